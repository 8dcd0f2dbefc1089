"""Process safety: a forked child cannot use its parent's ucxrpc, and whatever the
child does, or however it ends, the parent's connections keep working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(90)
HELPER = Path(__file__).parent / "helpers" / "fork_child.py"


def _run(port: int, mode: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, str(HELPER), str(port), mode], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture
def port(spawn: Any) -> int:
    return int(spawn("serve.py").read_ready()[0])


@pytest.mark.parametrize(
    ("mode", "status"),
    [("exit", 0), ("exit-in-loop", 0), ("os-exit", 0), ("kill", -9)],
)
def test_a_child_that_ends_never_harms_its_parent(port: int, mode: str, status: int) -> None:
    # Without the at-fork handlers, a child leaving its `async with Manager()` closed
    # the parent's connection (the parent's next call hung), or took the parent's
    # control socket, listener and UCX fd out of the shared epoll set (its heartbeats
    # went unanswered); the parent now also waits 1.5 s of heartbeats and accepts a
    # new connection to its own server before it passes.
    lines = _run(port, mode)
    assert lines == [{"status": status}, {"after": "ok"}]


@pytest.mark.parametrize("mode", ["use", "new-manager", "idle-manager"])
def test_a_child_that_uses_ucxrpc_gets_a_clear_error(port: int, mode: str) -> None:
    # Without them, the child's call went through the parent's frame ring and broke it.
    lines = _run(port, mode)
    assert lines[0]["child"] == "Unavailable"
    assert "forked process" in lines[0]["message"] and "spawn" in lines[0]["message"]
    assert lines[1:] == [{"status": 0}, {"after": "ok"}]
