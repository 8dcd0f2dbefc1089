"""Shared parts on one host: read from the sender's memory, or sealed memory files.

UCX 1.21 cannot combine shared memory with peer error handling, so the safe default
(error handling on) sends large messages over TCP even between processes on one host.
This module gives those transfers a same-host path that a dying peer cannot break,
in two forms:

* **memory reads** (where the kernel lets the receiver read the sender's memory, as it
  lets a debugger: same user, no ptrace restriction): the sender keeps the part's
  buffer and sends its address; the receiver copies it out with ``process_vm_readv``
  (one copy, done by ucxrpc itself, so a sender that is gone is an ``ESRCH`` this
  module turns into ``ConnectionLost``, never UCX's abort on a failed CMA read); a
  pidfd taken in the handshake proves the bytes came from that very process, not one
  that got its pid after it died;
* **memory files** otherwise: the sender writes a part into a Linux memory file
  (``memfd_create``), appends the trailer that binds it to the connection
  (:mod:`ucxrpc.wire.shared`), **seals** it against any further write, shrink or
  growth, and sends a descriptor naming its fd; the receiver opens the file through
  ``/proc/<peer pid>/fd/<fd>`` (the pid proven in the handshake), checks its name,
  size, seals and trailer, and maps it privately: the part is handed out with no
  copy, writable (copy on write).

Nothing can abort either process. The kernel keeps a file alive while anyone maps it,
so a sender that dies after the receiver opened it takes nothing away; a sender that
dies before just makes the open fail (that call fails, and the connection is lost
anyway); sealed files cannot shrink under a mapping (no SIGBUS). The sender keeps its
fd until the receiver says it has mapped the part (a ``RELEASE`` frame), the
connection closes, or ``hold`` seconds pass, whichever comes first. The same holds
for a buffer whose address was sent.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import socket
import stat
import struct
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

import numpy as _np

from ..errors import ConnectionLost, DeadlineExceeded, ProtocolError
from ..wire.shared import TRAILER_SIZE
from . import cmem, copier, regions, ring

__all__ = [
    "Exports",
    "Lent",
    "Peer",
    "Probe",
    "address_of",
    "available",
    "export",
    "make_probe",
    "offers_memory",
    "open_part",
    "owns_connection",
    "read_probe",
]

_NAME: Final = "ucxrpc"
_LINK_PREFIX: Final = f"/memfd:{_NAME}"
_NEEDED: Final = (
    getattr(fcntl, "F_SEAL_WRITE", 0)
    | getattr(fcntl, "F_SEAL_SHRINK", 0)
    | getattr(fcntl, "F_SEAL_GROW", 0)
)
_SEALS: Final = _NEEDED | getattr(fcntl, "F_SEAL_SEAL", 0)
_PROBE: Final = struct.Struct("!IIQ")
_CHUNK: Final = 1 << 30
_libc = ctypes.CDLL(None, use_errno=True)


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_vm_readv = getattr(_libc, "process_vm_readv", None)
if _vm_readv is not None:
    _vm_readv.restype = ctypes.c_ssize_t
    _vm_readv.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_IOVec),
        ctypes.c_ulong,
        ctypes.POINTER(_IOVec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]


def available() -> bool:
    """Whether this system can make and open sealed memory files."""
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "memfd_create")
        and hasattr(fcntl, "F_ADD_SEALS")
        and os.path.isdir(f"/proc/{os.getpid()}/fd")
    )


def export(pieces: Sequence[Any]) -> int:
    """A sealed memory file holding ``pieces`` back to back; returns its fd.

    The caller owns the fd (and closes it once the receiver has mapped the file).

    Raises:
        OSError: The file could not be made (out of memory, no memfd support).
    """
    fd = os.memfd_create(_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        for piece in pieces:
            view = memoryview(piece).cast("B")
            while view.nbytes:
                written = os.write(fd, view[:_CHUNK])
                view = view[written:]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open(pid: int, fd: int, size: int) -> int:
    """Open another process's sealed memory file of exactly ``size`` bytes.

    The peer's fd slot is resolved with ``O_PATH`` first, which opens nothing (no
    device is touched, nothing can block); only a regular file of this user, named
    as ucxrpc names its files, is then opened for reading, through that same
    resolved file, so a peer swapping its fd in between gains nothing.
    """
    path = f"/proc/{pid}/fd/{fd}"
    try:
        if not os.readlink(path).startswith(_LINK_PREFIX):
            raise ProtocolError("shared part refused: not a ucxrpc memory file")
        pinned = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        if not _alive(pid):
            raise ConnectionLost(f"the peer process {pid} is gone") from None
        raise ProtocolError(f"shared part unavailable: {exc.strerror}") from None
    try:
        info = os.fstat(pinned)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise ProtocolError("shared part refused: not a ucxrpc memory file of this user")
        if not os.readlink(f"/proc/self/fd/{pinned}").startswith(_LINK_PREFIX):
            raise ProtocolError("shared part refused: not a ucxrpc memory file")
        own = os.open(f"/proc/self/fd/{pinned}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ProtocolError(f"shared part refused: {exc.strerror}") from None
    finally:
        os.close(pinned)
    try:
        actual = os.fstat(own).st_size
        if actual != size:
            raise ProtocolError(f"shared part refused: {actual} bytes where {size} were announced")
        if fcntl.fcntl(own, fcntl.F_GET_SEALS) & _NEEDED != _NEEDED:
            raise ProtocolError("shared part refused: the file is not sealed")
    except OSError as exc:
        os.close(own)
        raise ProtocolError(f"shared part refused: {exc.strerror}") from None
    except BaseException:
        os.close(own)
        raise
    return own


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie has closed its files: it does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


class _Mappings:
    """Mappings of shared parts alive in this process, bounded: each one is a kernel
    mapping (``vm.max_map_count`` is about 65,000 per process, for everything)."""

    limit = 8192
    live = 0


def _map(fd: int, size: int) -> memoryview:
    """A private, writable (copy on write) mapping of ``fd``, unmapped once the last
    view of it is gone. (``mmap.mmap`` would keep a duplicate of the fd open for as
    long as the mapping lives: an fd per part received.)"""
    if _Mappings.live >= _Mappings.limit:
        raise ProtocolError(
            f"shared part refused: {_Mappings.live} shared parts are mapped in this process"
        )
    try:
        addr = cmem.map_memory(size, fd)
    except OSError as exc:
        raise ProtocolError(f"shared part refused: cannot map it: {exc.strerror}") from None
    region = (ctypes.c_char * size).from_address(addr)
    _Mappings.live += 1
    weakref.finalize(region, _unmap, addr, size).atexit = False  # see regions.region
    return memoryview(region).cast("B")


def _unmap(addr: int, size: int) -> None:
    cmem.unmap(addr, size)
    _Mappings.live -= 1


def open_part(pid: int, fd: int, length: int, check: Callable[[bytes], bool]) -> memoryview:
    """Map a shared part: ``length`` bytes followed by a trailer that ``check`` accepts.

    Returns:
        A writable (copy-on-write), zero-copy view of the part's bytes.

    Raises:
        ConnectionLost: The peer process is gone (its files with it).
        ProtocolError: The file is gone, is not a sealed ucxrpc memory file of this
            user and of the announced size, or its trailer does not bind it to this
            connection.
    """
    own = _open(pid, fd, length + TRAILER_SIZE)
    try:
        if not check(os.pread(own, TRAILER_SIZE, length)):
            raise ProtocolError("shared part refused: its trailer does not match")
        view = _map(own, length + TRAILER_SIZE)
    except OSError as exc:
        raise ProtocolError(f"shared part refused: {exc.strerror}") from None
    finally:
        os.close(own)
    return view[:length]


def address_of(buf: Any) -> int:
    """The address of a contiguous buffer's first byte in this process."""
    return int(_np.frombuffer(buf, dtype=_np.uint8).ctypes.data)


