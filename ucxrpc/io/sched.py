"""Priority-ordered, fair admission: a semaphore whose waiters start by priority, and
within one priority take turns by key (FIFO within a key).

Pure asyncio (no UCX): the server uses it for its concurrency limit, keyed by
connection, so one client flooding the server cannot starve another one's calls of
the same priority; the client uses it for ``max_inflight``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Hashable

__all__ = ["PriorityLimiter"]


class PriorityLimiter:
    """At most ``limit`` holders; waiters are admitted highest priority first, keys
    taking turns within a priority, FIFO within a key.

    Args:
        limit: How many may hold a slot at once (``None``: unlimited).
    """

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._held = 0
        self._queued = 0  # entries in _waiters, cancelled ones included until skipped
        # priority -> key -> waiters of that key, keys in turn order
        self._waiters: dict[int, OrderedDict[Hashable, deque[asyncio.Future[None]]]] = {}

    @property
    def held(self) -> int:
        """Slots currently held."""
        return self._held

    @property
    def waiting(self) -> int:
        """Waiters not yet admitted."""
        return sum(
            1
            for keys in self._waiters.values()
            for queue in keys.values()
            for f in queue
            if not f.done()
        )

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits; never blocks."""
        if self._limit is None or (self._held < self._limit and not self._queued):
            self._held += 1
            return True
        return False

    async def acquire(self, priority: int = 1, key: Hashable = None) -> None:
        """Wait for a slot; higher ``priority`` is admitted first; within a priority,
        each ``key`` gets a turn in order; FIFO within a key."""
        if self.try_acquire():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        keys = self._waiters.setdefault(-priority, OrderedDict())
        queue = keys.get(key)
        if queue is None:
            queue = keys[key] = deque()
        queue.append(fut)
        self._queued += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # admitted and cancelled in the same breath: pass it on
            raise

    def release(self) -> None:
        """Give a slot back, admitting the next waiter if there is one."""
        while self._waiters:
            level = min(self._waiters)
            keys = self._waiters[level]
            key, queue = next(iter(keys.items()))
            fut = queue.popleft()
            self._queued -= 1
            if queue:
                keys.move_to_end(key)  # the next turn goes to the next key
            else:
                del keys[key]
                if not keys:
                    del self._waiters[level]
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the waiter
                return
        self._held -= 1
