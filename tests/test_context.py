"""The call context: deadlines and cancellation that follow nested calls, over real UCX."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

import ucxrpc


@dataclass
class Hop:
    """What one service in a chain saw."""

    remaining: float | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Chain:
    a: Hop
    b: Hop
    c: Hop
    client: ucxrpc.Client


@pytest.fixture
async def chain(manager: ucxrpc.Manager) -> AsyncIterator[Chain]:
    """Three servers: A calls B, B calls C, C sleeps. Each records what it saw."""
    hops = Hop(), Hop(), Hop()
    servers = [ucxrpc.Server() for _ in range(3)]
    clients: list[ucxrpc.Client] = []

    def relay(hop: Hop, next_hop: int | None) -> object:
        async def handle(seconds: float) -> str:
            hop.remaining = ucxrpc.time_remaining()
            hop.entered.set()
            try:
                if next_hop is None:
                    await asyncio.sleep(seconds)
                    return "slept"
                return await clients[next_hop].call("handle", seconds)
            except asyncio.CancelledError:
                hop.cancelled.set()
                raise

        return handle

    for i, (server, hop) in enumerate(zip(servers, hops, strict=True)):
        server.add_handler(relay(hop, i if i < 2 else None), name="handle")  # type: ignore[arg-type]
        await server.start(manager)
    # clients[0] reaches B (used by A), clients[1] reaches C (used by B), clients[2] reaches A.
    for server in (servers[1], servers[2], servers[0]):
        clients.append(await manager.connect("127.0.0.1", server.port))
    yield Chain(*hops, client=clients[2])
    for client in clients:
        await client.close()
    for server in servers:
        await server.stop()


async def test_the_callers_timeout_cancels_every_hop(chain: Chain) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ucxrpc.DeadlineExceeded):
        await chain.client.call("handle", 30.0, timeout=0.5)
    assert time.perf_counter() - t0 < 1.5
    async with asyncio.timeout(5):
        await chain.b.cancelled.wait()
        await chain.c.cancelled.wait()
        await chain.a.cancelled.wait()
    # Each hop received what was left of the one budget, never more.
    assert chain.a.remaining is not None and chain.b.remaining is not None
    assert chain.c.remaining is not None
    assert 0.5 >= chain.a.remaining >= chain.b.remaining >= chain.c.remaining > 0.2


async def test_cancelling_the_caller_cancels_every_hop(chain: Chain) -> None:
    task = asyncio.create_task(chain.client.call("handle", 30.0))
    async with asyncio.timeout(5):
        await chain.c.entered.wait()
    assert chain.c.remaining is None  # no deadline anywhere
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(5):
        await chain.a.cancelled.wait()
        await chain.b.cancelled.wait()
        await chain.c.cancelled.wait()


async def test_a_nested_call_keeps_the_earlier_deadline(manager: ucxrpc.Manager) -> None:
    inner = ucxrpc.Server()

    @inner.rpc
    async def budget() -> float | None:
        return ucxrpc.time_remaining()

    await inner.start(manager)
    to_inner = await manager.connect("127.0.0.1", inner.port)
    outer = ucxrpc.Server()

    @outer.rpc
    async def ask(own_timeout: float | None) -> float | None:
        result: float | None = await to_inner.call("budget", timeout=own_timeout)
        return result

    await outer.start(manager)
    async with await manager.connect("127.0.0.1", outer.port) as client:
        left = await client.call("ask", None, timeout=2.0)
        assert left is not None and 1.0 < left <= 2.0  # inherited
        left = await client.call("ask", 0.5, timeout=2.0)
        assert left is not None and left <= 0.5  # its own, shorter timeout wins
        left = await client.call("ask", 10.0, timeout=2.0)
        assert left is not None and left <= 2.0  # a longer one cannot extend the budget
        assert await client.call("ask", None) is None
    await to_inner.close()
    await outer.stop()
    await inner.stop()


async def test_the_context_inside_handlers(manager: ucxrpc.Manager) -> None:
    assert ucxrpc.current_call() is None
    assert ucxrpc.current_deadline() is None and ucxrpc.time_remaining() is None
    server = ucxrpc.Server()

    @server.rpc
    async def whoami() -> dict[str, object]:
        call = ucxrpc.current_call()
        assert call is not None
        return {
            "method": call.method,
            "kind": call.kind,
            "side": call.side,
            "peer": call.peer,
            "metadata": dict(call.metadata),
            "priority": call.priority,
            "deadline_set": ucxrpc.current_deadline() is not None,
        }

    @server.rpc
    def in_a_thread() -> float | None:
        return ucxrpc.time_remaining()  # plain handlers run in a thread and see it too

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        seen = await client.call(
            "whoami", metadata={"trace": "abc"}, timeout=3.0, priority=ucxrpc.Priority.HIGH
        )
        assert seen["method"] == "whoami" and seen["kind"] == "unary"
        assert seen["side"] == "server" and seen["metadata"] == {"trace": "abc"}
        assert str(seen["peer"]).startswith("127.0.0.1:")
        assert seen["priority"] == ucxrpc.Priority.HIGH and seen["deadline_set"] is True
        left = await client.call("in_a_thread", timeout=3.0)
        assert left is not None and 2.0 < left <= 3.0
    await server.stop()