class Probe:
    """This side's handshake probe: ``content`` in a sealed file and in memory, for
    the peer to read (the file proves a shared host and the right to open this
    side's files; the memory, the right to read this side's memory).

    Args:
        content: What the peer expects to find (the nonce or the challenge).
        memory: Whether to offer memory reads too (the field's address is 0 if not).

    Raises:
        OSError: The file could not be made.
    """

    def __init__(self, content: bytes, memory: bool = True) -> None:
        self.content = content  # kept alive while the peer may read it at its address
        self.fd: int | None = export([content])
        address = address_of(content) if memory and _vm_readv is not None else 0
        #: The handshake field naming the probe: this pid, the fd and the address.
        self.field = _PROBE.pack(os.getpid(), self.fd, address)

    def close(self) -> None:
        """Let the probe go (the peer read it, or never will)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def make_probe(content: bytes) -> tuple[int, bytes]:
    """A sealed file holding ``content`` for the peer to read in the handshake (no
    memory offered).

    Returns:
        Its fd and the handshake field naming it (this pid and the fd).
    """
    probe = Probe(content, memory=False)
    assert probe.fd is not None
    return probe.fd, probe.field


def _same_network(pid: int) -> bool:
    """Whether ``pid`` runs in this process's network namespace. Processes in two
    namespaces are treated as two hosts (the way tests and containers separate them),
    so their traffic goes over the network between them."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


