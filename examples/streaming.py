"""Server streaming: async-generator handlers, consumed with ``async for``.

Run it (server and client in one process)::

    python examples/streaming.py

Shows a streaming method of a service interface (iterated through a typed stub), a
streaming function registered with ``@server.rpc``, what leaving the loop early does
to the generator on the server, and a stream cut short by its deadline.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import AsyncIterator

import ucxrpc

#: Items the server may send ahead of the consumer (flow control), kept small here.
WINDOW = 8


class Probe:
    """Records how a server-side generator ended, for the client side to report."""

    def __init__(self) -> None:
        self.outcome = ""
        self.produced = 0
        self.ended = asyncio.Event()

    def end(self, outcome: str, produced: int) -> None:
        self.outcome, self.produced = outcome, produced
        self.ended.set()

    async def wait(self) -> str:
        await asyncio.wait_for(self.ended.wait(), 5.0)
        self.ended.clear()
        return f"{self.outcome} after {self.produced} items"


class CounterApi(ucxrpc.Service, name="counter.v1"):
    """Streaming methods are declared with ``def``: calling one returns the iterator."""

    @ucxrpc.rpc
    @abstractmethod
    def count(self, n: int) -> AsyncIterator[int]:
        """0, 1, ..., n - 1."""

    @ucxrpc.rpc
    @abstractmethod
    def naturals(self) -> AsyncIterator[int]:
        """0, 1, 2, ... without end."""


class Counter(CounterApi):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        self.probe.end("ran to the end", n)

    async def naturals(self) -> AsyncIterator[int]:
        i = 0
        outcome = "ran to the end"
        try:
            while True:
                yield i
                i += 1
        except GeneratorExit:  # closed at a ``yield``: the consumer went away
            outcome = "closed early"
            raise
        finally:
            self.probe.end(outcome, i)


async def main() -> None:
    probe = Probe()
    lines: asyncio.Queue[str] = asyncio.Queue()

    server = ucxrpc.Server()
    server.add_service(Counter(probe))

    @server.rpc
    async def tail() -> AsyncIterator[str]:
        """Log lines as they come, like ``tail -f``: the stream never ends by itself."""
        sent = 0
        try:
            while True:
                yield await lines.get()
                sent += 1
        except asyncio.CancelledError:
            probe.end("cancelled", sent)
            raise

    async with ucxrpc.Manager(stream_window=WINDOW) as manager:
        await server.start(manager, "127.0.0.1", 0)
        client = await manager.connect("127.0.0.1", server.port)

        # 1. The whole stream, by name.
        items = [n async for n in client.stream("counter.v1.count", 5)]
        print(f"count(5) by name -> {items}; server: {await probe.wait()}")

        # 2. The same method through the typed stub: items are validated as ints.
        stub = client.stub(CounterApi)
        total = 0
        async for n in stub.count(100):
            total += n
        print(f"sum of count(100) via the stub -> {total}; server: {await probe.wait()}")

        # 3. Leaving the loop early cancels the generator on the server. The server ran
        # ahead of the consumer by at most the stream window.
        taken = []
        async for n in client.stream("counter.v1.naturals"):
            taken.append(n)
            if len(taken) == 3:
                break
        print(f"naturals(): break after {taken}")
        print(f"  server generator {await probe.wait()} (window {WINDOW})")

        # The break above works because the loop held the only reference to the stream.
        # To keep the stream in a variable, use it as a context manager (or aclose() it).
        async with client.stream("counter.v1.naturals") as numbers:
            async for n in numbers:
                if n == 1:
                    break
        print("naturals() in 'async with': break at 1")
        print(f"  server generator {await probe.wait()}")

        # 4. A deadline covers the whole stream.
        for text in ("boot", "ready", "serving"):
            lines.put_nowait(text)
        received = []
        try:
            async for line in client.stream("tail", timeout=0.3):
                received.append(line)
        except ucxrpc.DeadlineExceeded as exc:
            print(f"tail(timeout=0.3): got {received}, then {type(exc).__name__}")
        print(f"  server generator {await probe.wait()}")

        await client.close()
        await server.stop(grace=1.0)


if __name__ == "__main__":
    ucxrpc.run(main())
