"""A short scheduler slice for the event loop's thread while it waits on a reply or two.

On a busy machine a process woken by a reply (its frame landed, its eventfd rang)
still has to get a core. Linux's scheduler (EEVDF, 6.6 and later) runs a woken thread
at once only if its virtual deadline, roughly its virtual runtime plus its *slice*,
comes before that of the thread it would displace. With the default slice (the
kernel's base slice scaled by the core count: 1.4 ms on a two-core machine with
Linux 6.18) a client woken by its reply waits behind a flooded server, or behind
another client, often until the next tick. Since 6.12 a thread may ask for a shorter
slice of its own (``sched_setattr`` with ``sched_runtime``, clamped to 0.1 to 100 ms).
That changes how soon it runs once runnable, not its share of the CPU (its weight,
from its nice value, is unchanged).

The engine decides when (``Config.sched_slice_us``; see :class:`~.engine.Engine`):
while one or two replies are awaited, and no more were in the last second, it wants
the short slice, and it gives it back once none has been awaited for a second or as
soon as more are. This module only does what it is asked, for the calling thread,
with two system calls (read, then write) per change and none when nothing changes:

* the thread keeps its policy, nice value and priority. While it is short, the
  kernel's reset-on-fork flag is set too, so threads and processes it starts then (an
  executor's worker threads) start with the kernel's default slice instead of
  inheriting the short one; ``os.sched_getscheduler`` then shows the flag. Giving the
  slice back restores the thread's own flag, except that an unprivileged thread may
  not clear it: it keeps it, and a later change of its policy must then keep it too;
* threads under a real-time, deadline or idle policy, or with a negative nice value
  (which that flag would reset in their children), are left alone;
* so is everything on other systems (only Linux 6.12 and later on 64-bit x86 and
  arm: older kernels ignore the slice), and after a refusal (``EPERM`` under a seccomp
  filter, for one) no thread asks again, though one that has the short slice still
  gives it back.

What it gives back is the kernel's default: a slice the thread had chosen itself is
not restored. Pure OS bookkeeping; no UCX, no asyncio.
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
_RESET_ON_FORK: Final = 0x01  # SCHED_FLAG_RESET_ON_FORK


def _syscalls() -> tuple[int, int] | None:
    # A 32-bit process on a 64-bit kernel has other numbers for these calls; a kernel
    # before 6.12 ignores the slice (and the flags would be set for nothing).
    if not sys.platform.startswith("linux") or struct.calcsize("P") != 8:
        return None
    try:
        version = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return None
    if version < (6, 12):
        return None
    return _CALLS.get(os.uname().machine)


_NR = _syscalls()
_libc: ctypes.CDLL | None = None
_refused = False  # a request was refused once: never ask again in this process


def supported() -> bool:
    """Whether a thread may choose its slice here (Linux 6.12 and later on 64-bit x86
    or arm) and no request has been refused."""
    return _NR is not None and not _refused


def _call(nr: int, *args: object) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.syscall(nr, *args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _get() -> tuple[int, ...]:
    """The calling thread's ``struct sched_attr`` (its first eight fields)."""
    assert _NR is not None
    buf = ctypes.create_string_buffer(_ATTR.size)
    _call(_NR[1], 0, buf, ctypes.c_uint(_ATTR.size), ctypes.c_uint(0))
    return _ATTR.unpack(buf.raw)


def thread_slice_ns() -> int | None:
    """The calling thread's scheduler slice in nanoseconds, or None where it cannot be
    read (the kernel reports its default slice unless the thread chose one)."""
    if _NR is None:
        return None
    try:
        return int(_get()[5])
    except OSError:
        return None


def _write(policy: int, flags: int, nice: int, priority: int, slice_ns: int) -> None:
    assert _NR is not None
    attr = ctypes.create_string_buffer(
        _ATTR.pack(_ATTR.size, policy, flags, nice, priority, slice_ns, 0, 0), _ATTR.size
    )
    _call(_NR[0], 0, attr, ctypes.c_uint(0))


def _set(slice_ns: int) -> bool:
    """Give the calling thread a slice of ``slice_ns`` (0: the kernel's default, and
    its own reset-on-fork flag back), keeping its policy, nice value and priority;
    False if it was left alone."""
    global _refused
    if _NR is None or (_refused and slice_ns):
        return False
    holders = _holders
    try:
        _, policy, flags, nice, priority, _, _, _ = _get()
        if policy not in _FAIR or (slice_ns and nice < 0):
            return False
        if slice_ns:
            holders.own_flags = flags & _RESET_ON_FORK
            _write(policy, _RESET_ON_FORK, nice, priority, slice_ns)
            return True
        try:
            _write(policy, holders.own_flags, nice, priority, 0)
        except PermissionError:
            if holders.own_flags:
                raise
            # An unprivileged thread may not clear the flag: it keeps it.
            _write(policy, _RESET_ON_FORK, nice, priority, 0)
    except OSError as exc:
        _refused = True
        level = logging.DEBUG if exc.errno in (errno.ENOSYS, errno.EPERM) else logging.INFO
        log.log(level, "ucxrpc: scheduler slice hints are off: sched_setattr: %s", exc)
        return False
    return True


class _Holders(threading.local):
    count = 0  # hints of this thread that want the short slice
    granted = False  # whether the thread has it (a refusal or a policy may deny it)
    own_flags = 0  # the thread's reset-on-fork flag before it had it


_holders = _Holders()


def _forked() -> None:
    # A forked child has only the thread that forked, and that thread's slice was
    # reset by the fork (reset-on-fork): none of its parent's hints holds it now.
    _holders.count = 0
    _holders.granted = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class SliceHint:
    """One engine's wish for a short slice on the thread it runs on.

    Several hints on one thread (two managers on one event loop) share it: the thread
    has the short slice while any of them wants it, of the length the first asked for.
    Call :meth:`want` from that thread only.

    Args:
        slice_ns: The slice to ask for (0: never ask; below :data:`MIN_SLICE_NS`, the
            kernel grants that).
    """

    __slots__ = ("_short", "_slice_ns")

    def __init__(self, slice_ns: int) -> None:
        self._slice_ns = max(0, slice_ns)
        self._short = False

    @property
    def slice_ns(self) -> int:
        """The slice this hint asks for (0: it never asks)."""
        return self._slice_ns

    @property
    def short(self) -> bool:
        """Whether this hint currently wants the short slice."""
        return self._short

    def want(self, short: bool) -> None:
        """Want the short slice (``True``) or the kernel's default (``False``); system
        calls only when the thread's choice changes."""
        if short == self._short or not self._slice_ns:
            return
        self._short = short
        holders = _holders
        if short:
            holders.count += 1
            if holders.count == 1:
                holders.granted = _set(self._slice_ns)
        elif holders.count > 0:  # (0: wanted before a fork; nothing to give back here)
            holders.count -= 1
            if holders.count == 0 and holders.granted:
                holders.granted = False
                _set(0)
