"""The ping/echo service and the client tour that ``ucxrpc demo`` runs.

The service answers ``ping()`` with ``"PONG"``; ``echo("ECHO:x")`` with ``"REPLY:x"``
and any other text with ``"RECEIVED:<text>"``; ``sleep(s)`` waits ``s`` seconds.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

from .calls.manager import Manager
from .calls.server import Server
from .errors import DeadlineExceeded

__all__ = ["DemoReport", "build_server", "run_demo", "summarize", "tour"]


def build_server() -> Server:
    """Build the ping/echo server."""
    server = Server()

    @server.rpc
    async def ping() -> str:
        return "PONG"

    @server.rpc
    async def echo(text: str) -> str:
        if text.startswith("ECHO:"):
            return "REPLY:" + text.removeprefix("ECHO:")
        return "RECEIVED:" + text

    @server.rpc
    async def sleep(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "AWAKE"

    return server


@dataclass
class DemoReport:
    """What the client tour saw."""

    replies: list[tuple[str, str]] = field(default_factory=list)
    rtt_us: list[float] = field(default_factory=list)
    burst_size: int = 0
    burst_ok: int = 0
    burst_ms: float = 0.0
    timeout_outcome: str = ""


async def tour(manager: Manager, host: str, port: int, *, pings: int = 1000) -> DemoReport:
    """Call the ping/echo service: replies, round-trip times, a burst, a timeout."""
    report = DemoReport()
    async with await manager.connect(host, port) as client:
        for method, arg in (("ping", None), ("echo", "ECHO:hello"), ("echo", "hello")):
            reply = await (client.call(method, arg) if arg else client.call(method))
            report.replies.append((f"{method}({arg or ''})", reply))
        pc = time.perf_counter_ns
        for _ in range(pings):
            t = pc()
            await client.call("ping")
            report.rtt_us.append((pc() - t) / 1000)
        report.burst_size = 500
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(client.call("echo", f"ECHO:{i}") for i in range(report.burst_size)),
            return_exceptions=True,
        )
        report.burst_ms = (time.perf_counter() - t0) * 1000
        report.burst_ok = sum(r == f"REPLY:{i}" for i, r in enumerate(results))
        try:
            await client.call("sleep", 2.0, timeout=0.1)
            report.timeout_outcome = "answered (unexpected)"
        except DeadlineExceeded as exc:
            report.timeout_outcome = f"DeadlineExceeded: {exc.message}"
    return report


async def run_demo(*, pings: int = 1000, progress_mode: str = "blocking") -> DemoReport:
    """Serve the ping/echo service and run the client tour against it, in one process."""
    server = build_server()
    async with Manager(progress_mode=progress_mode) as manager:
        await server.start(manager, "127.0.0.1", 0)
        report = await tour(manager, "127.0.0.1", server.port, pings=pings)
        await server.stop(grace=1.0)
    return report


def summarize(rtt_us: list[float]) -> dict[str, float]:
    """min / p50 / p99 / mean of round-trip times in microseconds."""
    s = sorted(rtt_us)
    return {
        "min": s[0],
        "p50": statistics.median(s),
        "p99": s[min(len(s) - 1, int(len(s) * 0.99))],
        "mean": statistics.fmean(s),
    }
