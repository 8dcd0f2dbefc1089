"""Memory mappings made through the C library (ctypes), where ``mmap.mmap`` will not do.

``mmap.mmap`` keeps a duplicate of the file's fd open for as long as the mapping
lives and can only be closed while no view of it exists; the mappings here (shared
parts, receive regions) are unmapped by a finalizer once their last view is gone.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from typing import Final

__all__ = ["advise_huge", "map_memory", "unmap"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_madvise = getattr(_libc, "madvise", None) if sys.platform.startswith("linux") else None
if _madvise is not None:
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED: Final = ctypes.c_void_p(-1).value
_MADV_HUGEPAGE: Final = 14


def map_memory(size: int, fd: int = -1) -> int:
    """A private, readable and writable mapping of ``size`` bytes: of ``fd`` (copy on
    write), or anonymous with ``fd`` -1. Returns its address.

    Raises:
        OSError: The kernel refused.
    """
    flags = mmap.MAP_PRIVATE | (mmap.MAP_ANONYMOUS if fd < 0 else 0)
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(addr)


def unmap(addr: int, size: int) -> None:
    """Unmap what :func:`map_memory` mapped."""
    _libc.munmap(addr, size)


def advise_huge(addr: int, size: int) -> None:
    """Ask for huge pages there (a hint: one page fault per 2 MiB, not per 4 KiB)."""
    if _madvise is not None:
        _madvise(addr, size, _MADV_HUGEPAGE)
