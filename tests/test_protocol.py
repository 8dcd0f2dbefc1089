"""The sans-I/O protocol core, driven through a simulated transport that completes
messages in any order (no UCX here: the machines are pure)."""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ucxrpc.codec import Kind
from ucxrpc.errors import ProtocolError, ResourceExhausted
from ucxrpc.protocol import (
    INBOX_LIMIT,
    Budget,
    CallIds,
    Deliver,
    Discard,
    Fail,
    Inbound,
    Outbound,
    Receive,
    Violation,
)
from ucxrpc.wire import codec
from ucxrpc.wire import shared as shared_wire

# Sizes straddling UCX's rendezvous switch (8 KiB), the out-of-band threshold
# (16 KiB), the largest inline frame (64 KiB) and 256 KiB.
EDGE_SIZES = [0, 1, 8191, 8192, 8193, 16383, 16384, 16385, 65535, 65536, 65537, 262144, 262145]
SECRET, KEY, CONN = 0x1122334455667788, 0xABCDE12345, 4242


def payload_of(size: int, seed: int) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(min(size, 64))) * (size // 64 + 1)


class Wire:
    """A simulated transport: messages in flight, completed in any order."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.parts: dict[int, tuple[int, bytes]] = {}  # handle -> (tag, data), not probed
        self.probed: dict[int, bytes] = {}  # probed (removed from UCX's queue), not received
        self.real: set[int] = set()  # tags of parts the sender sent
        self.receives: list[tuple[Receive, bytes]] = []
        self._handles = itertools.count(1)
        self.filled: set[int] = set()

    def put(self, messages: list[tuple[int, Any]]) -> None:
        for tag, buf in messages:
            data = bytes(buf)
            if tag & codec.DATA_BIT:
                self.parts[next(self._handles)] = (tag, data)
                self.real.add(tag)
            else:
                self.frames.append((tag, data))


def run_actions(inbound: Inbound, wire: Wire, out: list[Any], limit: int | None = None) -> None:
    for action in inbound.take(limit):
        if isinstance(action, Receive):
            wire.receives.append((action, wire.probed.pop(action.handle)))
        elif isinstance(action, Discard):
            del wire.probed[action.handle]
        else:
            out.append(action)


class Pair(RuleBasedStateMachine):
    """An Outbound and an Inbound joined by a Wire that reorders everything."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.out = Outbound(CONN, SECRET, KEY)
        self.inb = Inbound(
            CONN,
            SECRET,
            KEY,
            Budget(max_bytes=1 << 21, max_parts=64, part_timeout=5.0),
            clock=lambda: self.now,
        )
        self.wire = Wire()
        self.sent: list[tuple[int, Any]] = []  # (call_id, payload) in send order
        self.results: list[Any] = []
        self.lied: set[int] = set()  # calls whose parts were tampered with
        self.expired: set[int] = set()
        self.sent_at: dict[int, float] = {}
        self.call_ids = itertools.count(1)
        # Shared parts in flight: (seq, part) -> the bytes the receiver will map.
        self.files: dict[tuple[int, int], bytes] = {}
        # Deliveries taken per take() (None: all): the rest wait, as the I/O layer
        # leaves them for the end of its drive.
        self.slice: int | None = None

    @rule(limit=st.sampled_from([None, 1, 2, 3]))
    def take_in_slices(self, limit: int | None) -> None:
        self.slice = limit

    @precondition(lambda self: self.inb.pending)
    @rule()
    def take_what_waits(self) -> None:
        before, delivered = self.inb.pending, len(self.results)
        run_actions(self.inb, self.wire, self.results, self.slice)
        # Every take makes progress (one frame read may release several waiting).
        assert self.inb.pending < before or len(self.results) > delivered

    def _encode(
        self, sizes: list[int], seed: int, shared: bool = False
    ) -> tuple[int, codec.Encoded, Any]:
        call_id = next(self.call_ids)
        value = [payload_of(n, seed + i) for i, n in enumerate(sizes)]
        encoded = codec.encode(Kind.REQUEST, call_id, [value, {}], method="m")
        if shared and encoded.parts:
            # As the I/O layer does: parts of at least SHARED_MIN become descriptors
            # (here the "file" is kept by the simulated transport).
            seq = self.out.next_seq
            codec.add_flags(encoded.frame, codec.Flags.SHARED_PARTS)
            parts: list[Any] = []
            for i, part in enumerate(encoded.parts, 1):
                n = codec.nbytes(part)
                if n >= codec.SHARED_MIN:
                    self.files[(seq, i)] = bytes(part)
                    part = shared_wire.descriptor(shared_wire.FILE, i, n)
                parts.append(part)
            encoded = codec.Encoded(encoded.frame, parts)
        return call_id, encoded, value

    @rule(
        sizes=st.lists(st.sampled_from(EDGE_SIZES), max_size=3),
        seed=st.integers(0, 255),
        shared=st.booleans(),
    )
    def send(self, sizes: list[int], seed: int, shared: bool) -> None:
        call_id, encoded, value = self._encode(sizes, seed, shared)
        self.sent.append((call_id, value))
        self.sent_at[call_id] = self.now
        self.wire.put(self.out.send(call_id, encoded))

    @rule(
        batch=st.lists(st.lists(st.sampled_from(EDGE_SIZES), max_size=2), min_size=1, max_size=5),
        seed=st.integers(0, 255),
    )
    def send_queued(self, batch: list[list[int]], seed: int) -> None:
        for sizes in batch:
            call_id, encoded, value = self._encode(sizes, seed)
            self.sent.append((call_id, value))
            self.sent_at[call_id] = self.now
            self.out.queue(call_id, encoded)
        self.wire.put(self.out.flush())

    @precondition(lambda self: self.wire.frames)
    @rule(pick=st.integers(0, 1 << 16))
    def frame_arrives(self, pick: int) -> None:
        tag, data = self.wire.frames.pop(pick % len(self.wire.frames))
        self.inb.on_frame(tag, bytearray(data))
        run_actions(self.inb, self.wire, self.results, self.slice)

    @precondition(lambda self: self.wire.parts)
    @rule(pick=st.integers(0, 1 << 16))
    def part_probed(self, pick: int) -> None:
        handle = sorted(self.wire.parts)[pick % len(self.wire.parts)]
        tag, data = self.wire.parts.pop(handle)
        self.wire.probed[handle] = data
        self.inb.on_part(tag, len(data), handle)
        run_actions(self.inb, self.wire, self.results, self.slice)

    @precondition(lambda self: self.wire.receives)
    @rule(pick=st.integers(0, 1 << 16))
    def receive_completes(self, pick: int) -> None:
        action, data = self.wire.receives.pop(pick % len(self.wire.receives))
        action.buffer[:] = data
        self.wire.filled.add(id(action.buffer))
        if action.shared is None:
            self.inb.on_part_done(action.token, True)
        else:
            # The descriptor arrived: the I/O layer maps the file it names.
            where = action.shared
            mapped = memoryview(bytearray(self.files.pop((where.seq, where.part))))
            self.wire.filled.add(id(mapped))
            self.inb.on_part_done(action.token, True, mapped)
        run_actions(self.inb, self.wire, self.results)

    @precondition(lambda self: any(a.shared for a, _ in self.wire.receives))
    @rule(pick=st.integers(0, 1 << 16), delta=st.sampled_from([-1, 1]))
    def mapping_is_not_what_was_announced(self, pick: int, delta: int) -> None:
        shared = [r for r in self.wire.receives if r[0].shared]
        action, data = shared[pick % len(shared)]
        self.wire.receives.remove((action, data))
        where = action.shared
        assert where is not None
        length = len(self.files.pop((where.seq, where.part))) + delta
        self.inb.on_part_done(action.token, True, memoryview(bytearray(length)))
        self.lied.add(self.sent[where.seq][0])
        run_actions(self.inb, self.wire, self.results)

    @precondition(lambda self: self.wire.parts)
    @rule(pick=st.integers(0, 1 << 16), delta=st.sampled_from([-1, 1, -8192, 4096]))
    def peer_lies_about_a_part(self, pick: int, delta: int) -> None:
        handle = sorted(self.wire.parts)[pick % len(self.wire.parts)]
        tag, data = self.wire.parts[handle]
        if len(data) + delta < 0 or tag not in self.wire.real:
            return
        self.wire.parts[handle] = (tag, data[: len(data) + delta] + b"\0" * max(delta, 0))
        self.lied.add(self._call_of_part(tag))

    def _call_of_part(self, tag: int) -> int:
        seq = ((tag & codec.KEY_MASK) ^ KEY) >> 8
        return self.sent[seq][0]  # one frame per call, in seq order

    @rule(secret=st.integers(0, (1 << 64) - 1), call=st.integers(0, 50))
    def stranger_frame(self, secret: int, call: int) -> None:
        if secret == SECRET:
            return
        enc = codec.encode(Kind.CANCEL, call)
        codec.stamp(enc.frame, self.inb.next_seq, secret)
        dropped, pending = self.inb.dropped, self.inb.pending
        self.inb.on_frame(codec.frame_tag(CONN, call), enc.frame)
        assert self.inb.pending == pending  # no action
        assert self.inb.dropped == dropped + 1

    @rule(low=st.integers(0, codec.KEY_MASK), size=st.sampled_from(EDGE_SIZES))
    def stranger_part(self, low: int, size: int) -> None:
        # A part on a guessed tag of this connection: held at most, never delivered.
        self.wire.parts[next(self.wire._handles)] = (
            codec.DATA_BIT | (CONN << 40) | low,
            b"\xee" * size,
        )

    # UCX delivers frames promptly; a frame missing longer than the timeout is a lost
    # one (a violation, tested on its own): time passes only once frames are in.
    @precondition(lambda self: not self.wire.frames)
    @rule(seconds=st.sampled_from([0.5, 6.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        # Frames waiting for parts longer than the timeout fail: any call sent (and
        # so possibly received) that long ago may fail this way.
        limit = self.now - self.inb.budget.part_timeout
        self.expired |= {c for c, t in self.sent_at.items() if t <= limit}
        self.inb.expire(self.now)
        run_actions(self.inb, self.wire, self.results)

    @invariant()
    def delivered_in_order_and_intact(self) -> None:
        assert len(self.results) <= len(self.sent)
        for (call_id, value), action in zip(self.sent, self.results, strict=False):
            assert not isinstance(action, Violation), action
            if isinstance(action, Fail):
                assert action.call_id == call_id
                if isinstance(action.error, ResourceExhausted):
                    continue  # over the budget: bounded() checks the budget held
                assert isinstance(action.error, ProtocolError)
                assert call_id in self.lied or call_id in self.expired, action.error
                continue
            assert isinstance(action, Deliver)
            assert action.header.call_id == call_id
            for buf in action.parts:
                assert id(buf) in self.wire.filled  # UCX filled every delivered buffer
            if call_id in self.lied:
                continue  # cut and padded back to its length: the peer's own bytes
            args = codec.decode_payload(action.header, action.payload, action.parts)
            assert [bytes(x) for x in args[0]] == value

    @invariant()
    def bounded(self) -> None:
        assert self.inb.announced_bytes <= self.inb.budget.max_bytes
        assert self.inb.awaited_parts <= self.inb.budget.max_parts + self.inb.budget.max_early

    def teardown(self) -> None:
        # Drain everything still in flight, in order: every frame not tampered with
        # is then delivered.
        while self.wire.frames or self.wire.receives or self.wire.parts:
            if self.wire.frames:
                self.frame_arrives(0)
            elif self.wire.receives:
                self.receive_completes(0)
            else:
                self.part_probed(0)
        while self.inb.pending:
            self.take_what_waits()
        # Parts held before a frame that never came (strangers') time out.
        self.now += 10
        self.inb.expire(self.now)
        run_actions(self.inb, self.wire, self.results)
        assert not self.wire.probed and self.inb.awaited_parts == 0
        self.delivered_in_order_and_intact()


Pair.TestCase.settings = settings(
    # UCXRPC_FUZZ_SCALE=10 (say) for a deeper run than the suite's.
    max_examples=600 * int(os.environ.get("UCXRPC_FUZZ_SCALE", "1")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestPair = Pair.TestCase


def test_parts_held_before_their_frame_are_bound_to_it() -> None:
    out = Outbound(CONN, SECRET, KEY)
    inb = Inbound(CONN, SECRET, KEY)
    enc = codec.encode(Kind.REQUEST, 9, [[b"a" * 20000, b"b" * 30000], {}], method="m")
    (frame_tag, frame), (t1, p1), (t2, p2) = out.send(9, enc)
    inb.on_part(t2, len(p2), "h2")
    inb.on_part(t1, len(p1), "h1")
    assert inb.take() == []
    inb.on_frame(frame_tag, bytearray(frame))
    receives = inb.take()
    assert [r.handle for r in receives] == ["h1", "h2"]
    for r, data in zip(receives, (p1, p2), strict=True):
        assert isinstance(r, Receive)
        r.buffer[:] = data
        inb.on_part_done(r.token, True)
    (deliver,) = inb.take()
    assert isinstance(deliver, Deliver)
    value = codec.decode_payload(deliver.header, deliver.payload, deliver.parts)
    assert value[0] == [b"a" * 20000, b"b" * 30000]


def test_a_short_part_fails_its_call_only() -> None:
    out = Outbound(CONN, SECRET, KEY)
    inb = Inbound(CONN, SECRET, KEY)
    big = codec.encode(Kind.REQUEST, 1, [[b"x" * (1 << 20)], {}], method="m")
    small = codec.encode(Kind.REQUEST, 2, [[1], {}], method="m")
    (ft, frame), (pt, _) = out.send(1, big)
    ((st_, sframe),) = out.send(2, small)
    inb.on_frame(ft, bytearray(frame))
    inb.on_part(pt, 1, "short")  # announced 1 MiB, 1 byte came
    inb.on_frame(st_, bytearray(sframe))
    discard, fail, deliver = inb.take()
    assert discard == Discard("short", 1)
    assert isinstance(fail, Fail) and fail.call_id == 1
    assert "announced 1048576" in fail.error.message
    assert isinstance(deliver, Deliver) and deliver.header.call_id == 2


def test_a_frame_announcing_parts_beyond_the_budget_allocates_nothing() -> None:
    out = Outbound(CONN, SECRET, KEY)
    allocated: list[int] = []

    def alloc(n: int) -> bytearray:
        allocated.append(n)
        return bytearray(n)

    inb = Inbound(CONN, SECRET, KEY, Budget(max_bytes=1 << 20), alloc=alloc)
    enc = codec.encode(Kind.REQUEST, 3, [[b"y" * (2 << 20)], {}], method="m")
    (ft, frame), (pt, part) = out.send(3, enc)
    inb.on_frame(ft, bytearray(frame))
    (fail,) = inb.take()
    assert isinstance(fail, Fail) and isinstance(fail.error, ResourceExhausted)
    inb.on_part(pt, len(part), "h")
    assert inb.take() == [Discard("h", len(part))]  # its frame is gone: dropped at once
    assert allocated == []
    assert inb.announced_bytes == 0


def test_parts_that_never_come_time_out_and_free_the_budget() -> None:
    now = [0.0]
    out = Outbound(CONN, SECRET, KEY)
    inb = Inbound(CONN, SECRET, KEY, Budget(part_timeout=1.0), clock=lambda: now[0])
    enc = codec.encode(Kind.REQUEST, 4, [[b"z" * 100_000], {}], method="m")
    (ft, frame), _ = out.send(4, enc)
    inb.on_frame(ft, bytearray(frame))
    assert inb.take() == [] and inb.announced_bytes == 100_000
    now[0] = 2.0
    inb.expire(now[0])
    (fail,) = inb.take()
    assert isinstance(fail, Fail) and "did not arrive" in fail.error.message
    assert inb.announced_bytes == 0 and inb.awaited_parts == 0


def test_a_cancel_after_a_request_waiting_for_parts_is_delivered_after_it() -> None:
    out = Outbound(CONN, SECRET, KEY)
    inb = Inbound(CONN, SECRET, KEY)
    (ft, frame), (pt, part) = out.send(
        5, codec.encode(Kind.REQUEST, 5, [[b"q" * 50_000], {}], method="m")
    )
    ((ct, cancel),) = out.send(5, codec.encode(Kind.CANCEL, 5))
    inb.on_frame(ct, bytearray(cancel))  # UCX completed the CANCEL first
    inb.on_frame(ft, bytearray(frame))
    inb.on_part(pt, len(part), "h")
    (receive,) = inb.take()
    assert isinstance(receive, Receive)
    receive.buffer[:] = part
    inb.on_part_done(receive.token, True)
    kinds = [a.header.kind for a in inb.take() if isinstance(a, Deliver)]
    assert kinds == [Kind.REQUEST, Kind.CANCEL]


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda f: f.__setitem__(slice(16, 20), (77).to_bytes(4, "big")), id="call"),
        pytest.param(lambda f: f.__setitem__(slice(4, 8), (9999).to_bytes(4, "big")), id="seq"),
    ],
)
def test_frames_that_break_the_protocol_are_violations(mutate: Any) -> None:
    out = Outbound(CONN, SECRET, KEY)
    inb = Inbound(CONN, SECRET, KEY, Budget(max_ahead=16))
    ((tag, frame),) = out.send(6, codec.encode(Kind.REQUEST, 6, [[], {}], method="m"))
    frame = bytearray(frame)
    mutate(frame)
    inb.on_frame(tag, frame)
    (violation,) = inb.take()
    assert isinstance(violation, Violation)


def test_a_duplicate_frame_is_a_violation() -> None:
    out = Outbound(CONN, SECRET, KEY)
    inb = Inbound(CONN, SECRET, KEY)
    (ft, frame), _ = out.send(7, codec.encode(Kind.REQUEST, 7, [[b"d" * 20000], {}], method="m"))
    inb.on_frame(ft, bytearray(frame))
    inb.on_frame(ft, bytearray(frame))
    (violation,) = inb.take()
    assert isinstance(violation, Violation) and "twice" in violation.error.message


def test_seq_wraps_around() -> None:
    out = Outbound(CONN, SECRET, KEY)
    inb = Inbound(CONN, SECRET, KEY)
    out._seq = inb._next = codec.SEQ_MOD - 2
    for call in range(1, 6):
        ((tag, frame),) = out.send(call, codec.encode(Kind.REQUEST, call, [[], {}], method="m"))
        inb.on_frame(tag, bytearray(frame))
    calls = [a.header.call_id for a in inb.take() if isinstance(a, Deliver)]
    assert calls == [1, 2, 3, 4, 5] and inb.next_seq == 3


def test_a_lone_queued_frame_leaves_alone_and_a_run_leaves_as_one_batch() -> None:
    out = Outbound(CONN, SECRET, KEY)
    out.queue(1, codec.encode(Kind.REPLY, 1, "a"))
    (lone,) = out.flush()
    assert codec.peek(lone[1]).kind == Kind.REPLY
    for call in range(2, 12):
        out.queue(call, codec.encode(Kind.REPLY, call, "b" * 100))
    (batch,) = out.flush()
    assert codec.peek(batch[1]).kind == Kind.BATCH and out.batches == 1
    inb = Inbound(CONN, SECRET, KEY)
    inb.on_frame(*lone)
    inb.on_frame(*batch)
    assert [a.header.call_id for a in inb.take() if isinstance(a, Deliver)] == list(range(1, 12))


def _batch(out: Outbound, calls: range, size: int = 10) -> tuple[int, bytearray]:
    for call in calls:
        out.queue(call, codec.encode(Kind.REPLY, call, "b" * size))
    (batch,) = out.flush()
    assert codec.peek(batch[1]).kind == Kind.BATCH
    return batch[0], bytearray(batch[1])


def _delivered(actions: list[Any]) -> list[int]:
    return [a.header.call_id for a in actions if isinstance(a, Deliver)]


def test_a_batch_is_taken_a_slice_at_a_time_in_order() -> None:
    out = Outbound(CONN, SECRET, KEY)
    inb = Inbound(CONN, SECRET, KEY)
    inb.on_frame(*_batch(out, range(1, 101)))
    ((tag, lone),) = out.send(101, codec.encode(Kind.REPLY, 101, "after"))
    inb.on_frame(tag, bytearray(lone))  # behind the batch frames not yet looked at
    assert inb.pending == 101
    got: list[int] = []
    while inb.pending:
        taken = _delivered(inb.take(16))
        assert 0 < len(taken) <= 16
        got += taken
    assert got == list(range(1, 102))
    assert inb.take(16) == []


def test_a_part_whose_frame_is_in_an_unread_batch_is_matched() -> None:
    out = Outbound(CONN, SECRET, KEY)
    inb = Inbound(CONN, SECRET, KEY)
    for call in range(1, 51):
        out.queue(call, codec.encode(Kind.REPLY, call, "s"))
    big = codec.encode(Kind.REPLY, 51, [b"p" * 20000])
    out.queue(51, big)
    messages = out.flush()
    (batch_tag, batch), (part_tag, part) = messages
    inb.on_frame(batch_tag, bytearray(batch))
    assert _delivered(inb.take(1)) == [1]
    inb.on_part(part_tag, len(part), "h")  # its frame is the batch's last, still unread
    actions = inb.take()
    (receive,) = [a for a in actions if isinstance(a, Receive)]
    assert _delivered(actions) == list(range(2, 51))
    receive.buffer[:] = part
    inb.on_part_done(receive.token, True)
    (deliver,) = inb.take()
    assert isinstance(deliver, Deliver) and deliver.header.call_id == 51
    assert codec.decode_payload(deliver.header, deliver.payload, deliver.parts) == [b"p" * 20000]


def test_a_part_reads_the_unread_batch_frames_only_up_to_its_own() -> None:
    out = Outbound(CONN, SECRET, KEY)
    inb = Inbound(CONN, SECRET, KEY)
    for call in range(1, 5):
        out.queue(call, codec.encode(Kind.REPLY, call, "s"))
    out.queue(5, codec.encode(Kind.REPLY, 5, [b"p" * 20000]))
    for call in range(6, 301):
        out.queue(call, codec.encode(Kind.REPLY, call, "s"))
    messages = out.flush()
    ((part_tag, part),) = [m for m in messages if m[0] & codec.DATA_BIT]
    for tag, frame in messages:
        if not tag & codec.DATA_BIT:
            inb.on_frame(tag, bytearray(frame))
    assert _delivered(inb.take(1)) == [1]
    inb.on_part(part_tag, len(part), "h")
    assert inb.pending > 250  # the frames after the part's own are still unread
    taken = inb.take(16)
    assert _delivered(taken) == [2, 3, 4]  # 5 waits for its part, and the rest behind it
    (receive,) = [a for a in taken if isinstance(a, Receive)]
    receive.buffer[:] = part
    inb.on_part_done(receive.token, True)
    got = _delivered(inb.take(16))
    while inb.pending:
        got += _delivered(inb.take(16))
    assert got == list(range(5, 301))


def test_closing_discards_the_parts_of_receives_not_taken() -> None:
    out = Outbound(CONN, SECRET, KEY)
    inb = Inbound(CONN, SECRET, KEY)
    enc = codec.encode(Kind.REPLY, 1, [b"q" * 30000])
    (ft, frame), (pt, part) = out.send(1, enc)
    inb.on_frame(*_batch(out, range(2, 40)))
    inb.on_part(pt, len(part), "held")  # its frame comes next, after the batch
    inb.on_frame(ft, bytearray(frame))
    assert inb.pending
    inb.close()
    assert inb.take() == [Discard("held", len(part))]  # nothing delivered after close
    assert inb.pending == 0


def test_what_waits_stays_bounded_when_batches_arrive_faster_than_they_are_taken() -> None:
    """Four batches of 600 one-way calls per drive, each followed by a take of one
    slice, and one more per drive: past INBOX_LIMIT a take takes the excess too, so
    what waits stays bounded (and no take is much more than a batch), and every call is
    delivered once, in order."""
    out = Outbound(CONN, SECRET, KEY)
    inb = Inbound(CONN, SECRET, KEY)
    got: list[int] = []
    call = 0
    for _drive in range(60):
        for _ in range(4):
            for _ in range(600):
                call += 1
                out.queue(call, codec.encode(Kind.REPLY, call, "n" * 60))
            (batch,) = out.flush()
            inb.on_frame(batch[0], bytearray(batch[1]))
            taken = _delivered(inb.take(16))
            assert len(taken) <= 16 + 600  # the excess, never everything at once
            got += taken
            assert inb.pending <= INBOX_LIMIT + 600
        got += _delivered(inb.take(16))
    got += _delivered(inb.take())
    assert got == list(range(1, call + 1))


def _forty_replies_and_a_part() -> Inbound:
    """An Inbound given a batch of 40 replies, then a 41st with a part (handle "h"):
    every frame is read (for the part), and nothing taken yet."""
    out = Outbound(CONN, SECRET, KEY)
    inb = Inbound(CONN, SECRET, KEY)
    for call in range(1, 41):
        out.queue(call, codec.encode(Kind.REPLY, call, "s"))
    out.queue(41, codec.encode(Kind.REPLY, 41, [b"r" * 20000]))
    (batch_tag, batch), (part_tag, part) = out.flush()
    inb.on_frame(batch_tag, bytearray(batch))
    inb.on_part(part_tag, len(part), "h")
    return inb


def test_receives_are_taken_ahead_of_the_slice() -> None:
    """A part's sender waits for its receive: a take with a limit hands over every
    receive made so far, even those behind the deliveries left for later."""
    inb = _forty_replies_and_a_part()
    first = inb.take(4)
    assert _delivered(first) == [1, 2, 3, 4]
    assert [a.handle for a in first if isinstance(a, Receive)] == ["h"]
    assert _delivered(inb.take()) == list(range(5, 41))


def test_a_take_of_no_deliveries_hands_over_the_receives_only() -> None:
    """A connection whose slice for this drive is spent takes with a limit of 0: the
    receives (its peer's parts wait for them) leave, every delivery waits."""
    inb = _forty_replies_and_a_part()
    none = inb.take(0)
    assert _delivered(none) == [] and [a.handle for a in none if isinstance(a, Receive)] == ["h"]
    assert inb.take(0) == []
    assert _delivered(inb.take(3)) == [1, 2, 3]
    assert _delivered(inb.take()) == list(range(4, 41))


def test_a_stranger_frame_inside_a_batch_breaks_the_connection_when_reached() -> None:
    inb = Inbound(CONN, SECRET, KEY)
    frames = []
    for call in range(1, 6):
        enc = codec.encode(Kind.REPLY, call, "x")
        codec.stamp(enc.frame, call - 1, SECRET if call != 4 else SECRET ^ 1)
        frames.append(enc.frame)
    batch = codec.encode_batch(frames, SECRET)
    codec.stamp(batch, 0, SECRET)
    inb.on_frame(codec.frame_tag(CONN, 0), batch)
    assert _delivered(inb.take(2)) == [1, 2]
    rest = inb.take(2)
    assert _delivered(rest) == [3] and isinstance(rest[-1], Violation)
    assert inb.pending == 0 and inb.broken is not None


@given(st.sets(st.integers(1, 20), max_size=19), st.integers(1, 20))
def test_call_ids_never_collide_with_a_live_call(live: set[int], start: int) -> None:
    ids = CallIds(20, start)
    for _ in range(40):
        new = ids.allocate(live, len(live))
        assert new not in live and 1 <= new <= 20


def test_call_ids_when_every_id_is_live() -> None:
    with pytest.raises(ResourceExhausted):
        CallIds(3, 1).allocate({1, 2, 3}, 3)
