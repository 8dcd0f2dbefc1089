"""A client/server pair of raw workers with two-way traffic on several tags.

Run both sides in one process::

    python examples/worker_pair.py

or in two terminals::

    python examples/worker_pair.py serve --port 13338     # prints READY <port>
    python examples/worker_pair.py client 127.0.0.1:13338

The tags:

* ``HELLO`` (1): the client says hello; the server answers on the same tag, then sends
  two ``NEWS`` messages (4) of its own accord;
* ``DATA`` (2): the client sends chunks of several sizes (one large enough to travel
  out of band) all at once; the server acknowledges each on the same tag;
* ``BYE`` (3): the client is done; the server answers with what it received.

Each side then prints its ``stats()``. The server serves any number of clients until
SIGINT or SIGTERM (with no arguments: until the one client is done) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from dataclasses import dataclass

import ucxrpc
from ucxrpc.transport import Message, Worker

HELLO, DATA, BYE, NEWS = 1, 2, 3, 4
#: The chunks the client sends: small ones inline, the 100,000-byte one out of band.
CHUNK_SIZES = [64, 1024, 16 * 1024, 100_000, 3]
#: Seconds to wait for each message.
TIMEOUT = 5.0


@dataclass
class Tally:
    """What the server has received from one client."""

    chunks: int = 0
    size: int = 0


async def handle(worker: Worker, endpoint: int, message: Message, tally: Tally) -> bool:
    """Answer one message; True when the client said bye."""
    if message.tag == HELLO:
        await worker.send_tag(endpoint, HELLO, f"welcome, {message.as_text()}")
        for i in (1, 2):
            await worker.send_tag(endpoint, NEWS, f"news {i} of 2")
    elif message.tag == DATA:
        tally.chunks += 1
        tally.size += len(message.data)
        await worker.send_tag(endpoint, DATA, f"ack {tally.chunks}: {len(message.data)} bytes")
    elif message.tag == BYE:
        await worker.send_tag(endpoint, BYE, f"got {tally.chunks} chunks, {tally.size} bytes")
        return True
    return False


async def serve(worker: Worker, stop: asyncio.Event, clients: int | None) -> None:
    """Answer every client until ``stop`` is set (or ``clients`` have said bye)."""
    tallies: dict[int, Tally] = {}
    done = 0
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while clients is None or done < clients:
            receiving = asyncio.ensure_future(worker.next_message())
            await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not receiving.done():
                receiving.cancel()
                await asyncio.wait({receiving})
                break
            endpoint, message = receiving.result()
            tally = tallies.setdefault(endpoint, Tally())
            try:
                said_bye = await handle(worker, endpoint, message, tally)
            except ucxrpc.RpcError as exc:  # that client is gone: serve the others
                print(f"server: endpoint {endpoint}: {exc.message}", flush=True)
                continue
            if said_bye:
                done += 1
                print(
                    f"server: endpoint {endpoint} said bye after {tally.chunks} chunks "
                    f"({tally.size} bytes); stats so far:",
                    flush=True,
                )
                print(indent(worker.stats().summary()), flush=True)
    finally:
        stopping.cancel()
        await asyncio.wait({stopping})
    print(f"server: stopping; clients served: {done}", flush=True)


async def client(worker: Worker, host: str, port: int) -> None:
    endpoint = await worker.connect(host, port)
    print(f"client: connected to {worker.peer(endpoint)}")

    async def receive(tag: int) -> str:
        return (await worker.recv_tag(endpoint, tag, timeout=TIMEOUT)).decode()

    await worker.send_tag(endpoint, HELLO, "client")
    print(f"client: HELLO -> {await receive(HELLO)}")
    for _ in range(2):
        print(f"client: NEWS <- {await receive(NEWS)}")

    await asyncio.gather(*(worker.send_tag(endpoint, DATA, bytes(n)) for n in CHUNK_SIZES))
    for _ in CHUNK_SIZES:
        print(f"client: DATA -> {await receive(DATA)}")

    await worker.send_tag(endpoint, BYE, "bye")
    print(f"client: BYE -> {await receive(BYE)}")
    print("client: stats:")
    print(indent(worker.stats().summary()))


def indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


async def run_server(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with ucxrpc.Manager() as manager:
            worker = Worker(manager=manager)
            try:
                print(f"READY {await worker.listen('127.0.0.1', port)}", flush=True)
                await serve(worker, stop, None)
            finally:
                await worker.close_all()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_client(address: str) -> int:
    host, _, port = address.rpartition(":")
    async with ucxrpc.Manager() as manager:
        worker = Worker(manager=manager)
        try:
            await client(worker, host, int(port))
        except ucxrpc.RpcError as exc:
            print(f"client: error: {type(exc).__name__}: {exc.message}")
            return 1
        finally:
            await worker.close_all()
    return 0


async def run_both() -> int:
    async with ucxrpc.Manager() as server_side, ucxrpc.Manager() as client_side:
        server_worker, client_worker = Worker(manager=server_side), Worker(manager=client_side)
        try:
            port = await server_worker.listen("127.0.0.1", 0)
            serving = asyncio.ensure_future(serve(server_worker, asyncio.Event(), clients=1))
            try:
                await client(client_worker, "127.0.0.1", port)
                await serving  # it ends once the one client has said bye
            except ucxrpc.RpcError as exc:
                print(f"client: error: {type(exc).__name__}: {exc.message}")
                return 1
            finally:
                serving.cancel()
                await asyncio.wait({serving})
        finally:
            await client_worker.close_all()
            await server_worker.close_all()
    return 0


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    roles = parser.add_subparsers(dest="role")
    serve_parser = roles.add_parser("serve", help="serve until SIGINT/SIGTERM")
    serve_parser.add_argument("--port", type=int, default=0, help="0: pick a free port")
    client_parser = roles.add_parser("client", help="talk to a server")
    client_parser.add_argument("address", help="the server's HOST:PORT")
    args = parser.parse_args()
    if args.role == "serve":
        await run_server(args.port)
        return 0
    if args.role == "client":
        return await run_client(args.address)
    return await run_both()


if __name__ == "__main__":
    raise SystemExit(ucxrpc.run(main()))
