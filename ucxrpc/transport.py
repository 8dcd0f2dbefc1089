"""Tag-level messaging to one peer over UCX: frames and their data parts.

A :class:`Link` is one direction-pair between this worker and a peer worker: the UCX
endpoint to the peer, the connection id the peer gave us (we put it in every tag we
send) and the id we gave the peer (it is in every tag we receive). See
:mod:`ucxrpc.codec` for the tag layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as _np

from . import codec
from .errors import ConnectionLost, RpcError

if TYPE_CHECKING:
    from ._engine import Engine, Op

__all__ = ["Link"]

PartsCallback = Callable[[BaseException | None, list[Any]], None]


def _alloc(size: int) -> Any:
    """A receive buffer for a data part.

    Large buffers come from numpy (``malloc``, not zero-filled: ``bytearray(n)`` would
    write every page once before UCX writes it again) and are handed out as a
    memoryview; small ones are bytearrays.
    """
    if size < _LARGE:
        return bytearray(size)
    return _np.empty(size, dtype=_np.uint8).data.cast("B")


_LARGE = 256 * 1024


class Link:
    """Frames and data parts to and from one peer.

    Args:
        engine: The manager's progress engine.
        ep: The UCX endpoint to the peer.
        local_id: The connection id this side assigned (appears in received tags).
        remote_id: The connection id the peer assigned (put in sent tags).
        remote_slot: The size of the receives the peer posts for frames it awaits.
        max_size: The largest message either side accepts.
        on_error: Called once when a send fails (the peer is gone).
    """

    def __init__(
        self,
        engine: Engine,
        ep: Any,
        local_id: int,
        remote_id: int,
        remote_slot: int,
        max_size: int,
        on_error: Callable[[RpcError], None],
    ) -> None:
        self.engine = engine
        self.ep = ep
        self.local_id = local_id
        self.remote_id = remote_id
        self.remote_slot = remote_slot
        self.max_size = max_size
        self._on_error = on_error
        self.closed = False
        self.bytes_sent = 0
        self.bytes_received = 0

    def _send_done(self, exc: BaseException | None) -> None:
        if exc is not None and not self.closed:
            self._on_error(exc if isinstance(exc, RpcError) else ConnectionLost(str(exc)))

    def send(self, call_id: int, encoded: codec.Encoded) -> None:
        """Send a frame and its parts for ``call_id``.

        Raises:
            ConnectionLost: The link is closed or UCX refused the send.
        """
        if self.closed:
            raise ConnectionLost("connection closed")
        engine, ep, rid = self.engine, self.ep, self.remote_id
        frame, parts = encoded
        engine.send(ep, frame, codec.frame_tag(rid, call_id), self._send_done)
        self.bytes_sent += len(frame)
        if parts:
            for i, part in enumerate(parts, 1):
                engine.send(ep, part, codec.data_tag(rid, call_id, i), self._send_done)
            self.bytes_sent += encoded.size - len(frame)

    def recv_frame(
        self, call_id: int, cb: Callable[[BaseException | None], None], buf: bytearray
    ) -> Op:
        """Post a receive of the next frame for ``call_id`` into ``buf`` (a slot)."""
        return self.engine.recv(buf, codec.frame_tag(self.local_id, call_id), cb)

    def recv_parts(self, call_id: int, sizes: tuple[int, ...], cb: PartsCallback) -> None:
        """Receive the data parts announced by a frame, each at its exact size."""
        bufs = [_alloc(n) for n in sizes]
        remaining = len(bufs)
        failed: list[BaseException] = []

        def one_done(exc: BaseException | None) -> None:
            nonlocal remaining
            remaining -= 1
            if exc is not None:
                failed.append(exc)
            if remaining == 0:
                self.bytes_received += sum(sizes)
                cb(failed[0] if failed else None, bufs)

        for i, buf in enumerate(bufs, 1):
            self.engine.recv(buf, codec.data_tag(self.local_id, call_id, i), one_done)

    def drain_parts(self, call_id: int, count: int) -> None:
        """Consume and discard ``count`` data parts of a frame nobody waits for."""
        for i in range(1, count + 1):
            self.engine.drain(codec.data_tag(self.local_id, call_id, i))
