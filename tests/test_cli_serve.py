"""``ucxrpc serve`` mistakes as a user meets them: the installed command, in subprocesses."""

from __future__ import annotations

import socket

from helpers.cli_run import ucxrpc


def test_a_module_that_raises_at_import_shows_the_users_frames_only() -> None:
    out = ucxrpc("serve", "tests.helpers.cli_broken:server")
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == (
        "error: cannot import 'tests.helpers.cli_broken': RuntimeError: settings file "
        "missing: /nonexistent/app.toml"
    )
    frames = [line for line in lines if line.startswith('  File "')]
    assert len(frames) == 2, out.stderr
    assert all("tests/helpers/cli_broken.py" in f for f in frames), out.stderr
    assert "importlib" not in out.stderr and "ucxrpc/" not in out.stderr
    assert len(lines) <= 10, out.stderr
    assert out.stdout == ""


def test_a_metrics_port_in_use_fails_before_serving() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = ucxrpc("serve", "tests.helpers.cli_app:server", "--metrics-port", str(port))
    assert out.returncode == 1
    assert out.stdout == "", out.stdout  # no "serving ..." line
    assert out.stderr.splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith(f"error: cannot serve metrics on 127.0.0.1:{port}:")
