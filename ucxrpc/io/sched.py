"""Priority-ordered admission: a semaphore whose waiters start by priority, FIFO within one.

Pure asyncio (no UCX): the server uses it for its concurrency limit and the client for
``max_inflight``, so queued work starts in priority order on both sides.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

__all__ = ["PriorityLimiter"]


class PriorityLimiter:
    """At most ``limit`` holders; waiters are admitted highest priority first.

    Args:
        limit: How many may hold a slot at once (``None``: unlimited).
    """

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._held = 0
        self._seq = itertools.count()
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []

    @property
    def held(self) -> int:
        """Slots currently held."""
        return self._held

    @property
    def waiting(self) -> int:
        """Waiters not yet admitted (cancelled ones may be counted until skipped)."""
        return sum(1 for _, _, f in self._waiters if not f.done())

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits; never blocks."""
        if self._limit is None or (self._held < self._limit and not self._waiters):
            self._held += 1
            return True
        return False

    async def acquire(self, priority: int = 1) -> None:
        """Wait for a slot; higher ``priority`` is admitted first, FIFO within one."""
        if self.try_acquire():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # admitted and cancelled in the same breath: pass it on
            raise

    def release(self) -> None:
        """Give a slot back, admitting the best waiter if there is one."""
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the waiter
                return
        self._held -= 1
