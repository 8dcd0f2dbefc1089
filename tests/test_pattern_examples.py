"""The pool, retry, batch and metrics examples run and show what they claim to show."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run_example(name: str) -> list[str]:
    """Run ``examples/<name>`` in a fresh interpreter; its stdout lines (stderr must be empty)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr == "", out.stderr
    return out.stdout.splitlines()


def test_pool() -> None:
    lines = run_example("pool.py")
    assert lines[0] == "20 tasks: sum of squares 2470, at most 3 connections at once"
    assert lines[1] == "pool: size=3 idle=3 in_use=0"
    assert re.fullmatch(
        r"all three taken: ResourceExhausted: no connection to 127\.0\.0\.1:\d+ became free "
        r"within 0\.2s \(all 3 in use\)",
        lines[2],
    ), lines[2]
    assert lines[3:] == [
        "a connection broke while borrowed: discarded, size=2",
        "the next rush opened a new one: size=3",
    ]


def test_retry() -> None:
    assert run_example("retry.py") == [
        "pauses between attempts: 0.05 s, 0.10 s, 0.15 s",
        "get('k') -> 'value of k' after 3 attempts (retry-attempt: -, 2, 3)",
        "lookup('a1') -> 'a1: in stock' after 3 attempts",
        "charge(10) -> Unavailable after 1 attempt: not idempotent, not retried",
        "attempts made: 6, of which retries: 4",
    ]


def test_batch() -> None:
    lines = run_example("batch.py")
    assert lines[:4] == [
        "100 calls: 90 ok, 10 failed",
        "results[:7] = [0, 1, 4, 9, 16, 25, 36]",
        "results[7] = InvalidArgument: 7 ends in 7",
        "failed at: [7, 17, 27, 37, 47, 57, 67, 77, 87, 97]",
    ]
    peak = re.fullmatch(r"the server ran at most (\d+) calls at once \(concurrency=8\)", lines[4])
    assert peak is not None, lines[4]
    assert 1 <= int(peak[1]) <= 8


def test_metrics() -> None:
    lines = run_example("metrics.py")
    assert re.fullmatch(r"method +calls +errors +p50 +p99", lines[0]), lines[0]
    row = r"{} +{} +{} +\d+\.\d{{3}} ms +\d+\.\d{{3}} ms"
    assert re.fullmatch(row.format("echo", 50, "-"), lines[1]), lines[1]
    assert re.fullmatch(row.format("refuse", 5, "PERMISSION_DENIED=5"), lines[2]), lines[2]
    totals = re.fullmatch(
        r"totals: 55 calls, 5 errors, (\d+) bytes in, (\d+) bytes out, 1 connection\(s\)",
        lines[3],
    )
    assert totals is not None, lines[3]
    assert int(totals[1]) > 1225 and int(totals[2]) > 1225  # 0 + 1 + ... + 49 echoed bytes
    assert re.fullmatch(r"GET /metrics -> HTTP/1\.1 200 OK, \d+ lines; the first ones:", lines[4])
    assert lines[5:11] == [
        "  # HELP ucxrpc_calls_total Calls finished.",
        "  # TYPE ucxrpc_calls_total counter",
        '  ucxrpc_calls_total{method="echo",side="server"} 50.0',
        '  ucxrpc_calls_total{method="refuse",side="server"} 5.0',
        "  # HELP ucxrpc_errors_total Calls failed, by status code.",
        "  # TYPE ucxrpc_errors_total counter",
    ]
    assert lines[11:] == ["GET /other -> HTTP/1.1 404 Not Found"]
