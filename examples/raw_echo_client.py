"""A client of ``raw_echo_server.py`` on the raw tag-messaging layer, with round-trip times.

Start the server, then run the client with the port it printed::

    python examples/raw_echo_server.py --port 13337
    python examples/raw_echo_client.py 127.0.0.1:13337

It sends ``PING``, ``ECHO:hello`` and ``status?`` (each on its own tag: the server
answers on the tag a message came on) and prints each reply with its round-trip time,
then times ``--rounds`` more PING/PONG exchanges and prints the worker's statistics.
It exits 1 with the error if the server cannot be reached or does not answer.
"""

from __future__ import annotations

import argparse
import sys
import time

import ucxrpc
from ucxrpc.transport import Message, Worker, WorkerConfig

#: The three requests, each on its own tag.
REQUESTS = [Message.text(1, "PING"), Message.text(2, "ECHO:hello"), Message.text(3, "status?")]
#: Seconds to wait for each reply.
TIMEOUT = 5.0


# --8<-- [start:pingpong]
async def round_trip(worker: Worker, endpoint: int, message: Message) -> tuple[str, float]:
    """Send ``message`` and wait for the reply on its tag: (reply, microseconds)."""
    start = time.perf_counter()
    await worker.send_tag(endpoint, message.tag, message.data)
    reply = await worker.recv_tag(endpoint, message.tag, timeout=TIMEOUT)
    return reply.decode(errors="replace"), (time.perf_counter() - start) * 1e6


async def talk(worker: Worker, host: str, port: int, rounds: int) -> None:
    endpoint = await worker.connect(host, port)
    print(f"connected to {worker.peer(endpoint)} (endpoint {endpoint})")
    for message in REQUESTS:
        reply, micros = await round_trip(worker, endpoint, message)
        print(f"{message.as_text()} -> {reply} in {micros:.1f} us")

    if rounds > 0:  # the design notes' ping-pong with round-trip timing
        times = []
        for _ in range(rounds):
            reply, micros = await round_trip(worker, endpoint, REQUESTS[0])
            if reply != "PONG":
                raise ucxrpc.ProtocolError(f"expected PONG, got {reply!r}")
            times.append(micros)
        times.sort()
        print(
            f"ping-pong x{rounds}: min {times[0]:.1f} us, "
            f"p50 {times[len(times) // 2]:.1f} us, max {times[-1]:.1f} us"
        )
    print(worker.stats().summary())


# --8<-- [end:pingpong]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address", help="the server's HOST:PORT")
    parser.add_argument("--rounds", type=int, default=100, help="timed PING/PONG exchanges")
    args = parser.parse_args()
    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"expected HOST:PORT, got {args.address!r}")

    async with ucxrpc.Manager() as manager:
        worker = Worker(WorkerConfig(), manager=manager)
        try:
            await talk(worker, host, int(port), args.rounds)
        except ucxrpc.RpcError as exc:
            print(f"error: {type(exc).__name__}: {exc.message}")
            return 1
        finally:
            await worker.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(ucxrpc.run(main()))
