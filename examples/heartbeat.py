"""A connection monitor: heartbeats, fail-fast calls while the server is away, reconnection.

Run it (server and client in one process, each on its own manager)::

    python examples/heartbeat.py

The client sends a heartbeat every 0.2 s on its control connection and gives the server
0.5 s to answer (the design notes' "every 30 s with a 5 s timeout", shortened); a
server that goes silent is noticed within ``interval + timeout``, and a server that
closes the connection at once. Either way the client reconnects with growing delays
(0.1 s, 0.2 s, ... up to 1 s). While it reconnects, calls fail at once with
``Unavailable`` instead of waiting.

The script stops the server, shows a call failing fast, starts the server again on the
same port, waits for the client to reconnect and calls again.
"""

from __future__ import annotations

import asyncio
import time

import ucxrpc
from ucxrpc.liveness import KeepAlive, Reconnect

KEEPALIVE = KeepAlive(interval=0.2, timeout=0.5)
RECONNECT = Reconnect(initial=0.1, maximum=1.0)

server = ucxrpc.Server()


@server.rpc
async def ping() -> str:
    return "PONG"


@server.rpc
async def work(seconds: float) -> str:
    await asyncio.sleep(seconds)  # simulated work, longer than a heartbeat interval
    return "done"


async def call_ping(client: ucxrpc.Client, when: str) -> None:
    start = time.perf_counter()
    try:
        reply = await client.call("ping", timeout=2)
    except ucxrpc.Unavailable as exc:
        millis = (time.perf_counter() - start) * 1e3
        print(
            f"{when}: ping failed in {millis:.1f} ms with Unavailable "
            f"({type(exc).__name__}: {exc.message})"
        )
        return
    print(f"{when}: ping -> {reply}")


async def main() -> None:
    async with ucxrpc.Manager() as server_side, ucxrpc.Manager() as client_side:
        await server.start(server_side, "127.0.0.1", 0)
        port = server.port
        print(f"server listening on {server.address}")
        client = await client_side.connect(
            "127.0.0.1", port, keepalive=KEEPALIVE, reconnect=RECONNECT
        )
        try:
            print(
                f"client connected: heartbeat every {KEEPALIVE.interval} s, "
                f"answer within {KEEPALIVE.timeout} s"
            )
            await call_ping(client, "connected")
            reply = await client.call("work", 3 * KEEPALIVE.interval, timeout=5)
            print(f"a {3 * KEEPALIVE.interval:.1f} s call spanning 3 heartbeats -> {reply}")

            await server.stop()
            print("server stopped")
            await call_ping(client, "server down")  # fails once the loss is noticed
            await call_ping(client, "server down")  # the client is reconnecting: fails fast

            await server.start(server_side, "127.0.0.1", port)
            print(f"server started again on port {port}")
            await client.wait_connected(timeout=10)
            print(f"client reconnected; reconnects: {client.reconnects}")
            await call_ping(client, "reconnected")
        finally:
            await client.close()
            await server.stop(grace=1.0)


if __name__ == "__main__":
    ucxrpc.run(main())
