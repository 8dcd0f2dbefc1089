"""A helper script in a process of its own, as the drivers and tests start one.

Started with subprocess (fork+exec: nothing of the parent's UCX is inherited) and
stopped by its pid. Its stdout lines arrive on a queue read by a thread, so that the
parent can wait for one with a bound (from an event loop too, polling); its stderr goes
to a file, named in a log folder or anonymous.

The base of ``load_common.Child`` (load, fairness and soak drivers),
``faultproc.Peer`` (tests/test_faults.py) and ``Child`` of benchmarks/kill_matrix.py;
each keeps its own way of waiting for a line and of reporting what went wrong. Imports
nothing of UCX.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["HELPERS", "ChildProcess"]

HELPERS = Path(__file__).resolve().parent
#: How long stopping waits for the process to end and for its stdout to close.
STOP_WAIT = 10.0


class ChildProcess:
    """``python SCRIPT ARGS...`` with piped stdin and stdout, stopped by its pid.

    Args:
        script: The script's path.
        *args: Its arguments.
        env: Its whole environment.
        logdir: Where its stderr file goes (kept after :meth:`stop`, named after
            ``errprefix``); ``None``: an anonymous file, gone at :meth:`stop`.
        errprefix: The start of the stderr file's name (default: the script's stem).
    """

    def __init__(
        self,
        script: Path,
        *args: str,
        env: Mapping[str, str],
        logdir: Path | None = None,
        errprefix: str | None = None,
    ) -> None:
        self._err: IO[Any]
        self.errpath: Path | None = None
        if logdir is None:
            self._err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()
        else:
            self._err = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
                prefix=f"{errprefix or script.stem}-", suffix=".err", dir=logdir, delete=False
            )
            self.errpath = Path(self._err.name)
        self.popen = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env=dict(env),
        )
        self.pid = self.popen.pid
        #: True once a reader has met the end of stdout (every line before it was read).
        self.eof = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pumper = threading.Thread(target=self._pump, daemon=True)
        self._pumper.start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        try:
            for line in self.popen.stdout:
                self._queue.put(line.rstrip("\n"))
        except (OSError, ValueError):  # stdout closed under the reader by stop()
            pass
        self._queue.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next stdout line, waiting up to ``timeout`` seconds (0: not at all).

        Returns:
            The line, or ``None`` once stdout has ended (and every time after).

        Raises:
            queue.Empty: No line within ``timeout``.
        """
        line = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        if line is None:
            self._queue.put(None)  # keep reporting the end
            self.eof = True
        return line

    def lines_within(self, timeout: float) -> Iterator[str]:
        """Stdout lines as they come, until ``timeout`` seconds have passed or stdout
        has ended (then :attr:`eof` is True)."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = self.next_line(left)
            except queue.Empty:
                continue
            if line is None:
                return
            yield line

    def send(self, line: str) -> None:
        """Write one command line to its stdin."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def alive(self) -> bool:
        """Whether it still runs."""
        return self.popen.poll() is None

    def returncode(self, wait: float = 0.0) -> int | None:
        """Its return code, waiting up to ``wait`` seconds for it (``None``: running)."""
        try:
            return self.popen.wait(timeout=wait) if wait else self.popen.poll()
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL it (by pid) if it still runs, and wait (bounded) for it to end."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=STOP_WAIT)

    def stop(self) -> None:
        """:meth:`kill`, then release its pipes and its stderr file."""
        self.kill()
        self._pumper.join(timeout=STOP_WAIT)  # the end of stdout follows the kill
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._err.close()

    def stderr_text(self) -> str:
        """What it wrote to stderr so far (a named file: "" once it cannot be read)."""
        if self.errpath is None:
            self._err.flush()
            self._err.seek(0)
            text: str = self._err.read()
            return text
        try:
            return self.errpath.read_text(errors="replace")
        except OSError:
            return ""

    def stderr_tail(self, lines: int, sep: str) -> str:
        """The last ``lines`` non-empty lines of its stderr, joined by ``sep``."""
        keep = [ln for ln in self.stderr_text().splitlines() if ln.strip()]
        return sep.join(keep[-lines:])
