"""Server streaming over real UCX: order, flow control, cancellation, deadlines, errors."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import until

import ucxrpc
from ucxrpc.codec import Kind
from ucxrpc.wire import codec


class Producer:
    """Streaming handlers that record what they produced and how they ended."""

    def __init__(self) -> None:
        self.produced = 0
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def _end(self, how: str) -> None:
        if not self.ended.done():
            self.ended.set_result(how)

    async def count(self, n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                self.produced += 1
                yield i
        except asyncio.CancelledError:
            self._end("cancelled")
            raise
        except GeneratorExit:
            self._end("closed")
            raise
        else:
            self._end("finished")

    async def forever(self, period: float) -> AsyncIterator[int]:
        async for i in self.count(1 << 62):
            await asyncio.sleep(period)
            yield i


@pytest.fixture
async def streaming(
    manager: ucxrpc.Manager,
) -> AsyncIterator[tuple[ucxrpc.Server, ucxrpc.Client, Producer]]:
    producer = Producer()
    server = ucxrpc.Server()
    server.add_handler(producer.count, name="count")
    server.add_handler(producer.forever, name="forever")

    @server.rpc
    async def chunks(n: int, size: int) -> AsyncIterator[bytes]:
        for i in range(n):
            yield bytes([i % 256]) * size

    @server.rpc
    async def fails_after(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise ucxrpc.RpcError(ucxrpc.StatusCode.DATA_LOSS, "the source broke", {"at": n})

    @server.rpc
    async def tagged(n: int) -> AsyncIterator[int]:
        call = ucxrpc.current_call()
        assert call is not None
        call.response_metadata["seen"] = str(call.metadata.get("who", ""))
        for i in range(n):
            yield i

    @server.rpc
    async def unary() -> int:
        return 1

    await server.start(manager)
    client = await manager.connect("127.0.0.1", server.port)
    yield server, client, producer
    await client.close()
    await server.stop(grace=1.0)


Streaming = tuple[ucxrpc.Server, ucxrpc.Client, Producer]


def _server_streams(server: ucxrpc.Server) -> int:
    return sum(len(c.credits) for c in server._conns)


async def test_items_arrive_in_order_then_the_stream_ends(streaming: Streaming) -> None:
    server, client, producer = streaming
    assert [x async for x in client.stream("count", 500)] == list(range(500))
    assert await producer.ended == "finished"
    assert client.pending == 0
    await until(lambda: _server_streams(server) == 0)


async def test_large_items_travel_out_of_band_in_order(streaming: Streaming) -> None:
    _, client, _ = streaming
    size = 300 * 1024  # above the part threshold: each item is a frame plus a data part
    got = [bytes(x) async for x in client.stream("chunks", 40, size)]
    assert [len(x) for x in got] == [size] * 40
    assert [x[0] for x in got] == list(range(40))
    assert all(x == x[:1] * size for x in got)


async def test_slow_consumer_slows_the_producer(streaming: Streaming) -> None:
    server, client, producer = streaming
    window = client._window
    total = 100_000
    consumed = 0
    worst_ahead = 0
    worst_buffered = 0
    stream = client.stream("count", total, timeout=120)
    async with stream:
        async for i in stream:
            assert i == consumed
            consumed += 1
            worst_ahead = max(worst_ahead, producer.produced - consumed)
            worst_buffered = max(worst_buffered, stream.buffered)
            if consumed % 25_000 == 0:
                # A consumer that stops for a while: the producer must stop too.
                before = producer.produced
                await asyncio.sleep(0.2)
                assert producer.produced - before <= window
                assert producer.produced - consumed <= window + 1
    assert consumed == total
    assert worst_ahead <= window + 1
    assert worst_buffered <= window
    await until(lambda: _server_streams(server) == 0)


async def test_breaking_out_of_the_loop_cancels_the_generator(streaming: Streaming) -> None:
    server, client, producer = streaming
    async for i in client.stream("count", 1_000_000):
        if i == 10:
            break
    assert await asyncio.wait_for(producer.ended, 5) in ("cancelled", "closed")
    assert producer.produced < 1_000
    assert client.pending == 0
    await until(lambda: _server_streams(server) == 0 and server.inflight == 0)


async def test_aclose_and_async_with_cancel_the_generator(streaming: Streaming) -> None:
    server, client, producer = streaming
    async with client.stream("forever", 0.001) as stream:
        assert await anext(stream) == 0
    assert await asyncio.wait_for(producer.ended, 5) in ("cancelled", "closed")
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    await until(lambda: server.inflight == 0)


async def test_cancelling_the_consumer_cancels_the_generator(streaming: Streaming) -> None:
    server, client, producer = streaming
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in client.stream("forever", 0.001):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.wait_for(producer.ended, 5) in ("cancelled", "closed")
    await until(lambda: server.inflight == 0 and client.pending == 0)


async def test_the_deadline_covers_the_whole_stream(streaming: Streaming) -> None:
    server, client, producer = streaming
    got: list[int] = []
    t0 = time.perf_counter()
    with pytest.raises(ucxrpc.DeadlineExceeded):
        async for i in client.stream("forever", 0.01, timeout=0.3):
            got.append(i)
    elapsed = time.perf_counter() - t0
    assert 0.25 < elapsed < 2.0
    assert len(got) >= 3 and got == list(range(len(got)))
    assert await asyncio.wait_for(producer.ended, 5) in ("cancelled", "closed")
    await until(lambda: server.inflight == 0 and client.pending == 0)


async def test_an_error_ends_the_stream_after_the_items_before_it(streaming: Streaming) -> None:
    _, client, _ = streaming
    got: list[int] = []
    with pytest.raises(ucxrpc.RpcError) as info:
        async for i in client.stream("fails_after", 3):
            got.append(i)
    assert got == [0, 1, 2]
    assert info.value.code is ucxrpc.StatusCode.DATA_LOSS
    assert info.value.details == {"at": 3}


async def test_kind_mismatches_and_unknown_streams(streaming: Streaming) -> None:
    _, client, _ = streaming
    with pytest.raises(ucxrpc.InvalidArgument, match=r"streams its results.*client\.stream"):
        await client.call("count", 3)
    with pytest.raises(ucxrpc.InvalidArgument, match=r"returns one result.*client\.call"):
        async for _ in client.stream("unary"):
            pass
    with pytest.raises(ucxrpc.MethodNotFound):
        async for _ in client.stream("nope"):
            pass
    with pytest.raises(ucxrpc.InvalidArgument, match="n: Input should be a valid integer"):
        async for _ in client.stream("count", "many"):
            pass
    assert client.pending == 0


async def test_metadata_both_ways_on_a_stream(streaming: Streaming) -> None:
    _, client, _ = streaming
    async with client.stream("tagged", 2, metadata={"who": "alice"}) as stream:
        assert [x async for x in stream] == [0, 1]
    assert stream.metadata == {"seen": "alice"}


async def test_a_malformed_credit_ends_the_stream_with_a_protocol_error(
    streaming: Streaming,
) -> None:
    server, client, producer = streaming
    stream = client.stream("forever", 0.001)
    assert await anext(stream) == 0
    call = stream._call
    assert call is not None
    client.link.send(call.call_id, codec.encode(Kind.CREDIT, call.call_id, "lots"))
    with pytest.raises(ucxrpc.ProtocolError, match="malformed CREDIT"):
        async for _ in stream:
            pass
    assert await asyncio.wait_for(producer.ended, 5) in ("cancelled", "closed")
    await until(lambda: server.inflight == 0)
    assert [x async for x in client.stream("count", 3)] == [0, 1, 2]


async def test_many_streams_at_once_on_one_connection(streaming: Streaming) -> None:
    _, client, _ = streaming

    async def collect(n: int) -> list[int]:
        return [x async for x in client.stream("count", n)]

    results = await asyncio.gather(*(collect(200 + i) for i in range(20)))
    assert [len(r) for r in results] == [200 + i for i in range(20)]
    assert all(r == list(range(len(r))) for r in results)


async def test_server_killed_mid_stream_fails_the_stream_promptly(spawn: Any) -> None:
    proc = spawn("serve.py")
    (port,) = proc.read_ready()
    async with ucxrpc.Manager() as manager:
        client = await manager.connect("127.0.0.1", int(port))
        stream = client.stream("ticks", 0.001, timeout=60)
        assert await anext(stream) == 0
        proc.kill()
        t0 = time.perf_counter()
        with pytest.raises(ucxrpc.ConnectionLost):
            async for _ in stream:
                pass
        assert time.perf_counter() - t0 < 2.0
        assert client.pending == 0
        await client.close()


async def test_aclosing_a_stream_kept_in_a_variable(streaming: Streaming) -> None:
    server, client, producer = streaming
    stream = client.stream("forever", 0.001)
    async with contextlib.aclosing(stream):
        async for i in stream:
            if i == 2:
                break
        # Still referenced here: the generator runs until the stream is closed.
        assert not producer.ended.done()
    assert await asyncio.wait_for(producer.ended, 5) in ("cancelled", "closed")
    await until(lambda: server.inflight == 0 and client.pending == 0)


def test_a_server_that_ignores_credits_fails_the_stream() -> None:
    from ucxrpc.calls.stream import StreamCall

    call = StreamCall(None, 7, window=2)  # type: ignore[arg-type]
    for i in range(3):
        encoded = codec.encode(Kind.ITEM, 7, i)
        header, payload = codec.decode_header(encoded.frame)
        call.on_frame(header, payload, [])
    assert call.buffered == 2
    assert isinstance(call.error, ucxrpc.ProtocolError)
    assert "more than 2 items ahead" in call.error.message
