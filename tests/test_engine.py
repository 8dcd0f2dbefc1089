"""The progress engine survives failures in any step of a drive (real UCX workers)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from conftest import until

from ucxrpc.io.engine import Engine
from ucxrpc.io.runtime import LOOPBACK_DEVICE
from ucxrpc.io.ucx import Array, lib
from ucxrpc.wire import codec

pytestmark = pytest.mark.timeout(60)

#: UCX on the loopback device only (a raw context on every device listens on all).
LOOPBACK = {"NET_DEVICES": LOOPBACK_DEVICE}


class Faulty:
    """A real UCX worker whose chosen methods raise on their next calls."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.faults: dict[str, int] = {}

    def fail(self, method: str, times: int = 1) -> None:
        self.faults[method] = times

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.worker, name)
        if not callable(real):
            return real

        def call(*args: Any) -> Any:
            if self.faults.get(name, 0) > 0:
                self.faults[name] -= 1
                raise RuntimeError(f"injected failure in {name}")
            return real(*args)

        return call


class Recorder:
    def __init__(self, engine: Any) -> None:
        self.frames: list[bytes] = []
        self.parts: list[tuple[int, int]] = []
        self.engine = engine
        self.fail_next_part = False

    def on_frame(self, tag: int, buf: bytearray) -> None:
        self.frames.append(bytes(buf))

    def on_part(self, tag: int, length: int, handle: Any) -> None:
        if self.fail_next_part:
            self.fail_next_part = False
            raise RuntimeError("injected failure in the router")
        self.parts.append((tag, length))
        self.engine[0].receive(handle, bytearray(length), lambda exc: None)

    def on_oversized(self, tag: int, length: int) -> None:
        pass


@pytest.fixture
async def pair() -> Any:
    ctx = lib.UCXContext(LOOPBACK, (lib.Feature.TAG, lib.Feature.WAKEUP))
    worker = lib.UCXWorker(ctx)
    worker.init_blocking_progress_mode()
    faulty = Faulty(worker)
    holder: list[Engine] = []
    recorder = Recorder(holder)
    engine = Engine(
        faulty,
        asyncio.get_running_loop(),
        mode="polling",
        spin=0.0,
        router=recorder,
        junk_limit=1 << 20,
    )
    holder.append(engine)
    sender_ctx = lib.UCXContext(LOOPBACK, (lib.Feature.TAG,))
    sender = lib.UCXWorker(sender_ctx)
    addr = lib.UCXAddress.create_from_buffer(bytes(worker.address.tobytes()))
    ep = sender.create_endpoint_from_worker_address(addr, False)
    keep: list[Any] = []

    async def send(tag: int, data: bytes) -> None:
        keep.append(data)
        req = ep.tag_send(Array(data), lib.UCXXTag(tag))
        keep.append(req)
        while not req.completed:
            sender.progress()
            await asyncio.sleep(0)

    yield faulty, engine, recorder, send
    engine.close()


@pytest.mark.parametrize("method", ["progress_once", "tag_probe", "tag_recv_with_handle", "arm"])
async def test_a_failure_in_any_step_is_logged_once_and_progress_goes_on(
    pair: Any, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    faulty, engine, recorder, send = pair
    caplog.set_level(logging.ERROR, "ucxrpc")
    faulty.fail(method, times=2)
    for i in range(5):
        await send(codec.frame_tag(1, i), b"frame %d" % i)
    # A frame whose receive failed is lost (and consumed); no other is.
    lost = 1 if method == "tag_recv_with_handle" else 0
    await until(lambda: len(recorder.frames) == 5 - lost)
    drives = engine.drives
    await until(lambda: engine.drives > drives + 10)  # still driving
    assert faulty.faults[method] == 0 or method == "arm"
    logged = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert len(logged) == len(set(logged))  # once per kind of failure
    await send(codec.frame_tag(1, 99), b"last")
    await until(lambda: recorder.frames[-1:] == [b"last"])


async def test_a_failing_router_does_not_stop_the_engine(pair: Any) -> None:
    _, engine, recorder, send = pair
    recorder.fail_next_part = True
    await send(codec.DATA_BIT | 1, b"p" * 20_000)
    await send(codec.DATA_BIT | 2, b"q" * 20_000)
    await until(lambda: recorder.parts == [(codec.DATA_BIT | 2, 20_000)])
    await until(lambda: engine.discarded == 1)  # the first one was consumed


async def test_long_waiting_requests_cost_a_drive_a_bounded_slice(pair: Any) -> None:
    """10,000 requests that never complete (receives nobody sends to, as a send to a peer
    that never receives would be) must not be scanned by every drive."""
    faulty, engine, recorder, send = pair
    bufs = [bytearray(8) for _ in range(10_000)]
    for i, buf in enumerate(bufs):
        req = faulty.worker.tag_recv(Array(buf), lib.UCXXTag(codec.DATA_BIT | (1 << 39) | i))
        engine.add(req, None)
    assert engine.in_flight == 10_000

    # Let them age (each reap after progress checks the young), then measure.
    async def one_by_one(count: int) -> None:
        for i in range(count):
            seen = len(recorder.frames)
            await send(codec.frame_tag(1, i), b"x")
            await until(lambda seen=seen: len(recorder.frames) > seen)

    await one_by_one(64)
    checked, drives = engine.checked, engine.drives
    await one_by_one(200)
    per_drive = (engine.checked - checked) / max(1, engine.drives - drives)
    assert per_drive <= 200, per_drive  # a slice, not 10,000 per drive
    assert engine.in_flight == 10_000  # nothing lost on the way
    # One of the old ones completing is still noticed.
    await send(codec.DATA_BIT | (1 << 39) | 5, b"12345678")
    await until(lambda: engine.in_flight == 9_999)
    assert bytes(bufs[5]) == b"12345678"


async def test_one_drive_takes_connections_in_turn(pair: Any) -> None:
    """Frames found by one drive are handed over connection by connection in turn
    (each connection's own in arrival order): a flood from one peer does not go first."""
    faulty, _, recorder, _ = pair
    sender_ctx = lib.UCXContext(LOOPBACK, (lib.Feature.TAG,))
    sender = lib.UCXWorker(sender_ctx)
    addr = lib.UCXAddress.create_from_buffer(bytes(faulty.worker.address.tobytes()))
    ep = sender.create_endpoint_from_worker_address(addr, False)
    keep: list[Any] = []
    # Sent without yielding to the loop: all of them wait in UCX before the next drive.
    for conn, count in ((1, 10), (2, 2), (3, 1)):
        for i in range(count):
            data = b"%d:%d" % (conn, i)
            req = ep.tag_send(Array(data), lib.UCXXTag((conn << 40) | codec.frame_tag(0, i)))
            keep += [data, req]
            for _ in range(100_000):
                if req.completed:
                    break
                sender.progress()
            assert req.completed
    await until(lambda: len(recorder.frames) == 13)
    assert recorder.frames[:6] == [b"1:0", b"2:0", b"3:0", b"1:1", b"2:1", b"1:2"]
    assert recorder.frames[6:] == [b"1:%d" % i for i in range(3, 10)]
