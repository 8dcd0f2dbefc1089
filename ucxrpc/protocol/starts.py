"""Which delivered calls start now, and in what order the others follow.

A server starts a call by making a task for it, and the event loop runs tasks in the
order they were made. If one connection's burst made a thousand tasks at once, another
connection's call arriving just after would wait for all of them. So the calls started
in one loop iteration (a *turn*) share a bounded budget across every connection, and
the calls over it wait here until a later turn:

* connections take turns, one call each per pass;
* a connection's own calls start highest priority first, in arrival order within a
  priority;
* a connection that starts waiting joins the end of the round (going first instead
  would let connections that wait a call or two every turn starve one with a backlog).

The budget shrinks while calls start past a burst: a turn's calls run, one after the
other, before the loop looks for new frames, so a connection with one call in flight
waits, for each of its calls, for the whole turn of another's burst. For the
:attr:`StartQueue.recent` turns after a call of a connection with nothing waiting
started while other connections had calls waiting, a turn starts
:attr:`StartQueue.shared` calls; otherwise the larger :attr:`StartQueue.budget` (fewer,
fuller turns: more calls per second). So a burst alone keeps the budget, and so do
bursts against each other while each keeps calls waiting; a burst whose queue runs
empty passes the other's like a ping does, and shrinks it. An idle queue (nothing
waiting, nothing started since the last turn) has the whole budget again.

A call of a connection that has nothing waiting starts at once while the turn's budget
lasts, so an idle server adds nothing to a call's latency; and the first such call of
a connection in a turn starts at once even when the budget is spent (by other
connections' bursts): a connection with one call in flight never waits a turn.

Pure bookkeeping: the server makes the tasks and calls :meth:`StartQueue.turn` once
per loop iteration while :attr:`StartQueue.busy` is true.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["StartQueue"]

T = TypeVar("T")


class _Lanes(Generic[T]):
    """One connection's waiting calls: a FIFO per priority."""

    __slots__ = ("by_key", "lanes")

    def __init__(self) -> None:
        self.by_key: dict[int, int] = {}  # key -> priority
        self.lanes: dict[int, dict[int, T]] = {}  # priority -> key -> item, in arrival order

    def put(self, key: int, priority: int, item: T) -> None:
        self.by_key[key] = priority
        lane = self.lanes.get(priority)
        if lane is None:
            lane = self.lanes[priority] = {}
        lane[key] = item

    def pop(self) -> T:
        priority = max(self.lanes)
        lane = self.lanes[priority]
        key = next(iter(lane))
        item = lane.pop(key)
        if not lane:
            del self.lanes[priority]
        del self.by_key[key]
        return item

    def drop(self, key: int) -> T | None:
        priority = self.by_key.pop(key, None)
        if priority is None:
            return None
        lane = self.lanes[priority]
        item = lane.pop(key)
        if not lane:
            del self.lanes[priority]
        return item

    def drain(self) -> list[T]:
        items = []
        while self.by_key:
            items.append(self.pop())
        return items


