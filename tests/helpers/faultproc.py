"""A peer process for the fault tests: stdout lines on a queue, stderr to a file.

Started with subprocess (fork+exec: nothing of this process's UCX is inherited) and
stopped by its pid. Lines are read by a thread, so a test can wait for one without
blocking its event loop, and every line is kept for the check that nothing else was
printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HELPERS = Path(__file__).resolve().parent


class Peer:
    """One helper script of tests/helpers in its own process."""

    def __init__(self, script: str, *args: str, env: dict[str, str] | None = None) -> None:
        self._err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, str(HELPERS / script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.pid = self.popen.pid
        self.lines: list[str] = []  # every line so far
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    async def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """The rest of the next line that starts with ``prefix`` (lines before it are
        kept in :attr:`lines` only).

        Raises:
            AssertionError: The process ended, or no such line came within ``timeout``.
        """
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.001)
                continue
            if line is None:
                self._queue.put(None)
                raise AssertionError(f"peer {self.pid} ended before {prefix!r}: {self.stderr}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise AssertionError(f"no {prefix!r} from peer {self.pid} within {timeout} s")

    async def expect_json(self, prefix: str, timeout: float = 30.0) -> dict[str, Any]:
        """:meth:`expect` for a line whose rest is JSON."""
        value: dict[str, Any] = json.loads(await self.expect(prefix, timeout))
        return value

    def send(self, line: str) -> None:
        """One command line on the peer's stdin."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def signal(self, sig: signal.Signals) -> float:
        """Send ``sig`` by pid; returns the ``time.monotonic()`` just before."""
        t = time.monotonic()
        os.kill(self.pid, sig)
        return t

    async def exited(self, timeout: float) -> int:
        """Wait for the process to end; its return code.

        Raises:
            AssertionError: Still running after ``timeout`` seconds.
        """
        end = time.monotonic() + timeout
        while (rc := self.popen.poll()) is None:
            if time.monotonic() > end:
                raise AssertionError(f"peer {self.pid} still running after {timeout} s")
            await asyncio.sleep(0.005)
        return rc

    async def rest(self, timeout: float = 10.0) -> list[str]:
        """Every line once the process has ended (it must end within ``timeout``)."""
        end = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                if time.monotonic() > end:
                    raise AssertionError(f"peer {self.pid} output did not end") from None
                await asyncio.sleep(0.001)
                continue
            if line is None:
                self._queue.put(None)
                return self.lines
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        """What the process wrote to stderr so far."""
        self._err.flush()
        self._err.seek(0)
        return self._err.read()

    def stop(self) -> None:
        """SIGKILL it (by pid) if it still runs, and release its pipes."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=10)
        self._pump.join(timeout=10)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._err.close()