_SOCK_DIAG_BY_FAMILY: Final = 20
_NETLINK_SOCK_DIAG: Final = 4
_DIAG_MSG_INODE: Final = 16 + 4 + 48 + 16  # nlmsghdr, then inet_diag_msg up to inode


def _socket_inode(src: str, sport: int, dst: str, dport: int) -> int | None:
    """The inode of the TCP socket bound to ``src:sport`` and connected to
    ``dst:dport``, asked of the kernel (sock_diag netlink: one socket looked up, not a
    table of every socket read)."""
    family = socket.AF_INET6 if ":" in src else socket.AF_INET

    def address(host: str) -> bytes:
        return socket.inet_pton(family, host).ljust(16, b"\0")

    sockid = (
        struct.pack("!HH", sport, dport)
        + address(src)
        + address(dst)
        + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie
    )
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, 1, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.send(header + request)
        reply = nl.recv(65536)
    if len(reply) < _DIAG_MSG_INODE + 4:
        return None
    (kind,) = struct.unpack_from("=H", reply, 4)
    if kind != _SOCK_DIAG_BY_FAMILY:
        return None  # an error message: no such socket
    (inode,) = struct.unpack_from("=I", reply, _DIAG_MSG_INODE)
    return int(inode) or None


def owns_connection(pid: int, peer: tuple[Any, ...], local: tuple[Any, ...]) -> bool:
    """Whether process ``pid`` holds the far end of this side's TCP connection from
    ``local`` to ``peer`` (both as ``getsockname``/``getpeername`` give them).

    This binds a handshake probe to the control connection it came on: a probe that
    names another process than the one at the other end (say, a victim's, relayed by
    the peer) is not trusted.
    """
    try:
        inode = _socket_inode(str(peer[0]), int(peer[1]), str(local[0]), int(local[1]))
    except (OSError, ValueError, IndexError, TypeError, struct.error):
        return False
    if inode is None:
        return False
    target = f"socket:[{inode}]"
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    # Newest first: the control connection was opened moments ago, so its fd is
    # among the highest (a process with many connections has many fds).
    names.sort(key=lambda n: -int(n) if n.isdigit() else 0)
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == target:
                return True
        except OSError:
            continue
    return False


def read_probe(field: bytes, content: bytes) -> int | None:
    """The peer's pid if the probe ``field`` names a sealed file holding ``content``
    that this process can open (the two share a host, a pid and a network namespace
    and the permission to open each other's files), else None."""
    if len(field) != _PROBE.size:
        return None
    pid, fd, _ = _PROBE.unpack(field)
    if pid <= 0 or not _same_network(pid):
        return None
    try:
        own = _open(pid, fd, len(content))
    except (ProtocolError, ConnectionLost):
        return None
    try:
        return pid if os.pread(own, len(content), 0) == content else None
    except OSError:
        return None
    finally:
        os.close(own)


def offers_memory(field: bytes) -> bool:
    """Whether a probe ``field`` offers an address to read (in a welcome: the server
    reads the client's memory)."""
    return len(field) == _PROBE.size and _PROBE.unpack(field)[2] != 0


