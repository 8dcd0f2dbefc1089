"""The progress engine: drives one UCX worker from the asyncio loop.

ucxx's own asyncio modes busy-poll a core per process even when idle. This engine owns
the low-level worker and keeps three promises:

* while traffic flows it polls (``progress()`` on every loop iteration), so a reply is
  seen as soon as it lands;
* after ``spin`` seconds without an event it arms the worker and sleeps on its epoll fd
  (``arm()`` returning False means events are pending: poll again first);
* the fd callback only *schedules* a drive; at most one drive is ever queued.

Requests are tracked here (UCX completes them during ``progress()``): each drive reaps
finished ones and runs their callbacks. Frames of unknown size are found with
``tag_probe(remove=True)`` and received at their exact size.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from . import codec
from ._ucx import Array
from ._ucx import lib as _ucx
from .errors import ConnectionLost, RpcError, Unavailable

__all__ = ["Engine", "Op", "convert_ucx_error"]

log = logging.getLogger("ucxrpc")

Callback = Callable[[BaseException | None], None]
_FULL_MASK = _ucx.UCXXTagMask((1 << 64) - 1)
_FRAME_TAG = _ucx.UCXXTag(codec.FRAME_PROBE_TAG)
_FRAME_MASK = _ucx.UCXXTagMask(codec.FRAME_PROBE_MASK)
_Tag = _ucx.UCXXTag


def convert_ucx_error(exc: BaseException) -> RpcError:
    """Turn a ucxx exception into the ucxrpc error a user should see."""
    if isinstance(exc, RpcError):
        return exc
    name = type(exc).__name__
    if "Truncated" in name:
        return RpcError(13, f"UCX receive buffer too small: {exc}")
    if any(s in name for s in ("Reset", "Unreachable", "NotConnected", "Canceled", "Failure")):
        return ConnectionLost(f"UCX: {name}: {exc}")
    return Unavailable(f"UCX: {name}: {exc}")


class Op:
    """A UCX request in flight, with the buffer it uses and its completion callback."""

    __slots__ = ("buf", "cb", "is_recv", "req")

    def __init__(self, req: Any, cb: Callback | None, buf: Any, is_recv: bool) -> None:
        self.req = req
        self.cb = cb
        self.buf = buf
        self.is_recv = is_recv


FrameHandler = Callable[[int, bytearray], None]
OversizeHandler = Callable[[int, int], None]


class Engine:
    """Progress engine for one worker. Created and owned by a Manager."""

    def __init__(
        self,
        worker: Any,
        loop: asyncio.AbstractEventLoop,
        *,
        mode: str,
        spin: float,
        max_frame: int,
        on_frame: FrameHandler,
        on_oversized: OversizeHandler,
    ) -> None:
        self._worker = worker
        self._loop = loop
        self._poll_forever = mode == "polling"
        self._spin = 0.0 if mode == "efficient" else spin
        self._max_frame = max_frame
        self._on_frame = on_frame
        self._on_oversized = on_oversized
        self._ops: list[Op] = []
        self._scheduled = False
        self._closed = False
        self._last_event = 0.0
        self._fd: int = worker.epoll_file_descriptor
        #: Receives posted and not yet completed or cancelled.
        self.posted_receives = 0
        #: Drives run (a measure of how busy the engine was).
        self.drives = 0
        loop.add_reader(self._fd, self.kick)
        self.kick()

    # -- scheduling -----------------------------------------------------------------

    def kick(self) -> None:
        """Make sure a drive is queued (called on fd readiness and after posting work)."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._drive)

    def _drive(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        self.drives += 1
        worker = self._worker
        worker.progress()
        active = self._reap() if self._ops else False
        if self._probe():
            active = True
        now = time.perf_counter()
        if active:
            self._last_event = now
        elif not self._poll_forever and now - self._last_event >= self._spin and worker.arm():
            return  # asleep: the fd wakes us
        self._scheduled = True
        self._loop.call_soon(self._drive)

    # -- requests ---------------------------------------------------------------------

    def _reap(self) -> bool:
        keep: list[Op] = []
        finished: list[Op] = []
        for op in self._ops:
            req = op.req
            if req is None:
                continue
            (finished if req.completed else keep).append(op)
        if not finished:
            return False
        self._ops = keep
        for op in finished:
            if op.is_recv:
                self.posted_receives -= 1
            exc: BaseException | None = None
            try:
                op.req.check_error()
            except Exception as err:
                exc = convert_ucx_error(err)
            op.req = None
            cb, op.cb = op.cb, None
            if cb is not None:
                self._run(cb, exc)
        return True

    def _run(self, cb: Callback, exc: BaseException | None) -> None:
        try:
            cb(exc)
        except Exception:
            log.exception("ucxrpc: completion callback failed")

    def send(self, ep: Any, buf: Any, tag: int, cb: Callback | None = None) -> Op | None:
        """Send ``buf`` on ``tag``. Returns None when UCX completed it in place.

        Raises:
            RpcError: The send failed at once (converted from ucxx).
        """
        try:
            req = ep.tag_send(Array(buf), _Tag(tag))
        except Exception as err:
            raise convert_ucx_error(err) from None
        if req.completed:
            try:
                req.check_error()
            except Exception as err:
                raise convert_ucx_error(err) from None
            if cb is not None:
                cb(None)
            return None
        op = Op(req, cb, buf, False)
        self._ops.append(op)
        self.kick()
        return op

    def recv(self, buf: Any, tag: int, cb: Callback) -> Op:
        """Post a receive of ``buf`` for exactly ``tag``; ``cb`` runs on completion."""
        try:
            req = self._worker.tag_recv(Array(buf), _Tag(tag), _FULL_MASK)
        except Exception as err:
            raise convert_ucx_error(err) from None
        op = Op(req, cb, buf, True)
        self.posted_receives += 1
        self._ops.append(op)
        self.kick()
        return op

    def cancel(self, op: Op) -> None:
        """Cancel a posted eager-sized receive (a reply slot) that has not completed.

        Dropping the request makes ucxx cancel it in UCX; only receives whose message
        cannot be half-arrived (at most one eager fragment) may be cancelled this way.
        """
        if op.req is None:
            return
        op.cb = None
        if op.is_recv:
            self.posted_receives -= 1
        op.req = None

    def drain(self, tag: int) -> None:
        """Receive and discard one message on ``tag`` (truncating it to one byte)."""
        self.recv(bytearray(1), tag, _ignore)

    # -- arrivals ---------------------------------------------------------------------

    def _probe(self) -> bool:
        worker = self._worker
        found = False
        while True:
            probe = worker.tag_probe(_FRAME_TAG, _FRAME_MASK, True)
            if not probe.matched:
                return found
            found = True
            tag: int = probe.sender_tag.value
            size: int = probe.length
            if size > self._max_frame:
                # Receiving into a 1-byte buffer consumes the message (UCX truncates).
                self._track(
                    worker.tag_recv_with_handle(Array(junk := bytearray(1)), probe), junk, None
                )
                try:
                    self._on_oversized(tag, size)
                except Exception:
                    log.exception("ucxrpc: oversize handler failed")
                continue
            buf = bytearray(size)
            req = worker.tag_recv_with_handle(Array(buf), probe)
            if req.completed:
                try:
                    req.check_error()
                except Exception:
                    log.warning("ucxrpc: dropped a frame that failed to arrive")
                    continue
                try:
                    self._on_frame(tag, buf)
                except Exception:
                    log.exception("ucxrpc: frame handler failed")
            else:
                self._track(req, buf, self._frame_done(tag, buf))

    def _frame_done(self, tag: int, buf: bytearray) -> Callback:
        def done(exc: BaseException | None) -> None:
            if exc is None:
                self._on_frame(tag, buf)

        return done

    def _track(self, req: Any, buf: Any, cb: Callback | None) -> None:
        if req.completed:
            return
        self._ops.append(Op(req, cb, buf, False))

    # -- shutdown ---------------------------------------------------------------------

    def close(self) -> list[Op]:
        """Stop driving. Returns the ops still in flight (keep their buffers alive until
        the worker is destroyed)."""
        self._closed = True
        self._loop.remove_reader(self._fd)
        ops, self._ops = self._ops, []
        for op in ops:
            op.cb = None
        self.posted_receives = 0
        return ops

    def progress(self) -> int:
        """Run one progress pass now; returns the number of completions and arrivals."""
        self._worker.progress()
        before = len(self._ops)
        self._reap()
        return max(0, before - len(self._ops)) + int(self._probe())


def _ignore(_exc: BaseException | None) -> None:
    return None
