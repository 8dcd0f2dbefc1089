"""Ids that never collide with a live one: calls on a connection, connections on a worker."""

from __future__ import annotations

import secrets
from collections.abc import Container

from ..errors import ResourceExhausted

__all__ = ["CallIds", "random_id"]


class CallIds:
    """Allocates call ids in ``1..limit``, skipping ids still in use, wrapping around.

    Args:
        limit: The largest id (``2**32 - 1`` for calls).
        start: The first id to try (random by default, so ids are not predictable
            from the connection's age).
    """

    def __init__(self, limit: int, start: int | None = None) -> None:
        self.limit = limit
        self._next = secrets.randbelow(limit) + 1 if start is None else start

    def allocate(self, live: Container[int], count: int) -> int:
        """An id not in ``live`` (which holds ``count`` ids).

        Raises:
            ResourceExhausted: Every id is in use.
        """
        if count >= self.limit:
            raise ResourceExhausted("every call id is in use")
        limit = self.limit
        candidate = self._next
        while candidate in live:
            candidate = candidate + 1 if candidate < limit else 1
        self._next = candidate + 1 if candidate < limit else 1
        return candidate


def random_id(limit: int, live: Container[int]) -> int:
    """A random id in ``1..limit`` not in ``live`` (connection ids: hard to guess)."""
    while True:
        candidate = secrets.randbelow(limit) + 1
        if candidate not in live:
            return candidate
