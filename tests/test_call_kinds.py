"""The four call kinds over real UCX: unary, server streaming, client streaming and
bidirectional, through client.call, client.stream and typed stubs."""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import until
from pydantic import BaseModel

import ucxrpc

pytestmark = pytest.mark.timeout(60)


class Chunk(BaseModel):
    n: int


class KindsApi(ucxrpc.Service, name="kinds.v1"):
    @ucxrpc.rpc
    @abstractmethod
    async def total(self, chunks: AsyncIterator[Chunk]) -> int: ...

    @ucxrpc.rpc
    @abstractmethod
    def doubled(self, numbers: AsyncIterator[int]) -> AsyncIterator[int]: ...


class KindsImpl(KindsApi):
    async def total(self, chunks: AsyncIterator[Chunk]) -> int:
        return sum([c.n async for c in chunks])

    async def doubled(self, numbers: AsyncIterator[int]) -> AsyncIterator[int]:
        async for n in numbers:
            yield 2 * n


class Probe:
    """What the handlers saw, for the tests to check."""

    def __init__(self) -> None:
        self.taken = 0
        self.cancelled = asyncio.Event()
        self.entered = asyncio.Event()


def kinds_server(probe: Probe) -> ucxrpc.Server:
    server = ucxrpc.Server()
    server.add_service(KindsImpl())

    @server.rpc
    async def square(x: int) -> int:
        return x * x

    @server.rpc
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @server.rpc
    async def sizes(blobs: AsyncIterator[bytes], scale: int = 1) -> list[int]:
        return [scale * len(b) async for b in blobs]

    @server.rpc
    async def slow_total(numbers: AsyncIterator[int]) -> int:
        total = 0
        async for n in numbers:
            probe.taken += 1
            total += n
            await asyncio.sleep(0.001)
        return total

    @server.rpc
    async def chat(messages: AsyncIterator[str]) -> AsyncIterator[str]:
        async for m in messages:
            yield m.upper()
        yield "bye"  # after the caller half-closed

    @server.rpc
    async def first_only(numbers: AsyncIterator[int]) -> int:
        async for n in numbers:
            return n
        return -1

    @server.rpc
    async def hang(numbers: AsyncIterator[int]) -> int:
        probe.entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise
        return 0

    return server


@pytest.fixture
async def kinds(manager: ucxrpc.Manager) -> Any:
    probe = Probe()
    server = kinds_server(probe)
    await server.start(manager)
    client = await manager.connect("127.0.0.1", server.port)
    yield server, client, probe
    await client.close()
    await server.stop()


async def agen(items: list[Any], delay: float = 0.0) -> AsyncIterator[Any]:
    for item in items:
        if delay:
            await asyncio.sleep(delay)
        yield item


async def test_unary_and_server_streaming(kinds: Any) -> None:
    _, client, _ = kinds
    assert await client.call("square", 7) == 49
    assert [x async for x in client.stream("count", 5)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n", [0, 1, 200])
async def test_client_streaming_with_call(kinds: Any, n: int) -> None:
    _, client, _ = kinds
    blobs = [bytes([i % 256]) * (i * 997 % 70_000) for i in range(n)]
    assert await client.call("sizes", agen(blobs)) == [len(b) for b in blobs]
    assert await client.call("sizes", agen(blobs), scale=2) == [2 * len(b) for b in blobs]
    assert await client.call("sizes", blobs=agen(blobs)) == [len(b) for b in blobs]


async def test_bidirectional_with_half_close(kinds: Any) -> None:
    _, client, _ = kinds
    got = [x async for x in client.stream("chat", agen(["a", "b", "c"]))]
    assert got == ["A", "B", "C", "bye"]


async def test_typed_stubs_for_client_and_bidirectional_streams(kinds: Any) -> None:
    _, client, _ = kinds
    stub = client.stub(KindsApi)
    assert await stub.total(agen([Chunk(n=i) for i in range(10)])) == 45
    assert [x async for x in stub.doubled(agen(list(range(5))))] == [0, 2, 4, 6, 8]


async def test_items_are_validated_into_the_declared_type(kinds: Any) -> None:
    _, client, _ = kinds
    with pytest.raises(ucxrpc.InvalidArgument, match="n"):
        await client.call("kinds.v1.total", agen([{"n": 1}, {"n": "x"}]))


async def test_the_producer_is_paced_by_the_consumer(kinds: Any, manager: ucxrpc.Manager) -> None:
    _, client, probe = kinds
    window = manager.config.stream_window
    sent = 0

    async def numbers() -> AsyncIterator[int]:
        nonlocal sent
        for i in range(2000):
            # Never more than a window (plus the half-window in a credit) ahead.
            assert sent - probe.taken <= window + window // 2 + 1, (sent, probe.taken)
            sent += 1
            yield i

    assert await client.call("slow_total", numbers(), timeout=30) == sum(range(2000))


async def test_a_handler_that_stops_reading_ends_the_call(kinds: Any) -> None:
    _, client, _ = kinds

    async def endless() -> AsyncIterator[int]:
        i = 0
        while True:
            i += 1
            yield i

    assert await client.call("first_only", endless(), timeout=10) == 1
    assert await client.call("square", 3) == 9


async def test_the_deadline_covers_the_whole_client_stream(kinds: Any) -> None:
    _, client, _ = kinds
    with pytest.raises(ucxrpc.DeadlineExceeded):
        await client.call("slow_total", agen(list(range(100)), delay=0.05), timeout=0.3)


async def test_cancelling_the_caller_cancels_the_handler(kinds: Any) -> None:
    server, client, probe = kinds
    task = asyncio.ensure_future(client.call("hang", agen([1, 2, 3])))
    await asyncio.wait_for(probe.entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(probe.cancelled.wait(), 5)
    await until(lambda: server.inflight == 0)


async def test_a_source_that_raises_fails_the_call_and_cancels_the_handler(kinds: Any) -> None:
    server, client, probe = kinds

    async def broken() -> AsyncIterator[int]:
        yield 1
        await probe.entered.wait()
        raise ValueError("the source broke")

    with pytest.raises(ValueError, match="the source broke"):
        await client.call("hang", broken())
    await asyncio.wait_for(probe.cancelled.wait(), 5)
    await until(lambda: server.inflight == 0)


async def test_calling_with_the_wrong_kind_is_a_clear_error(kinds: Any) -> None:
    _, client, _ = kinds
    with pytest.raises(ucxrpc.InvalidArgument, match="pass an async iterable"):
        await client.call("sizes", [b"x"])
    with pytest.raises(ucxrpc.InvalidArgument, match="takes no stream"):
        await client.call("square", agen([1]))
    with pytest.raises(ucxrpc.InvalidArgument, match=r"client\.stream"):
        await client.call("chat", agen(["a"]))
    with pytest.raises(ucxrpc.InvalidArgument, match="at most one stream"):
        await client.call("sizes", agen([b""]), scale=agen([1]))


async def test_reflection_shows_each_kind(kinds: Any) -> None:
    _, client, _ = kinds
    methods = {m.name: m.kind for m in (await client.describe()).methods}
    assert methods["square"] == "unary"
    assert methods["count"] == "stream"
    assert methods["sizes"] == "client_stream"
    assert methods["chat"] == "bidi"
    assert methods["kinds.v1.total"] == "client_stream"
    assert methods["kinds.v1.doubled"] == "bidi"
