"""A second core for the one large copy a receive makes.

A part read out of the peer's memory is one ``process_vm_readv`` of many megabytes,
and while it runs the peer waits for the reply and the other core is idle. Copying
the two halves at once, one in the event loop's thread and one in a helper thread
(ctypes lets go of the GIL for the call), takes a 16 MiB read from about 1.4 ms to
about 0.8 ms on a two-core machine.

The helper thread starts on the first large copy and ends after
:data:`IDLE_SECONDS` without one, so a process that stops moving large parts holds no
extra thread. A forked child starts without it (the thread does not exist there).

The same split serves the copy of a large received part into ``bytes``
(:func:`to_bytes`).
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable
from typing import Final

import numpy as _np

from ..wire import codec

__all__ = ["IDLE_SECONDS", "SPLIT_BYTES", "copy_split", "fill", "to_bytes"]

#: A copy this large or larger is split in two.
SPLIT_BYTES: Final = 4 << 20
#: The helper thread ends after this long without work.
IDLE_SECONDS: Final = 2.0

# A chunk copier: (offset, length) -> None, raising what the copy raises.
Copy = Callable[[int, int], object]


class _Job:
    __slots__ = ("copy", "done", "error", "keep", "length", "offset")

    def __init__(self, copy: Copy, offset: int, length: int, keep: object) -> None:
        self.copy = copy
        self.offset = offset
        self.length = length
        self.keep = keep  # the buffers written and read: alive until the job ends
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.copy(self.offset, self.length)
        except BaseException as exc:  # handed to the thread that waits for it
            self.error = exc
        finally:
            self.keep = None
            self.done.set()


class _Helper:
    """One thread taking one job at a time, ending when idle."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._running = False
        self._busy = False

    def submit(self, job: _Job) -> bool:
        """Hand ``job`` to the thread; False (the job not taken) if the thread is busy
        with another caller's job (no caller waits behind another's copy) or cannot
        be started."""
        with self._lock:
            if self._busy:
                return False
            if not self._running:
                try:
                    threading.Thread(target=self._serve, name="ucxrpc-copy", daemon=True).start()
                except RuntimeError:  # no thread to be had: copy in one piece
                    return False
                self._running = True
            self._busy = True
            self._jobs.put(job)
            return True

    def _serve(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    # A job put after the timeout but before the lock is still served.
                    if self._jobs.empty():
                        self._running = False
                        return
                continue
            job.run()
            with self._lock:
                self._busy = False

    def reset(self) -> None:
        """Forget the thread and its jobs (in a forked child, where neither exists)."""
        self._lock = threading.Lock()
        self._jobs = queue.SimpleQueue()
        self._running = False
        self._busy = False


_helper = _Helper()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_helper.reset)


def copy_split(copy: Copy, length: int, keep: object = None) -> None:
    """Run ``copy(offset, n)`` over ``length`` bytes, in two halves on two threads
    when ``length`` is at least :data:`SPLIT_BYTES`, else in one call here.

    Args:
        copy: Copies ``n`` bytes at ``offset``.
        length: Bytes in all.
        keep: What ``copy`` writes and reads (kept referenced until both halves end).

    Once this returns or raises, nothing writes into the buffers any more: it waits
    for the helper's half even when interrupted (a signal handler that raises), and
    raises the first error after both halves ended. When the helper is busy with
    another caller's copy, or no thread can be started, it copies in one piece here.
    """
    if length < SPLIT_BYTES:
        copy(0, length)
        return
    half = length // 2
    job = _Job(copy, half, length - half, keep)
    if not _helper.submit(job):
        copy(0, length)
        return
    error: BaseException | None = None
    try:
        copy(0, half)
    except BaseException as exc:
        error = exc
    while True:
        try:
            job.done.wait()
            break
        except BaseException as exc:  # the helper still writes: wait on, raise after
            error = error or exc
    if error is None:
        error = job.error
    elif job.error is not None and error.__context__ is None:
        error.__context__ = job.error
    if error is not None:
        raise error


def fill(address: int, view: memoryview) -> None:
    """Write the bytes of ``view`` (contiguous, of bytes) at ``address``, split as
    :func:`copy_split` splits."""
    source = int(_np.frombuffer(view, dtype=_np.uint8).ctypes.data)
    copy_split(lambda at, n: ctypes.memmove(address + at, source + at, n), view.nbytes, view)


def to_bytes(buf: object) -> bytes:
    """:func:`ucxrpc.wire.codec.to_bytes` with a large copy made on two cores."""
    return codec.to_bytes(buf, fill)
