"""The receiving half of one connection, as a pure state machine.

UCX hands the I/O layer two kinds of arrivals, in whatever order it completes them:
frames (each a whole UCX message, found by a probe) and data parts (found by a probe
that reports their length, then received). This machine turns them into frames
delivered in the order the peer sent them, each with exactly the parts it announced,
or into a failure of that one call. It never touches UCX: it is fed events and
answers with actions that the I/O layer carries out.

Events::

    on_frame(tag, buf)              a frame arrived (all its bytes)
    on_part(tag, length, handle)    a data part is waiting in UCX (not yet received)
    on_part_done(token, ok, buf?)   a part receive the machine asked for completed
                                    (for a shared part: with the mapped bytes)
    expire(now)                     time passed (frames waiting too long for parts)

Actions (``take(limit)``: with a limit, up to that many deliveries; the rest, and the
frames of batches not yet looked at, wait for the next call: ``pending``)::

    Receive(handle, buffer, token,  receive the part into buffer; report on_part_done
            shared)                 (``shared`` set: buffer gets a shared part's
                                    descriptor; map the part, then report)
    Discard(handle, length)         consume the part and throw it away
    Deliver(header, payload, parts) the next frame, in order, with its parts
    Fail(call_id, kind, error)      the next frame was unusable: fail that call only
    Violation(error)                the peer broke the protocol: close the connection

What holds by construction:

* frames are delivered in seq order; a frame waits for every part it announced;
* a part is bound to one frame and part index by its tag, and is received only after
  its length was checked against the announcement: a short or long part fails its
  call and no buffer UCX did not fill is ever delivered; a shared part's descriptor
  must be exactly a descriptor, and the bytes mapped for it exactly as announced;
* a frame whose secret is not this connection's is dropped and counted (no action,
  no receive, nothing sent back);
* the bytes and parts a peer may have announced and not yet delivered are bounded
  (``budget``), and checked before any buffer is allocated;
* a batch's frames are looked at in order, a slice per ``take(limit)``, and all of
  them before any part is matched (a part never waits on a frame not yet looked at);
  what waits is bounded (``INBOX_LIMIT``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from ..errors import ProtocolError, ResourceExhausted, RpcError
from ..wire import codec
from ..wire.codec import Flags, Header, Kind
from ..wire.shared import DESCRIPTOR_SIZE

__all__ = [
    "INBOX_LIMIT",
    "Action",
    "Budget",
    "Deliver",
    "Discard",
    "Fail",
    "Inbound",
    "Receive",
    "Shared",
    "Violation",
]


class Shared(NamedTuple):
    """Which shared part a :class:`Receive` brings the descriptor of."""

    seq: int
    part: int
    length: int


class Receive(NamedTuple):
    """Receive the probed part ``handle`` into ``buffer``; report ``on_part_done(token)``.

    With ``shared`` set, ``buffer`` receives the descriptor of a shared part: the I/O
    layer maps the part it names and reports ``on_part_done(token, ok, mapped)``.
    """

    handle: Any
    buffer: Any
    token: Any
    shared: Shared | None = None


class Discard(NamedTuple):
    """Consume the probed part ``handle`` (``length`` bytes) and drop it.

    ``release`` is set when the part was a shared part's descriptor: the peer is told
    (RELEASE ``release``) so that it closes the file at once.
    """

    handle: Any
    length: int
    release: int | None = None


class Deliver(NamedTuple):
    """The next frame in order, with the buffers of its parts."""

    header: Header
    payload: memoryview
    parts: list[Any]


class Fail(NamedTuple):
    """The next frame in order could not be used: fail call ``call_id`` with ``error``.

    ``kind`` is the frame's kind when its prefix named a known one, else None.
    """

    call_id: int
    kind: Kind | None
    error: RpcError


class Violation(NamedTuple):
    """The peer broke the protocol in a way that leaves the connection unusable."""

    error: ProtocolError


Action = Receive | Discard | Deliver | Fail | Violation


class Budget(NamedTuple):
    """Per-connection limits on what a peer may have announced and not delivered.

    Attributes:
        max_message: The largest message (frame plus parts) accepted.
        max_bytes: Part bytes announced by frames not yet delivered.
        max_parts: Parts announced and not yet arrived.
        max_ahead: Frames received ahead of the next one in order (a seq further
            ahead is a violation).
        max_held: Bytes of frames received and not yet delivered (frames ahead of a
            gap, frames waiting for their parts); more is a violation.
        max_early: Parts that arrived before their frame (held, not received). Only
            parts whose tag names a frame inside the window are held; over TCP a
            rendezvous frame often completes after the parts of later frames.
        part_timeout: Seconds a frame may wait for its parts.
    """

    max_message: int = 256 * 1024 * 1024
    max_bytes: int = 1024 * 1024 * 1024
    max_parts: int = 4096
    max_ahead: int = 4096
    max_held: int = 64 * 1024 * 1024
    max_early: int = 4096
    part_timeout: float = 30.0


DEFAULT_BUDGET: Final = Budget()

#: Batch frames looked at per step while a part's frame is searched for.
_SEARCH_STEP: Final = 16

#: Frames and actions left waiting by :meth:`Inbound.take` at most: past this, a take
#: takes the excess too (a peer whose batches arrive faster than they are taken gets
#: larger slices, about a batch at most, and the owner's own limits apply).
INBOX_LIMIT: Final = 4096


class _Entry:
    """A frame received and not yet delivered."""

    __slots__ = (
        "bytes",
        "call_id",
        "error",
        "header",
        "kind",
        "missing",
        "parts",
        "payload",
        "size",
    )

    def __init__(self, call_id: int, kind: Kind | None) -> None:
        self.call_id = call_id
        self.kind = kind
        self.header: Header | None = None
        self.payload: memoryview = memoryview(b"")
        self.parts: list[Any] = []
        self.missing = 0
        self.bytes = 0
        self.size = 0
        self.error: RpcError | None = None


class _Expected:
    """A part announced by a frame and not yet arrived."""

    __slots__ = ("entry", "index", "seq", "shared", "since", "size")

    def __init__(
        self, entry: _Entry, index: int, size: int, since: float, seq: int, shared: bool
    ) -> None:
        self.entry = entry
        self.index = index
        self.size = size
        self.since = since
        self.seq = seq
        #: The part travels shared: its UCX message is a descriptor.
        self.shared = shared


_KINDS = {int(k): k for k in Kind}
_SEQ_MASK = codec.SEQ_MOD - 1


def default_alloc(size: int) -> Any:
    """A receive buffer of ``size`` bytes (zero-filled; UCX overwrites all of it)."""
    return bytearray(size)


class Inbound:
    """The receiving state of one connection.

    Args:
        conn_id: This side's id of the connection (in the tags it receives).
        secret: The 64-bit secret every frame for this connection carries.
        key: The 40-bit key that masks its data tags.
        budget: The limits (see :class:`Budget`).
        alloc: Makes a part's receive buffer of a given size.
        clock: The current time in seconds (for part timeouts).
    """

    def __init__(
        self,
        conn_id: int,
        secret: int,
        key: int,
        budget: Budget = DEFAULT_BUDGET,
        *,
        alloc: Callable[[int], Any] = default_alloc,
        clock: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.conn_id = conn_id
        self.secret = secret
        self.key = key & codec.KEY_MASK
        self.budget = budget
        self._alloc = alloc
        self._clock = clock
        self._next = 0
        self._entries: dict[int, _Entry] = {}
        self._expected: dict[int, _Expected] = {}
        self._early: dict[int, tuple[int, Any, float]] = {}
        self._bytes = 0
        self._held = 0
        self._gap_since: float | None = None
        self._actions: list[Action] = []
        self._inbox: deque[Any] = deque()  # frames of batches, not yet looked at
        self.broken: ProtocolError | None = None
        #: Frames dropped because they carried another connection's secret.
        self.dropped = 0
        #: Frames delivered (or failed) in order so far.
        self.delivered = 0

    # -- state, for the I/O layer and tests ----------------------------------------------

    @property
    def next_seq(self) -> int:
        """The seq of the next frame to deliver."""
        return self._next

    @property
    def waiting_frames(self) -> int:
        """Frames received and not yet delivered."""
        return len(self._entries)

    @property
    def awaited_parts(self) -> int:
        """Parts announced and not yet arrived (or held before their frame)."""
        return len(self._expected) + len(self._early)

    @property
    def announced_bytes(self) -> int:
        """Part bytes announced by frames not yet delivered."""
        return self._bytes

    @property
    def pending(self) -> int:
        """Actions and batch frames not yet taken (left by a :meth:`take` with a limit)."""
        return len(self._actions) + len(self._inbox)

    def take(self, limit: int | None = None) -> list[Action]:
        """The actions produced since the last call, in order.

        Args:
            limit: Take deliveries (and failures) up to the ``limit``-th
                :class:`Deliver` only (none for 0), reading no more batch frames than
                that; the rest wait for the next call. Receives and discards are
                always taken (they change no delivery's order, and a part's sender
                waits for its receive). A batch carries up to a thousand small
                frames: handing them all over at once would keep every other
                connection waiting that long. With more than ``INBOX_LIMIT`` pending (a
                peer sending faster than it is served), the excess is taken too: what
                waits stays bounded.
        """
        if limit is not None and self.pending > INBOX_LIMIT:
            limit += self.pending - INBOX_LIMIT  # the excess too: about a batch at most
        if self._inbox:
            self._unpack(limit)
        out = self._actions
        if limit is None or len(out) <= limit:
            self._actions = []
            return out
        cut = 0  # how many actions go before the rest is sorted (none for a limit of 0)
        if limit > 0:
            delivers = 0
            for i, action in enumerate(out):
                if type(action) is Deliver:
                    delivers += 1
                    if delivers == limit:
                        cut = i + 1
                        break
            else:
                self._actions = []
                return out
        taken = out[:cut]
        rest: list[Action] = []
        for later in out[cut:]:
            kind = type(later)
            (taken if kind is Receive or kind is Discard else rest).append(later)
        self._actions = rest
        return taken

    # -- events ---------------------------------------------------------------------------

    def on_frame(self, tag: int, buf: Any) -> None:
        """A frame arrived on ``tag`` (a frame tag of this connection)."""
        if self.broken is not None:
            return
        if len(buf) < codec.PREFIX_SIZE:
            # Too short to carry a secret: nobody can be blamed for it.
            self.dropped += 1
            return
        prefix = codec.peek(buf)
        if prefix.secret != self.secret:
            self.dropped += 1
            return
        if prefix.call_id != (tag >> 8) & codec.MAX_CALL_ID:
            self._violation(
                f"frame for call {prefix.call_id} arrived on the tag of call "
                f"{(tag >> 8) & codec.MAX_CALL_ID}"
            )
            return
        if prefix.kind == Kind.BATCH:
            try:
                header, payload = codec.decode_header(buf)
                inner = codec.split_batch(payload)
            except ProtocolError as exc:
                self._violation(f"malformed batch: {exc}")
                return
            del header
            # Its frames are taken in turn (see take): decoding a thousand of them at
            # once would hold up every other connection that long.
            self._inbox.extend(inner)
        elif self._inbox:
            self._inbox.append(buf)  # behind the batch frames before it
        else:
            self._frame(buf, prefix)
            self._flush()

    def _unpack(self, count: int | None) -> None:
        """Take ``count`` (None: all) frames of the batches received, in order."""
        inbox = self._inbox
        n = len(inbox) if count is None else min(count, len(inbox))
        for _ in range(n):
            frame = inbox.popleft()
            sub = codec.peek(frame)
            if sub.secret != self.secret:
                inbox.clear()
                self._violation("a frame inside a batch carries another secret")
                return
            self._frame(frame, sub)
            if self.broken is not None:
                inbox.clear()
                return
        self._flush()

    def on_part(self, tag: int, length: int, handle: Any) -> None:
        """A data part of ``length`` bytes is waiting in UCX under ``tag``."""
        # Its frame may be among the batch frames not yet looked at: look at them up to
        # it first (all of them for a stranger's part), or it would be taken for one
        # that came early.
        while self._inbox and tag not in self._expected and self.broken is None:
            self._unpack(_SEARCH_STEP)
        if self.broken is not None:
            self._actions.append(Discard(handle, length))
            return
        expected = self._expected.pop(tag, None)
        if expected is None:
            # Which frame would this part belong to? Only the key holder can tell: a
            # stranger's guess lands far outside the window and is thrown away.
            low = (tag ^ self.key) & codec.KEY_MASK
            ahead = ((low >> 8) - self._next) & _SEQ_MASK
            if (
                ahead >= self.budget.max_ahead
                or low & 0xFF == 0
                or len(self._early) >= self.budget.max_early
                or tag in self._early
            ):
                self._actions.append(Discard(handle, length))
                return
            self._early[tag] = (length, handle, self._clock())
            return
        self._arrived(expected, length, handle)
        self._flush()

    def on_part_done(
        self, token: Any, ok: bool, mapped: Any = None, error: RpcError | None = None
    ) -> None:
        """A :class:`Receive` completed (``ok``) or failed (with ``error``, if known).

        For a shared part, ``mapped`` is the part's bytes as the I/O layer mapped them
        from the descriptor; anything but exactly the announced length fails the call.
        """
        entry, index, size, shared = token
        entry.missing -= 1
        if ok and shared:
            if mapped is None or len(mapped) != size:
                ok = False
                error = ProtocolError(
                    f"shared part {index + 1} of call {entry.call_id} is not the "
                    f"{size} bytes its frame announced"
                )
            elif entry.error is None:
                entry.parts[index] = mapped
        if not ok and entry.error is None:
            entry.error = error or ProtocolError(
                f"data part {index + 1} of call {entry.call_id} failed"
            )
        self._flush()

    def expire(self, now: float) -> None:
        """Fail frames that waited longer than ``part_timeout`` for a part, and drop
        parts held that long before their frame."""
        if self._inbox:
            self._unpack(None)  # a frame not yet looked at may be what others wait for
        limit = now - self.budget.part_timeout
        for tag in [t for t, e in self._expected.items() if e.since <= limit]:
            expected = self._expected.pop(tag)
            entry = expected.entry
            entry.missing -= 1
            if entry.error is None:
                entry.error = ProtocolError(
                    f"data part {expected.index + 1} of call {entry.call_id} did not arrive "
                    f"within {self.budget.part_timeout} s"
                )
        for tag in [t for t, (_, _, since) in self._early.items() if since <= limit]:
            length, handle, _ = self._early.pop(tag)
            self._actions.append(Discard(handle, length))
        if self._gap_since is not None and self._gap_since <= limit and self.broken is None:
            # Frames wait behind one that never came (a lost or withheld frame): the
            # connection cannot go on in order.
            self._violation(
                f"frame {self._next} did not arrive within {self.budget.part_timeout} s "
                f"while {len(self._entries)} later frames waited"
            )
            return
        self._flush()

    def close(self) -> None:
        """The connection is closing: discard every part held before its frame, and
        every part a receive not yet taken was for; deliver nothing more."""
        left: list[Action] = []
        for action in self._actions:
            if type(action) is Receive:
                left.append(Discard(action.handle, memoryview(action.buffer).nbytes))
            elif type(action) is Discard:
                left.append(action)
        self._actions = left
        self._inbox.clear()
        for length, handle, _ in self._early.values():
            self._actions.append(Discard(handle, length))
        self._early.clear()
        self._expected.clear()
        self._entries.clear()
        self._bytes = 0
        self._held = 0

    # -- internals ------------------------------------------------------------------------

    def _violation(self, message: str) -> None:
        self.broken = ProtocolError(message)
        self._actions.append(Violation(self.broken))

    def _frame(self, buf: Any, prefix: codec.Prefix) -> None:
        seq = prefix.seq
        decoded: tuple[Header, memoryview] | None = None
        if seq == self._next and not self._entries:
            # The next frame in order with nothing waiting (the common case): a frame
            # without parts is delivered at once, with no entry to keep.
            try:
                decoded = codec.decode_header(buf)
            except ProtocolError as exc:
                self._actions.append(Fail(prefix.call_id, _KINDS.get(prefix.kind), exc))
                self._next = (seq + 1) & _SEQ_MASK
                self.delivered += 1
                return
            header = decoded[0]
            if not header.parts and header.kind is not Kind.BATCH:
                self._actions.append(Deliver(header, decoded[1], []))
                self._next = (seq + 1) & _SEQ_MASK
                self.delivered += 1
                return
        ahead = (seq - self._next) & _SEQ_MASK
        if ahead >= self.budget.max_ahead:
            self._violation(f"frame {seq} is out of the window (next is {self._next})")
            return
        if seq in self._entries:
            self._violation(f"frame {seq} arrived twice")
            return
        held = self._held + len(buf)
        if held > self.budget.max_held:
            self._violation(
                f"{held} bytes of frames held undelivered (limit {self.budget.max_held})"
            )
            return
        entry = _Entry(prefix.call_id, _KINDS.get(prefix.kind))
        entry.size = len(buf)
        self._held = held
        self._entries[seq] = entry
        if decoded is None:
            try:
                decoded = codec.decode_header(buf)
            except ProtocolError as exc:
                entry.error = exc
                return
        header, payload = decoded
        if header.kind is Kind.BATCH:
            self._violation("a batch inside a batch")
            return
        entry.header, entry.payload = header, payload
        sizes = header.parts
        if not sizes:
            return
        total = sum(sizes)
        budget = self.budget
        if total + len(buf) > budget.max_message:
            entry.error = ResourceExhausted(
                f"message of {total + len(buf)} bytes exceeds the limit of "
                f"{budget.max_message} bytes"
            )
            return
        if self._bytes + total > budget.max_bytes or (
            len(self._expected) + len(sizes) > budget.max_parts
        ):
            # Refused before anything is allocated or remembered: should the parts
            # come anyway, they are held as strangers' (bounded) and thrown away.
            entry.error = ResourceExhausted(
                f"call {prefix.call_id}: {total} bytes in {len(sizes)} parts exceed what "
                f"this connection may have in flight ({budget.max_bytes} bytes, "
                f"{budget.max_parts} parts)"
            )
            return
        entry.bytes = total
        self._bytes += total
        entry.parts = [None] * len(sizes)
        entry.missing = len(sizes)
        now = self._clock()
        conn, key = self.conn_id, self.key
        shared = bool(header.flags & Flags.SHARED_PARTS)
        for i, size in enumerate(sizes):
            tag = codec.data_tag(conn, key, seq, i + 1)
            expected = _Expected(entry, i, size, now, seq, shared and size >= codec.SHARED_MIN)
            early = self._early.pop(tag, None)
            if early is None:
                self._expected[tag] = expected
            else:
                self._arrived(expected, early[0], early[1])

    def _arrived(self, expected: _Expected, length: int, handle: Any) -> None:
        entry = expected.entry
        release = (expected.seq << 8) | (expected.index + 1) if expected.shared else None
        if entry.error is not None:
            self._actions.append(Discard(handle, length, release))
            entry.missing -= 1
            return
        wire = DESCRIPTOR_SIZE if expected.shared else expected.size
        if length != wire:
            what = "the descriptor of shared part" if expected.shared else "data part"
            entry.error = ProtocolError(
                f"{what} {expected.index + 1} of call {entry.call_id} is {length} bytes; "
                f"{'a descriptor is' if expected.shared else 'its frame announced'} {wire}"
            )
            self._actions.append(Discard(handle, length, release))
            entry.missing -= 1
            return
        index = expected.index
        token = (entry, index, expected.size, expected.shared)
        if expected.shared:
            buf: Any = bytearray(DESCRIPTOR_SIZE)
            shared = Shared(expected.seq, index + 1, expected.size)
            self._actions.append(Receive(handle, buf, token, shared))
            return
        buf = self._alloc(length)
        entry.parts[index] = buf
        self._actions.append(Receive(handle, buf, token))

    def _flush(self) -> None:
        if self.broken is not None:
            return  # nothing is delivered after a violation: the connection is closing
        entries = self._entries
        while True:
            entry = entries.get(self._next)
            if entry is None or (entry.missing > 0 and entry.error is None):
                if entry is None and entries:
                    if self._gap_since is None:
                        self._gap_since = self._clock()
                else:
                    self._gap_since = None
                return
            if entry.error is not None:
                # Deliver the failure now; parts still on their way stay expected and
                # are discarded when they come (or when they time out).
                self._release(entry)
                self._actions.append(Fail(entry.call_id, entry.kind, entry.error))
            elif entry.missing == 0:
                header = entry.header
                assert header is not None
                self._bytes -= entry.bytes
                self._actions.append(Deliver(header, entry.payload, entry.parts))
            del entries[self._next]
            self._held -= entry.size
            self._next = (self._next + 1) & _SEQ_MASK
            self.delivered += 1

    def _release(self, entry: _Entry) -> None:
        self._bytes -= entry.bytes
        entry.bytes = 0
        entry.parts = []
