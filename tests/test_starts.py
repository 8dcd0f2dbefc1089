"""The start queue: which delivered calls start in a loop iteration (pure, no I/O)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ucxrpc.protocol.starts import StartQueue


def test_an_idle_queue_starts_every_call_at_once_within_the_budget() -> None:
    q: StartQueue[str] = StartQueue(3)
    assert [q.offer("a", k, 1, f"a{k}") for k in range(3)] == [True, True, True]
    assert not q.offer("a", 3, 1, "a3")  # the budget is spent: it waits
    assert len(q) == 1 and q.busy
    assert q.turn() == ["a3"]
    assert len(q) == 0 and q.busy  # a call started this turn: the budget resets next turn
    assert q.turn() == []
    assert not q.busy


def test_a_connection_with_one_call_never_waits_behind_another_connections_burst() -> None:
    q: StartQueue[str] = StartQueue(4)
    started = [k for k in range(100) if q.offer("flood", k, 1, f"f{k}")]
    assert started == [0, 1, 2, 3]
    # Another connection's single call starts at once although the budget is spent ...
    assert q.offer("ping", 0, 1, "p0")
    # ... but only its first one in a turn: a second waits, its connection's turn next.
    assert not q.offer("ping", 1, 1, "p1")
    assert q.turn() == ["f4", "p1", "f5", "f6"]
    for _ in range(30):
        q.turn()
    assert len(q) == 0


def test_connections_take_turns_in_the_order_they_started_waiting() -> None:
    q: StartQueue[str] = StartQueue(2)
    assert q.offer("x", 0, 1, "x0") and q.offer("x", 1, 1, "x1")  # the budget
    assert q.offer("a", 2, 1, "a2")  # a's first call of the turn
    for k in range(3, 7):
        assert not q.offer("a", k, 1, f"a{k}")  # the rest of a's burst waits
    assert q.offer("b", 7, 1, "b7")
    for k in range(8, 10):
        assert not q.offer("b", k, 1, f"b{k}")  # b started waiting after a
    assert q.turn() == ["a3", "b8"]
    assert q.turn() == ["a4", "b9"]
    assert q.turn() == ["a5", "a6"]


def test_a_connections_calls_start_highest_priority_first_fifo_within_one() -> None:
    q: StartQueue[str] = StartQueue(1)
    q.offer("c", 0, 1, "first")  # starts
    for key, prio in [(1, 0), (2, 1), (3, 2), (4, 1), (5, 2), (6, 0)]:
        assert not q.offer("c", key, prio, f"k{key}p{prio}")
    out = [item for _ in range(6) for item in q.turn()]
    assert out == ["k3p2", "k5p2", "k2p1", "k4p1", "k1p0", "k6p0"]


def test_dropped_and_removed_calls_never_start() -> None:
    q: StartQueue[str] = StartQueue(1)
    q.offer("a", 0, 1, "a0")
    for k in (1, 2, 3):
        q.offer("a", k, 1, f"a{k}")
    q.offer("b", 6, 1, "b6")  # b's first call of the turn starts
    q.offer("b", 7, 1, "b7")
    assert q.has("a", 2) and q.drop("a", 2) == "a2" and not q.has("a", 2)
    assert q.drop("a", 2) is None and q.drop("nobody", 1) is None
    assert q.remove("b") == ["b7"] and q.waiting("b") == 0
    assert q.turn() == ["a1"] and q.turn() == ["a3"] and q.turn() == []
    with pytest.raises(ValueError):
        StartQueue(0)


def test_the_budget_shrinks_while_calls_start_past_a_burst_and_grows_back_after() -> None:
    """A burst alone starts ``budget`` calls a turn; once another connection's call
    started past its waiting calls, a turn starts ``shared`` for the next ``recent``
    turns, then ``budget`` again."""
    q: StartQueue[str] = StartQueue(4, shared=2, recent=3)
    for i in range(40):
        q.offer("burst", i, 1, f"b{i}")
    assert len(q.turn()) == 4 and q.limit == 4  # alone: the whole budget
    assert q.offer("ping", 0, 1, "p0")  # another connection's call starts at once ...
    assert len(q.turn()) == 2 and q.limit == 2  # ... and from the next turn, two a turn
    assert len(q.turn()) == 2
    assert len(q.turn()) == 2  # the third turn after the ping's start still counts it
    assert len(q.turn()) == 4 and q.limit == 4  # then the burst has the budget back


def test_a_shared_turn_starts_at_once_only_what_its_limit_leaves() -> None:
    """During a shared turn a connection with nothing waiting starts its calls at once
    up to the shared limit (and its first call beyond it), not up to ``budget``."""
    q: StartQueue[str] = StartQueue(4, shared=2, recent=3)
    for i in range(5):
        q.offer("burst", i, 1, f"b{i}")  # four start, one waits
    assert q.offer("ping", 0, 1, "p0")  # past the burst: the next turns are shared
    assert q.turn() == ["b4"] and q.limit == 2  # one of the two the turn may start
    assert q.offer("c", 0, 1, "c0")  # the second
    assert not q.offer("c", 1, 1, "c1")  # the limit is spent (budget would allow two more)
    assert q.turn() == ["c1"]


def test_an_idle_queue_has_the_whole_budget_again() -> None:
    """Once nothing waits and a turn started nothing, the shrink is over: a new burst
    starts the whole budget at once, without waiting out ``recent`` turns."""
    q: StartQueue[str] = StartQueue(4, shared=2, recent=30)
    for i in range(6):
        q.offer("burst", i, 1, f"b{i}")
    assert q.offer("ping", 0, 1, "p0")  # past the burst
    assert q.turn() == ["b4", "b5"] and q.limit == 2
    assert q.turn() == [] and not q.busy  # drained: idle
    started = [q.offer("next", i, 1, f"n{i}") for i in range(6)]
    assert started == [True] * 4 + [False] * 2 and q.limit == 4


def test_bursts_against_each_other_keep_the_whole_budget() -> None:
    """Two connections whose calls all wait (two bursts) take turns at the whole
    budget: shorter turns would only cost calls per second. A call that starts while
    nothing waits (an idle server) does not shrink it either."""
    q: StartQueue[str] = StartQueue(4, shared=2, recent=3)
    assert q.offer("a", 0, 1, "a0")  # nothing waits: not past anyone
    for i in range(1, 20):
        q.offer("a", i, 1, f"a{i}")
        q.offer("b", i, 1, f"b{i}")
    for _ in range(5):
        assert len(q.turn()) == 4 and q.limit == 4


def test_a_budget_or_recent_below_one_or_a_shared_budget_above_the_budget_is_refused() -> None:
    for args in ((0, None, 1), (1, 0, 1), (1, 1, 0), (2, 3, 1)):
        with pytest.raises(ValueError):
            StartQueue(*args)


def test_a_key_waiting_twice_is_refused() -> None:
    q: StartQueue[str] = StartQueue(1)
    q.offer("a", 0, 1, "a0")
    q.offer("a", 1, 1, "a1")
    with pytest.raises(KeyError):
        q.offer("a", 1, 1, "again")


class Machine(RuleBasedStateMachine):
    """Arbitrary offers, drops, removals and turns, checked against what the queue
    promises: every call starts at most once and only if not dropped; a turn starts
    at most its budget (the shared one while, in the last ``recent`` turns, a call
    started past other connections' waiting calls), connections in turn, each one's
    calls by priority then arrival; a connection with nothing waiting starts its first
    call of a turn."""

    SOURCES = ("a", "b", "c", "d")

    def __init__(self) -> None:
        super().__init__()
        self.budget = 3
        self.shared = 2
        self.recent = 2
        self.q: StartQueue[tuple[str, int, int, int]] = StartQueue(
            self.budget, self.shared, self.recent
        )
        self.limit = self.budget
        self.shrunk = 0  # turns left at the shared budget
        self.next_key = 0
        self.seq = 0
        # source -> waiting (key, priority, arrival) in the model
        self.waiting: dict[str, dict[int, tuple[int, int]]] = defaultdict(dict)
        self.started: set[int] = set()
        self.gone: set[int] = set()
        self.served: set[str] = set()
        self.started_now = 0

    @rule(source=st.sampled_from(SOURCES), priority=st.integers(0, 3))
    def offer(self, source: str, priority: int) -> None:
        key = self.next_key
        self.next_key += 1
        self.seq += 1
        had_waiting = bool(self.waiting[source])
        if not any(self.waiting.values()) and not self.started_now:
            self.shrunk, self.limit = 0, self.budget  # idle: the whole budget again
        may_start = not had_waiting and (self.started_now < self.limit or source not in self.served)
        others_wait = any(w for s, w in self.waiting.items() if s != source)
        now = self.q.offer(source, key, priority, (source, key, priority, self.seq))
        assert now == may_start
        if now:
            self.started.add(key)
            self.served.add(source)
            self.started_now += 1
            if others_wait:
                self.shrunk = self.recent
        else:
            self.waiting[source][key] = (priority, self.seq)

    @rule(source=st.sampled_from(SOURCES), priority=st.integers(0, 3), n=st.integers(2, 5))
    def offer_many(self, source: str, priority: int, n: int) -> None:
        for _ in range(n):
            self.offer(source, priority)

    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        keys = [(s, k) for s, w in self.waiting.items() for k in w]
        if not keys:
            assert self.q.drop("a", 10**9) is None
            return
        source, key = data.draw(st.sampled_from(keys))
        item = self.q.drop(source, key)
        assert item is not None and item[1] == key
        del self.waiting[source][key]
        self.gone.add(key)

    @rule(source=st.sampled_from(SOURCES))
    def remove(self, source: str) -> None:
        items = self.q.remove(source)
        expected = sorted(self.waiting[source].items(), key=lambda kv: (-kv[1][0], kv[1][1]))
        assert [i[1] for i in items] == [k for k, _ in expected]
        self.gone.update(k for k, _ in expected)
        self.waiting[source].clear()

    @rule(source=st.sampled_from(SOURCES))
    def discard(self, source: str) -> None:
        self.q.discard(source)
        self.gone.update(self.waiting[source])
        self.waiting[source].clear()
        self.served.discard(source)

    @rule()
    def turn(self) -> None:
        before = {s: dict(w) for s, w in self.waiting.items() if w}
        items = self.q.turn()
        self.limit = self.shared if self.shrunk else self.budget
        self.shrunk = max(0, self.shrunk - 1)
        assert self.q.limit == self.limit
        assert len(items) == min(self.limit, sum(len(w) for w in before.values()))
        per_source: dict[str, int] = defaultdict(int)
        for source, key, _priority, _seq in items:
            assert key not in self.started and key not in self.gone
            # The highest priority of the source's waiting calls, the oldest of them.
            best = min(self.waiting[source].items(), key=lambda kv: (-kv[1][0], kv[1][1]))
            assert key == best[0]
            del self.waiting[source][key]
            self.started.add(key)
            per_source[source] += 1
        # Round robin: no connection gets a second start while another that was
        # waiting (and still has calls) got fewer.
        if per_source:
            most = max(per_source.values())
            for source, waited in before.items():
                got = per_source.get(source, 0)
                assert got >= min(len(waited), most - 1), (source, per_source, before)
        self.served = set(per_source)
        self.started_now = len(items)

    @invariant()
    def counts_match(self) -> None:
        assert len(self.q) == sum(len(w) for w in self.waiting.values())
        for source in self.SOURCES:
            assert self.q.waiting(source) == len(self.waiting[source])
        assert self.q.busy == (len(self.q) > 0 or self.started_now > 0)
        assert not (self.started & self.gone)


Machine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestStartQueue = Machine.TestCase


def test_the_stateful_machine_catches_a_queue_that_ignores_priority(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The machine above fails on a queue that starts a connection's calls in arrival
    order only (so its priority checks can fail)."""
    from ucxrpc.protocol import starts

    def fifo_pop(self: Any) -> Any:
        key = min(self.by_key, key=lambda k: k)
        return self.drop(key)

    monkeypatch.setattr(starts._Lanes, "pop", fifo_pop)
    q: StartQueue[str] = StartQueue(1)
    q.offer("c", 0, 1, "first")
    q.offer("c", 1, 0, "low")
    q.offer("c", 2, 2, "high")
    assert q.turn() == ["low"]  # the broken order the machine's turn rule rejects
    with pytest.raises(AssertionError):
        state = Machine()
        state.offer("c", 1)
        state.offer("c", 1)
        state.offer("c", 1)
        state.offer("c", 1)
        state.offer("c", 0)
        state.offer("c", 2)
        state.turn()
