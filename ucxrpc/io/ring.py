"""Frame rings: small frames between two processes on one host, through shared memory.

The safe default gives UCX no shared memory (it cannot survive a dying peer there), so
every frame between two processes on one host is a TCP ``send`` and a probed receive:
most of a small call's round trip. A connection whose peer proved in the handshake
that each may read the other's memory (:class:`~ucxrpc.io.shared.Peer`) therefore
carries its frames through a ring of its own instead, one per direction:

* the **receiving** side makes the ring: a sealed memory file (it cannot shrink or
  grow, so a mapping never faults) of :data:`HEADER` bytes and a power-of-two data
  area, and tells the peer its fd, the fd of its engine's wake-up ``eventfd`` and a
  random nonce it also wrote into the ring (a ``RING`` frame);
* the **sending** side takes both fds out of the receiver's process
  (``pidfd_getfd``, allowed exactly when reading its memory is), checks they are
  what they should be (a sealed ``memfd:ucxrpc-ring`` of the announced size, an
  non-blocking ``eventfd``, the nonce in the ring), maps the ring and from then on
  writes each frame that fits as one
  record, publishing it by advancing ``head``; when the receiver said it sleeps, it
  also writes to the receiver's eventfd.

Nothing the other side writes is trusted. The reader keeps its own read position and
checks every ``head``, length and record against the ring's bounds, copies a record
out before it looks at it, and hands it to the connection's protocol machine, which
checks it as it checks a frame from UCX; the writer checks ``tail``. Anything out of
bounds breaks that connection only (each ring belongs to one connection: a peer that
dies halfway through a record leaves a record never published, on a ring nobody else
uses). A frame that does not fit (too large, or the ring full) goes over UCX as
before: frames carry their sequence number, so the two paths may interleave.

Layout (native byte order; x86-64 only, whose stores are seen in order, so a record
written before ``head`` is complete when ``head`` says so). The three header words are
read and written as whole aligned words (ctypes), never with ``struct``, which clears
the bytes before it writes them: a reader could see 0 in between::

    offset  size  field
    0       8     head: bytes published (the writer's)
    8       8     tail: bytes consumed (the reader's)
    16      4     the reader sleeps (1) or polls (0)
    24      8     the ring's nonce (random; the RING frame names it too)
    64      N     records: length (4), 0 (4), tag (8), frame, padding to 8;
                  length 0xFFFFFFFF: skip to the start of the data area
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import stat
import struct
import sys
from collections.abc import Callable
from typing import Any, Final

from ..errors import ProtocolError

__all__ = [
    "CAPACITY",
    "HEADER",
    "MAX_RECORD",
    "Reader",
    "Writer",
    "available",
    "capacity_for",
]

#: Bytes before the data area.
HEADER: Final = 64
#: Bytes of a ring's data area, at most (see :func:`capacity_for`).
CAPACITY: Final = 64 * 1024
#: The smallest record (header and the smallest frame, padded).
MIN_RECORD: Final = 48
#: The largest frame a ring carries (larger ones go over UCX).
MAX_RECORD: Final = 16 * 1024

_NAME: Final = "ucxrpc-ring"
_LINK: Final = f"/memfd:{_NAME}"
_RECORD = struct.Struct("=IIQ")
_WRAP: Final = 0xFFFFFFFF
_HEAD, _TAIL, _SLEEP, _NONCE = 0, 8, 16, 24
_SEALS: Final = (
    getattr(fcntl, "F_SEAL_SHRINK", 0)
    | getattr(fcntl, "F_SEAL_GROW", 0)
    | getattr(fcntl, "F_SEAL_SEAL", 0)
)
_NEEDED: Final = getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0)
_SYS_PIDFD_GETFD: Final = 438  # x86-64
_libc = ctypes.CDLL(None, use_errno=True)

# A full memory fence. Between "I published" and "do they sleep?" (the writer) and
# "I sleep" and "anything published?" (the reader), x86 may let each load pass the
# store before it, and both sides would miss each other: a frame left waiting on a
# sleeping reader. A locked instruction orders them; glibc's spin lock is one.
_fence_lock = ctypes.c_int(0)
_fence_ref = ctypes.byref(_fence_lock)
_spin_lock = getattr(_libc, "pthread_spin_trylock", None)
_spin_unlock = getattr(_libc, "pthread_spin_unlock", None)
if (
    _spin_lock is None
    or _spin_unlock is None
    or _libc.pthread_spin_init(ctypes.byref(_fence_lock), 0)
):
    _spin_lock = _spin_unlock = None  # no rings without a fence


def _fence() -> None:
    # trylock is one locked exchange (the fence), and never spins: if another thread
    # holds the lock, the exchange happened all the same.
    if _spin_lock is not None and _spin_unlock is not None and not _spin_lock(_fence_ref):
        _spin_unlock(_fence_ref)


def available() -> bool:
    """Whether frame rings can work here: Linux on x86-64 (see the module's layout
    note), with memfd seals, eventfds and ``pidfd_getfd``."""
    return (
        sys.platform.startswith("linux")
        and platform.machine() in ("x86_64", "AMD64")
        and hasattr(os, "memfd_create")
        and hasattr(os, "eventfd")
        and hasattr(os, "pidfd_open")
        and bool(_NEEDED)
        and _spin_lock is not None
        and sys.maxsize > 2**32  # 64-bit: the header's words are read whole
    )


def capacity_for(window: int) -> int:
    """The largest ring (a power of two, at most :data:`CAPACITY`) whose frames can
    never all be ahead of the receiver's window: a frame that finds the ring full
    goes over UCX, numbered after everything in the ring, and must still fall within
    ``window`` frames of the next one expected. 0 if no ring is that small."""
    capacity = CAPACITY
    while capacity > 4 * MAX_RECORD and capacity // MIN_RECORD > window // 2:
        capacity //= 2
    return capacity if capacity // MIN_RECORD <= window // 2 else 0


def _words(m: mmap.mmap) -> tuple[ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32]:
    """The header's head, tail and sleep words, each read and written whole."""
    return (
        ctypes.c_uint64.from_buffer(m, _HEAD),
        ctypes.c_uint64.from_buffer(m, _TAIL),
        ctypes.c_uint32.from_buffer(m, _SLEEP),
    )


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ProtocolError(f"frame ring broken: {what}")


