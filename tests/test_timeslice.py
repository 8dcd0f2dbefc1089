"""A short scheduler slice while replies are awaited (``Config.sched_slice_us``).

The hint itself is tested in threads of their own (a thread's slice, nice value and
policy are its own), the engine's use of it over real UCX: a client awaiting a slow
reply has the short slice on its loop's thread, and the kernel's default is back once
no reply has been awaited for ``SLICE_HOLD``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest
from conftest import until

import ucxrpc
from ucxrpc.io import engine as engine_module
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
    thread.join(10)
    assert not thread.is_alive(), "the thread did not finish"
    if errors:
        raise errors[0]
    return out[0]


def _granted() -> bool:
    hint = SliceHint(2 * MIN_SLICE_NS)
    hint.want(True)
    got = thread_slice_ns()
    hint.want(False)
    return got == 2 * MIN_SLICE_NS


if not (supported() and in_thread(_granted)):
    pytest.skip(
        "the kernel grants no custom scheduler slice (Linux 6.12+ on x86-64 or arm64)",
        allow_module_level=True,
    )


def test_a_hint_gives_its_thread_the_slice_and_takes_it_back() -> None:
    def run() -> tuple[Any, ...]:
        default = thread_slice_ns()
        hint = SliceHint(3 * MIN_SLICE_NS)
        hint.want(True)
        hint.want(True)  # no change: no call
        short = thread_slice_ns()
        hint.want(False)
        return default, short, hint.short, thread_slice_ns()

    default, short, still_short, after = in_thread(run)
    assert short == 3 * MIN_SLICE_NS and default != short
    assert not still_short and after == default


def test_the_thread_keeps_its_nice_value_and_others_keep_their_slice() -> None:
    mine = thread_slice_ns()

    def run() -> tuple[Any, ...]:
        os.setpriority(os.PRIO_PROCESS, 0, 7)  # this thread's (Linux: a tid)
        hint = SliceHint(MIN_SLICE_NS)
        hint.want(True)
        seen = os.getpriority(os.PRIO_PROCESS, 0), thread_slice_ns()
        hint.want(False)
        return seen

    nice, short = in_thread(run)
    assert (nice, short) == (7, MIN_SLICE_NS)
    assert thread_slice_ns() == mine


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


def test_a_zero_slice_never_asks_and_an_idle_policy_is_left_alone() -> None:
    def run() -> tuple[Any, ...]:
        default = thread_slice_ns()
        off = SliceHint(0)
        off.want(True)
        unasked = off.short, thread_slice_ns()
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        hint = SliceHint(MIN_SLICE_NS)
        hint.want(True)
        idle = os.sched_getscheduler(0), thread_slice_ns()
        hint.want(False)
        return default, unasked, idle

    default, unasked, idle = in_thread(run)
    assert unasked == (False, default)
    assert idle[0] == os.SCHED_IDLE and idle[1] != MIN_SLICE_NS


class Napper:
    """A server whose ``nap()`` waits until released, on one manager, and a client of
    it on another (configured with ``config``), both on this loop's thread."""

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

    async def slice_during(self, client: ucxrpc.Client, engine: Any, calls: int) -> int | None:
        """The loop thread's slice while ``calls`` naps are awaited (after the client's
        engine has driven twice with all of them sent and started)."""
        self.started = 0
        self.release.clear()
        naps = [asyncio.ensure_future(client.call("nap")) for _ in range(calls)]
        await until(lambda: self.started == calls)
        drives = engine.drives
        await until(lambda: engine.drives >= drives + 2)
        seen = thread_slice_ns()
        self.release.set()
        assert await asyncio.gather(*naps) == ["rested"] * calls
        return seen


async def test_a_client_awaiting_a_reply_has_the_short_slice_until_it_is_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_module, "SLICE_HOLD", 0.2)
    default = thread_slice_ns()
    napper = Napper()
    async with napper.client() as (client, engine):
        assert await napper.slice_during(client, engine, 1) == MIN_SLICE_NS  # 100 µs
        # Given back once no reply has been awaited for SLICE_HOLD (the engine sleeps).
        await until(lambda: thread_slice_ns() == default, timeout=5)
    assert thread_slice_ns() == default


async def test_no_short_slice_when_turned_off_or_with_many_replies_awaited() -> None:
    default = thread_slice_ns()
    napper = Napper()
    async with napper.client(sched_slice_us=0) as (client, engine):
        assert await napper.slice_during(client, engine, 1) == default
    napper = Napper()
    async with napper.client(sched_slice_us=300) as (client, engine):
        assert await napper.slice_during(client, engine, 1) == 3 * MIN_SLICE_NS
    napper = Napper()
    async with napper.client() as (client, engine):
        busy = engine_module.SLICE_AWAITING + 6
        assert await napper.slice_during(client, engine, busy) == default
    assert thread_slice_ns() == default  # shutdown gives it back


def test_the_setting_is_validated() -> None:
    assert ucxrpc.Config().sched_slice_us == 100.0
    with pytest.raises(ValueError):
        ucxrpc.Config(sched_slice_us=-1)
    with pytest.raises(ValueError):
        ucxrpc.Config(sched_slice_us=200_000)
