"""Large receive buffers, recycled: memory the kernel has already handed over.

A fresh buffer costs more than the bytes copied into it: every page is faulted in and
zeroed by the kernel on its first write (16 MiB is 4,096 faults, about two thirds of
the time of receiving it on a small VM). So a large part is received into a region of
its own mapping (anonymous, huge pages asked for), and once the last view of it is
gone the region is kept for the next part of its size class instead of being
unmapped, up to :attr:`Regions.limit` bytes kept idle per process.

A region is reused only when nothing refers to it any more: a view handed to the
application, or held by a UCX request in flight, keeps it alive (it is unmapped or
recycled by its finalizer, never earlier).
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Final

from . import cmem

__all__ = ["MIN_SIZE", "Regions", "region"]

#: Buffers at least this large come from regions (smaller ones are cheap anyway).
MIN_SIZE: Final = 256 * 1024
_HUGE_PAGE: Final = 2 << 20


class Regions:
    """The process's idle regions, by size class (a power of two)."""

    #: Bytes kept idle at most; a region freed beyond that is unmapped.
    limit = 64 << 20
    #: Bytes kept idle now.
    idle = 0
    #: Regions reused, and regions mapped.
    reused = 0
    mapped = 0
    _free: dict[int, list[int]] = {}  # noqa: RUF012 (process-wide on purpose)
    _lock = threading.RLock()  # finalizers may run in any thread, even inside


def _size_class(size: int) -> int:
    return 1 << (size - 1).bit_length()


def region(size: int) -> memoryview:
    """A writable, flat buffer of ``size`` bytes (contents undefined).

    Raises:
        MemoryError: The kernel would not map more memory.
    """
    cls = _size_class(max(size, MIN_SIZE))
    addr = 0
    with Regions._lock:
        free = Regions._free.get(cls)
        if free:
            addr = free.pop()
            Regions.idle -= cls
            Regions.reused += 1
    if not addr:
        addr = _map(cls)
        Regions.mapped += 1
    buf = (ctypes.c_char * size).from_address(addr)
    # Not at interpreter exit: views may still be alive then (and UCX may still use
    # them); the process's end unmaps everything anyway.
    weakref.finalize(buf, _recycle, addr, cls).atexit = False
    return memoryview(buf).cast("B")


def _map(cls: int) -> int:
    try:
        addr = cmem.map_memory(cls)
    except OSError:
        raise MemoryError(f"cannot map {cls} bytes") from None
    if cls >= _HUGE_PAGE:
        cmem.advise_huge(addr, cls)
    return addr


def _recycle(addr: int, cls: int) -> None:
    with Regions._lock:
        if Regions.idle + cls <= Regions.limit:
            Regions._free.setdefault(cls, []).append(addr)
            Regions.idle += cls
            return
    cmem.unmap(addr, cls)
