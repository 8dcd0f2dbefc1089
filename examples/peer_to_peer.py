"""Peer to peer: two workers that each listen and connect to the other at once.

Run it (both peers in one process, each on its own manager, so its own UCX worker)::

    python examples/peer_to_peer.py

A worker can listen and connect at the same time. When alice and bob each connect to
the other, each ends up with two endpoints for the other: the one it connected
("outgoing") and the one it accepted ("incoming"). Both carry messages both ways. The
peers say hello on their outgoing endpoints, answer on the endpoint each hello came in
on, then alice broadcasts to all her endpoints, so bob gets one copy on each of his.
"""

from __future__ import annotations

import asyncio

import ucxrpc
from ucxrpc.transport import Worker

HELLO, THANKS, NEWS = 1, 2, 3
#: Seconds to wait for each message.
TIMEOUT = 5.0


class Peer:
    """A named worker that listens and connects."""

    def __init__(self, name: str, manager: ucxrpc.Manager) -> None:
        self.name = name
        self.worker = Worker(manager=manager)
        self.port = 0
        self.outgoing = 0  # the endpoint this peer connected

    async def listen(self) -> None:
        self.port = await self.worker.listen("127.0.0.1", 0)

    async def connect(self, other: Peer) -> None:
        self.outgoing = await self.worker.connect("127.0.0.1", other.port)

    def describe(self, endpoint: int) -> str:
        kind = "outgoing" if endpoint == self.outgoing else "incoming"
        return f"endpoint {endpoint} ({kind}, {self.worker.peer(endpoint)})"

    async def greet_and_answer(self, other: Peer) -> None:
        """Say hello on the outgoing endpoint; answer the hello on the incoming one."""
        await self.worker.send_tag(self.outgoing, HELLO, f"hello from {self.name}")
        [incoming] = [ep for ep in self.worker.endpoint_ids() if ep != self.outgoing]
        hello = await self.worker.recv_tag(incoming, HELLO, timeout=TIMEOUT)
        print(f"{self.name} <- {hello.decode()!r} on {self.describe(incoming)}")
        await self.worker.send_tag(incoming, THANKS, f"{self.name} thanks {other.name}")
        thanks = await self.worker.recv_tag(self.outgoing, THANKS, timeout=TIMEOUT)
        print(f"{self.name} <- {thanks.decode()!r} on {self.describe(self.outgoing)}")


async def main() -> None:
    async with ucxrpc.Manager() as manager_a, ucxrpc.Manager() as manager_b:
        alice, bob = Peer("alice", manager_a), Peer("bob", manager_b)
        try:
            await asyncio.gather(alice.listen(), bob.listen())
            print(f"alice listens on port {alice.port}, bob on port {bob.port}")
            await asyncio.gather(alice.connect(bob), bob.connect(alice))  # at once
            for peer in (alice, bob):
                print(f"{peer.name} endpoints: {peer.worker.endpoint_ids()}")

            await asyncio.gather(alice.greet_and_answer(bob), bob.greet_and_answer(alice))

            results = await alice.worker.broadcast_tag(NEWS, "news for everyone")
            sent = {ep: "sent" if error is None else repr(error) for ep, error in results.items()}
            print(f"alice broadcast on tag {NEWS}: {sent}")
            for endpoint in bob.worker.endpoint_ids():
                copy = await bob.worker.recv_tag(endpoint, NEWS, timeout=TIMEOUT)
                print(f"bob <- {copy.decode()!r} on {bob.describe(endpoint)}")

            for peer in (alice, bob):
                stats = peer.worker.stats()
                print(
                    f"{peer.name} stats: sent {stats.messages_sent}, "
                    f"received {stats.messages_received}, connections {stats.connections}, "
                    f"errors {stats.errors}"
                )
        finally:
            await alice.worker.close_all()
            await bob.worker.close_all()


if __name__ == "__main__":
    ucxrpc.run(main())
