"""Progress modes over real UCX, the engine's sleep when idle, the demo and the example."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ucxrpc

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("mode", ["blocking", "polling", "efficient", "balanced", "latency"])
async def test_every_progress_mode_carries_calls(mode: str) -> None:
    async with ucxrpc.Manager(progress_mode=mode) as manager:
        server = ucxrpc.Server()

        @server.rpc
        async def blob(data: bytes) -> bytes:
            return data

        await server.start(manager)
        async with await manager.connect("127.0.0.1", server.port) as client:
            small = await asyncio.gather(*(client.call("blob", bytes([i])) for i in range(200)))
            assert small == [bytes([i]) for i in range(200)]
            big = os.urandom(4 << 20)
            assert bytes(await client.call("blob", big)) == big
        await server.stop()


@pytest.mark.parametrize(("mode", "sleeps"), [("blocking", True), ("polling", False)])
async def test_engine_sleeps_on_the_fd_when_idle(mode: str, sleeps: bool) -> None:
    async with ucxrpc.Manager(progress_mode=mode) as manager:
        server = ucxrpc.Server()

        @server.rpc
        async def ping() -> str:
            return "PONG"

        await server.start(manager)
        async with await manager.connect("127.0.0.1", server.port) as client:
            assert await client.call("ping") == "PONG"
            # Let the spin window (200 us) pass, then count drives over an idle window.
            await asyncio.sleep(0.05)
            before = manager.engine.drives
            await asyncio.sleep(0.2)
            idle_drives = manager.engine.drives - before
            if sleeps:
                assert idle_drives < 20, idle_drives
            else:
                assert idle_drives > 100, idle_drives
            # And it wakes up for the next call.
            assert await asyncio.wait_for(client.call("ping"), 5) == "PONG"
        await server.stop()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "120"},
    )


def test_demo_command() -> None:
    out = run(sys.executable, "-m", "ucxrpc.cli", "demo", "--pings", "200")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    for text in (
        "PONG",
        "REPLY:hello",
        "RECEIVED:hello",
        "p50",
        "500/500 concurrent calls answered in",  # 500/500: every reply was right
        "DeadlineExceeded",
    ):
        assert text in out.stdout, out.stdout


def test_demo_command_rejects_a_bad_mode() -> None:
    out = run(sys.executable, "-m", "ucxrpc.cli", "demo", "--progress-mode", "turbo")
    assert out.returncode != 0
    assert "Traceback" not in out.stdout + out.stderr


def test_ping_echo_example() -> None:
    out = run(sys.executable, "examples/ping_echo.py")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[:3] == ["ping -> PONG", "echo('ECHO:hi') -> REPLY:hi", "echo('hi') -> RECEIVED:hi"]
    assert "burst: 100/100 concurrent calls answered correctly" in lines
    assert any(line.startswith("timeout: [DEADLINE_EXCEEDED]") for line in lines)


def test_readme_example_runs(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1", "2"]
    assert done.stderr == ""
