"""One deadline across a chain of services: client -> A -> B -> C.

Run it (three servers and the client in one process)::

    python examples/nested_deadline.py

The client calls A with ``timeout=0.3``. A calls B and B calls C without passing any
timeout: a call made inside a handler inherits the deadline of the call being
handled. C is slow; when the deadline passes, the client gets ``DeadlineExceeded``
and the handlers of A, B and C are all cancelled, instead of C working on for an
answer nobody waits for.
"""

from __future__ import annotations

import asyncio

import ucxrpc


class Hop:
    """One service of the chain: passes the call on to the next one, if any."""

    def __init__(self, name: str, downstream: ucxrpc.Client | None) -> None:
        self.name = name
        self.downstream = downstream
        self.cancelled = asyncio.Event()
        self.cancelled_at = 0.0

    async def relay(self, path: str) -> str:
        left = ucxrpc.time_remaining()
        shown = "None" if left is None else f"{left * 1e3:.1f} ms"
        print(f"{self.name}: entered, time_remaining() = {shown}")
        path += self.name
        try:
            if self.downstream is None:
                await asyncio.sleep(5.0)  # the slow part, far past the deadline
                return path
            # No timeout given: the call inherits this handler's deadline.
            result: str = await self.downstream.call("relay", path)
            return result
        except asyncio.CancelledError:
            self.cancelled_at = asyncio.get_running_loop().time()
            self.cancelled.set()
            raise


async def main() -> None:
    async with ucxrpc.Manager() as manager:
        servers: list[ucxrpc.Server] = []
        clients: list[ucxrpc.Client] = []
        hops: list[Hop] = []
        downstream: ucxrpc.Client | None = None
        for name in ("C", "B", "A"):  # start the end of the chain first
            hop = Hop(name, downstream)
            server = ucxrpc.Server()
            server.add_handler(hop.relay, name="relay")
            await server.start(manager, "127.0.0.1", 0)
            downstream = await manager.connect("127.0.0.1", server.port)
            servers.append(server)
            clients.append(downstream)
            hops.insert(0, hop)
        assert downstream is not None
        client = downstream  # connected to A

        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            print("client: got", await client.call("relay", "", timeout=0.3))
        except ucxrpc.DeadlineExceeded:
            print(f"client: DeadlineExceeded after {loop.time() - start:.2f} s")

        # Each handler sets its event when it sees CancelledError; wait for all three.
        await asyncio.wait_for(asyncio.gather(*(h.cancelled.wait() for h in hops)), 5.0)
        for hop in hops:
            elapsed = hop.cancelled_at - start
            print(f"{hop.name}: saw CancelledError {elapsed:.2f} s after the call started")

        for c in reversed(clients):
            await c.close()
        for server in reversed(servers):
            await server.stop(grace=1.0)


if __name__ == "__main__":
    ucxrpc.run(main())
