"""Batches over real UCX: order kept, an error per failing item, bounded concurrency."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import ucxrpc
from ucxrpc.batch import BatchCall, call_many, split_results
from ucxrpc.pool import ClientPool


class Gauge:
    """Counts the calls running on the server and remembers the most at once."""

    def __init__(self, until_full: int) -> None:
        self.active = 0
        self.peak = 0
        self.until_full = until_full
        self.full = asyncio.Event()

    async def enter(self) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        if self.active >= self.until_full:
            self.full.set()
        # The first calls wait for their peers, so the bound is reached, not just
        # respected; if fewer than until_full calls could ever be in flight at once,
        # this times out and the item fails.
        async with asyncio.timeout(10):
            await self.full.wait()

    def leave(self) -> None:
        self.active -= 1


def make_server(gauge: Gauge) -> ucxrpc.Server:
    server = ucxrpc.Server()

    @server.rpc
    async def square(n: int) -> int:
        await gauge.enter()
        try:
            if n % 7 == 3:
                raise ucxrpc.InvalidArgument(f"{n} is unlucky")
            return n * n
        finally:
            gauge.leave()

    @server.rpc
    async def scale(n: int, factor: int = 1) -> int:
        return n * factor

    @server.rpc
    async def sleep(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "AWAKE"

    return server


async def test_results_in_order_with_errors_in_their_slots(manager: ucxrpc.Manager) -> None:
    gauge = Gauge(until_full=16)
    server = make_server(gauge)
    await server.start(manager, "127.0.0.1", 0)
    async with await manager.connect("127.0.0.1", server.port) as client:
        async with asyncio.timeout(30):
            results = await call_many(client, [("square", n) for n in range(500)], concurrency=16)
    await server.stop()
    assert len(results) == 500
    for n, value in enumerate(results):
        if n % 7 == 3:
            assert isinstance(value, ucxrpc.InvalidArgument), (n, value)
            assert value.message == f"{n} is unlucky"
        else:
            assert value == n * n, (n, value)
    assert gauge.peak == 16  # reached, never exceeded
    ok, failed = split_results(results)
    assert sorted(failed) == [n for n in range(500) if n % 7 == 3]
    assert len(ok) + len(failed) == 500 and ok[12] == 144


async def test_batch_call_objects_and_keyword_arguments(manager: ucxrpc.Manager) -> None:
    server = make_server(Gauge(until_full=1))
    await server.start(manager, "127.0.0.1", 0)
    async with await manager.connect("127.0.0.1", server.port) as client:
        calls: list[BatchCall | tuple[Any, ...]] = [
            BatchCall("scale", (3,), {"factor": 5}),
            ("scale", 4),
            BatchCall("no_such_method"),
            ("scale", "not a number"),
        ]
        results = await call_many(client, calls, concurrency=2)
        assert results[:2] == [15, 4]
        assert isinstance(results[2], ucxrpc.MethodNotFound)
        assert isinstance(results[3], ucxrpc.InvalidArgument)
        assert await call_many(client, []) == []
        with pytest.raises(TypeError, match="a batch item must be"):
            await call_many(client, [["scale", 1]])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="concurrency"):
            await call_many(client, [("scale", 1)], concurrency=0)
    await server.stop()


async def test_the_timeout_covers_the_whole_batch(manager: ucxrpc.Manager) -> None:
    server = make_server(Gauge(until_full=1))
    await server.start(manager, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    async with await manager.connect("127.0.0.1", server.port) as client:
        start = loop.time()
        # One at a time: the first sleeps past the batch's deadline, the rest never start.
        results = await call_many(
            client, [("sleep", 0.0), ("sleep", 5.0), ("sleep", 0.0)], concurrency=1, timeout=0.3
        )
        assert loop.time() - start < 3.0
        assert results[0] == "AWAKE"
        assert isinstance(results[1], ucxrpc.DeadlineExceeded)
        assert isinstance(results[2], ucxrpc.DeadlineExceeded)
        assert "was not sent" in results[2].message
    await server.stop()


async def test_a_pool_spreads_a_batch_over_connections(manager: ucxrpc.Manager) -> None:
    gauge = Gauge(until_full=3)
    server = make_server(gauge)
    await server.start(manager, "127.0.0.1", 0)
    async with ClientPool(manager, "127.0.0.1", server.port, max_connections=3) as pool:
        results = await call_many(pool, [("square", n) for n in range(100)], concurrency=8)
        assert [r for n, r in enumerate(results) if n % 7 != 3] == [
            n * n for n in range(100) if n % 7 != 3
        ]
        assert pool.size == 3
        assert gauge.peak == 3  # one call per borrowed connection
    await server.stop()


async def test_send_many_reports_per_message_results_in_order(manager: ucxrpc.Manager) -> None:
    from ucxrpc.batch import send_many
    from ucxrpc.transport import Worker

    receiver, sender = Worker(manager=manager), Worker(manager=manager)
    port = await receiver.listen()
    ep = await sender.connect("127.0.0.1", port)
    messages: list[tuple[int, int, bytes]] = [(ep, 1, bytes([i])) for i in range(200)]
    messages[50] = (999, 1, b"nowhere")  # an unknown endpoint fails only its own slot
    results = await send_many(sender, messages, concurrency=16)
    assert isinstance(results[50], ucxrpc.InvalidArgument)
    assert all(r is None for i, r in enumerate(results) if i != 50)
    got = [await receiver.recv_tag(1, 1, timeout=5) for _ in range(199)]
    assert got == [bytes([i]) for i in range(200) if i != 50]
    await sender.close_all()
    await receiver.close_all()
