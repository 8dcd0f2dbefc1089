"""The examples in examples/ run to completion and show what they claim to show."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import match_each

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, *, stderr_empty: bool = True) -> tuple[list[str], str]:
    """Run ``examples/<name>`` in a fresh interpreter; its stdout lines and its stderr."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    if stderr_empty:
        assert out.stderr == "", out.stderr
    return out.stdout.splitlines(), out.stderr


def test_typed_service() -> None:
    lines, _ = run_example("typed_service.py")
    # Replies are validated into the declared types by the stub.
    assert "shout -> EchoReply(text='AAA')" in lines
    assert "midpoint -> Point(x=1.5, y=2.0)" in lines
    assert "summarize -> {'count': 100, 'mean': 50.5, 'largest': 100.0}" in lines
    assert any(
        line.startswith("InvalidArgument: req.times: Input should be a valid integer")
        for line in lines
    ), lines
    start = lines.index("server 0.1.0 serves:")
    assert lines[start + 1 :] == [
        "  echo.v1.midpoint (unary)",
        "  echo.v1.shout (unary)",
        "  echo.v1.summarize (unary)",
        "  ucxrpc.describe (unary)",
        "  ucxrpc.health.check (unary)",
        "  ucxrpc.health.watch (stream)",
    ]


def test_streaming() -> None:
    lines, _ = run_example("streaming.py")
    assert "count(5) by name -> [0, 1, 2, 3, 4]; server: ran to the end after 5 items" in lines
    assert "sum of count(100) via the stub -> 4950; server: ran to the end after 100 items" in lines

    # Breaking out of the loop closes the server's generator, which ran ahead of the
    # consumer by at most the stream window (8).
    i = lines.index("naturals(): break after [0, 1, 2]")
    [closed] = match_each(
        r"  server generator closed early after (\d+) items \(window 8\)", lines[i + 1 : i + 2]
    )
    assert 3 <= int(closed[1]) <= 8
    i = lines.index("naturals() in 'async with': break at 1")
    match_each(r"  server generator closed early after \d+ items", lines[i + 1 : i + 2])

    i = lines.index("tail(timeout=0.3): got ['boot', 'ready', 'serving'], then DeadlineExceeded")
    assert lines[i + 1] == "  server generator cancelled after 3 items"


LOG_LINE = (
    r"(?P<level>INFO|WARNING) ucxrpc\.calls: server unary (?P<method>greet|whoami) "
    r"peer=127\.0\.0\.1:\d+ -> (?P<status>OK|UNAUTHENTICATED) in \d+\.\d{3} ms"
)


def test_interceptors() -> None:
    lines, stderr = run_example("interceptors.py", stderr_empty=False)
    assert lines[:3] == ["hello, ada", "hello, grace", "hello, linus"]
    # The request id added by the client interceptor reached the handler, and the
    # handler's response metadata reached the client.
    assert any(line.startswith("whoami -> request req-4 from 127.0.0.1:") for line in lines)
    assert "response metadata: {'served-by': 'example-server', 'x-request-id': 'req-4'}" in lines
    assert "without the token: Unauthenticated: 'greet' needs a valid bearer token" in lines

    # The metrics table: calls and errors per method.
    header = next(i for i, line in enumerate(lines) if line.startswith("method "))
    rows = match_each(r"(\w+) +(\d+)  (\S+) +(\d+\.\d{3}) ms", lines[header + 1 :])
    assert {row[1]: (int(row[2]), row[3]) for row in rows} == {
        "greet": (4, "UNAUTHENTICATED=1"),
        "whoami": (1, "-"),
    }

    # The logging interceptor: one line per call on stderr, and nothing else there.
    logged = match_each(LOG_LINE, stderr.splitlines())
    assert [(m["level"], m["method"], m["status"]) for m in logged] == [
        ("INFO", "greet", "OK"),
        ("INFO", "greet", "OK"),
        ("INFO", "greet", "OK"),
        ("INFO", "whoami", "OK"),
        ("WARNING", "greet", "UNAUTHENTICATED"),
    ]


def test_nested_deadline() -> None:
    lines, _ = run_example("nested_deadline.py")
    assert len(lines) == 7, lines
    # Each hop got what was left of the caller's budget (not None, not a fresh one).
    entered = match_each(r"([ABC]): entered, time_remaining\(\) = (\d+\.\d) ms", lines[:3])
    assert [m[1] for m in entered] == ["A", "B", "C"]
    assert all(0 < float(m[2]) <= 300.0 for m in entered)

    [failed] = match_each(r"client: DeadlineExceeded after (\d+\.\d+) s", lines[3:4])
    assert 0.29 <= float(failed[1]) < 2.0

    # Every handler was cancelled at the deadline, long before C's 5 s sleep would end.
    cancelled = match_each(
        r"([ABC]): saw CancelledError (\d+\.\d+) s after the call started", lines[4:]
    )
    assert [m[1] for m in cancelled] == ["A", "B", "C"]
    assert all(0.29 <= float(m[2]) < 2.0 for m in cancelled)


def test_call_kinds() -> None:
    lines, _ = run_example("call_kinds.py")
    assert lines == [
        "unary: 10.0",
        "server streaming: [20.0, 21.0, 22.0]",
        "client streaming: count=3 mean=3.0",
        "bidirectional: ['s1 at 9.0', 's3 at 12.0', 'done']",
        "by name: {'count': 1, 'mean': 4.0}",
        "  sensors.v1.alarms: bidi",
        "  sensors.v1.replay: stream",
        "  sensors.v1.scale: unary",
        "  sensors.v1.summarize: client_stream",
    ]