class StartQueue(Generic[T]):
    """The calls of every connection that wait for a turn to start.

    Args:
        budget: Calls started per turn (loop iteration), over all connections.
        shared: The budget while calls of connections with nothing waiting start
            while others wait (by default ``budget``; at most ``budget``).
        recent: Turns for which such a start keeps the budget at ``shared``.

    Raises:
        ValueError: A budget is below 1, ``shared`` is above ``budget``, or ``recent``
            is below 1.
    """

    def __init__(self, budget: int, shared: int | None = None, recent: int = 32) -> None:
        shared = budget if shared is None else shared
        if budget < 1 or shared < 1:
            raise ValueError("the budget must be at least 1")
        if shared > budget:
            raise ValueError("the shared budget must not exceed the budget")
        if recent < 1:
            raise ValueError("recent must be at least 1 turn")
        self.budget = budget
        self.shared = shared
        self.recent = recent
        #: Calls started in the current turn.
        self.started = 0
        #: The current turn's budget: :attr:`budget`, or :attr:`shared` while calls of
        #: connections with nothing waiting start while others wait.
        self.limit = budget
        self._shrunk = 0  # turns left at the shared budget
        self._served: set[Hashable] = set()  # connections that started a call this turn
        self._waiting: dict[Hashable, _Lanes[T]] = {}
        self._round: deque[Hashable] = deque()  # connections with calls waiting, in turn order
        self._count = 0

    def __len__(self) -> int:
        """Calls waiting, over all connections."""
        return self._count

    @property
    def busy(self) -> bool:
        """True while a turn is due: calls wait, or this turn's budget is being spent."""
        return self._count > 0 or self.started > 0

    def offer(self, source: Hashable, key: int, priority: int, item: T) -> bool:
        """A call of ``source`` (a connection) was delivered.

        Args:
            source: Its connection.
            key: Its id, unique among the connection's waiting calls.
            priority: Higher starts first among the connection's calls.
            item: What to hand back when it is its turn.

        Returns:
            True if the call starts now (the caller starts it); False if it waits.

        Raises:
            KeyError: A call of that key already waits for that connection.
        """
        lanes = self._waiting.get(source)
        if lanes is None:
            if not self._count and not self.started:
                # Idle (no turn ran or is due since): no burst is left to pass.
                self._shrunk, self.limit = 0, self.budget
            served = self._served
            if self.started < self.limit or source not in served:
                self.started += 1
                served.add(source)
                if self._round:
                    # Past other connections' waiting calls. (Calls wait only once the
                    # turn's limit is spent, so this is a connection's first call of
                    # the turn going beyond the limit.)
                    self._shrunk = self.recent
                return True
            lanes = self._waiting[source] = _Lanes()
            self._round.append(source)
        elif key in lanes.by_key:
            raise KeyError(key)
        lanes.put(key, priority, item)
        self._count += 1
        return False

    def waiting(self, source: Hashable) -> int:
        """Calls of ``source`` waiting."""
        lanes = self._waiting.get(source)
        return 0 if lanes is None else len(lanes.by_key)

    def has(self, source: Hashable, key: int) -> bool:
        """True if the call ``key`` of ``source`` waits."""
        lanes = self._waiting.get(source)
        return lanes is not None and key in lanes.by_key

    def drop(self, source: Hashable, key: int) -> T | None:
        """Forget a waiting call (cancelled, or its connection broke it); its item, or
        None if no such call waits."""
        lanes = self._waiting.get(source)
        if lanes is None:
            return None
        item = lanes.drop(key)
        if item is not None:
            self._count -= 1
            if not lanes.by_key:
                self._forget(source)
        return item

    def remove(self, source: Hashable) -> list[T]:
        """Take every waiting call of ``source``, in the order they would have started
        (its connection closed, or the server drains and starts them all)."""
        lanes = self._waiting.get(source)
        if lanes is None:
            return []
        items = lanes.drain()
        self._count -= len(items)
        self._forget(source)
        return items

    def turn(self) -> list[T]:
        """Begin a new turn: the budget is whole again, and the waiting calls that
        start now are returned (connections in turn, one call each per pass).

        Returns:
            The calls to start, in order; at most :attr:`limit`.
        """
        self.started = 0
        if self._shrunk:
            self._shrunk -= 1
            self.limit = self.shared
        else:
            self.limit = self.budget
        served = self._served
        served.clear()
        ready: list[T] = []
        round_ = self._round
        while round_ and self.started < self.limit:
            source = round_.popleft()
            lanes = self._waiting[source]
            ready.append(lanes.pop())
            self.started += 1
            served.add(source)
            self._count -= 1
            if lanes.by_key:
                round_.append(source)
            else:
                del self._waiting[source]
        return ready

    def discard(self, source: Hashable) -> None:
        """Forget ``source`` altogether (its connection closed): its waiting calls too."""
        self.remove(source)
        self._served.discard(source)

    def _forget(self, source: Hashable) -> None:
        del self._waiting[source]
        self._round.remove(source)
