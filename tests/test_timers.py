"""The heap of timers behind the deadlines of calls (``ucxrpc.io.timers``), on uvloop."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import pytest
import uvloop

from ucxrpc.io.timers import Timers

pytestmark = pytest.mark.timeout(30)


def run(main: Any) -> Any:
    return uvloop.run(main())


def test_timers_fire_in_deadline_order_with_their_arguments_and_cancelled_ones_never() -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        timers = Timers(loop)
        fired: list[Any] = []
        now = loop.time()
        # Added out of order: each earlier one re-arms the loop's timer.
        for delay, name in [(0.06, "c"), (0.02, "a"), (0.04, "b"), (0.03, "x"), (0.01, "y")]:
            timer = timers.at(
                now + delay, lambda n, d: fired.append((n, loop.time() - (now + d))), name, delay
            )
            if name in "xy":
                timer.cancel()
                assert timer.cancelled and not timer.fired
        assert len(timers) == 3
        done = loop.create_future()
        timers.at(now + 0.07, done.set_result, None)
        await done
        assert len(timers) == 0 and timers.held == 0
        return fired

    fired = run(main)
    assert [name for name, _ in fired] == ["a", "b", "c"]
    assert all(late > -0.0011 for _, late in fired)  # none before its time


def test_an_earlier_timer_re_arms_the_loops_timer() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        timers = Timers(loop)
        timers.at(loop.time() + 30, print, "far")
        fired = loop.create_future()
        when = loop.time() + 0.01
        timers.at(when, lambda: fired.set_result(loop.time()))
        return await asyncio.wait_for(fired, 5) - when

    assert -0.0011 < run(main) < 5


def test_a_callback_may_cancel_hundreds_of_timers_due_with_it() -> None:
    # Enough cancels to rebuild the heap while it is being emptied.
    async def main() -> tuple[list[str], int, int]:
        loop = asyncio.get_running_loop()
        timers = Timers(loop)
        fired: list[str] = []
        when = loop.time() + 0.01
        victims = []

        def first() -> None:
            fired.append("first")
            for victim in victims:
                victim.cancel()

        timers.at(when, first)
        victims.extend(timers.at(when, fired.append, "victim") for _ in range(600))
        done = loop.create_future()
        timers.at(when + 0.01, lambda: (fired.append("later"), done.set_result(None)))
        await done
        return fired, len(timers), timers.held

    assert run(main) == (["first", "later"], 0, 0)


def test_a_timer_added_by_a_callback_fires_in_a_later_pass() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        timers = Timers(loop)
        order: list[str] = []
        done = loop.create_future()

        def again(n: int) -> None:
            order.append(f"timer {n}")
            if n < 3:
                timers.at(loop.time() - 1, again, n + 1)  # already due
                loop.call_soon(order.append, f"soon {n}")
            else:
                done.set_result(None)

        timers.at(loop.time() + 0.005, again, 1)
        await done
        return order

    assert run(main) == ["timer 1", "soon 1", "timer 2", "soon 2", "timer 3"]


def test_a_deadline_already_passed_fires_in_a_later_loop_iteration() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers = Timers(loop)
        fired: list[int] = []
        timer = timers.at(loop.time() - 1.0, fired.append, 1)
        assert fired == [] and not timer.fired  # never from inside at()
        for _ in range(3):
            await asyncio.sleep(0)
        await asyncio.sleep(0.005)
        assert fired == [1] and timer.fired and timer.cancelled
        timer.cancel()  # a fired timer: nothing happens, nothing is counted twice
        assert len(timers) == 0 and timers.held == 0

    run(main)


def test_the_heap_stays_within_twice_the_live_timers_and_cancelled_ones_hold_nothing() -> None:
    class Big:
        """Something a timer's callback holds: it must be let go at cancel."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers = Timers(loop)
        live = [timers.at(loop.time() + 600, print, "live", i) for i in range(100)]
        most = 0
        refs = []
        for i in range(100_000):
            big = Big()
            if i % 1000 == 0:
                refs.append(weakref.ref(big))
            timers.at(loop.time() + 60 + i * 1e-6, print, big).cancel()
            most = max(most, timers.held)
        del big
        assert len(timers) == 100
        # Rebuilt once the cancelled entries outnumber the live ones and 256.
        assert most <= 100 + 257
        assert all(ref() is None for ref in refs)
        for timer in live:
            timer.cancel()
        assert len(timers) == 0 and timers.held <= 257

    run(main)


def test_a_failing_callback_is_reported_and_the_others_still_fire() -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        reported: list[BaseException] = []
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx["exception"]))
        timers = Timers(loop)
        fired: list[str] = []
        when = loop.time() + 0.01

        def boom() -> None:
            raise ValueError("boom")

        timers.at(when, boom)
        timers.at(when, fired.append, "after")
        await asyncio.sleep(0.03)
        return [fired, [repr(e) for e in reported]]

    assert run(main) == [["after"], ["ValueError('boom')"]]


def test_callbacks_may_add_and_cancel_timers_of_the_same_heap() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        timers = Timers(loop)
        fired: list[str] = []
        done = loop.create_future()
        now = loop.time()
        victim = timers.at(now + 0.02, fired.append, "victim")

        def first() -> None:
            fired.append("first")
            victim.cancel()
            timers.at(loop.time() + 0.01, fired.append, "added")
            timers.at(loop.time() + 0.02, done.set_result, None)

        timers.at(now + 0.01, first)
        await done
        return fired

    assert run(main) == ["first", "added"]


def test_close_cancels_every_timer() -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        timers = Timers(loop)
        fired: list[int] = []
        kept = [timers.at(loop.time() + 0.01 * i, fired.append, i) for i in range(5)]
        timers.close()
        await asyncio.sleep(0.08)
        assert all(t.cancelled and not t.fired for t in kept)
        assert len(timers) == 0 and timers.held == 0
        return fired

    assert run(main) == []


def test_a_timer_due_later_does_not_fire_with_an_earlier_one() -> None:
    # The loop's timer may run when loop.time() still reads a little short of the
    # deadline it was armed for (libuv counts whole milliseconds), and what is due by
    # then fires; a timer due 3 ms later waits for its own time.
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        timers = Timers(loop)
        early = []
        for _ in range(10):
            fired = loop.create_future()
            when = loop.time() + 0.005
            timers.at(when, lambda: None)
            timers.at(when + 0.003, lambda f=fired: f.set_result(loop.time()))
            early.append(when + 0.003 - await fired)
        return early

    assert max(run(main)) < 0.0011


def test_a_cancelled_timer_lets_go_of_its_callback_at_once() -> None:
    class Held:
        def __call__(self) -> None:
            raise AssertionError("cancelled: never called")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers = Timers(loop)
        held = Held()
        ref = weakref.ref(held)
        timer = timers.at(loop.time() + 60, held)
        del held
        assert ref() is not None
        timer.cancel()
        assert ref() is None and timers.held == 1  # still in the heap, holding nothing

    run(main)
