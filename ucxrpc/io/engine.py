"""The progress engine: drives one UCX worker from the asyncio loop.

ucxx's own asyncio modes busy-poll a core per process even when idle. This engine owns
the low-level worker and keeps three promises:

* while traffic flows it polls (progress on every loop iteration), so a message is
  seen as soon as it lands;
* after ``spin`` seconds without an event it arms the worker and sleeps on its epoll fd
  (``arm()`` returning False means events are pending: poll again first);
* the fd callback only *schedules* a drive; at most one drive is ever queued.

While one or two replies are awaited (and no more were for ``SLICE_HOLD``) it asks the
kernel for a short scheduler slice for its thread (``sched_slice``, see
:mod:`.timeslice`), so that on a busy machine a reply's wake-up can displace a busy
process at once; it gives the slice back once none has been awaited for
``SLICE_HOLD``, or as soon as more are.

Nothing is received blindly. Every arriving message is found by a probe that reports
its tag and length and removes it from UCX's queue: frames (tag bit 63 clear) are
received at once into a buffer of exactly that length, unless longer than
``codec.MAX_FRAME``; data parts (bit 63 set) are handed to their connection's protocol
machine, which checks the length against what the part's frame announced before a
buffer is allocated (:meth:`receive` or :meth:`discard`). So no receive is ever posted
in advance. Requests in flight are checked for completion on the drives after they are
posted; one still waiting after a few drives (a send to a peer that does not receive)
joins the old, which are swept a bounded slice per drive. So a drive costs what arrived,
what was posted and a constant, not how much is in flight.

A drive does a bounded amount of work, then yields to the loop, so timers, heartbeats
and other tasks run while a peer floods: it hands arrived frames over for about
``drive_time`` (passes over the frame rings, ``ring_slice`` frames from each per pass,
the rings taking turns at going first; then UCX's arrivals, at most ``max_probes``).
Every source gets its share on every drive, and the frames one drive found over UCX
are handed over taking connections in turn, so a flooding peer's frames do not all go
before another peer's. An exception in a drive is logged (once per kind) and the
drive is rescheduled: progress never stops.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol

from ..errors import ConnectionLost, RpcError, Unavailable
from ..wire import codec
from . import shared
from .timeslice import SliceHint
from .ucx import Array
from .ucx import lib as _ucx

__all__ = [
    "CONTENDED_FOR",
    "CONTENDED_WINDOW",
    "CONTENDED_YIELD",
    "DRIVE_TIME",
    "PROBES_ALWAYS",
    "FORKED_MESSAGE",
    "RING_SLICE",
    "SHARE_EVERY",
    "SLICE_AWAITING",
    "SLICE_HOLD",
    "Engine",
    "Op",
    "RingSource",
    "Router",
    "convert_ucx_error",
]

log = logging.getLogger("ucxrpc")

Callback = Callable[[BaseException | None], None]
_FRAME_TAG = _ucx.UCXXTag(codec.FRAME_PROBE_TAG)
_FRAME_MASK = _ucx.UCXXTagMask(codec.FRAME_PROBE_MASK)
_PART_TAG = _ucx.UCXXTag(codec.PART_PROBE_TAG)
_PART_MASK = _ucx.UCXXTagMask(codec.PART_PROBE_MASK)
_Tag = _ucx.UCXXTag


def convert_ucx_error(exc: BaseException) -> RpcError:
    """Turn a ucxx exception into the ucxrpc error a user should see."""
    if isinstance(exc, RpcError):
        return exc
    name = type(exc).__name__
    if "Truncated" in name:
        return RpcError(13, f"UCX receive buffer too small: {exc}")
    lost = ("Reset", "Unreachable", "NotConnected", "Canceled", "Failure", "EndpointTimeout")
    if any(s in name for s in lost):
        return ConnectionLost(f"UCX: {name}: {exc}")
    return Unavailable(f"UCX: {name}: {exc}")


def _outcome(req: Any) -> BaseException | None:
    """The error a completed UCX request ended with (converted), or None."""
    try:
        req.check_error()
    except Exception as err:
        return convert_ucx_error(err)
    return None


class Router(Protocol):
    """Where the engine hands what arrives (the manager, which routes by connection)."""

    def on_frame(self, tag: int, buf: bytearray) -> None:
        """A whole frame arrived on ``tag``."""

    def on_part(self, tag: int, length: int, handle: Any) -> None:
        """A data part of ``length`` bytes waits under ``tag``; ``handle`` receives it
        (:meth:`Engine.receive`) or throws it away (:meth:`Engine.discard`)."""

    def on_oversized(self, tag: int, length: int) -> None:
        """A frame longer than ``codec.MAX_FRAME`` arrived (and was thrown away)."""


class Op:
    """A UCX request in flight, with the buffer it uses and its completion callback.

    The buffer is referenced until UCX completed the request: UCX may write into a
    receive buffer (or read a send buffer) until then.
    """

    __slots__ = ("age", "buf", "cb", "req")

    def __init__(self, req: Any, cb: Callback | None, buf: Any) -> None:
        self.req = req
        self.cb = cb
        self.buf = buf
        self.age = 0


#: Seconds between looks at the frame rings while asleep, at first and at most (see
#: ``_drive``).
_NAP = 0.005
_NAP_MAX = 1.0


class RingSource(Protocol):
    """A frame ring this side reads (:class:`ucxrpc.io.ring.Reader`)."""

    def poll(self, limit: int = ...) -> int:
        """Deliver what was published; returns how many frames."""

    def doze(self) -> bool:
        """Say this side sleeps; True if nothing waits."""

    def rouse(self) -> None:
        """Say this side polls again."""


#: The largest scratch buffer for discarded messages kept between discards.
_JUNK_KEEP = 1 << 20

#: Reaps a request stays among the young (checked on every reap) before it is old.
_YOUNG_REAPS = 4
#: Old requests checked per reap, in turn: a request that waits long (a send to a peer
#: that does not receive) costs a drive a bounded slice, not a scan of everything.
_OLD_PER_REAP = 64


#: Why a forked child cannot use its parent's engine.
FORKED_MESSAGE: Final = (
    "ucxrpc was started in the parent of this forked process, whose UCX state cannot be "
    "shared: start processes with multiprocessing's 'spawn' or 'forkserver' method (or "
    "fork before starting any ucxrpc Manager)"
)


_sched_yield: Callable[[], None] = getattr(os, "sched_yield", lambda: None)


#: Frames a drive takes from one frame ring per pass (see :class:`Engine`).
RING_SLICE = 8
#: Seconds a drive spends handing arrived frames over before it yields (see :class:`Engine`).
DRIVE_TIME = 100e-6
#: Frames a drive takes from UCX even when the rings spent its time (so both progress).
PROBES_ALWAYS = 16
#: A yield that kept the core away this long (seconds) means the cores are contended.
CONTENDED_YIELD = 200e-6
#: Two such yields this close (seconds) mean the cores are contended.
CONTENDED_WINDOW = 0.01
#: Seconds an engine that found the cores contended sleeps when idle instead of spinning.
CONTENDED_FOR = 0.05
#: Seconds a short scheduler slice is kept after replies were last awaited (so calls
#: a little apart do not make a system call each).
SLICE_HOLD: Final = 1.0
#: Replies awaited at most, for the short slice (and never more for ``SLICE_HOLD``):
#: a caller with more in flight is bound by throughput, not by the next wake-up, and
#: its wake-ups would keep displacing the process that answers it (twenty clients of
#: four calls each on two cores lost 14% of their calls/s so).
SLICE_AWAITING: Final = 2
#: Seconds after its last yield at which a serving engine lets a process waiting for its
#: core run (``sched_yield``; see :meth:`Engine.share`).
SHARE_EVERY = 250e-6

_clock = time.perf_counter  # (what :meth:`Engine.share` reads: a test may replace it)


class Engine:
    """Progress engine for one worker. Created and owned by a Manager.

    Args:
        worker: The low-level ucxx worker.
        loop: The event loop that drives it.
        mode: ``"blocking"``, ``"polling"`` or ``"efficient"``.
        spin: Seconds of quiet before sleeping (blocking mode).
        reply_spin: Seconds of quiet before sleeping while replies are awaited
            (:attr:`awaiting`; blocking mode). Longer than ``spin``: a reply is known
            to be on its way, and waking from the fd costs more than a round trip.
        router: Receives arrived frames and parts.
        junk_limit: The longest message :meth:`discard` consumes; a longer one is
            left unreceived (its sender is misbehaving and gets disconnected).
        max_probes: Arrivals handled per drive before yielding to the loop.
        ring_slice: Frames taken from each frame ring per pass over the rings.
        drive_time: Seconds a drive hands arrived frames over before it yields
            (another pass over the rings, more probes), at least one pass over the
            rings and ``PROBES_ALWAYS`` UCX frames. Short: the calls a drive
            delivers start after it, so a long drive keeps every other connection's
            next call waiting while a peer floods.
        sched_slice: Seconds of scheduler slice the loop's thread asks for while
            one or two replies are awaited (0: never ask).
    """

    def __init__(
        self,
        worker: Any,
        loop: asyncio.AbstractEventLoop,
        *,
        mode: str,
        spin: float,
        router: Router,
        reply_spin: float | None = None,
        junk_limit: int,
        max_probes: int = 256,
        ring_slice: int = RING_SLICE,
        drive_time: float = DRIVE_TIME,
        sched_slice: float = 0.0,
    ) -> None:
        self._worker = worker
        self._loop = loop
        self._poll_forever = mode == "polling"
        self._spin = 0.0 if mode == "efficient" else spin
        self._reply_spin = self._spin if reply_spin is None or mode == "efficient" else reply_spin
        #: Replies awaited (calls sent and not answered): while there are any the engine
        #: keeps polling for ``reply_spin`` after the last event instead of ``spin``.
        self.awaiting = 0
        self._router = router
        self._junk_limit = junk_limit
        self._junk = bytearray(0)
        self._max_probes = max_probes
        self._ops: list[Op] = []
        self._old: deque[Op] = deque()
        self._sweep = 0
        self._scheduled = False
        self._closed = False
        #: Set in a forked child (:meth:`forget`): the engine is its parent's.
        self.forked = False
        self._last_event = 0.0
        self._failures: set[str] = set()
        self._stranded: list[Any] = []
        self._fd: int = worker.epoll_file_descriptor
        #: Receives posted and not yet completed (parts and large frames in transfer).
        self.posted_receives = 0
        #: Drives run (a measure of how busy the engine was).
        self.drives = 0
        #: Messages consumed and thrown away (strangers' parts, refused parts).
        self.discarded = 0
        #: Times the engine went to sleep on the worker's fd.
        self.sleeps = 0
        #: Request completions checked (what reaping cost, summed over drives).
        self.checked = 0
        self._rings: list[RingSource] = []
        self._ring_slice = ring_slice
        self._after: list[Callable[[], None]] = []
        self._contended_until = 0.0  # until then, sleep as soon as a drive finds nothing
        self._slow_yield = -1.0  # when a yield last kept the core away
        self._drive_time = drive_time
        self._first_ring = 0  # the rings take turns at being polled first
        self._wake_fd: int | None = None
        self._nap: asyncio.TimerHandle | None = None
        self._nap_for = _NAP
        self._dozing = False  # slept with the rings' sleep flags set
        #: Whether this engine shares its core while it works (set once its manager
        #: serves: see :meth:`share`).
        self.share_core = False
        self._slice = SliceHint(round(sched_slice * 1e9))
        self._awaited = 0.0  # when a reply or two were last awaited (at a drive)
        self._crowded = -math.inf  # when more than SLICE_AWAITING were
        self._slice_timer: asyncio.TimerHandle | None = None
        self._yielded = 0.0  # when this engine last gave its core up (a yield)
        loop.add_reader(self._fd, self.kick)
        self.kick()

    # -- scheduling -----------------------------------------------------------------------

    def wake_fd(self) -> int:
        """This engine's wake-up eventfd (made on first use): the writers of the rings
        it reads write to it when it sleeps, and the loop watches it. One per engine,
        so no two engines (or loops) of a process take each other's wake-ups.

        Raises:
            OSError: The engine is closed, or no eventfd could be made.
        """
        if self._closed:
            raise OSError(errno.ESHUTDOWN, "the engine is closed")
        if self._wake_fd is None:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._loop.add_reader(self._wake_fd, self._rung)
        return self._wake_fd

    def add_ring(self, source: RingSource) -> None:
        """Poll ``source`` (a frame ring this side reads) on every drive."""
        if not self._closed:
            self._rings.append(source)
            self.kick()

    def remove_ring(self, source: RingSource) -> None:
        """Stop polling ``source``."""
        try:
            self._rings.remove(source)
        except ValueError:
            pass

    def _rung(self) -> None:
        assert self._wake_fd is not None
        try:
            os.eventfd_read(self._wake_fd)
        except OSError:
            pass  # already read: the wake-up below is what matters
        self.kick()

    def _napped(self) -> None:
        self._nap = None
        self.kick()

    def _awake(self) -> None:
        self._nap_for = _NAP
        if self._nap is not None:
            self._nap.cancel()
            self._nap = None

    def _slice_idle(self) -> None:
        # The thread may do other work now: give the short slice back once no reply
        # has been awaited for SLICE_HOLD (a short gap between calls keeps it). A reply
        # still awaited counts as awaited now: the engine may be asleep, not driving.
        self._slice_timer = None
        if self._closed or not self._slice.short:
            return
        now = time.perf_counter()
        if 0 < self.awaiting <= SLICE_AWAITING:
            self._awaited = now
        left = self._awaited + SLICE_HOLD - now
        if left > 0:
            # (uvloop runs a timer under 0.5 ms at once, and libuv's may fire a little
            # early: at least 1 ms, or this would spin through the last of the hold.)
            self._slice_timer = self._loop.call_later(max(left, 1e-3), self._slice_idle)
        else:
            self._slice.want(False)

    def after_drive(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once, at the end of the next drive: after the arrivals that
        drive hands over, so what it starts queues behind what they started. The
        engine keeps driving (it does not sleep) while such callbacks wait. A closed
        engine never runs it."""
        if not self._closed:
            self._after.append(callback)
            self.kick()

    def share(self) -> None:
        """Let a process waiting for this core run (``sched_yield``), if this engine
        shares its core and has not yielded for ``SHARE_EVERY`` (a sleep does not
        count: the first drive after one yields): called on every drive and send.

        A busy server keeps its core for a whole scheduler slice, and a client woken
        on that core (its reply is ready) waits, runnable, until the kernel's next tick
        (4 ms at 250 Hz) unless the server gives the core up. A yield with nobody
        waiting returns at once.
        """
        if self.share_core and _clock() - self._yielded > SHARE_EVERY:
            _sched_yield()
            self._yielded = _clock()

    def kick(self) -> None:
        """Make sure a drive is queued (called on fd readiness and after posting work)."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._drive)

    def _drive(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        self.share()
        self.drives += 1
        active = True
        try:
            active = self._step()
        except Exception as exc:  # never let one bad drive stop progress for good
            self._failed("drive", exc)
        if self._after:
            self._run_after()
            active = True
        now = time.perf_counter()
        awaiting = self.awaiting
        if awaiting and self._slice.slice_ns:
            if awaiting > SLICE_AWAITING:
                self._crowded = now
                if self._slice.short:
                    self._slice.want(False)
            elif now - self._crowded >= SLICE_HOLD:
                # A caller waiting on a reply or two is bound by their latency: its
                # wake-up (or the core back after a yield) should come at once.
                self._awaited = now
                if not self._slice.short:
                    self._slice.want(True)
                    if self._slice_timer is None:
                        self._slice_timer = self._loop.call_later(SLICE_HOLD, self._slice_idle)
        if active:
            self._last_event = now
            if self._nap is not None or self._nap_for != _NAP:
                self._awake()
        elif not self._poll_forever and (
            now < self._contended_until
            or now - self._last_event
            >= (
                # While a peer copies a large part out of this process the reply is a
                # copy away, and a long spin would take the core that copy runs on.
                self._reply_spin
                if self.awaiting > 0 and not shared.Exports.process_lending
                else self._spin
            )
        ):
            rings = self._rings
            try:
                if all([ring.doze() for ring in rings]) and self._worker.arm():
                    self.sleeps += 1
                    self._dozing = bool(rings)
                    if rings and self._nap is None:
                        # Belt and braces (writers fence, then wake us): look at the
                        # rings now and then while asleep, less often the longer the
                        # sleep, so an idle engine stays idle.
                        self._nap = self._loop.call_later(self._nap_for, self._napped)
                        self._nap_for = min(_NAP_MAX, self._nap_for * 2)
                    return  # asleep: the fd wakes us
            except Exception as exc:
                self._failed("arm", exc)
            for ring in rings:
                ring.rouse()
        if not active:
            # Polling with nothing found: give the core to whatever else is runnable
            # (the peer, or other processes waiting for theirs). Free on an idle core;
            # with more processes than cores, spinners otherwise starve the server.
            _sched_yield()
            self._yielded = back = _clock()
            if back - now > CONTENDED_YIELD:
                # The core went to another process for a while, twice in a short
                # time: there are more runnable processes than cores. Spinning then
                # costs a whole time slice of theirs each time it yields, while a
                # sleeper is woken (and run first) as soon as its message lands:
                # sleep when idle. (One slow yield alone happens now and then on an
                # idle machine too; sleeping then would only add wake-ups.)
                if now - self._slow_yield < CONTENDED_WINDOW:
                    self._contended_until = now + CONTENDED_FOR
                self._slow_yield = now
        if not self._scheduled:  # (a callback run after this drive may have kicked)
            self._scheduled = True
            self._loop.call_soon(self._drive)

    def _run_after(self) -> None:
        after, self._after = self._after, []
        for callback in after:
            try:
                callback()
            except Exception as exc:
                self._failed("after drive", exc)

    def _step(self) -> bool:
        worker = self._worker
        made = False
        while worker.progress_once():
            made = True
        if made:
            # Anything in flight may have completed: check the young now and sweep
            # the old over the next drives, a slice per drive.
            self._sweep = len(self._old)
        if (made and self._ops) or self._sweep:
            self._reap()
        budget = self._max_probes
        found = 0
        # Arrivals are handed over until the drive has spent its time: the tasks they
        # start run after it, and a long drive would keep every other connection's
        # next call waiting (each source still gets a share on every drive).
        until = time.perf_counter() + self._drive_time
        if self._rings:
            rings = self._rings
            first = self._first_ring % len(rings)
            self._first_ring = first + 1
            rings = rings[first:] + rings[:first]  # a copy: a frame may close its ring
            if self._dozing:  # woken (by a writer or by UCX): writers need not ring
                self._dozing = False
                for ring in rings:
                    ring.rouse()
            limit = self._ring_slice
            while rings:
                more = []
                for ring in rings:
                    try:
                        got = ring.poll(limit)
                    except Exception as exc:  # one connection's bug must not stop the others
                        self._failed("ring", exc)
                        continue
                    found += got
                    if got == limit:
                        more.append(ring)
                if time.perf_counter() >= until:
                    break
                rings = more
        found += self._probe_frames(budget, until)
        # Parts get a share even when frames took the budget: a large message's
        # parts must not wait for a flood of small frames to end.
        found += self._probe_parts(max(budget - found, PROBES_ALWAYS))
        # Work left over (the budget ran out, a sweep unfinished) keeps the drive active.
        return made or found > 0 or self._sweep > 0

    def _failed(self, where: str, exc: BaseException) -> None:
        kind = f"{where}:{type(exc).__name__}"
        if kind not in self._failures:
            self._failures.add(kind)
            log.error(
                "ucxrpc: the progress engine recovered from an error in %s", where, exc_info=exc
            )

    # -- requests -------------------------------------------------------------------------

    def _reap(self) -> None:
        # Young requests (posted in the last few reaps) are all checked; old ones a
        # bounded slice at a time, so a drive's cost follows what was posted and what
        # completed, not how much has been waiting.
        young = self._ops
        keep: list[Op] = []
        finished: list[Op] = []
        old = self._old
        for op in young:
            if op.req.completed:
                finished.append(op)
            else:
                op.age += 1
                (old.append if op.age >= _YOUNG_REAPS else keep.append)(op)
        turn = min(len(old), self._sweep, _OLD_PER_REAP)
        self._sweep -= turn
        for _ in range(turn):
            op = old.popleft()
            (finished if op.req.completed else old).append(op)
        self.checked += len(young) + turn
        self._ops = keep
        for op in finished:
            exc = _outcome(op.req)
            op.req = None
            cb, op.cb = op.cb, None
            if cb is not None:
                self._run(cb, exc)

    def _run(self, cb: Callback, exc: BaseException | None) -> None:
        try:
            cb(exc)
        except Exception as err:
            self._failed("callback", err)

    def _track(self, req: Any, cb: Callback | None, buf: Any, receive: bool) -> Op | None:
        if req.completed:
            if cb is not None:
                self._run(cb, _outcome(req))
            return None
        if receive:
            self.posted_receives += 1
            inner = cb

            def cb(exc: BaseException | None) -> None:
                self.posted_receives -= 1
                if inner is not None:
                    inner(exc)

        op = Op(req, cb, buf)
        self._ops.append(op)
        self.kick()
        return op

    def send(self, ep: Any, buf: Any, tag: int, cb: Callback | None = None) -> None:
        """Send ``buf`` (a contiguous buffer) on ``tag``; ``cb`` runs when it has left.

        Raises:
            RpcError: The send failed at once (converted from ucxx).
            Unavailable: This process is a forked child of the engine's.
        """
        if self.forked:
            raise Unavailable(FORKED_MESSAGE)
        try:
            req = ep.tag_send(Array(buf), _Tag(tag))
        except Exception as err:
            raise convert_ucx_error(err) from None
        self._track(req, cb, buf, False)

    def receive(self, handle: Any, buf: Any, cb: Callback) -> None:
        """Receive a probed message (``handle`` from :meth:`Router.on_part`) into ``buf``,
        which must be exactly as long as the probe reported."""
        if self.forked:
            self._run(cb, Unavailable(FORKED_MESSAGE))
            return
        try:
            req = self._worker.tag_recv_with_handle(Array(buf), handle)
        except Exception as err:
            self._run(cb, convert_ucx_error(err))
            return
        self._track(req, cb, buf, True)

    def discard(self, handle: Any, length: int) -> None:
        """Consume a probed message and throw it away.

        Every discarded message is received into one shared scratch buffer: its bytes
        are never read, so concurrent receives into it are harmless. A scratch buffer
        grown past :data:`_JUNK_KEEP` for a large message is let go once that message
        is in (a stranger's one large part must not keep the server that much larger
        for good). A message longer than ``junk_limit`` is left unreceived (kept
        referenced, never freed, since UCX owns its descriptor).
        """
        if self.forked:
            return
        self.discarded += 1
        if length > self._junk_limit:
            self._stranded.append(handle)
            log.warning("ucxrpc: left a %d-byte message unreceived (over the limit)", length)
            return
        if len(self._junk) < length:
            self._junk = bytearray(length)
        try:
            req = self._worker.tag_recv_with_handle(Array(self._junk), handle)
        except Exception as err:
            self._failed("discard", err)
            return
        # Each request keeps its buffer referenced until it completes, so a receive
        # still filling a large buffer keeps it even once the engine has let it go.
        self._track(req, None if length <= _JUNK_KEEP else self._shrink_junk, self._junk, True)

    def _shrink_junk(self, _exc: BaseException | None) -> None:
        if len(self._junk) > _JUNK_KEEP:
            self._junk = bytearray(0)

    # -- arrivals -------------------------------------------------------------------------

    def _probe_frames(self, budget: int, until: float) -> int:
        worker = self._worker
        router = self._router
        found = 0
        ready: dict[int, list[tuple[int, bytearray]]] | None = None  # made when needed
        clock = time.perf_counter
        while found < budget and (found < PROBES_ALWAYS or clock() < until):
            probe = worker.tag_probe(_FRAME_TAG, _FRAME_MASK, True)
            if not probe.matched:
                break
            found += 1
            tag: int = probe.sender_tag.value
            size: int = probe.length
            if size > codec.MAX_FRAME:
                self.discard(probe, size)
                try:
                    router.on_oversized(tag, size)
                except Exception as err:
                    self._failed("oversized frame", err)
                continue
            buf = bytearray(size)
            try:
                req = worker.tag_recv_with_handle(Array(buf), probe)
            except Exception as err:
                self._failed("frame receive", err)
                self.discard(probe, size)  # consume it all the same
                continue
            if req.completed:  # the common case: a small frame that arrived whole
                exc = _outcome(req)
                if exc is None:
                    if ready is None:
                        ready = {}
                    ready.setdefault(tag >> 40, []).append((tag, buf))
                else:
                    log.debug("ucxrpc: a frame failed to arrive: %s", exc)
                continue
            self._track(req, self._frame_done(tag, buf), buf, True)
        if ready:
            self._dispatch(ready)
        return found

    def _dispatch(self, ready: dict[int, list[tuple[int, bytearray]]]) -> None:
        """Hand the frames one drive found to the router, taking connections in turn
        (each in its own arrival order): a peer that floods gets one frame handled per
        turn like any other, not the whole drive before them."""
        router = self._router
        queues = list(ready.values())
        if len(queues) == 1:
            turns: Any = queues[0]
        else:
            turns = (q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q))
        for tag, buf in turns:
            try:
                router.on_frame(tag, buf)
            except Exception as err:
                self._failed("frame", err)

    def _frame_done(self, tag: int, buf: bytearray) -> Callback:
        router = self._router

        def done(exc: BaseException | None) -> None:
            if exc is None:
                router.on_frame(tag, buf)
            else:
                log.debug("ucxrpc: a frame failed to arrive: %s", exc)

        return done

    def _probe_parts(self, budget: int) -> int:
        worker = self._worker
        router = self._router
        found = 0
        while found < budget:
            probe = worker.tag_probe(_PART_TAG, _PART_MASK, True)
            if not probe.matched:
                break
            found += 1
            try:
                router.on_part(probe.sender_tag.value, probe.length, probe)
            except Exception as err:
                self._failed("part", err)
                self.discard(probe, probe.length)  # a no-op if it was consumed already
        return found

    # -- shutdown -------------------------------------------------------------------------

    def fds(self) -> list[int]:
        """The fds the event loop watches for this engine (the worker's epoll fd and
        the wake-up eventfd, if made)."""
        return [self._fd] + ([] if self._wake_fd is None else [self._wake_fd])

    def forget(self) -> None:
        """Stop for good without a UCX call or a change to the event loop: in a forked
        child the worker, its requests, and the loop's epoll set are the parent's."""
        self._closed = True
        self.forked = True

    def close(self) -> list[Any]:
        """Stop driving. Returns what must stay referenced until the worker is gone
        (requests in flight with their buffers, messages left unreceived)."""
        if self.forked:
            return []
        self._closed = True
        self._slice.want(False)
        if self._slice_timer is not None:
            self._slice_timer.cancel()
            self._slice_timer = None
        self._loop.remove_reader(self._fd)
        if self._wake_fd is not None:
            self._loop.remove_reader(self._wake_fd)
            os.close(self._wake_fd)
            self._wake_fd = None
        if self._nap is not None:
            self._nap.cancel()
            self._nap = None
        self._rings = []
        self._after = []  # their owners (servers) must not be kept alive by the engine
        ops = [*self._ops, *self._old]
        self._ops = []
        self._old.clear()
        self._sweep = 0
        for op in ops:
            op.cb = None
        self.posted_receives = 0
        # Whoever still holds the engine (a link of a client kept after shutdown) must
        # not keep the worker alive: its owner destroys it next (see Runtime.shutdown).
        self._worker = None
        return [*ops, *self._stranded, self._junk]

    def progress(self) -> int:
        """Run one progress pass now, a drive like the loop's (what waits for the end of
        a drive runs after it: a connection's next slice of a batch, the server's next
        start turn); returns the number of completions and arrivals."""
        if self._closed:
            return 0
        self.drives += 1
        before = self.in_flight
        active = self._step()
        if self._after:
            self._run_after()
        return max(0, before - self.in_flight) + int(active)

    @property
    def in_flight(self) -> int:
        """UCX requests in flight (sends not yet left, receives not yet filled)."""
        return len(self._ops) + len(self._old)

    def add(self, req: Any, cb: Callback | None) -> None:
        """Track a request made elsewhere (an endpoint close) until it completes."""
        self._track(req, cb, None, False)