class Reader:
    """The receiving end of one connection's ring (this side made it).

    Args:
        deliver: Called with each frame's tag and bytes, in the ring's order.
        broken: Called once if the peer broke the ring (then nothing is read).
        capacity: Bytes of the data area (a power of two).

    Raises:
        OSError: The ring could not be made, or :attr:`limit` rings are open.
    """

    #: Rings read in this process, and the most it reads (each costs an fd and
    #: ``CAPACITY`` bytes of memory; connections beyond use UCX for their frames).
    live = 0
    limit = 16

    def __init__(
        self,
        deliver: Callable[[int, bytearray], None],
        broken: Callable[[ProtocolError], None],
        capacity: int = CAPACITY,
    ) -> None:
        assert capacity & (capacity - 1) == 0
        if Reader.live >= Reader.limit:
            raise OSError(errno.EMFILE, f"{Reader.live} frame rings are open")
        self.capacity = capacity
        self._deliver = deliver
        self._broken = broken
        fd = os.memfd_create(_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, HEADER + capacity)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self._map = mmap.mmap(fd, HEADER + capacity)
        except BaseException:
            os.close(fd)
            raise
        #: The ring's fd, for the peer to take (closed with the reader).
        self.fd: int | None = fd
        self._view = memoryview(self._map)
        self._head, self._tail, self._sleep = _words(self._map)
        #: The ring's nonce (in the ring and in the RING frame).
        self.nonce = int.from_bytes(os.urandom(8), "big") | 1
        struct.pack_into("=Q", self._map, _NONCE, self.nonce)  # before anyone maps it
        Reader.live += 1
        self._pos = 0
        self.dead = False
        #: Frames read.
        self.frames = 0

    def poll(self, limit: int = 64) -> int:
        """Deliver up to ``limit`` published frames; returns how many."""
        if self.dead:
            return 0
        m = self._map
        pos = self._pos
        try:
            head = self._head.value
            if head == pos:
                return 0
            _check(pos < head <= pos + self.capacity, f"head {head} at read position {pos}")
            cap, mask = self.capacity, self.capacity - 1
            got = 0
            while pos < head and got < limit:
                off = pos & mask
                if cap - off < _RECORD.size:
                    pos += cap - off  # too little room left for a record: the writer skipped it
                    _check(pos <= head, "a skip past head")
                    continue
                length, _, tag = _RECORD.unpack_from(m, HEADER + off)
                if length == _WRAP:
                    pos += cap - off
                    _check(pos <= head, "a skip past head")
                    continue
                size = (_RECORD.size + length + 7) & ~7
                _check(length <= MAX_RECORD and size <= cap - off, f"a {length}-byte record")
                _check(pos + size <= head, "a record past head")
                start = HEADER + off + _RECORD.size
                frame = bytearray(self._view[start : start + length])  # copied out first
                pos += size
                got += 1
                try:
                    self._deliver(tag, frame)
                except ProtocolError as exc:
                    # The connection's own error, not the ring's: let the engine log it.
                    raise RuntimeError(f"delivering a frame failed: {exc}") from exc
                if self.dead:
                    break  # closed by what the frame did
        except ProtocolError as exc:
            self._fail(exc)
            return 0
        finally:
            if not self.dead:
                self._pos = pos
                self._tail.value = pos
        self.frames += got
        return got

    def doze(self) -> bool:
        """Say this side sleeps; True if nothing is waiting (it may sleep), else the
        flag is cleared again."""
        if self.dead:
            return True
        self._sleep.value = 1
        _fence()
        if self._head.value != self._pos:
            self._sleep.value = 0
            return False
        return True

    def rouse(self) -> None:
        """Say this side polls again (writers need not wake it)."""
        if not self.dead:
            self._sleep.value = 0

    def _fail(self, exc: ProtocolError) -> None:
        self.dead = True
        self._broken(exc)

    def close(self) -> None:
        """Unmap the ring and close its fd."""
        self.dead = True
        fd, self.fd = self.fd, None
        if fd is None:
            return  # closed already
        os.close(fd)
        Reader.live -= 1
        del self._head, self._tail, self._sleep  # their exports hold the mapping
        self._view.release()
        self._map.close()


