"""Fair starts over real UCX: the server's start turns and the engine's bounded drives.

The pure queue is tested in ``test_starts.py``; these tests run it inside a server
and an engine: turns run at the end of a drive, a drive is never queued twice, a
drive's work is bounded by time and shared by every frame ring, and an engine whose
yields lose the core sleeps when idle instead of spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import until

import ucxrpc
from ucxrpc import HealthApi
from ucxrpc.calls.server import SHARED_START_BUDGET, START_BUDGET
from ucxrpc.codec import Kind
from ucxrpc.errors import ConnectionLost
from ucxrpc.io import engine as engine_module
from ucxrpc.io.engine import DRIVE_TIME, RING_SLICE, SHARE_EVERY, Engine
from ucxrpc.io.link import DELIVER_SLICE, Link, key_parts
from ucxrpc.io.runtime import LOOPBACK_DEVICE
from ucxrpc.io.ucx import lib
from ucxrpc.protocol import Budget, Outbound
from ucxrpc.protocol.starts import StartQueue
from ucxrpc.wire import codec

pytestmark = pytest.mark.timeout(60)

#: UCX on the loopback device only (a raw context on every device listens on all).
LOOPBACK = {"NET_DEVICES": LOOPBACK_DEVICE}


class Quiet:
    """A router that receives nothing (the engine's rings and callbacks are tested)."""

    def on_frame(self, tag: int, buf: bytearray) -> None:
        raise AssertionError("no frame was sent")

    def on_part(self, tag: int, length: int, handle: Any) -> None:
        raise AssertionError("no part was sent")

    def on_oversized(self, tag: int, length: int) -> None:
        raise AssertionError("no frame was sent")


class FakeRing:
    """A frame ring with ``frames`` waiting; each frame costs ``cost`` seconds."""

    def __init__(self, name: str, log: list[tuple[str, int]], frames: int, cost: float = 0.0):
        self.name, self.log, self.frames, self.cost = name, log, frames, cost
        self.drives: list[int] = []  # the engine's drive count at each poll
        self.engine: Engine | None = None

    def poll(self, limit: int = 64) -> int:
        got = min(limit, self.frames)
        self.frames -= got
        self.log.append((self.name, limit))
        if self.engine is not None and got:
            self.drives.append(self.engine.drives)
        end = time.perf_counter() + got * self.cost
        while time.perf_counter() < end:
            pass
        return got

    def doze(self) -> bool:
        return self.frames == 0

    def rouse(self) -> None:
        pass


@pytest.fixture
async def make_engine() -> Any:
    made: list[Engine] = []

    def make(mode: str = "blocking", spin: float = 0.0) -> Engine:
        ctx = lib.UCXContext(LOOPBACK, (lib.Feature.TAG, lib.Feature.WAKEUP))
        worker = lib.UCXWorker(ctx)
        worker.init_blocking_progress_mode()
        engine = Engine(
            worker,
            asyncio.get_running_loop(),
            mode=mode,
            spin=spin,
            router=Quiet(),
            junk_limit=1 << 20,
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


async def test_an_after_drive_callback_runs_once_at_the_end_of_the_next_drive(
    make_engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(mode="polling")
    log: list[tuple[str, int]] = []
    engine.add_ring(FakeRing("ring", log, frames=1))
    seen: list[str] = []

    def broken() -> None:
        seen.append("broken")
        raise RuntimeError("injected")

    caplog.set_level(logging.ERROR, "ucxrpc")
    engine.after_drive(broken)
    engine.after_drive(lambda: seen.append(f"after {len(log)} polls"))
    await until(lambda: len(seen) == 2)
    # After the drive polled the ring; one failing callback does not stop the next one.
    assert seen == ["broken", "after 1 polls"]
    assert "recovered from an error in after drive" in caplog.text
    drives = engine.drives
    await until(lambda: engine.drives > drives + 5)
    assert len(seen) == 2  # once


async def test_a_progress_pass_by_hand_is_a_drive(make_engine: Any) -> None:
    """``Engine.progress()`` (what a polling loop calls: ``Worker.try_recv_tag``,
    ``Worker.progress``) is a drive: it is counted, and what waits for the end of a
    drive runs after it. A connection whose slice of a batch is spent gets its next
    slice from it, not only when the event loop next drives (a loop that polls
    without awaiting would otherwise never see the 17th message)."""
    engine = make_engine(mode="polling")
    ran: list[int] = []
    engine.after_drive(lambda: ran.append(engine.drives))
    drives = engine.drives
    engine.progress()  # without yielding to the loop
    assert engine.drives == drives + 1 and ran == [drives + 1]
    engine.progress()
    assert ran == [drives + 1]  # once


async def test_a_serving_engine_gives_its_core_up_every_share_interval(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy server keeps its core for a whole scheduler slice: a client woken on the
    same core waits, runnable, for the kernel's next tick (4 ms at 250 Hz). An engine
    that shares its core yields it (``sched_yield``) at most once per
    ``SHARE_EVERY``, on drives and sends; one that does not, never does so while
    busy."""
    clock = [1000.0]
    yields: list[float] = []
    monkeypatch.setattr(engine_module, "_clock", lambda: clock[0])
    monkeypatch.setattr(engine_module, "_sched_yield", lambda: yields.append(clock[0]))
    engine = make_engine(mode="polling")
    engine.share()
    assert yields == []  # not a serving manager's engine
    engine.share_core = True
    engine.share()
    clock[0] += SHARE_EVERY / 2
    engine.share()
    assert yields == [1000.0]  # once per interval, however often asked
    clock[0] += SHARE_EVERY
    engine.share()
    assert len(yields) == 2


@contextlib.asynccontextmanager
async def _connected(server: ucxrpc.Server) -> AsyncIterator[tuple[Any, Any, Any]]:
    """``server`` (given a ``ping`` method) started on one manager, and a client of it
    on another after one call: ``(client, server's manager, client's manager)``."""

    @server.rpc
    async def ping() -> str:
        return "pong"

    async with ucxrpc.Manager() as m1, ucxrpc.Manager() as m2:
        await server.start(m1, "127.0.0.1", 0)
        client = await m2.connect("127.0.0.1", server.port)
        assert await client.call("ping") == "pong"
        yield client, m1, m2
        await client.close()


async def test_a_server_shares_its_engines_core_and_a_client_does_not() -> None:
    async with _connected(ucxrpc.Server()) as (_, served, connected):
        assert served.engine.share_core and not connected.engine.share_core


async def test_a_drive_is_never_queued_twice(make_engine: Any) -> None:
    """A callback that asks for another drive (a server's next turn) while the drive
    that runs it reschedules itself must not make two drives per loop iteration: they
    would double every time."""
    engine = make_engine(mode="polling")
    turns = 0

    def turn() -> None:
        nonlocal turns
        turns += 1
        if turns < 200:
            engine.after_drive(turn)
            engine.kick()

    engine.after_drive(turn)
    start = engine.drives
    for _ in range(100):
        await asyncio.sleep(0)
    assert engine.drives - start <= 101  # at most one drive per loop iteration


async def test_a_drive_shares_its_time_between_the_rings(make_engine: Any) -> None:
    """Every ring gets a slice on every drive, the rings take turns at going first, and
    a ring that always has more does not make a drive last longer than its time."""
    engine = make_engine(mode="polling")
    log: list[tuple[str, int]] = []
    flood = FakeRing("flood", log, frames=10**9, cost=20e-6)  # never runs dry
    quiet = FakeRing("quiet", log, frames=10**9)
    engine.add_ring(flood)
    engine.add_ring(quiet)
    await until(lambda: len(log) >= 200)
    engine.remove_ring(flood)
    engine.remove_ring(quiet)
    assert {limit for _, limit in log} == {RING_SLICE}
    names = [name for name, _ in log]
    # Per drive, the flood's slice (8 frames, 160 µs) spends the drive's time: one pass,
    # so the two rings alternate, and each goes first every other drive.
    assert names.count("quiet") >= len(names) // 2 - 2, names[:40]
    firsts = names[0::2]
    assert "flood" in firsts and "quiet" in firsts
    assert RING_SLICE * 20e-6 > DRIVE_TIME  # (what makes it one pass per drive)


async def test_a_cheap_flood_gets_more_passes_within_the_drives_time(make_engine: Any) -> None:
    engine = make_engine(mode="polling")
    log: list[tuple[str, int]] = []
    ring = FakeRing("cheap", log, frames=RING_SLICE * 40)
    ring.engine = engine
    engine.add_ring(ring)
    await until(lambda: ring.frames == 0)
    assert len(log) >= 40  # 8 frames each ...
    assert len(set(ring.drives)) < 20  # ... several passes per drive


async def test_an_engine_whose_yields_lose_the_core_sleeps_when_idle(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a spin of 10 s an idle engine keeps polling; once a yield kept the core away
    (here: 1 ms, as when another process ran), it sleeps as soon as it is idle, and a
    message still wakes it."""
    engine = make_engine(mode="blocking", spin=10.0)
    engine.after_drive(lambda: None)  # an event: from now on it spins (for 10 s)
    await until(lambda: engine.drives > 1)
    sleeps, drives = engine.sleeps, engine.drives
    await until(lambda: engine.drives > drives + 50)
    assert engine.sleeps == sleeps  # spinning: the cores are not contended
    monkeypatch.setattr(engine_module, "_sched_yield", lambda: time.sleep(0.001))
    await until(lambda: engine.sleeps > sleeps)
    monkeypatch.setattr(engine_module, "_sched_yield", lambda: None)
    # Asleep, it is woken by what lands: a callback that needs a drive.
    woke = asyncio.Event()
    engine.after_drive(woke.set)
    async with asyncio.timeout(5):
        await woke.wait()
    # After CONTENDED_FOR without a slow yield it spins again (no new sleeps).
    await asyncio.sleep(engine_module.CONTENDED_FOR * 2)
    sleeps = engine.sleeps
    engine.kick()
    drives = engine.drives
    await until(lambda: engine.drives > drives + 50)
    assert engine.sleeps == sleeps


async def test_one_slow_yield_alone_does_not_make_an_engine_sleep(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A yield that loses the core once in a while (an idle machine's kernel threads)
    is not contention: the engine keeps spinning, without the wake-ups sleeping adds."""
    engine = make_engine(mode="blocking", spin=10.0)
    engine.after_drive(lambda: None)
    await until(lambda: engine.drives > 1)
    slow = 0

    def yield_now_and_then() -> None:
        nonlocal slow
        if engine.drives % 40 == 0:  # far more than CONTENDED_WINDOW apart
            slow += 1
            time.sleep(engine_module.CONTENDED_WINDOW * 1.2)  # slow, and far apart

    monkeypatch.setattr(engine_module, "_sched_yield", yield_now_and_then)
    sleeps = engine.sleeps
    await until(lambda: slow >= 5, timeout=20)
    assert engine.sleeps == sleeps


async def test_a_closed_engine_keeps_no_callback(make_engine: Any) -> None:
    """What a callback belongs to (a server) is not kept alive by a closed engine."""

    class Owner:
        def turn(self) -> None:
            raise AssertionError("a closed engine never drives")

    engine = make_engine(mode="polling")
    waiting, later = Owner(), Owner()
    engine.after_drive(waiting.turn)  # registered before the close ...
    engine.close()
    engine.after_drive(later.turn)  # ... and after it: no error
    refs = [weakref.ref(waiting), weakref.ref(later)]
    del waiting, later
    gc.collect()
    assert [r() for r in refs] == [None, None]


# -- the server -------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_health_check_while_the_manager_drains_its_server_is_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Manager.shutdown(grace) drains its servers while the manager is closing: a call
    accepted then (a health check) is started and answered NOT_SERVING, as under
    Server.stop(grace); nothing escapes into the engine."""
    server = ucxrpc.Server()
    entered = asyncio.Event()

    @server.rpc
    async def slow() -> str:
        entered.set()
        await asyncio.sleep(1.5)
        return "done"

    async with ucxrpc.Manager() as m1, ucxrpc.Manager() as m2:
        await server.start(m1, "127.0.0.1", 0)
        client = await m2.connect("127.0.0.1", server.port)
        running = asyncio.ensure_future(client.call("slow"))
        await entered.wait()
        shutdown = asyncio.ensure_future(m1.shutdown(grace=5.0))
        await until(lambda: str(server.health.statuses[""]).endswith("NOT_SERVING"))
        with caplog.at_level(logging.ERROR, logger="ucxrpc"):
            async with asyncio.timeout(2.0):
                status = await client.stub(HealthApi).check("")
        assert str(status).endswith("NOT_SERVING")
        assert "recovered from an error" not in caplog.text
        assert await running == "done"
        await shutdown
        await client.close()


async def test_calls_waiting_for_a_turn_count_in_flight_and_can_be_cancelled(
    manager: ucxrpc.Manager,
) -> None:
    """A burst of 400 calls: those over the turn's budget wait (counted by
    ``server.inflight``); cancelling half of them before they start means they never
    run, and every other call is answered once."""
    server = ucxrpc.Server()
    ran: list[int] = []
    gate = asyncio.Event()

    @server.rpc
    async def work(i: int) -> int:
        ran.append(i)
        await gate.wait()
        return i

    await server.start(manager, "127.0.0.1", 0)
    client = await manager.connect("127.0.0.1", server.port)
    try:
        calls = [asyncio.ensure_future(client.call("work", i)) for i in range(400)]
        await until(lambda: server.inflight == 400)  # running or waiting, all counted
        for call in calls[1::2]:
            call.cancel()
        await until(lambda: server.inflight <= 200 + len(ran) // 2 + 1)
        gate.set()
        results = await asyncio.gather(*calls[0::2])
        assert results == list(range(0, 400, 2))
        await until(lambda: server.inflight == 0)
        # A cancelled call that had not started never ran; none ran twice.
        assert len(ran) == len(set(ran))
        assert set(range(0, 400, 2)) <= set(ran)
    finally:
        gate.set()
        await client.close()
        await server.stop(grace=1.0)


async def _steps_per_drive(calls: int, pad: str = "") -> tuple[list[int], int]:
    """Send ``calls`` calls in one loop iteration to a server whose handlers wait until
    all have arrived; returns how much ``server.inflight`` grew from each drive's end
    to the next, and how many BATCH messages the client built for them. Every call is
    answered once."""
    server = ucxrpc.Server(max_concurrency=None)
    gate = asyncio.Event()

    @server.rpc
    async def hold(i: int, pad: str) -> int:
        await gate.wait()
        return i

    async with _connected(server) as (client, m1, _):
        assert client.link is not None
        engine = m1.engine
        seen: list[int] = []
        done = False

        def record() -> None:
            seen.append(server.inflight)
            if not done:
                engine.after_drive(record)

        engine.after_drive(record)
        await until(lambda: len(seen) > 2)
        batches = client.link.outbound.batches
        futures = [asyncio.ensure_future(client.call("hold", i, pad)) for i in range(calls)]
        try:
            await until(lambda: server.inflight == calls)
        finally:
            done = True
            gate.set()
        assert await asyncio.gather(*futures) == list(range(calls))
        batches = client.link.outbound.batches - batches
    return [b - a for a, b in itertools.pairwise(seen)], batches


async def test_a_batch_of_calls_reaches_the_server_a_slice_per_drive() -> None:
    """900 calls sent in one loop iteration leave the client as one BATCH message; the
    server takes its frames a slice at a time (``DELIVER_SLICE`` per drive and one
    more at its end) instead of all in the drive that received it, so another
    connection's call waits behind a slice, not behind the batch."""
    steps, _ = await _steps_per_drive(900)
    assert max(steps) <= 2 * DELIVER_SLICE + 1, max(steps)
    assert sum(1 for s in steps if s > 0) >= 900 // (2 * DELIVER_SLICE + 1)


async def test_several_batches_in_one_drive_reach_the_server_one_slice_per_drive() -> None:
    """1,000 calls of 300 B sent in one loop iteration leave the client as several
    BATCH messages, which the server's drive takes together: they share one slice
    (and the drive's end one more), instead of a slice each (96 calls in one drive)."""
    steps, batches = await _steps_per_drive(1000, "p" * 300)
    assert batches >= 4  # (what makes this test)
    assert max(steps) <= 2 * DELIVER_SLICE + 1, max(steps)


async def test_a_burst_starts_fewer_calls_a_turn_while_another_connection_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection's burst alone starts ``START_BUDGET`` calls a loop iteration (full
    turns: more calls per second); while another connection's calls start past the
    burst's waiting ones, ``SHARED_START_BUDGET``, so that the other's next call waits
    for a shorter turn. Counted at the server's every turn."""
    server = ucxrpc.Server(max_concurrency=None)
    turns: list[tuple[int, int]] = []  # calls each turn of the server started, its limit
    turn = StartQueue.turn

    def counted(self: StartQueue[Any]) -> list[Any]:
        started = turn(self)
        if started:
            turns.append((len(started), self.limit))
        return started

    monkeypatch.setattr(StartQueue, "turn", counted)

    @server.rpc
    async def work(i: int) -> int:
        return i

    async def burst(client: Any) -> list[tuple[int, int]]:
        """The server's turns during a burst: calls started, and the limit."""
        turns.clear()
        calls = range(400)
        assert await asyncio.gather(*(client.call("work", i) for i in calls)) == list(calls)
        return list(turns)

    async with _connected(server) as (client, _, _), ucxrpc.Manager() as m3:
        alone = Counter(n for n, _ in await burst(client))
        assert alone.most_common(1)[0][0] == START_BUDGET and max(alone) == START_BUDGET, alone

        other = await m3.connect("127.0.0.1", server.port)
        calls = 0
        stop = False

        async def pinger() -> None:
            nonlocal calls
            while not stop:
                assert await other.call("ping") == "pong"
                calls += 1

        task = asyncio.ensure_future(pinger())
        try:
            await until(lambda: calls >= 3)
            before = calls
            shared = await burst(client)
            assert calls > before + 3  # it called throughout the burst
        finally:
            stop = True
            await task
            await other.close()
        # The burst's first turns come before the other's first call passes it; from
        # then on, every turn is a shared one.
        limits = [limit for _, limit in shared]
        first = limits.index(SHARED_START_BUDGET)
        assert first <= 10 and SHARED_START_BUDGET < START_BUDGET, shared
        assert all(n <= limit == SHARED_START_BUDGET for n, limit in shared[first:]), shared
        assert Counter(n for n, _ in shared[first:]).most_common(1)[0][0] == SHARED_START_BUDGET


class _InlineEngine:
    """What a Link needs of an engine, with receives that complete at once (a small
    part that arrived whole) and drives run by hand."""

    forked = False
    drives = 0

    def __init__(self, parts: dict[str, bytes]) -> None:
        self.parts = parts
        self.after: list[Any] = []

    def after_drive(self, callback: Any) -> None:
        self.after.append(callback)

    def share(self) -> None:
        pass

    def receive(self, handle: str, buf: Any, cb: Any) -> None:
        buf[:] = self.parts[handle]
        cb(None)

    def discard(self, handle: Any, length: int) -> None:
        raise AssertionError("nothing is discarded")

    def drive(self) -> None:
        """The end of this drive (what waits for it runs), then the next one."""
        after, self.after = self.after, []
        for callback in after:
            callback()
        self.drives += 1


def _linked(engine: _InlineEngine, owner: Any) -> tuple[Link, Outbound]:
    """A Link on ``engine`` delivering to ``owner``, and the peer's Outbound for it."""
    key = bytes(range(16))
    link = Link(engine, 5, key, owner, Budget())  # type: ignore[arg-type]
    return link, Outbound(5, *key_parts(key))


class _Calls:
    def __init__(self) -> None:
        self.got: list[int] = []

    def deliver(self, header: Any, payload: Any, parts: list[Any]) -> None:
        self.got.append(header.call_id)

    def failed(self, *args: Any) -> None:
        raise AssertionError(f"failed: {args}")

    def broken(self, error: Any) -> None:
        raise AssertionError(f"broken: {error}")


class _SendingEngine(_InlineEngine):
    """Records a Link's sends and its yields of the core, in order."""

    def __init__(self) -> None:
        super().__init__({})
        self.events: list[str] = []

    def send(self, ep: Any, buf: Any, tag: int, cb: Any) -> None:
        self.events.append("send")

    def share(self) -> None:
        self.events.append("share")


async def test_a_send_gives_the_core_up_after_its_frames_left() -> None:
    """A busy server's yield of its core (``Engine.share``) comes after a send's frames
    left, so that the peer they wake (often onto this core) reads them during the
    yield, instead of after it."""
    engine = _SendingEngine()
    link, _ = _linked(engine, _Calls())
    link.connect("ep", 9, bytes(range(16, 32)), 1 << 20)
    link.send(3, codec.encode(Kind.REPLY, 3, "pong"), done=lambda exc: None)
    assert engine.events == ["send", "share"]
    link.close()


async def test_a_receive_completing_inside_a_slice_keeps_the_frames_in_order() -> None:
    """Frames released by a late frame wait for their slice; a receive that completes
    at once in the middle of a slice (its part was eager) must not hand over the
    frames behind it before those ahead of it."""
    parts: dict[str, bytes] = {}
    engine, owner = _InlineEngine(parts), _Calls()
    link, out = _linked(engine, owner)

    def request(call: int, value: Any = "x") -> codec.Encoded:
        return codec.encode(Kind.REQUEST, call, value)

    (late0,) = out.send(1000, request(1000))  # seq 0, held back
    for call in range(1, 50):
        out.queue(call, request(call))
    (first,) = out.flush()  # seqs 1..49
    (late50,) = out.send(1050, request(1050))  # seq 50, held back
    for call in range(51, 100):
        out.queue(call, request(call))
    out.queue(100, request(100, [b"p" * 20000]))  # seq 100, with a part
    second, part = out.flush()
    parts["h"] = bytes(part[1])
    link.on_frame(first[0], bytearray(first[1]))
    link.on_frame(second[0], bytearray(second[1]))
    while link.inbound.pending:
        engine.drive()
    link.on_frame(late0[0], bytearray(late0[1]))  # 0..49 can go: a slice now, the rest later
    link.on_part(part[0], len(part[1]), "h")  # its receive completes at once
    link.on_frame(late50[0], bytearray(late50[1]))  # 50..99 can go, behind them
    while link.inbound.pending or engine.after:
        engine.drive()
    assert owner.got == [1000, *range(1, 50), 1050, *range(51, 101)]
    link.close()


async def test_deliver_pending_hands_over_the_rest_of_a_batch_at_once() -> None:
    """What a stopping server calls: the frames that arrived and wait for their turn
    are delivered now, in order (they are then accepted like those before them)."""
    engine, owner = _InlineEngine({}), _Calls()
    link, out = _linked(engine, owner)
    for call in range(1, 201):
        out.queue(call, codec.encode(Kind.REQUEST, call, "x"))
    (batch,) = out.flush()
    link.on_frame(batch[0], bytearray(batch[1]))
    assert owner.got == list(range(1, DELIVER_SLICE + 1))
    link.deliver_pending()
    assert owner.got == list(range(1, 201)) and not link.inbound.pending
    engine.drive()  # the resume it had asked for finds nothing left
    assert owner.got == list(range(1, 201))
    link.close()


async def test_frames_arriving_in_one_drive_share_one_slice() -> None:
    """A drive that brings several of a connection's frames (a ring pass takes eight)
    hands over one slice between them, and one more at its end: each frame used to
    hand over a slice of its own from the batch waiting before it (eight frames, 128
    calls in one drive)."""
    engine, owner = _InlineEngine({}), _Calls()
    link, out = _linked(engine, owner)
    for call in range(1, 201):
        out.queue(call, codec.encode(Kind.REQUEST, call, "x"))
    (batch,) = out.flush()
    singles = [out.send(call, codec.encode(Kind.REQUEST, call, "x"))[0] for call in range(201, 208)]
    link.on_frame(batch[0], bytearray(batch[1]))
    for tag, frame in singles:
        link.on_frame(tag, bytearray(frame))
    assert owner.got == list(range(1, DELIVER_SLICE + 1))
    engine.drive()  # its end: a slice of its own
    assert owner.got == list(range(1, 2 * DELIVER_SLICE + 1))
    # The next drive's frame starts a new slice.
    (late,) = out.send(208, codec.encode(Kind.REQUEST, 208, "x"))
    link.on_frame(late[0], bytearray(late[1]))
    assert owner.got == list(range(1, 3 * DELIVER_SLICE + 1))
    while link.inbound.pending or engine.after:
        engine.drive()
    assert owner.got == list(range(1, 209))
    link.close()


class _DeadPeerEngine(_InlineEngine):
    """Receives fail at once: the peer is gone."""

    def receive(self, handle: str, buf: Any, cb: Any) -> None:
        cb(ConnectionLost("the peer is gone"))


class _ClosingCalls(_Calls):
    """Closes the link when it breaks, as a client does (its calls then fail)."""

    link: Any = None

    def failed(self, call_id: int, kind: Any, error: Any) -> None:
        self.got.append(-call_id)

    def broken(self, error: Any) -> None:
        self.got.append(0)
        self.link.close()


async def test_replies_that_arrived_are_handed_over_before_a_dead_peer_breaks_the_link() -> None:
    """40 replies in a batch, then one with a part whose receive finds the peer gone:
    the 40 are delivered (not turned into lost calls), then the call with the part
    fails, then the link breaks."""
    engine, owner = _DeadPeerEngine({}), _ClosingCalls()
    link, out = _linked(engine, owner)
    owner.link = link
    for call in range(1, 41):
        out.queue(call, codec.encode(Kind.REPLY, call, "x"))
    out.queue(41, codec.encode(Kind.REPLY, 41, [b"p" * 20000]))
    batch, part = out.flush()
    link.on_frame(batch[0], bytearray(batch[1]))
    link.on_part(part[0], len(part[1]), "h")
    while engine.after:
        engine.drive()
    assert owner.got == [*range(1, 41), -41, 0]
