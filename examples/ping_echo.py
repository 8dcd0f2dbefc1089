"""The ping/echo service, served and called over UCX.

Run both sides in one process::

    python examples/ping_echo.py

or in two terminals::

    python examples/ping_echo.py serve --port 50051
    python examples/ping_echo.py call --port 50051
"""

from __future__ import annotations

import argparse
import asyncio
import time

import ucxrpc

server = ucxrpc.Server()


@server.rpc
async def ping() -> str:
    return "PONG"


@server.rpc
async def echo(text: str) -> str:
    """``ECHO:x`` -> ``REPLY:x``; anything else -> ``RECEIVED:<text>``."""
    if text.startswith("ECHO:"):
        return "REPLY:" + text[5:]
    return "RECEIVED:" + text


@server.rpc
async def sleep(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "AWAKE"


async def call(manager: ucxrpc.Manager, port: int) -> None:
    async with await manager.connect("127.0.0.1", port) as client:
        print("ping ->", await client.call("ping"))
        print("echo('ECHO:hi') ->", await client.call("echo", "ECHO:hi"))
        print("echo('hi') ->", await client.call("echo", "hi"))

        rtts = []
        for _ in range(200):
            t = time.perf_counter()
            await client.call("ping")
            rtts.append((time.perf_counter() - t) * 1e6)
        rtts.sort()
        print(f"round trip: p50 {rtts[100]:.1f} us, min {rtts[0]:.1f} us")

        replies = await asyncio.gather(*(client.call("echo", f"ECHO:{i}") for i in range(100)))
        ok = sum(r == f"REPLY:{i}" for i, r in enumerate(replies))
        print(f"burst: {ok}/100 concurrent calls answered correctly")

        try:
            await client.call("sleep", 2.0, timeout=0.1)
        except ucxrpc.DeadlineExceeded as exc:
            print("timeout:", exc)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", nargs="?", choices=["both", "serve", "call"], default="both")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    async with ucxrpc.Manager() as manager:
        if args.role == "call":
            await call(manager, args.port)
            return
        await server.start(manager, "127.0.0.1", args.port)
        if args.role == "serve":
            print(f"serving on {server.address}", flush=True)
            await server.serve_forever()
        else:
            await call(manager, server.port)
            await server.stop(grace=1.0)


if __name__ == "__main__":
    ucxrpc.run(main())
