"""A short scheduler slice for the event loop's thread while it sleeps awaiting replies.

On a busy machine a process woken by a reply (its frame landed, its eventfd rang)
still has to get a core. Linux's scheduler (EEVDF, 6.6 and later) runs a woken thread
at once only if its virtual deadline, roughly its virtual runtime plus its *slice*,
comes before that of the thread it would displace. With the default slice (the
kernel's base slice scaled by the core count: 1.4 ms on a two-core machine) a client
woken by its reply waits behind a flooded server, or behind another client, often until
the next tick.
Since 6.12 a thread may ask for a shorter slice of its own (``sched_setattr`` with
``sched_runtime``, clamped to 0.1 to 100 ms). That changes how soon it runs once
runnable, not its share of the CPU (its weight, from its nice value, is unchanged).

So an engine asks for a short slice (``Config.sched_slice_us``) when it goes to sleep
with replies awaited, and gives it back when it goes to sleep with none: what the
slice affects is the wake-up, and a thread that does other work between calls keeps
the kernel's default for it. The request is one system call, made only when the
choice changes. Threads under a real-time or idle policy are left alone, as is
everything on other systems, kernels without the call or where it is refused: the
hint is then a no-op, never an error.

Pure OS bookkeeping for the calling thread; no UCX, no asyncio.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import sys
import threading
from typing import Final

__all__ = ["MIN_SLICE_NS", "SliceHint", "supported", "thread_slice_ns"]

log = logging.getLogger("ucxrpc")

#: The shortest slice the kernel grants (it clamps shorter requests to this).
MIN_SLICE_NS: Final = 100_000

# sched_setattr / sched_getattr by machine (x86-64; arm64 uses the generic table).
_CALLS: Final = {"x86_64": (314, 315), "aarch64": (274, 275)}
# struct sched_attr up to sched_period: size, policy, flags, nice, priority, runtime,
# deadline, period (the utilisation clamps after it are neither read nor written).
_ATTR: Final = struct.Struct("=IIQiIQQQ")
# SCHED_OTHER and SCHED_BATCH: the fair policies whose slice a thread may choose.
_FAIR: Final = (0, 3)


def _syscalls() -> tuple[int, int] | None:
    if not sys.platform.startswith("linux"):
        return None
    return _CALLS.get(os.uname().machine)


_NR = _syscalls()
_libc: ctypes.CDLL | None = None
_refused = False  # a call failed once: never try again in this process


def supported() -> bool:
    """Whether this system has the calls (Linux on x86-64 or arm64), and they have not
    been refused. A kernel older than 6.12 accepts them but ignores the slice."""
    return _NR is not None and not _refused


def _call(nr: int, *args: object) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.syscall(nr, *args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _get() -> tuple[int, int, int, int]:
    """The calling thread's policy, nice, priority and slice (``sched_runtime``)."""
    assert _NR is not None
    buf = ctypes.create_string_buffer(_ATTR.size)
    _call(_NR[1], 0, buf, ctypes.c_uint(_ATTR.size), ctypes.c_uint(0))
    _, policy, _, nice, priority, runtime, _, _ = _ATTR.unpack(buf.raw)
    return policy, nice, priority, runtime


def thread_slice_ns() -> int | None:
    """The calling thread's scheduler slice in nanoseconds, or None where it cannot be
    read (the kernel reports its default slice unless the thread chose one)."""
    if not supported():
        return None
    try:
        return _get()[3]
    except OSError:
        return None


def _set(slice_ns: int) -> None:
    """Give the calling thread a slice of ``slice_ns`` (0: the kernel's default),
    keeping its policy, nice value and priority."""
    global _refused
    if not supported():
        return
    assert _NR is not None
    try:
        policy, nice, priority, _ = _get()
        if policy not in _FAIR:
            return
        attr = ctypes.create_string_buffer(
            _ATTR.pack(_ATTR.size, policy, 0, nice, priority, slice_ns, 0, 0), _ATTR.size
        )
        _call(_NR[0], 0, attr, ctypes.c_uint(0))
    except OSError as exc:
        _refused = True
        level = logging.DEBUG if exc.errno in (errno.ENOSYS, errno.EPERM) else logging.INFO
        log.log(level, "ucxrpc: scheduler slice hints are off: sched_setattr: %s", exc)


class _Holders(threading.local):
    count = 0  # hints of this thread that want the short slice
    slice_ns = 0  # what the first of them asked for


_holders = _Holders()


class SliceHint:
    """One engine's wish for a short slice on the thread it runs on.

    Several hints on one thread (two managers on one event loop) share it: the thread
    has the short slice while any of them wants it, of the length the first asked for.
    Call :meth:`want` from that thread only.

    Args:
        slice_ns: The slice to ask for (0: never ask; below :data:`MIN_SLICE_NS`, the
            kernel grants that).
    """

    __slots__ = ("_short", "slice_ns")

    def __init__(self, slice_ns: int) -> None:
        self.slice_ns = max(0, slice_ns)
        self._short = False

    @property
    def short(self) -> bool:
        """Whether this hint currently wants the short slice."""
        return self._short

    def want(self, short: bool) -> None:
        """Want the short slice (``True``) or the kernel's default (``False``); a system
        call only when the thread's choice changes."""
        if short == self._short or not self.slice_ns:
            return
        self._short = short
        holders = _holders
        if short:
            holders.count += 1
            if holders.count == 1:
                holders.slice_ns = self.slice_ns
                _set(self.slice_ns)
        elif holders.count > 0:  # (0: wanted on another thread; nothing to give back here)
            holders.count -= 1
            if holders.count == 0:
                _set(0)
