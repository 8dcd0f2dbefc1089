"""What the load, fairness and soak runs share: payloads derived from a call's id, the
seeded plan of sizes and priorities, the child processes a driver starts, and the
statistics it prints.

Used by ``benchmarks/load.py``, ``benchmarks/fairness.py``, ``benchmarks/soak.py`` (the
drivers, which never initialise UCX themselves) and by the helpers they start,
``tests/helpers/load_server.py`` and ``tests/helpers/load_client.py``.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

from childproc import HELPERS, ChildProcess

KIB = 1 << 10
MIB = 1 << 20

#: Sizes of a call's payload (bytes), and how many of every 1,000 calls have each:
#: mostly small, some large; 8191 and 8193 straddle the 8 KiB eager/rendezvous switch,
#: 64 KiB is past the 16 KiB out-of-band threshold, 256 KiB and 1 MiB go shared.
SIZES = (64, 1 * KIB, 8191, 8193, 64 * KIB, 256 * KIB, 1 * MIB)
WEIGHTS = (500, 250, 80, 80, 60, 25, 5)
PRIORITIES = (2, 1, 0)  # ucxrpc.Priority HIGH, NORMAL, LOW (plain ints: no import here)
PRIORITY_NAMES = {2: "HIGH", 1: "NORMAL", 0: "LOW"}
ID = struct.Struct("<II")

#: The bytes every payload is cut from (seeded: every process builds the same ones).
BASE = random.Random(20261201).randbytes(2 * MIB)


def payload(cid: int, seq: int, size: int) -> bytes:
    """The payload of call ``seq`` of client ``cid``: its id, then ``size - 8`` bytes of
    :data:`BASE` from an offset that depends on the id (so that a reply carrying another
    call's bytes, or bytes shifted by one, never matches)."""
    off = (cid * 7919 + seq * 104729) % (len(BASE) - size)
    return ID.pack(cid, seq) + BASE[off : off + size - ID.size]


def plan(cid: int, calls: int, seed: int) -> list[tuple[int, int]]:
    """``(size, priority)`` of every call of client ``cid`` (seeded)."""
    rng = random.Random(seed * 1_000_003 + cid)
    sizes = rng.choices(SIZES, WEIGHTS, k=calls)
    prios = rng.choices(PRIORITIES, k=calls)
    return list(zip(sizes, prios, strict=True))


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest rank (0.0 if empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return float(ordered[rank])


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


async def orphan_guard(period: float = 0.5) -> None:
    """End this process when its parent is gone (a driver killed by a timeout must not
    leave helpers behind)."""
    parent = os.getppid()
    while True:
        await asyncio.sleep(period)
        if os.getppid() != parent:
            os._exit(3)


def say(*words: object) -> None:
    """One line to the driver."""
    print(*words, flush=True)


async def stdin_reader() -> asyncio.StreamReader:
    """An asyncio reader of this process's stdin (the driver's commands)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


class Child(ChildProcess):
    """A helper process started with subprocess (fork+exec: nothing of UCX inherited).

    Its stdout lines arrive on a queue read by a thread; its stderr goes to a file whose
    tail is shown when it fails.

    Args:
        script: The helper's file name in tests/helpers.
        *args: Its arguments.
        logdir: Where its stderr file goes.
        env: Extra environment variables.
    """

    def __init__(
        self, script: str, *args: str, logdir: Path, env: dict[str, str] | None = None
    ) -> None:
        full = {**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n", **(env or {})}
        super().__init__(HELPERS / script, *args, env=full, logdir=logdir)
        self.name = f"{Path(script).stem} {' '.join(args[:2])} (pid {self.pid})"

    def expect(self, word: str, timeout: float) -> str:
        """The rest of the next line starting with ``word``.

        Raises:
            RuntimeError: The child printed ERROR, exited, or said nothing in time.
        """
        return self.expect_any((word,), timeout)[1]

    def expect_any(self, words: tuple[str, ...], timeout: float) -> tuple[str, str]:
        """The next line starting with one of ``words``: ``(word, rest of the line)``.

        Raises:
            RuntimeError: The child printed ERROR, exited, or said nothing in time.
        """
        for line in self.lines_within(timeout):
            if line.startswith("ERROR"):
                raise RuntimeError(f"{self.name}: {line} {self.stderr_tail()}")
            first, _, rest = line.partition(" ")
            if first in words:
                return first, rest.strip()
        if self.eof:
            raise RuntimeError(
                f"{self.name} exited ({self.popen.poll()}) waiting for "
                f"{'/'.join(words)}: {self.stderr_tail()}"
            )
        raise RuntimeError(
            f"{self.name} was silent {timeout:.0f} s waiting for {'/'.join(words)}: "
            f"{self.stderr_tail()}"
        )

    def stderr_tail(self, lines: int = 8, sep: str = " | ") -> str:
        """The last non-empty lines of its stderr."""
        return super().stderr_tail(lines, sep)


class Children:
    """Every child a driver starts, each stopped by its pid at the end."""

    def __init__(self, logdir: Path | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="ucxrpc-load-") if logdir is None else None
        self.logdir = Path(self._tmp.name) if self._tmp is not None else logdir
        assert self.logdir is not None
        self.all: list[Child] = []

    def start(self, script: str, *args: str, env: dict[str, str] | None = None) -> Child:
        """Start ``tests/helpers/<script> args...``."""
        child = Child(script, *args, logdir=self.logdir, env=env)
        self.all.append(child)
        return child

    def stop(self) -> None:
        """Stop every child (by pid)."""
        for child in self.all:
            child.stop()
        self.all.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def latency_row(label: str, lat_us: list[float]) -> dict[str, Any]:
    """p50, p99 and max of a list of latencies in microseconds."""
    return {
        "label": label,
        "calls": len(lat_us),
        "p50_us": round(percentile(lat_us, 50), 1),
        "p99_us": round(percentile(lat_us, 99), 1),
        "max_us": round(max(lat_us), 1) if lat_us else 0.0,
    }
