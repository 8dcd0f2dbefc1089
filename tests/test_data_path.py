"""The data path over real UCX: order, integrity, isolation and bounded state.

Each test here reproduces a defect found on an earlier design (frames dispatched in
UCX completion order, parts bound to a call rather than a frame, no sender identity,
receives posted for parts that never come) and checks it cannot happen.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import numpy as np
import pytest
from conftest import until
from helpers.rawpeer import RawPeer

import ucxrpc
from ucxrpc.codec import Kind
from ucxrpc.transport import Worker, WorkerConfig
from ucxrpc.wire import codec

pytestmark = pytest.mark.timeout(120)


def blob(n: int, seed: int) -> bytes:
    return (bytes(range(seed % 251, 251)) + bytes(range(seed % 251))) * (n // 251 + 1)


def mixed_server() -> ucxrpc.Server:
    server = ucxrpc.Server()

    @server.rpc
    async def mixed(n: int) -> AsyncIterator[Any]:
        # 12 KB text items (rendezvous on shared memory) between 20-30 KB blobs (parts).
        for i in range(n):
            if i % 2 == 0:
                yield {"i": i, "text": "t" * 12_000}
            else:
                yield {"i": i, "blob": blob(20_000 + 1_000 * (i % 10), i)}

    @server.rpc
    async def rev(data: bytes) -> bytes:
        return data[::-1]

    @server.rpc
    async def echo(data: Any) -> Any:
        return data

    @server.rpc
    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)

    @server.rpc
    async def ping() -> str:
        return "PONG"

    @server.rpc
    async def with_metadata(size: int) -> str:
        ucxrpc.current_call().response_metadata["m"] = "x" * size
        return "y" * (4096 - size)

    @server.rpc
    async def bad_metadata() -> str:
        ucxrpc.current_call().response_metadata["m"] = object()  # type: ignore[assignment]
        return "never sent"

    return server


@pytest.fixture
async def mixed(manager: ucxrpc.Manager) -> AsyncIterator[tuple[ucxrpc.Server, ucxrpc.Client]]:
    server = mixed_server()
    await server.start(manager)
    client = await manager.connect("127.0.0.1", server.port)
    yield server, client
    await client.close()
    await server.stop()


async def test_a_stream_of_mixed_sizes_arrives_whole_and_in_order(mixed: Any) -> None:
    _, client = mixed
    for _ in range(5):
        items = [x async for x in client.stream("mixed", 40)]
        assert [x["i"] for x in items] == list(range(40))
        for x in items:
            if x["i"] % 2:
                assert x["blob"] == blob(20_000 + 1_000 * (x["i"] % 10), x["i"])
            else:
                assert x["text"] == "t" * 12_000


@pytest.mark.parametrize(
    "size", [1, 8191, 8192, 8193, 16383, 16384, 16385, 65537, 256 * 1024, 8 << 20]
)
async def test_a_reversed_view_comes_back_as_its_logical_bytes(mixed: Any, size: int) -> None:
    _, client = mixed
    data = blob(size, 7)[:size]
    assert await client.call("rev", data) == data[::-1]
    # A strided view sent by the client is sent as its logical bytes too.
    assert await client.call("echo", memoryview(data)[::-3]) == data[::-3]
    array = np.arange(size // 4 + 1, dtype=np.int32)[::2]
    assert await client.call("echo", memoryview(array)) == array.tobytes()


async def test_concurrent_calls_of_every_size_each_get_their_own_reply(mixed: Any) -> None:
    _, client = mixed
    sizes = [10, 12_000, 20_000, 8192, 300_000, 10, 70_000] * 6
    values = [blob(n, i)[:n] for i, n in enumerate(sizes)]
    got = await asyncio.gather(*(client.call("echo", v) for v in values))
    assert got == values


@pytest.mark.parametrize("size", range(3900, 4200, 37))
async def test_replies_near_4k_with_metadata(mixed: Any, size: int) -> None:
    _, client = mixed
    value, md = await client.call_with_metadata("with_metadata", size % 4000)
    assert md == {"m": "x" * (size % 4000)} and value == "y" * (4096 - size % 4000)


async def test_metadata_that_cannot_be_sent_is_an_error_not_a_hang(mixed: Any) -> None:
    _, client = mixed
    with pytest.raises(ucxrpc.RpcError, match="metadata"):
        await client.call("bad_metadata", timeout=5)
    assert await client.call("ping") == "PONG"


async def test_cancelling_right_after_sending_leaks_no_call(mixed: Any) -> None:
    server, client = mixed
    for _ in range(2000):
        task = asyncio.ensure_future(client.call("sleep", 1.0))
        await asyncio.sleep(0)
        task.cancel()
    await asyncio.sleep(0)
    await until(lambda: server.inflight == 0 and client.pending == 0)
    # More than max_inflight (1024) calls later, the connection still serves.
    assert await client.call("ping") == "PONG"


async def test_messages_of_mixed_sizes_keep_their_order(manager: ucxrpc.Manager) -> None:
    config = WorkerConfig(buffer_size=1 << 20)
    a, b = Worker(config, manager=manager), Worker(config, manager=manager)
    port = await a.listen()
    ep = await b.connect("127.0.0.1", port)
    sizes = [12_000, 10, 20_000, 9_000, 10, 300_000, 10] * 20
    sends = [b.send_tag(ep, 5, blob(n, i)[:n]) for i, n in enumerate(sizes)]
    await asyncio.gather(*sends)
    (peer,) = a.endpoint_ids()
    got = [await a.recv_tag(peer, 5, timeout=5) for _ in sizes]
    assert got == [blob(n, i)[:n] for i, n in enumerate(sizes)]
    await b.close_all()
    await a.close_all()


# -- hostile peers ------------------------------------------------------------------------


@pytest.fixture
async def victim(mixed: Any) -> Any:
    """A served client that another, hostile peer attacks."""
    return mixed


async def test_another_peer_cannot_cancel_feed_or_answer_a_victims_calls(
    manager: ucxrpc.Manager, victim: Any
) -> None:
    server, client = victim
    async with RawPeer.connected(server.port) as raw:
        # The attacker knows its own ids; it guesses the victim's by trying them all
        # near its own (connection ids are random, so this finds nothing).
        guesses = [raw.server_cid ^ d for d in range(1, 64)]
        slow = asyncio.ensure_future(client.call("echo", b"v" * 50_000, timeout=10))
        for cid in guesses:
            for call in range(1, 20):
                cancel = codec.encode(Kind.CANCEL, call)
                codec.stamp(cancel.frame, 0, raw.server_secret)
                await raw.send_tagged(codec.frame_tag(cid, call), cancel.frame)
                # Pre-sent data on the victim's guessed part tags, and a fake reply.
                await raw.send_tagged(codec.data_tag(cid, 0, call, 1), b"A" * 50_000, wait=False)
        assert await slow == b"v" * 50_000
        for _ in range(10):
            assert await client.call("echo", b"w" * 50_000) == b"w" * 50_000
        assert manager.dropped > 0  # the strangers' frames were dropped, not answered
        with pytest.raises(TimeoutError):
            await raw.next_frame(0.3)  # and nothing was sent back to the attacker


async def test_frames_with_another_connections_secret_are_dropped(
    manager: ucxrpc.Manager, victim: Any
) -> None:
    server, _ = victim
    async with RawPeer.connected(server.port) as raw:
        request = codec.encode(Kind.REQUEST, 3, [[], {}], method="ping")
        await raw.send_raw(3, raw.stamp_next(request.frame, secret=raw.server_secret ^ 1))
        with pytest.raises(TimeoutError):
            await raw.expect_reply(3, 0.3)
        # The right secret (the same seq: the dropped frame did not count) works.
        raw.out._seq -= 1
        await raw.send(4, codec.encode(Kind.REQUEST, 4, [[], {}], method="ping"))
        assert (await raw.expect_reply(4))[1] == "PONG"


@pytest.mark.parametrize("delta", [-(1 << 20) + 1, -1, 1])
async def test_a_part_of_the_wrong_length_fails_that_call_only(
    manager: ucxrpc.Manager, victim: Any, delta: int
) -> None:
    server, client = victim
    async with RawPeer.connected(server.port) as raw:
        enc = codec.encode(Kind.REQUEST, 5, [[b"x" * (1 << 20)], {}], method="echo")
        (frame_tag, frame), (part_tag, part) = raw.out.send(5, enc)
        await raw.send_tagged(frame_tag, frame)
        await raw.send_tagged(part_tag, bytes(part)[: len(part) + delta] + b"\0" * max(delta, 0))
        header, value = await raw.expect_reply(5)
        assert header.kind is Kind.ERROR and value[0] == ucxrpc.StatusCode.INTERNAL
        assert "announced 1048576" in value[1]
        await raw.send(6, codec.encode(Kind.REQUEST, 6, [[b"ok"], {}], method="echo"))
        assert (await raw.expect_reply(6))[1] == b"ok"
        assert await client.call("echo", b"z" * 300_000) == b"z" * 300_000


async def test_parts_that_never_come_are_bounded_then_forgotten() -> None:
    async with ucxrpc.Manager(part_timeout=1.0) as manager:
        server = mixed_server()
        await server.start(manager)
        client = await manager.connect("127.0.0.1", server.port)
        async with RawPeer.connected(server.port) as raw:
            for call in range(1, 201):
                # A frame announcing 255 parts of 255 KiB, none of which ever comes.
                header = msgpack.packb(["echo", None, None, [255 * 1024] * 255, None])
                prefix = struct.pack(
                    "!BBHIQIII", codec.VERSION, Kind.REQUEST, 0, 0, 0, call, len(header), 0
                )
                await raw.send_raw(call, raw.stamp_next(bytearray(prefix + header)))
            await until(lambda: manager.announced_bytes > 0)
            # Bounded by the budget, nothing allocated, no receive posted, and the other
            # client is served at once (its connection has its own order).
            assert manager.announced_bytes <= manager.config.receive_budget
            assert manager.awaited_parts <= 4096
            assert manager.posted_receives == 0
            assert await client.call("ping") == "PONG"
            # Every frame is answered: the first ones time out waiting for their parts,
            # the rest were over the budget.
            codes = set()
            for call in range(1, 201):
                header, value = await raw.expect_reply(call)
                codes.add(ucxrpc.StatusCode(value[0]))
            assert codes == {ucxrpc.StatusCode.INTERNAL, ucxrpc.StatusCode.RESOURCE_EXHAUSTED}
            assert manager.announced_bytes == 0 and manager.awaited_parts == 0
            assert manager.engine.in_flight == 0
        await client.close()
        await server.stop()


# -- regressions ---------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, "1"])
async def test_nan_and_infinite_timeouts_are_refused(mixed: Any, timeout: Any) -> None:
    _, client = mixed
    with pytest.raises(ucxrpc.InvalidArgument, match="timeout must be a finite number"):
        await client.call("ping", timeout=timeout)
    with pytest.raises(ucxrpc.InvalidArgument, match="timeout must be a finite number"):
        async for _ in client.stream("mixed", 1, timeout=timeout):
            pass
    assert await client.call("ping") == "PONG"


def test_reconnect_backoff_never_overflows() -> None:
    policy = ucxrpc.Reconnect(initial=0.1, maximum=5.0, multiplier=10.0, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3)] == pytest.approx([0.1, 1.0, 5.0])
    for attempt in (1_000, 10**6, 10**12):
        assert policy.delay(attempt) == 5.0


async def test_calls_whose_deadline_passes_in_the_admission_queue_leave_it() -> None:
    async with ucxrpc.Manager() as manager:
        server = ucxrpc.Server(max_concurrency=1)
        started: list[int] = []
        release = asyncio.Event()

        @server.rpc
        async def work(i: int) -> int:
            started.append(i)
            await release.wait()
            return i

        await server.start(manager)
        client = await manager.connect("127.0.0.1", server.port)
        first = asyncio.ensure_future(client.call("work", 0))
        await until(lambda: started == [0])
        queued = [asyncio.ensure_future(client.call("work", i, timeout=0.2)) for i in (1, 2)]
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert all(isinstance(r, ucxrpc.DeadlineExceeded) for r in results)
        await until(lambda: server.inflight == 1)  # they left the server's queue too
        release.set()
        assert await first == 0
        assert started == [0]  # the expired calls never ran
        await client.close()
        await server.stop()


async def test_response_metadata_is_validated_like_request_metadata(manager: Any) -> None:
    server = ucxrpc.Server()

    @server.rpc
    async def bad_key() -> str:
        ucxrpc.current_call().response_metadata[1] = "x"  # type: ignore[index]
        return "never sent"

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        with pytest.raises(ucxrpc.RpcError, match="metadata must map str to str or bytes"):
            await client.call("bad_key", timeout=5)
        with pytest.raises(ucxrpc.InvalidArgument, match="metadata must map str"):
            await client.call("bad_key", metadata={"k": 1})  # type: ignore[dict-item]
    await server.stop()


async def test_a_cancel_while_the_request_waits_for_its_parts_is_honoured(
    manager: ucxrpc.Manager,
) -> None:
    server = ucxrpc.Server()
    ran: list[int] = []

    @server.rpc
    async def store(data: bytes) -> int:
        ran.append(len(data))
        return len(data)

    await server.start(manager)
    async with RawPeer.connected(server.port) as raw:
        enc = codec.encode(Kind.REQUEST, 9, [[b"d" * 100_000], {}], method="store")
        (frame_tag, frame), (part_tag, part) = raw.out.send(9, enc)
        await raw.send_tagged(frame_tag, frame)
        await raw.send(9, codec.encode(Kind.CANCEL, 9))  # before the part
        await raw.send_tagged(part_tag, part)
        await raw.send(10, codec.encode(Kind.REQUEST, 10, [[b"e"], {}], method="store"))
        _, value = await raw.expect_reply(10)
        assert value == 1 and ran == [1]  # the cancelled call never ran, nor answered
        with pytest.raises(TimeoutError):
            await raw.expect_reply(9, 0.2)
        await until(lambda: server.inflight == 0)
    await server.stop()


async def test_a_flooding_client_does_not_starve_another_one() -> None:
    async with ucxrpc.Manager() as manager:
        server = ucxrpc.Server(max_concurrency=2)

        @server.rpc
        async def work() -> None:
            await asyncio.sleep(0.01)

        await server.start(manager)
        flooder = await manager.connect("127.0.0.1", server.port)
        other = await manager.connect("127.0.0.1", server.port)
        done = 0

        async def flood_one() -> None:
            nonlocal done
            await flooder.call("work")
            done += 1

        floods = [asyncio.ensure_future(flood_one()) for _ in range(200)]
        await until(lambda: server.inflight >= 100)  # the flood is queued at the server
        await other.call("work", timeout=30)
        # Connections take turns: the other client's call ran after a few of the
        # flooder's, not after all 200.
        assert done < 20, done
        await asyncio.gather(*floods)
        await flooder.close()
        await other.close()
        await server.stop()


async def test_shared_memory_is_an_explicit_opt_in_on_both_sides() -> None:
    async with (
        ucxrpc.Manager(peer_error_handling=False) as fast_server_side,
        ucxrpc.Manager(peer_error_handling=False) as fast_client_side,
        ucxrpc.Manager() as safe_side,
    ):
        server = mixed_server()
        await server.start(fast_server_side)
        client = await fast_client_side.connect("127.0.0.1", server.port)
        assert await client.call("echo", b"s" * 300_000) == b"s" * 300_000
        with pytest.raises(ucxrpc.RpcError, match="peer_error_handling") as caught:
            await safe_side.connect("127.0.0.1", server.port)
        assert caught.value.code == ucxrpc.StatusCode.FAILED_PRECONDITION
        await client.close()
        await server.stop()


async def test_frames_for_unknown_connections_or_calls_are_dropped_and_counted(
    manager: ucxrpc.Manager, victim: Any
) -> None:
    server, client = victim
    async with RawPeer.connected(server.port) as raw:
        before = manager.dropped
        # A CANCEL for a call the connection does not have, and a frame for a
        # connection id nobody has.
        await raw.send(77, codec.encode(Kind.CANCEL, 77))
        stray = codec.encode(Kind.CANCEL, 5)
        codec.stamp(stray.frame, 0, raw.server_secret)
        await raw.send_tagged(codec.frame_tag(raw.server_cid ^ 0x7FFFFF, 5), stray.frame)
        await until(lambda: manager.dropped >= before + 2)
        with pytest.raises(TimeoutError):
            await raw.next_frame(0.2)  # nothing was sent back
        # A late reply (its call timed out) is dropped and counted on the client side.
        with pytest.raises(ucxrpc.DeadlineExceeded):
            await client.call("sleep", 0.2, timeout=0.05)
        await until(lambda: manager.dropped >= before + 3)
        assert await client.call("ping") == "PONG"