class Peer:
    """The process at the other end, proven in the handshake, whose memory this side
    reads: its pid and a pidfd that tells whether that very process still runs.

    Args:
        pid: The peer's pid (from :func:`read_probe`).

    Raises:
        OSError: The process is gone.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        #: The kernel refused a read (EPERM): this side cannot read the peer after all.
        self.forbidden = False
        self._closed = False
        self._ticket = ctypes.c_uint64(0)
        self._poll = select.poll()
        self._polling = threading.Lock()
        self._pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                self._pidfd = os.pidfd_open(pid)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise  # the process is gone
            else:
                self._poll.register(self._pidfd, select.POLLIN)

    @classmethod
    def probed(cls, pid: int, field: bytes, content: bytes) -> Peer | None:
        """The peer, if its probe ``field`` (already proven by :func:`read_probe` to be
        process ``pid``'s) offers an address where this side reads ``content``."""
        if len(field) != _PROBE.size or _vm_readv is None:
            return None
        _, _, address = _PROBE.unpack(field)
        if not address:
            return None
        try:
            peer = cls(pid)
        except OSError:
            return None
        try:
            got = bytearray(len(content))
            mine = (ctypes.c_char * len(content)).from_buffer(got)
            peer._copy(address, ctypes.addressof(mine), len(content))
            del mine
            if bytes(got) == content and peer.alive():
                return peer
        except (ProtocolError, ConnectionLost):
            pass
        except BaseException:
            peer.close()
            raise
        peer.close()
        return None

    def read(self, address: int, length: int, ticket: int, value: int) -> memoryview:
        """``length`` bytes at ``address`` of the peer's memory, copied into a new
        buffer, if the 8 bytes at ``ticket`` still hold ``value`` once they are read
        (the peer still lent them: see :class:`Lent`).

        Raises:
            ConnectionLost: The peer process is gone (or this side let it go).
            ProtocolError: Those bytes are not the peer's to read (no such address,
                or the kernel forbids it: :attr:`forbidden` is set then), or the
                peer no longer lends them.
        """
        if self._closed:
            raise ConnectionLost("connection closed")
        buf = regions.region(length)
        local = address_of(buf)
        copier.copy_split(lambda at, n: self._copy(address + at, local + at, n), length, buf)
        self._copy(ticket, ctypes.addressof(self._ticket), 8)
        if not self.alive():
            # The pid may name another process by now: what was read is not the peer's.
            raise ConnectionLost(f"the peer process {self.pid} is gone")
        if self._ticket.value != value:
            raise ProtocolError("shared part withdrawn by the sender before it was read")
        return buf

    def _copy(self, remote: int, local: int, length: int) -> None:
        assert _vm_readv is not None
        done = 0
        while done < length:
            n = min(length - done, _CHUNK)
            mine, theirs = _IOVec(local + done, n), _IOVec(remote + done, n)
            got = _vm_readv(self.pid, ctypes.byref(mine), 1, ctypes.byref(theirs), 1, 0)
            if got <= 0:
                err = ctypes.get_errno() if got < 0 else 0
                if err == errno.ESRCH or not self.alive():
                    raise ConnectionLost(f"the peer process {self.pid} is gone")
                if err == errno.EPERM:
                    self.forbidden = True
                why = os.strerror(err) if err else "nothing there"
                raise ProtocolError(f"shared part refused: cannot read it: {why}")
            done += got

    def attach_ring(self, ring_fd: int, wake_fd: int, capacity: int, nonce: int) -> ring.Writer:
        """The peer's frame ring (its fds ``ring_fd`` and ``wake_fd``), taken out of
        the peer's process through the pidfd (so never another process's fds).

        Raises:
            ConnectionLost: This side let the peer go.
            ProtocolError: The fds are not a ring and an eventfd.
            OSError: They cannot be taken.
        """
        if self._closed or self._pidfd is None:
            raise ConnectionLost("no pidfd of the peer")
        return ring.Writer.attach(self._pidfd, ring_fd, wake_fd, capacity, nonce)

    def alive(self) -> bool:
        """Whether the very process proven in the handshake still runs (False once
        this side let it go: a pid alone proves nothing)."""
        if self._closed:
            return False
        if self._pidfd is None:
            return _alive(self.pid)
        # poll, not select: a pidfd numbered 1,024 or more is fine. The lock: the two
        # halves of a split read may both ask (a poll object polls once at a time).
        with self._polling:
            return not self._poll.poll(0)

    def close(self) -> None:
        """Let go of the pidfd."""
        self._closed = True
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            self._poll.unregister(fd)
            os.close(fd)


class Lent:
    """A buffer whose address was sent to the peer, and its ticket: 8 bytes of this
    process holding a random value while the buffer is lent, cleared before it is let
    go, which the peer reads after the bytes to know they were still the part's.

    Args:
        buf: A contiguous buffer (kept referenced while lent).
    """

    __slots__ = ("_cell", "address", "ticket", "value", "view")

    def __init__(self, buf: Any) -> None:
        self.view: memoryview | None = memoryview(buf)
        self.address = address_of(self.view)
        self.value = int.from_bytes(os.urandom(8), "big") | 1
        self._cell = ctypes.c_uint64(self.value)
        self.ticket = ctypes.addressof(self._cell)

    def withdraw(self) -> None:
        """Clear the ticket, then let the buffer go (a read after this fails)."""
        self._cell.value = 0
        self.view = None


class Exports:
    """The shared parts one connection has sent and the peer may not have taken yet:
    memory files (an fd each) and buffers whose address was sent.

    Every file held is an fd of this process, so their number is bounded too: per
    connection (``max_files``) and over the process (:attr:`process_limit`); buffers
    count against the same bounds.

    Args:
        limit: Bytes held at most; a part that does not fit travels over UCX.
        hold: Seconds a file is kept for a peer that never says it mapped it.
        clock: The current time in seconds.
        max_files: Files held at most.
    """

    #: Files held over every connection of the process, and the most it may hold.
    process_held = 0
    process_limit = 1024
    #: Buffers of :data:`~ucxrpc.io.copier.SPLIT_BYTES` or more lent over every
    #: connection of the process: a peer is copying one, on both cores, while any is.
    process_lending = 0

    def __init__(
        self, limit: int, hold: float, clock: Callable[[], float], max_files: int = 256
    ) -> None:
        self.limit = limit
        self.max_files = max_files
        self.hold = hold
        self._clock = clock
        self._files: dict[int, _Held] = {}
        #: Bytes held.
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._files)

    def room(self, size: int, files: int = 1) -> bool:
        """Whether ``files`` more files of ``size`` bytes in all may be held."""
        return (
            self.bytes + size <= self.limit
            and len(self._files) + files <= self.max_files
            and Exports.process_held + files <= Exports.process_limit
        )

    def add(
        self, key: int, fd: Any, size: int, done: Callable[[BaseException | None], None] | None
    ) -> None:
        """Hold ``fd`` (``size`` bytes) until :meth:`release` of ``key``: a file
        descriptor (an ``int``, closed then) or a buffer (referenced until then).

        ``done`` is told when the part is let go: None once released (or after
        ``hold``: the peer had its chance), ``ConnectionLost`` when the connection
        closes first.
        """
        old = self._files.pop(key, None)
        if old is not None:
            self._close(old, None)
        self._files[key] = _Held(fd, size, self._clock(), done)
        self.bytes += size
        Exports.process_held += 1
        if type(fd) is Lent and size >= copier.SPLIT_BYTES:
            Exports.process_lending += 1

    def release(self, key: int) -> bool:
        """The peer mapped the file of ``key``: close it. False for an unknown key."""
        held = self._files.pop(key, None)
        if held is None:
            return False
        self._close(held, None)
        return True

    def expire(self) -> None:
        """Close the files held longer than ``hold``."""
        limit = self._clock() - self.hold
        gone = [self._files.pop(k) for k, held in list(self._files.items()) if held.since <= limit]
        error = DeadlineExceeded(f"the peer did not take a shared part in {self.hold} s")
        self._close_all(gone, error)

    def close(self) -> None:
        """Close every file held (the connection is gone)."""
        files, self._files = self._files, {}
        self._close_all(list(files.values()), ConnectionLost("connection closed"))

    def _close_all(self, held: list[_Held], error: BaseException) -> None:
        # Every one is closed (and counted) even if a callback raises; the first
        # callback error is raised at the end.
        failed: BaseException | None = None
        for one in held:
            try:
                self._close(one, error)
            except Exception as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def _close(self, held: _Held, error: BaseException | None) -> None:
        self.bytes -= held.size
        Exports.process_held -= 1
        if type(held.fd) is int:
            try:
                os.close(held.fd)
            except OSError:
                pass
        elif type(held.fd) is Lent:
            held.fd.withdraw()
            if held.size >= copier.SPLIT_BYTES:
                Exports.process_lending -= 1
        if held.done is not None:
            held.done(error)


class _Held(NamedTuple):
    fd: Any  # an fd (int) or a buffer
    size: int
    since: float
    done: Callable[[BaseException | None], None] | None
