"""The sending half of one connection, as a pure state machine.

It numbers frames in the order they are handed over (the receiver delivers them in
that order), stamps the peer's secret into each, gives each data part the tag that
binds it to its frame, and coalesces frames queued while the sender is busy into one
BATCH message. It returns the UCX messages to send, as ``(tag, buffer)`` pairs in
order; it never sends anything itself.
"""

from __future__ import annotations

from typing import Any

from ..wire import codec
from ..wire.codec import Encoded

__all__ = ["Message", "Outbound"]

#: One UCX message to send: its tag and its buffer.
Message = tuple[int, Any]

_SEQ_MASK = codec.SEQ_MOD - 1


class Outbound:
    """The sending state of one connection.

    Args:
        conn_id: The peer's id of the connection (put in every tag sent).
        secret: The peer's 64-bit connection secret (stamped into every frame).
        key: The peer's 40-bit data-tag key.
        max_batch: The largest BATCH message built (bytes).
    """

    def __init__(
        self, conn_id: int, secret: int, key: int, *, max_batch: int = codec.MAX_FRAME
    ) -> None:
        self.conn_id = conn_id
        self.secret = secret
        self.key = key & codec.KEY_MASK
        self.max_batch = max_batch
        self._seq = 0
        self._queued: list[tuple[int, Encoded]] = []
        self._queued_bytes = 0
        #: Frames numbered so far.
        self.frames = 0
        #: BATCH messages built so far.
        self.batches = 0

    @property
    def next_seq(self) -> int:
        """The seq the next frame gets."""
        return self._seq

    @property
    def queued(self) -> int:
        """Frames queued for the next :meth:`flush`."""
        return len(self._queued)

    def send(self, call_id: int, encoded: Encoded) -> list[Message]:
        """Number ``encoded`` and return its messages (frame first, then its parts)."""
        seq = self._number(encoded)
        tag = codec.frame_tag(self.conn_id, call_id)
        out: list[Message] = [(tag, encoded.frame)]
        if encoded.parts:
            self._parts(seq, encoded, out)
        return out

    def queue(self, call_id: int, encoded: Encoded) -> None:
        """Number ``encoded`` now and hold it for the next :meth:`flush`."""
        self._number(encoded)
        self._queued.append((call_id, encoded))
        self._queued_bytes += len(encoded.frame)

    def flush(self) -> list[Message]:
        """The messages of every queued frame: runs of small frames become BATCH
        messages of at most ``max_batch`` bytes; a lone frame leaves as it is."""
        queued, self._queued = self._queued, []
        self._queued_bytes = 0
        out: list[Message] = []
        run: list[Encoded] = []
        run_call = 0
        run_bytes = 0
        for call_id, encoded in queued:
            size = len(encoded.frame)
            if run and run_bytes + size > self.max_batch - codec.PREFIX_SIZE:
                self._emit(run, run_call, out)
                run, run_bytes = [], 0
            if not run:
                run_call = call_id
            run.append(encoded)
            run_bytes += size
            if encoded.parts:
                # A frame's parts follow it: close the run here so they stay behind it.
                self._emit(run, run_call, out)
                run, run_bytes = [], 0
        if run:
            self._emit(run, run_call, out)
        return out

    # -- internals ------------------------------------------------------------------------

    def _number(self, encoded: Encoded) -> int:
        seq = self._seq
        codec.stamp(encoded.frame, seq, self.secret)
        self._seq = (seq + 1) & _SEQ_MASK
        self.frames += 1
        return seq

    def _parts(self, seq: int, encoded: Encoded, out: list[Message]) -> None:
        conn, key = self.conn_id, self.key
        for i, part in enumerate(encoded.parts, 1):
            out.append((codec.data_tag(conn, key, seq, i), part))

    def _emit(self, run: list[Encoded], call_id: int, out: list[Message]) -> None:
        if len(run) == 1:
            only = run[0]
            out.append((codec.frame_tag(self.conn_id, call_id), only.frame))
        else:
            self.batches += 1
            batch = codec.encode_batch([e.frame for e in run], self.secret)
            out.append((codec.frame_tag(self.conn_id, 0), batch))
        for encoded in run:
            if encoded.parts:
                self._parts(codec.peek(encoded.frame).seq, encoded, out)
