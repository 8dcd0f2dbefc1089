"""A short scheduler slice while a reply or two are awaited (``Config.sched_slice_us``).

Everything runs in threads of its own (a thread's slice, nice value and policy are its
own, and a thread starts with its creator's): the hint itself, and the engine's use of
it over real UCX, each scenario on an event loop of its own in a new thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from conftest import until

import ucxrpc
from ucxrpc.io import engine as engine_module
from ucxrpc.io import timeslice
from ucxrpc.io.timeslice import MIN_SLICE_NS, SliceHint, supported, thread_slice_ns

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")


def in_thread(func: Callable[[], T]) -> T:
    """Run ``func`` in a new thread (whose scheduling attributes it may change)."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(func())
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the thread did not finish"
    if errors:
        raise errors[0]
    return out[0]


def on_own_loop(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``scenario()`` on a new event loop in a new thread."""
    return in_thread(lambda: asyncio.run(scenario()))


def _kernel_refuses() -> str | None:
    """Why custom slices cannot work here (checked with the raw system calls), or
    None: Linux 6.12+ on 64-bit x86 or arm lets a thread choose its slice."""
    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    calls = {"x86_64": (314, 315), "aarch64": (274, 275)}.get(os.uname().machine)
    if not sys.platform.startswith("linux") or calls is None or struct.calcsize("P") != 8:
        return "custom scheduler slices need Linux on 64-bit x86 or arm"
    if release < (6, 12):
        return f"custom scheduler slices need Linux 6.12 (this is {os.uname().release})"

    def probe() -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        attr = ctypes.create_string_buffer(48)
        if libc.syscall(calls[1], 0, attr, ctypes.c_uint(48), ctypes.c_uint(0)) != 0:
            return ctypes.get_errno()
        # Write back what was read: no change, but a seccomp filter would refuse it.
        return 0 if libc.syscall(calls[0], 0, attr, ctypes.c_uint(0)) == 0 else ctypes.get_errno()

    code = in_thread(probe)
    if code:
        return f"sched_setattr is refused here: {os.strerror(code)}"
    policy = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
    if policy not in (os.SCHED_OTHER, os.SCHED_BATCH) or os.getpriority(os.PRIO_PROCESS, 0) < 0:
        return "the tests run under a policy or nice value whose threads are left alone"
    return None


_REFUSED = _kernel_refuses()
if _REFUSED is not None:
    pytest.skip(_REFUSED, allow_module_level=True)


def test_a_hint_gives_its_thread_the_slice_and_takes_it_back() -> None:
    def run() -> tuple[Any, ...]:
        default = thread_slice_ns()
        hint = SliceHint(3 * MIN_SLICE_NS)
        hint.want(True)
        hint.want(True)  # no change
        short = thread_slice_ns()
        hint.want(False)
        return default, short, hint.short, thread_slice_ns(), os.sched_getscheduler(0)

    assert supported()
    default, short, still_short, after, policy = in_thread(run)
    assert short == 3 * MIN_SLICE_NS and default != short
    assert not still_short and after == default
    # Its own reset-on-fork flag (none) is back, where the thread may clear the flag.
    privileged = os.geteuid() == 0
    assert policy == (os.SCHED_OTHER if privileged else os.SCHED_OTHER | os.SCHED_RESET_ON_FORK)


def test_the_thread_keeps_its_nice_value_and_others_keep_their_slice() -> None:
    mine = thread_slice_ns()

    def run() -> tuple[Any, ...]:
        os.setpriority(os.PRIO_PROCESS, 0, 7)  # this thread's (on Linux, a tid)
        hint = SliceHint(MIN_SLICE_NS)
        hint.want(True)
        seen = os.getpriority(os.PRIO_PROCESS, 0), thread_slice_ns()
        hint.want(False)
        return seen

    assert in_thread(run) == (7, MIN_SLICE_NS)
    assert thread_slice_ns() == mine


def test_threads_started_while_it_is_short_start_with_the_default() -> None:
    def run() -> tuple[Any, ...]:
        default = thread_slice_ns()
        hint = SliceHint(MIN_SLICE_NS)
        hint.want(True)
        child = in_thread(thread_slice_ns)  # an executor's worker, say
        short = thread_slice_ns()
        hint.want(False)
        return default, short, child

    default, short, child = in_thread(run)
    assert short == MIN_SLICE_NS
    assert child == default != short


def test_hints_on_one_thread_share_it_until_the_last_gives_it_back() -> None:
    def run() -> list[int | None]:
        first, second = SliceHint(2 * MIN_SLICE_NS), SliceHint(4 * MIN_SLICE_NS)
        seen = [thread_slice_ns()]
        first.want(True)
        second.want(True)  # the first one's length stays
        seen.append(thread_slice_ns())
        first.want(False)
        seen.append(thread_slice_ns())
        second.want(False)
        seen.append(thread_slice_ns())
        return seen

    default, both, one, none = in_thread(run)
    assert both == one == 2 * MIN_SLICE_NS
    assert none == default != both


def test_a_zero_slice_never_asks_and_a_batch_thread_gets_it() -> None:
    def run() -> tuple[Any, ...]:
        default = thread_slice_ns()
        off = SliceHint(0)
        off.want(True)
        unasked = off.short, thread_slice_ns()
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        hint = SliceHint(MIN_SLICE_NS)
        hint.want(True)
        batch = os.sched_getscheduler(0), thread_slice_ns()
        hint.want(False)
        return default, unasked, batch

    default, unasked, batch = in_thread(run)
    assert unasked == (False, default)
    # (The reset-on-fork flag is set while it is short: see the next test.)
    assert batch == (os.SCHED_BATCH | os.SCHED_RESET_ON_FORK, MIN_SLICE_NS)


def test_the_threads_own_reset_on_fork_flag_is_kept() -> None:
    def run() -> tuple[Any, ...]:
        policy = os.SCHED_OTHER | os.SCHED_RESET_ON_FORK
        os.sched_setscheduler(0, policy, os.sched_param(0))
        hint = SliceHint(MIN_SLICE_NS)
        hint.want(True)
        short = thread_slice_ns()
        hint.want(False)
        return short, os.sched_getscheduler(0)

    short, kept = in_thread(run)
    assert short == MIN_SLICE_NS
    assert kept == os.SCHED_OTHER | os.SCHED_RESET_ON_FORK


def test_a_thread_with_a_negative_nice_value_is_left_alone() -> None:
    def run() -> tuple[Any, ...]:
        default = thread_slice_ns()
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -1)
        except PermissionError:
            return default, None
        hint = SliceHint(MIN_SLICE_NS)
        hint.want(True)
        negative = thread_slice_ns()
        hint.want(False)
        return default, negative

    default, negative = in_thread(run)
    if negative is None:
        pytest.skip("lowering a nice value needs privilege (CAP_SYS_NICE)")
    assert negative == default


def test_a_refusal_never_strands_a_thread_that_has_the_slice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A seccomp filter refusing sched_setattr, for one thread only: the other, which
    # holds the short slice, still gives it back, and nobody asks again.
    monkeypatch.setattr(timeslice, "_refused", False)  # and so back to False after
    denied: set[int] = set()
    real = timeslice._call

    def call(nr: int, *args: object) -> None:
        if threading.get_ident() in denied and nr != timeslice._CALLS[os.uname().machine][1]:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        real(nr, *args)

    monkeypatch.setattr(timeslice, "_call", call)

    def refused() -> bool:
        denied.add(threading.get_ident())
        SliceHint(MIN_SLICE_NS).want(True)
        return supported()

    def run() -> tuple[Any, ...]:
        default = thread_slice_ns()
        held = SliceHint(MIN_SLICE_NS)
        held.want(True)
        short = thread_slice_ns()
        still = in_thread(refused)
        held.want(False)
        back = thread_slice_ns()
        held.want(True)  # not asked again
        again = thread_slice_ns()
        held.want(False)
        return default, short, still, back, again

    default, short, still, back, again = in_thread(run)
    assert short == MIN_SLICE_NS and not still
    assert back == again == default


def test_a_forked_child_can_take_the_slice_again() -> None:
    # In a process of its own that never starts UCX: it forks while a hint holds the
    # short slice, and the child's hints start afresh.
    code = textwrap.dedent(
        """
        import os, sys
        from ucxrpc.io.timeslice import SliceHint, thread_slice_ns
        default = thread_slice_ns()
        held = SliceHint(100_000)
        held.want(True)
        pid = os.fork()
        if pid == 0:
            seen = [thread_slice_ns()]
            mine = SliceHint(200_000)
            mine.want(True)
            seen.append(thread_slice_ns())
            mine.want(False)
            seen.append(thread_slice_ns())
            print(default, *seen, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    default, at_fork, taken, given_back = (int(x) for x in out.stdout.split())
    assert at_fork == default  # reset at the fork
    assert taken == 200_000 and given_back == default


class Napper:
    """A server whose ``nap()`` waits until released, on one manager, and a client of
    it on another (configured with ``config``), both on the running loop's thread."""

    def __init__(self) -> None:
        self.server = ucxrpc.Server()
        self.started = 0
        self.release = asyncio.Event()

        @self.server.rpc
        async def nap() -> str:
            self.started += 1
            await self.release.wait()
            return "rested"

    @contextlib.asynccontextmanager
    async def client(self, **config: Any) -> AsyncIterator[tuple[ucxrpc.Client, Any]]:
        async with ucxrpc.Manager() as m1, ucxrpc.Manager(**config) as m2:
            await self.server.start(m1, "127.0.0.1", 0)
            client = await m2.connect("127.0.0.1", self.server.port)
            yield client, m2.engine
            await client.close()

    async def slice_during(
        self, client: ucxrpc.Client, engine: Any, calls: int, hold: float = 0.0
    ) -> int | None:
        """The loop thread's slice while ``calls`` naps are awaited, read after the
        client's engine has driven with all of them sent and started, and ``hold``
        seconds later."""
        self.started = 0
        self.release.clear()
        naps = [asyncio.ensure_future(client.call("nap")) for _ in range(calls)]
        await until(lambda: self.started == calls)
        engine.kick()  # a drive of the client's engine runs before this task goes on
        await asyncio.sleep(0)
        if hold:
            await asyncio.sleep(hold)
        seen = thread_slice_ns()
        self.release.set()
        assert await asyncio.gather(*naps) == ["rested"] * calls
        return seen


@pytest.fixture
def short_hold(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(engine_module, "SLICE_HOLD", 0.2)
    return 0.2


def test_a_client_awaiting_a_reply_has_the_short_slice_until_it_is_idle(
    short_hold: float,
) -> None:
    async def scenario() -> tuple[Any, ...]:
        default = thread_slice_ns()
        napper = Napper()
        async with napper.client() as (client, engine):
            during = await napper.slice_during(client, engine, 1)
            # Given back once no reply has been awaited for SLICE_HOLD.
            t0 = time.monotonic()
            await until(lambda: thread_slice_ns() == default, timeout=5)
            waited = time.monotonic() - t0
        return default, during, waited, thread_slice_ns()

    default, during, waited, after = on_own_loop(scenario)
    assert during == MIN_SLICE_NS  # the default, 100 µs
    assert waited < 5 * short_hold
    assert after == default


def test_a_reply_awaited_longer_than_the_hold_keeps_it_without_spinning(
    short_hold: float,
) -> None:
    async def scenario() -> tuple[Any, ...]:
        napper = Napper()
        # Without frame rings the client's engine has no naps: nothing but the timer
        # runs while it sleeps awaiting the reply.
        async with napper.client(shared_frames=False) as (client, engine):
            cpu = time.thread_time()
            during = await napper.slice_during(client, engine, 1, hold=4 * short_hold)
            return during, time.thread_time() - cpu

    during, cpu = on_own_loop(scenario)
    assert during == MIN_SLICE_NS
    # Asleep, but for the reply spin and a timer per hold: 6 ms of CPU here, where a
    # timer rescheduled with no delay spun the loop for 0.6 s of the 0.8.
    assert cpu < short_hold / 2


def test_polling_mode_gives_it_back_too(short_hold: float) -> None:
    async def scenario() -> tuple[Any, ...]:
        default = thread_slice_ns()
        napper = Napper()
        async with napper.client(progress_mode="polling") as (client, engine):
            during = await napper.slice_during(client, engine, 1)
            await until(lambda: thread_slice_ns() == default, timeout=5)
        return default, during

    default, during = on_own_loop(scenario)
    assert during == MIN_SLICE_NS != default


def test_no_short_slice_when_turned_off_or_with_many_replies_awaited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Long enough that the last call surely comes within it of the busy ones.
    monkeypatch.setattr(engine_module, "SLICE_HOLD", 2.0)

    async def scenario() -> tuple[Any, ...]:
        default = thread_slice_ns()
        seen: list[int | None] = []
        napper = Napper()
        async with napper.client(sched_slice_us=0) as (client, engine):
            seen.append(await napper.slice_during(client, engine, 1))
        napper = Napper()
        async with napper.client(sched_slice_us=300) as (client, engine):
            seen.append(await napper.slice_during(client, engine, 1))
        napper = Napper()
        async with napper.client() as (client, engine):
            seen.append(await napper.slice_during(client, engine, 1))
            busy = engine_module.SLICE_AWAITING + 6
            seen.append(await napper.slice_during(client, engine, busy))  # given back
            seen.append(await napper.slice_during(client, engine, 1))  # not yet again
        return default, seen, thread_slice_ns()

    default, seen, after = on_own_loop(scenario)
    assert seen == [default, 3 * MIN_SLICE_NS, MIN_SLICE_NS, default, default]
    # (seen[2] is 100 µs: the 300 µs client's shutdown gave its slice back.)
    assert after == default
