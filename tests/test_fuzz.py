"""Fuzzing the decoders and the Inbound machine with arbitrary and mutated bytes.

What a peer sends must never escape as anything but an :class:`~ucxrpc.errors.RpcError`
(no IndexError, struct.error, UnicodeDecodeError, ...), and an :class:`Inbound` fed
anything at all must never raise and must only ever answer with its five actions.

Each test counts the examples it ran, and what they came to (decoded or refused, the
actions taken); pytest prints the counts in its terminal summary ("fuzz examples").
``UCXRPC_FUZZ_SCALE=10`` runs ten times as many examples (a deeper run: ~4 min at 20).

The ``test_bug_*`` test at the end fails until the bug it describes is fixed.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ucxrpc.codec import Flags, Header, Kind
from ucxrpc.errors import ProtocolError, ResourceExhausted, RpcError
from ucxrpc.protocol import Budget, Deliver, Discard, Fail, Inbound, Outbound, Receive, Violation
from ucxrpc.wire import codec

SCALE = float(os.environ.get("UCXRPC_FUZZ_SCALE", "1"))
SECRET, KEY, CONN = 0x1122334455667788, 0xABCDE12345, 4242
PREFIX = struct.Struct("!BBHIQIII")
#: Parts larger than this are not materialised for decode_payload (a mutated header may
#: announce 2**64 bytes).
MAX_PART_BYTES = 1 << 16
FRAME_KINDS = [k for k in Kind if k is not Kind.BATCH]
ACTIONS = (Receive, Discard, Deliver, Fail, Violation)

#: Examples run, per test.
EXAMPLES: Counter[str] = Counter()
#: What the examples came to (decoded or refused, actions taken): the fuzz reaches past
#: the first check.
OUTCOMES: Counter[str] = Counter()


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of ``choices``, each drawn with its weight (``one_of`` weighs its branches
    alike, and folds identical ones into one)."""
    table = [i for i, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(table).flatmap(lambda i: choices[i][1])


class _ExampleReport:
    """Prints the example counts in pytest's terminal summary."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not EXAMPLES:
            return
        terminalreporter.section("fuzz examples", sep="-")
        for name, count in sorted(EXAMPLES.items()):
            terminalreporter.write_line(f"{count:8d}  {name}")
        terminalreporter.write_line(f"{sum(EXAMPLES.values()):8d}  in all; outcomes:")
        for name, count in sorted(OUTCOMES.items()):
            terminalreporter.write_line(f"{count:8d}    {name}")


@pytest.fixture(scope="module", autouse=True)
def _report_examples(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin("ucxrpc-fuzz-examples"):
        manager.register(_ExampleReport(), "ucxrpc-fuzz-examples")


# -- strategies ----------------------------------------------------------------------------

small_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=24),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
metadata = st.none() | st.dictionaries(
    st.text(max_size=4), st.text(max_size=6) | st.binary(max_size=6), max_size=3
)


@st.composite
def encoded_frames(draw: st.DrawFn, seq: int | None = None) -> codec.Encoded:
    """A valid frame (small parts: binaries of 8+ bytes travel as parts), stamped."""
    enc = codec.encode(
        draw(st.sampled_from(FRAME_KINDS)),
        draw(st.integers(0, 20)),
        draw(
            weighted(
                (1, small_values), (1, st.lists(st.binary(min_size=8, max_size=40), max_size=3))
            )
        ),
        method=draw(st.text(max_size=5)),
        priority=draw(st.none() | st.integers(0, 255)),
        timeout=draw(st.none() | st.floats(0, 1e9)),
        metadata=draw(metadata),
        oob_threshold=8,
        inline_limit=draw(st.sampled_from([codec.MAX_FRAME, 48])),
    )
    codec.stamp(enc.frame, draw(st.integers(0, 8)) if seq is None else seq, SECRET)
    return enc


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few random mutations."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "extend", "splice", "prefix-field"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xC1, 0xFF]))
        elif op == "cut":
            del buf[pos:]
        elif op == "extend":
            buf += draw(st.binary(min_size=1, max_size=16))
        elif op == "splice":
            buf[pos : pos + draw(st.integers(0, 4))] = draw(st.binary(max_size=8))
        elif op == "prefix-field" and len(buf) >= codec.PREFIX_SIZE:
            # One of the 32-bit fields (seq, call_id, header_len, payload_len) or the
            # version/kind/flags bytes, set to an edge value.
            offset, fmt = draw(
                st.sampled_from(
                    [(0, "B"), (1, "B"), (2, "H"), (4, "I"), (16, "I"), (20, "I"), (24, "I")]
                )
            )
            limit = (1 << (8 * struct.calcsize(fmt))) - 1
            value = draw(st.sampled_from([0, 1, 2, 5, 11, 12, 255, limit]) | st.integers(0, limit))
            struct.pack_into("!" + fmt, buf, offset, min(value, limit))
    return bytes(buf)


@st.composite
def valid_then_mutated(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    enc = draw(encoded_frames())
    parts = [bytes(memoryview(p).cast("B")) for p in enc.parts]
    return draw(mutated(bytes(enc.frame))), parts


@st.composite
def structured_prefixes(draw: st.DrawFn) -> bytes:
    """A prefix with plausible fields (right version, right secret) and random bytes after."""
    tail = draw(st.binary(max_size=64))
    hlen = draw(st.integers(0, len(tail)) | st.integers(0, 2**32 - 1))
    plen = draw(st.just(max(len(tail) - hlen, 0)) | st.integers(0, 2**32 - 1))
    return (
        PREFIX.pack(
            draw(st.sampled_from([codec.VERSION, codec.VERSION, 1, 0, 255])),
            draw(st.integers(0, 12)),
            draw(st.sampled_from([0, 0, int(Flags.PAYLOAD_OOB), 2, 0xFFFF])),
            draw(st.integers(0, 8) | st.integers(0, 2**32 - 1)),
            SECRET,
            draw(st.integers(0, 20)),
            hlen,
            plen,
        )
        + tail
    )


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return weighted((4, good), (1, bad))


@st.composite
def header_with_payload(draw: st.DrawFn) -> bytes:
    """A prefix announcing exactly the (mostly well-formed) header and payload after it."""
    fields = [
        mostly(st.text(max_size=3), st.integers(-1, 1) | st.binary(max_size=2) | st.none()),
        mostly(st.none() | st.integers(0, 255), st.integers(-2, 300) | st.booleans() | st.floats()),
        mostly(
            st.none() | st.floats(0, 1e9) | st.integers(0, 5),
            st.floats() | st.integers(-5, -1) | st.text(max_size=1),
        ),
        mostly(
            st.lists(st.integers(0, 64), max_size=3),
            st.lists(st.integers(-1, 1 << 40) | st.floats(), max_size=3) | st.none(),
        ),
        mostly(metadata, st.dictionaries(st.integers(-5, 5), st.integers(-5, 5), max_size=2)),
    ]
    header: bytes = draw(
        mostly(
            st.tuples(*fields).map(lambda f: msgpack.packb(list(f))),
            st.binary(max_size=32) | st.lists(st.none(), max_size=7).map(msgpack.packb),
        )
    )
    payload: bytes = draw(mostly(small_values.map(msgpack.packb), st.binary(max_size=32)))
    flags = draw(st.sampled_from([0, 0, 0, int(Flags.PAYLOAD_OOB)]))
    kind = draw(st.sampled_from(FRAME_KINDS))
    prefix = PREFIX.pack(codec.VERSION, kind, flags, 0, SECRET, 1, len(header), len(payload))
    return prefix + header + payload


any_frame_bytes = st.binary(max_size=120) | structured_prefixes() | header_with_payload()


def decode_fully(data: bytes, parts: list[bytes] | None = None, **kw: Any) -> None:
    """decode_header then, if it passed and the parts are small, decode_payload."""
    header, payload = codec.decode_header(data, **kw)
    if sum(header.parts) > MAX_PART_BYTES:
        return
    given_parts: list[Any] = []
    for i, size in enumerate(header.parts):
        real = parts[i] if parts is not None and i < len(parts) else b""
        given_parts.append(bytearray(real[:size].ljust(size, b"\0")))
    codec.decode_payload(header, payload, given_parts)


def only_rpc_errors(name: str, fn: Any, *args: Any, **kw: Any) -> None:
    """Run ``fn``: anything it raises must be an RpcError; count both outcomes."""
    try:
        fn(*args, **kw)
    except RpcError as exc:
        OUTCOMES[f"{name}: {type(exc).__name__}"] += 1
    else:
        OUTCOMES[f"{name}: decoded"] += 1


# -- the decoders --------------------------------------------------------------------------


@given(data=any_frame_bytes, max_size=st.none() | st.integers(0, 1 << 20), exact=st.booleans())
@fuzz_settings(200)
def test_decode_header_and_payload_on_arbitrary_bytes(
    data: bytes, max_size: int | None, exact: bool
) -> None:
    EXAMPLES["decode_header+payload, arbitrary bytes"] += 1
    only_rpc_errors("arbitrary frame", decode_fully, data, max_size=max_size, exact=exact)


@given(case=valid_then_mutated(), exact=st.booleans())
@fuzz_settings(200)
def test_decode_header_and_payload_on_mutated_frames(
    case: tuple[bytes, list[bytes]], exact: bool
) -> None:
    EXAMPLES["decode_header+payload, mutated frames"] += 1
    data, parts = case
    only_rpc_errors("mutated frame", decode_fully, data, parts, exact=exact)


@given(
    flags=st.sampled_from([0, int(Flags.PAYLOAD_OOB)]),
    payload=st.binary(max_size=64) | small_values.map(msgpack.packb),
    parts=st.lists(st.binary(max_size=32) | small_values.map(msgpack.packb), max_size=3),
    ext=st.lists(st.tuples(st.integers(0, 127), st.binary(max_size=8)), max_size=3),
)
@fuzz_settings(150)
def test_decode_payload_on_arbitrary_payloads_and_parts(
    flags: int, payload: bytes, parts: list[bytes], ext: list[tuple[int, bytes]]
) -> None:
    EXAMPLES["decode_payload, arbitrary payloads and parts"] += 1
    if flags and not parts:
        parts = [payload]
    # Extension values (parts, arrays, unknown codes) at random, around the payload.
    body = msgpack.packb([msgpack.ExtType(code, data) for code, data in ext]) + payload
    header = Header(Kind.REPLY, 1, flags=flags, parts=tuple(len(p) for p in parts))
    for candidate in (payload, body):
        buffers = [bytearray(p) for p in parts]
        only_rpc_errors("arbitrary payload", codec.decode_payload, header, candidate, buffers)


@st.composite
def batch_payloads(draw: st.DrawFn) -> bytes:
    frames = [draw(encoded_frames(seq=i)).frame for i in range(draw(st.integers(1, 4)))]
    body = bytes(codec.encode_batch(frames, SECRET))[codec.PREFIX_SIZE :]
    return draw(st.just(body) | mutated(body)) if body else body


@given(data=st.binary(max_size=200) | batch_payloads() | any_frame_bytes)
@fuzz_settings(150)
def test_split_batch_on_arbitrary_and_mutated_bytes(data: bytes) -> None:
    EXAMPLES["split_batch, arbitrary and mutated batches"] += 1
    try:
        inner = codec.split_batch(data)
    except RpcError:
        OUTCOMES["batch: ProtocolError"] += 1
        return
    OUTCOMES[f"batch: split into {min(len(inner), 2)}{'+' * (len(inner) >= 2)} frames"] += 1
    # What it returns tiles the input with whole, non-batch frames.
    assert b"".join(bytes(v) for v in inner) == data
    for view in inner:
        prefix = codec.peek(view)
        assert prefix.kind != Kind.BATCH
        assert len(view) == codec.PREFIX_SIZE + prefix.header_len + prefix.payload_len
        only_rpc_errors("frame in a batch", decode_fully, bytes(view))


control_messages = st.dictionaries(st.text(max_size=6), small_values, max_size=4)


@given(
    data=st.binary(max_size=100)
    | control_messages.map(lambda m: codec.encode_control(m)[4:])
    | control_messages.flatmap(lambda m: mutated(codec.encode_control(m)[4:]))
)
@fuzz_settings(150)
def test_decode_control_on_arbitrary_and_mutated_bytes(data: bytes) -> None:
    EXAMPLES["decode_control, arbitrary and mutated messages"] += 1
    try:
        message = codec.decode_control(data)
    except RpcError:
        OUTCOMES["control: ProtocolError"] += 1
        return
    OUTCOMES["control: decoded"] += 1
    assert type(message) is dict


@given(prefix=st.binary(min_size=4, max_size=4), limit=st.integers(0, 2**32))
@fuzz_settings(100)
def test_control_length_on_arbitrary_prefixes(prefix: bytes, limit: int) -> None:
    EXAMPLES["control_length, arbitrary prefixes"] += 1
    try:
        n = codec.control_length(prefix, limit)
    except ProtocolError:
        return
    assert 0 <= n <= limit


# -- the Inbound machine -------------------------------------------------------------------

BUDGETS = [
    Budget(),
    Budget(
        max_message=1 << 16,
        max_bytes=1 << 12,
        max_parts=16,
        max_ahead=8,
        max_early=4,
        part_timeout=5.0,
    ),
    Budget(max_message=256, max_bytes=64, max_parts=2, max_ahead=2, max_early=1, part_timeout=1),
]
PICK = st.integers(0, 1 << 16)
#: What a peer does. An honest Outbound numbers, stamps and tags the traffic; the wire
#: delivers it in any order, and the peer (or the wire) may corrupt any of it.
peer_events = weighted(
    (15, st.tuples(st.just("send"), encoded_frames())),
    (8, st.tuples(st.just("queue"), st.lists(encoded_frames(), min_size=1, max_size=3))),
    (
        25,
        st.tuples(
            st.just("frame"),
            PICK,
            st.sampled_from(["honest"] * 14 + ["mutated"] * 4 + ["mutated-secret", "wrong-tag"]),
        ),
    ),
    (4, st.tuples(st.just("junk"), any_frame_bytes)),
    (
        25,
        st.tuples(
            st.just("part"), PICK, st.sampled_from(["right"] * 17 + ["short", "long", "dup"])
        ),
    ),
    (
        5,
        st.tuples(
            st.just("stranger"),
            st.builds(
                lambda seq, part: codec.data_tag(CONN, KEY, seq, part),
                st.integers(0, 10),
                st.integers(1, 4),
            )
            | st.integers(0, 2**64 - 1),
            st.sampled_from([0, 1, 8, 9, 16, 24]) | st.integers(0, 1 << 20),
        ),
    ),
    (15, st.tuples(st.just("done"), PICK, st.sampled_from([True] * 9 + [False]))),
    (3, st.tuples(st.just("expire"), st.sampled_from([0.0, 0.5, 2.0, 10.0]))),
)


@given(
    events=st.lists(peer_events, min_size=10, max_size=40),
    budget=st.sampled_from(BUDGETS),
    data=st.data(),
)
@fuzz_settings(100)
def test_inbound_never_raises_and_only_answers_with_its_actions(
    events: list[tuple[Any, ...]], budget: Budget, data: st.DataObject
) -> None:
    EXAMPLES["Inbound, arbitrary event sequences"] += 1
    now = [0.0]
    out = Outbound(CONN, SECRET, KEY)
    inbound = Inbound(CONN, SECRET, KEY, budget, clock=lambda: now[0])
    frames: list[tuple[int, bytes]] = []  # in flight
    parts: list[tuple[int, bytes]] = []  # in flight
    handles = itertools.count(1)
    probed: dict[int, bytes] = {}  # handle -> the part's bytes, not yet received/discarded
    pending: list[Receive] = []  # receives not yet reported done
    filled: set[int] = set()  # ids of buffers whose receive completed
    probed_data: dict[int, bytes] = {}  # id(Receive) -> the bytes UCX would write

    def put(messages: list[tuple[int, Any]]) -> None:
        for tag, buf in messages:
            raw = bytes(memoryview(buf).cast("B"))
            (parts if tag & codec.DATA_BIT else frames).append((tag, raw))

    def probe(tag: int, raw: bytes) -> None:
        handle = next(handles)
        probed[handle] = raw
        inbound.on_part(tag, len(raw), handle)

    def drain() -> Iterator[tuple[Any, ...]]:
        # In the end the wire delivers everything still in flight, intact.
        while frames or parts or pending:
            if frames:
                yield ("frame", 0, "honest")
            elif pending:
                yield ("done", 0, True)
            else:
                yield ("part", 0, "right")

    for event in itertools.chain(events, drain(), [("close",)]):
        name = event[0]
        OUTCOMES[f"Inbound event: {name}"] += 1
        if name == "send":
            enc = event[1]
            put(out.send(codec.peek(enc.frame).call_id, enc))
        elif name == "queue":
            for enc in event[1]:
                out.queue(codec.peek(enc.frame).call_id, enc)
            put(out.flush())
        elif name == "frame":
            if not frames:
                continue
            tag, raw = frames.pop(event[1] % len(frames))
            buf = bytearray(raw)
            if event[2].startswith("mutated"):
                buf = bytearray(data.draw(mutated(raw)))
                if event[2] == "mutated" and len(buf) >= codec.PREFIX_SIZE:
                    struct.pack_into("!Q", buf, 8, SECRET)  # the secret survives
            elif event[2] == "wrong-tag":
                tag ^= 1 << 8
            inbound.on_frame(tag, bytearray(buf))
        elif name == "junk":
            buf = event[1]
            call_id = codec.peek(buf).call_id if len(buf) >= codec.PREFIX_SIZE else 0
            inbound.on_frame(codec.frame_tag(CONN, call_id), bytearray(buf))
        elif name == "part":
            if not parts:
                continue
            how = event[2]
            index = event[1] % len(parts)
            tag, raw = parts[index] if how == "dup" else parts.pop(index)
            if how == "short":
                raw = raw[:-1]
            elif how == "long":
                raw += b"\0"
            probe(tag, raw)
        elif name == "stranger":
            probe(event[1], b"\xee" * event[2])
        elif name == "done":
            if not pending:
                continue
            receive = pending.pop(event[1] % len(pending))
            if event[2]:
                receive.buffer[:] = probed_data.pop(id(receive))
                filled.add(id(receive.buffer))
            inbound.on_part_done(receive.token, event[2])
        elif name == "expire":
            now[0] += event[1]
            inbound.expire(now[0])
        else:
            inbound.close()
        for action in inbound.take():
            assert isinstance(action, ACTIONS), action
            OUTCOMES[f"Inbound action: {type(action).__name__}"] += 1
            if isinstance(action, Receive):
                # Every part is received or discarded exactly once, into a buffer of
                # exactly its length.
                raw = probed.pop(action.handle)
                assert len(action.buffer) == len(raw)
                probed_data[id(action)] = raw
                pending.append(action)
            elif isinstance(action, Discard):
                assert action.length == len(probed.pop(action.handle))
            elif isinstance(action, Deliver):
                assert isinstance(action.header, Header)
                assert len(action.parts) == len(action.header.parts)
                for part, size in zip(action.parts, action.header.parts, strict=True):
                    assert id(part) in filled and len(part) == size
                only_rpc_errors(
                    "delivered payload",
                    codec.decode_payload,
                    action.header,
                    action.payload,
                    action.parts,
                )
            elif isinstance(action, Fail):
                assert isinstance(action.error, RpcError)
            else:
                assert isinstance(action.error, ProtocolError)
        # The budget holds whatever the peer sends.
        assert 0 <= inbound.announced_bytes <= budget.max_bytes
        assert inbound.awaited_parts <= budget.max_parts + budget.max_early
        assert inbound.waiting_frames <= budget.max_ahead
    # After close() no probed part is left held.
    assert not probed


@given(
    frames=st.lists(encoded_frames(), min_size=1, max_size=6),
    queued=st.booleans(),
    data=st.data(),
)
@fuzz_settings(50)
def test_inbound_delivers_unmutated_frames_from_an_outbound(
    frames: list[codec.Encoded], queued: bool, data: st.DataObject
) -> None:
    """The control case of the fuzz: valid traffic in any order is delivered in order,
    intact."""
    EXAMPLES["Inbound, valid traffic in any order"] += 1
    out = Outbound(CONN, SECRET, KEY)
    inbound = Inbound(CONN, SECRET, KEY)
    messages: list[tuple[int, Any]] = []
    call_ids = [codec.peek(enc.frame).call_id for enc in frames]
    sent = [
        (bytes(enc.frame), [bytes(memoryview(p).cast("B")) for p in enc.parts]) for enc in frames
    ]
    for call_id, enc in zip(call_ids, frames, strict=True):
        if queued:
            out.queue(call_id, enc)
        else:
            messages += out.send(call_id, enc)
    messages += out.flush()
    for tag, buf in messages:
        if not tag & codec.DATA_BIT:
            assert len(buf) <= codec.MAX_FRAME  # the receiving engine drops longer frames
    order = data.draw(st.permutations(range(len(messages))))
    delivered = []
    for index in order:
        tag, buf = messages[index]
        if tag & codec.DATA_BIT:
            raw = bytes(memoryview(buf).cast("B"))
            inbound.on_part(tag, len(raw), raw)
        else:
            inbound.on_frame(tag, bytearray(buf))
        actions = inbound.take()
        while actions:
            action = actions.pop(0)
            if isinstance(action, Receive):
                action.buffer[:] = action.handle  # UCX completes the receive at once
                inbound.on_part_done(action.token, True)
                actions += inbound.take()  # after what the machine asked for before
            else:
                assert isinstance(action, Deliver), action
                delivered.append(action)
    assert [d.header.call_id for d in delivered] == call_ids
    for d, (frame, parts) in zip(delivered, sent, strict=True):
        prefix = codec.peek(frame)
        assert bytes(d.payload) == frame[len(frame) - prefix.payload_len :]
        assert [bytes(p) for p in d.parts] == parts
    assert inbound.awaited_parts == 0 and inbound.announced_bytes == 0


# -- the budget under refused frames ------------------------------------------------------


def test_refused_frames_register_no_parts_beyond_the_budget() -> None:
    """A frame refused for the budget remembers none of its parts: a peer announcing
    parts it never sends cannot grow what the connection awaits past ``max_parts``, and
    parts that do come are thrown away at once (their frame has been answered), never
    received."""
    out = Outbound(CONN, SECRET, KEY)
    budget = Budget(max_bytes=100, max_parts=4, max_early=2, part_timeout=1.0)
    inbound = Inbound(CONN, SECRET, KEY, budget, alloc=lambda n: pytest.fail("allocated"))
    sent: list[tuple[int, Any]] = []
    for call in range(1, 11):
        enc = codec.encode(Kind.REQUEST, call, [[b"x" * 64] * 3, {}], oob_threshold=64)
        (tag, frame), *parts = out.send(call, enc)
        sent += parts
        inbound.on_frame(tag, bytearray(frame))
        (fail,) = inbound.take()
        assert isinstance(fail, Fail) and isinstance(fail.error, ResourceExhausted)
        assert inbound.awaited_parts <= budget.max_parts + budget.max_early
    assert inbound.announced_bytes == 0
    for handle, (tag, part) in enumerate(sent):
        inbound.on_part(tag, len(part), handle)
    discarded = inbound.take()
    assert all(isinstance(a, Discard) for a in discarded)
    assert len(discarded) == len(sent) and inbound.awaited_parts == 0


# -- bugs: these fail until ucxrpc/protocol/outbound.py is fixed ------------------------------


def test_bug_outbound_builds_batches_longer_than_max_frame() -> None:
    """BUG (Outbound.flush): a run is cut when its *inner* frames would exceed
    ``max_batch`` (MAX_FRAME by default), but the BATCH message adds its own 28-byte
    prefix: inner frames totalling MAX_FRAME give a 65564-byte message. The receiving
    engine discards every frame longer than MAX_FRAME and breaks the connection
    (Engine._probe_frames -> Runtime.on_oversized -> Link.on_oversized)."""
    filler = len(msgpack.packb(["", None, None, [], None])) + 3  # header + str16 prefix
    out = Outbound(CONN, SECRET, KEY)
    for call in (1, 2):
        enc = codec.encode(Kind.REPLY, call, "x" * (codec.MAX_FRAME // 2 - 28 - filler))
        assert len(enc.frame) == codec.MAX_FRAME // 2
        out.queue(call, enc)
    sizes = [len(buf) for _, buf in out.flush()]
    assert max(sizes) <= codec.MAX_FRAME, f"messages of {sizes} bytes (MAX_FRAME {codec.MAX_FRAME})"
