"""A peer process for the fault tests: stdout lines on a queue, stderr to a file.

Started with subprocess (fork+exec: nothing of this process's UCX is inherited) and
stopped by its pid (``childproc.ChildProcess``). Lines are read by a thread, so a test
can wait for one without blocking its event loop, and every line is kept for the check
that nothing else was printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

from .childproc import HELPERS, ChildProcess


class Peer(ChildProcess):
    """One helper script of tests/helpers in its own process."""

    def __init__(self, script: str, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(HELPERS / script, *args, env={**os.environ, **(env or {})})
        self.lines: list[str] = []  # every line so far

    async def _arrivals(self, timeout: float) -> AsyncIterator[str]:
        """Lines as they come, each kept in :attr:`lines`, until stdout ends (then
        :attr:`eof`) or none is waiting once ``timeout`` seconds have passed; polls,
        so the event loop runs meanwhile."""
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.next_line(0)
            except queue.Empty:
                if time.monotonic() > end:
                    return
                await asyncio.sleep(0.001)
                continue
            if line is None:
                return
            self.lines.append(line)
            yield line

    async def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """The rest of the next line that starts with ``prefix`` (lines before it are
        kept in :attr:`lines` only).

        Raises:
            AssertionError: The process ended, or no such line came within ``timeout``.
        """
        async for line in self._arrivals(timeout):
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        if self.eof:
            raise AssertionError(f"peer {self.pid} ended before {prefix!r}: {self.stderr}")
        raise AssertionError(f"no {prefix!r} from peer {self.pid} within {timeout} s")

    async def expect_json(self, prefix: str, timeout: float = 30.0) -> dict[str, Any]:
        """:meth:`expect` for a line whose rest is JSON."""
        value: dict[str, Any] = json.loads(await self.expect(prefix, timeout))
        return value

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
        async for _ in self._arrivals(timeout):
            pass
        if not self.eof:
            raise AssertionError(f"peer {self.pid} output did not end")
        return self.lines

    @property
    def stderr(self) -> str:
        """What the process wrote to stderr so far."""
        return self.stderr_text()
