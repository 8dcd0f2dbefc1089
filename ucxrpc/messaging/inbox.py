"""Received raw messages, by endpoint and tag, waiting to be taken.

Receivers either take the next message of one ``(endpoint, tag)`` or the oldest message
of any. A message goes straight to a receiver already waiting for it; otherwise it is
queued. Queues are bounded: a message beyond the bound is refused (the caller counts
and logs it), never dropped unnoticed.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import NamedTuple

__all__ = ["Inbox", "Queued"]

Key = tuple[int, int]  # (endpoint id, tag)


class Queued(NamedTuple):
    """A message waiting in the inbox."""

    seq: int
    endpoint: int
    tag: int
    data: bytes
    timestamp: float


class Inbox:
    """Per-(endpoint, tag) FIFO queues plus waiting receivers."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._queues: dict[Key, deque[Queued]] = {}
        self._count = 0
        self._seq = itertools.count()
        self._waiters: dict[Key, deque[asyncio.Future[Queued]]] = {}
        self._any: deque[asyncio.Future[tuple[int, Queued]]] = deque()

    def __len__(self) -> int:
        return self._count

    def put(self, endpoint: int, tag: int, data: bytes, timestamp: float) -> bool:
        """Deliver a message. Returns False when the inbox is full (it was refused)."""
        item = Queued(next(self._seq), endpoint, tag, data, timestamp)
        key = (endpoint, tag)
        waiters = self._waiters.get(key)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(item)
                return True
        while self._any:
            fut_any = self._any.popleft()
            if not fut_any.done():
                fut_any.set_result((endpoint, item))
                return True
        if self._count >= self.limit:
            return False
        self._queues.setdefault(key, deque()).append(item)
        self._count += 1
        return True

    def put_back(self, item: Queued) -> None:
        """Return a taken message to the head of its queue (the receiver refused it)."""
        self._queues.setdefault((item.endpoint, item.tag), deque()).appendleft(item)
        self._count += 1

    def take(self, endpoint: int, tag: int) -> Queued | None:
        """The oldest message of ``(endpoint, tag)``, or None."""
        queue = self._queues.get((endpoint, tag))
        if not queue:
            return None
        self._count -= 1
        return queue.popleft()

    def take_any(self) -> Queued | None:
        """The oldest message of all, or None."""
        heads = [q[0] for q in self._queues.values() if q]
        if not heads:
            return None
        oldest = min(heads, key=lambda q: q.seq)
        return self.take(oldest.endpoint, oldest.tag)

    def wait(self, endpoint: int, tag: int) -> asyncio.Future[Queued]:
        """A future for the next message of ``(endpoint, tag)``."""
        fut: asyncio.Future[Queued] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault((endpoint, tag), deque()).append(fut)
        return fut

    def wait_any(self) -> asyncio.Future[tuple[int, Queued]]:
        """A future for the next message from anyone."""
        fut: asyncio.Future[tuple[int, Queued]] = asyncio.get_running_loop().create_future()
        self._any.append(fut)
        return fut

    def tags_waiting(self, endpoint: int) -> list[int]:
        """Tags with messages queued from ``endpoint`` (for error messages)."""
        return sorted(tag for (ep, tag), q in self._queues.items() if ep == endpoint and q)

    def fail(self, endpoint: int, exc: BaseException) -> None:
        """Fail every receiver waiting on ``endpoint`` (it went away)."""
        for (ep, _), waiters in self._waiters.items():
            if ep == endpoint:
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(exc)
                waiters.clear()

    def fail_all(self, exc: BaseException) -> None:
        """Fail every waiting receiver (the worker closed)."""
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(exc)
            waiters.clear()
        for fut_any in self._any:
            if not fut_any.done():
                fut_any.set_exception(exc)
        self._any.clear()

    def drop(self, endpoint: int) -> int:
        """Forget the queued messages of ``endpoint``; returns how many there were."""
        gone = 0
        for key in [k for k in self._queues if k[0] == endpoint]:
            gone += len(self._queues.pop(key))
        self._count -= gone
        return gone
