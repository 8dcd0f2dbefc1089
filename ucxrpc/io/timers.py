"""Deadlines by the thousand: one heap of timers behind one event-loop timer.

Every call with a deadline needs a timer, and nearly every one of them is cancelled
(the call ends in time). An event-loop timer per call costs a libuv handle made,
started, stopped and freed (about 2.6 µs with uvloop here), and an ``asyncio.timeout``
scope around a handler about 6.5 µs; a push onto a heap and a flag cost about 0.5 µs.
:class:`Timers` keeps the heap and arms the loop's timer only for the earliest live
deadline. Cancelled timers drop their callback at once and leave the heap in bulk:
once they outnumber both the live ones and 256, the heap is rebuilt without them.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable
from typing import Any

__all__ = ["Timer", "Timers"]

#: The heap is rebuilt without its cancelled entries once they outnumber both the live
#: ones and this: a rebuild costs a pass over the heap.
_COMPACT_AFTER = 256


class Timer:
    """One deadline in a :class:`Timers` heap, made by :meth:`Timers.at`.

    Unlike :class:`asyncio.TimerHandle`, ``cancelled`` is an attribute, and it is also
    True once the timer has fired (it can fire no more).

    Attributes:
        when: The loop time it is due at.
        fired: True once its callback has been called.
        cancelled: True once :meth:`cancel` was called, or once it fired.
    """

    __slots__ = ("_args", "_callback", "_owner", "cancelled", "fired", "when")

    def __init__(
        self, owner: Timers, when: float, callback: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        self._owner = owner
        self._callback: Callable[..., object] | None = callback
        self._args = args
        self.when = when
        self.fired = False
        self.cancelled = False

    def cancel(self) -> None:
        """Never call the callback (no effect once it was called, or a second time)."""
        if not self.cancelled:
            self._forget()
            self._owner._dropped()

    def _forget(self) -> None:
        """Mark it cancelled and let go of what the callback holds, without telling the
        heap (which does this itself when it lets go of every timer at once)."""
        # At once: the entry may wait in the heap until its deadline or a rebuild.
        self.cancelled = True
        self._callback = None
        self._args = ()

    def _fire(self) -> None:
        # (The heap has popped it already: nothing to tell it.)
        callback, args = self._callback, self._args
        self._forget()
        self.fired = True
        if callback is not None:
            callback(*args)


class Timers:
    """Timers on one event loop, sharing one of the loop's timers.

    Args:
        loop: The loop whose clock (``loop.time()``) the deadlines are on and whose
            callbacks they run as.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = 0
        self._dead = 0
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = math.inf

    def __len__(self) -> int:
        """Timers neither cancelled nor fired."""
        return len(self._heap) - self._dead

    @property
    def held(self) -> int:
        """Entries in the heap, cancelled ones included. A cancel rebuilds it once the
        cancelled ones outnumber both the live ones and 256; timers that fire leave it
        by themselves."""
        return len(self._heap)

    def at(self, when: float, callback: Callable[..., object], *args: Any) -> Timer:
        """Call ``callback(*args)`` at loop time ``when`` (at once, in a later loop
        iteration, if that has passed).

        Args:
            when: The deadline, in the loop's clock.
            callback: Called once, from the loop, unless cancelled first.
            *args: Passed to ``callback``.

        Returns:
            The timer, to :meth:`Timer.cancel`.
        """
        timer = Timer(self, when, callback, args)
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, timer))
        if when < self._armed_for:
            self._arm(when)
        return timer

    def close(self) -> None:
        """Cancel every timer (and the loop's timer)."""
        for _, _, timer in self._heap:
            timer._forget()
        self._heap.clear()
        self._dead = 0
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_for = math.inf

    def _dropped(self) -> None:
        # A timer of this heap was cancelled. (The rebuild is in place: _due, which
        # a callback's cancel may reach, holds the same list.)
        self._dead += 1
        heap = self._heap
        if self._dead > _COMPACT_AFTER and self._dead * 2 > len(heap):
            heap[:] = [entry for entry in heap if not entry[2].cancelled]
            heapq.heapify(heap)
            self._dead = 0

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = when
        self._handle = self._loop.call_at(when, self._due)

    def _due(self) -> None:
        # The loop ran its timer for _armed_for: everything due by then is due now,
        # even where loop.time() still reads a little short of it (libuv counts
        # whole milliseconds), as asyncio.timeout's scopes would see it. Timers that
        # callbacks add now wait for the next pass (a later loop iteration).
        self._handle = None
        due = max(self._loop.time(), self._armed_for)
        last = self._seq
        self._armed_for = math.inf
        heap = self._heap
        try:
            while heap and heap[0][0] <= due and heap[0][1] <= last:
                timer = heapq.heappop(heap)[2]
                if timer.cancelled:
                    self._dead -= 1
                    continue
                try:
                    timer._fire()
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:  # as the loop reports a failing callback
                    self._loop.call_exception_handler(
                        {"message": "exception in a timer callback", "exception": exc}
                    )
        finally:
            while heap and heap[0][2].cancelled:
                heapq.heappop(heap)
                self._dead -= 1
            if heap:
                self._arm(heap[0][0])
