"""Deadlines by the thousand: one heap of timers behind one event-loop timer.

Every call with a deadline needs a timer, and nearly every one of them is cancelled
(the call ends in time). An event-loop timer per call costs a libuv handle made,
started, stopped and freed (about 2.5 µs with uvloop here), and an ``asyncio.timeout``
scope around a handler about 6.5 µs; a push onto a heap and a flag cost about 0.5 µs.
:class:`Timers` keeps the heap and arms the loop's timer only for the earliest live
deadline. Cancelled timers drop their callback at once and leave the heap in bulk, so
the heap stays within twice the live timers (plus a constant).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any

__all__ = ["Timer", "Timers"]

#: Cancelled entries the heap may hold before it is rebuilt without them (and never
#: more than the live ones): rebuilding costs a pass over the heap.
_COMPACT_AFTER = 256


class Timer:
    """One deadline in a :class:`Timers` heap (like :class:`asyncio.TimerHandle`).

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
            self.forget()
            self._owner.dropped()

    def forget(self) -> None:
        """Mark it cancelled and let go of what the callback holds, without telling the
        heap (which does this itself when it lets go of every timer at once)."""
        # At once: the entry may wait in the heap until its deadline or a rebuild.
        self.cancelled = True
        self._callback = None
        self._args = ()

    def fire(self) -> None:
        """Call the callback now (the heap does, once the deadline is due)."""
        callback, args = self._callback, self._args
        self.forget()
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
        self._seq = itertools.count()
        self._dead = 0
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = math.inf

    def __len__(self) -> int:
        """Timers neither cancelled nor fired."""
        return len(self._heap) - self._dead

    @property
    def held(self) -> int:
        """Entries in the heap, cancelled ones included (at most twice the live ones,
        plus a constant)."""
        return len(self._heap)

    def at(self, when: float, callback: Callable[..., object], *args: Any) -> Timer:
        """Call ``callback(*args)`` at loop time ``when`` (at once, in a later loop
        iteration, if that has passed).

        Returns:
            The timer, to :meth:`Timer.cancel`.
        """
        timer = Timer(self, when, callback, args)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        if when < self._armed_for:
            self._arm(when)
        return timer

    def close(self) -> None:
        """Cancel every timer (and the loop's timer)."""
        for _, _, timer in self._heap:
            timer.forget()
        self._heap.clear()
        self._dead = 0
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_for = math.inf

    def dropped(self) -> None:
        """A timer of this heap was cancelled (called by :meth:`Timer.cancel`)."""
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
        # whole milliseconds), as asyncio.timeout's scopes would see it.
        self._handle = None
        due = max(self._loop.time(), self._armed_for)
        self._armed_for = math.inf
        heap = self._heap
        while heap and heap[0][0] <= due:
            timer = heapq.heappop(heap)[2]
            if timer.cancelled:
                self._dead -= 1
                continue
            try:
                timer.fire()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # as the loop reports a failing callback
                self._loop.call_exception_handler(
                    {"message": "exception in a timer callback", "exception": exc}
                )
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._dead -= 1
        if heap:
            self._arm(heap[0][0])