def _take_fd(pidfd: int, fd: int) -> int:
    own = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    if own < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(own)


class Writer:
    """The sending end of the peer's ring for one connection.

    Use :meth:`attach`.
    """

    def __init__(self, ring: mmap.mmap, capacity: int, wake: int) -> None:
        self.capacity = capacity
        self._map = ring
        self._view = memoryview(ring)
        self._head, self._tail, self._sleep = _words(ring)
        self._wake = wake
        self._pos = 0
        self.dead = False
        #: Frames written, and wake-ups sent.
        self.frames = 0
        self.wakes = 0

    @classmethod
    def attach(cls, pidfd: int, ring_fd: int, wake_fd: int, capacity: int, nonce: int) -> Writer:
        """Take the peer's ring and wake-up fds (its fd numbers) out of the process
        ``pidfd`` names, check them and map the ring.

        Raises:
            ProtocolError: The fds are not a ucxrpc ring of that size holding
                ``nonce`` and a non-blocking eventfd.
            OSError: They cannot be taken (the peer is gone, or it is not allowed).
        """
        if not (0 < capacity <= 1 << 26 and capacity & (capacity - 1) == 0):
            raise ProtocolError(f"frame ring of {capacity} bytes refused")
        if not (0 <= ring_fd < 1 << 31 and 0 <= wake_fd < 1 << 31):
            raise ProtocolError("frame ring refused: no such fds")
        ring = _take_fd(pidfd, ring_fd)
        try:
            wake = _take_fd(pidfd, wake_fd)
        except BaseException:
            os.close(ring)
            raise
        try:
            info = os.fstat(ring)
            ok = (
                stat.S_ISREG(info.st_mode)
                and info.st_uid == os.geteuid()
                and os.readlink(f"/proc/self/fd/{ring}").startswith(_LINK)
                and info.st_size == HEADER + capacity
                and fcntl.fcntl(ring, fcntl.F_GET_SEALS) & _NEEDED == _NEEDED
            )
            if not ok:
                raise ProtocolError("frame ring refused: not a sealed ucxrpc ring of that size")
            if os.readlink(f"/proc/self/fd/{wake}") != "anon_inode:[eventfd]":
                raise ProtocolError("frame ring refused: its wake-up fd is not an eventfd")
            if os.get_blocking(wake):
                raise ProtocolError("frame ring refused: its eventfd blocks")
            mapped = mmap.mmap(ring, HEADER + capacity)
            if struct.unpack_from("=Q", mapped, _NONCE)[0] != nonce:
                mapped.close()
                raise ProtocolError("frame ring refused: not the ring announced")
        except BaseException:
            os.close(wake)
            raise
        finally:
            os.close(ring)
        return cls(mapped, capacity, wake)

    def put(self, tag: int, frame: Any) -> bool:
        """Write one frame; False if it does not fit now (send it another way).

        Raises:
            ProtocolError: The reader broke the ring (its ``tail`` is impossible).
        """
        if self.dead:
            return False
        length = len(frame)
        if length > MAX_RECORD:
            return False
        m, cap = self._map, self.capacity
        pos = self._pos
        tail = self._tail.value
        if not pos - cap <= tail <= pos:
            self.dead = True
            raise ProtocolError(f"frame ring broken: tail {tail} at write position {pos}")
        off = pos & (cap - 1)
        size = (_RECORD.size + length + 7) & ~7
        skip = cap - off if cap - off < size else 0
        if pos + skip + size - tail > cap:
            return False  # full: the reader is behind
        if skip:
            if skip >= _RECORD.size:
                _RECORD.pack_into(m, HEADER + off, _WRAP, 0, 0)
            pos += skip
            off = 0
        start = HEADER + off
        _RECORD.pack_into(m, start, length, 0, tag)
        self._view[start + _RECORD.size : start + _RECORD.size + length] = frame
        self._pos = pos + size
        self._head.value = self._pos  # publishes the record (stores stay in order)
        self.frames += 1
        _fence()
        if self._sleep.value:
            self._ring_bell()
        return True

    def _ring_bell(self) -> None:
        # The reader shares the eventfd's flags: it could make writes block since
        # attach. Then it is not woken (it looks at its rings now and then anyway).
        if os.get_blocking(self._wake):
            return
        self.wakes += 1
        try:
            os.eventfd_write(self._wake, 1)
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise

    def close(self) -> None:
        """Unmap the ring and close the wake-up fd."""
        if self._wake < 0:
            return  # closed already
        self.dead = True
        del self._head, self._tail, self._sleep
        self._view.release()
        self._map.close()
        os.close(self._wake)
        self._wake = -1
