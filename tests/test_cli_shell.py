"""``ucxrpc shell`` against an RPC server and a messaging endpoint, driven as a user
drives it: on a terminal (a pty, Ctrl-C and Ctrl-D typed) and from a pipe."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.cli_run import ROOT, UCXRPC, Procs, Terminal, one_error_line, tcp_peer, ucxrpc


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    p = Procs()
    try:
        _, addr = p.serve()
        yield addr
    finally:
        p.stop()


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Any]:
    started: list[Terminal] = []

    def start(*args: str) -> Terminal:
        term = Terminal(UCXRPC, *args, env={"HOME": str(tmp_path)})
        started.append(term)
        return term

    yield start
    for term in started:
        term.close()


def wait_for(path: Path, proc: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        assert proc.poll() is None, "the shell exited"
        time.sleep(0.01)


def test_shell_against_an_rpc_server_calls_streams_lists_and_describes(address: str) -> None:
    script = "\n".join(
        [
            "call ping",
            "call add 2 3",
            "call echo 'ECHO:hello world'",
            'call add --json \'{"a": 40, "b": 2}\'',
            "call add --json '[1, 2]' --priority high --timeout 5",
            "call metadata_echo -m user=ann",
            "call count 3",
            "stream count 2",
            "call no_result",
            "list",
            "describe add",
            "describe",
            "call pnig",
            "call add '{a'",
            "frobnicate",
            "call",
            "quit",
            "call ping",
        ]
    )
    out = ucxrpc("shell", address, stdin=script + "\n")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert "Worker.connect" not in out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"connected to {address}: ucxrpc server ")
    assert lines[1:6] == ['"PONG"', "5", '"REPLY:hello world"', "42", "3"]
    assert lines[6:11] == ["{", '  "user": "ann"', "}", "0", "1"]
    assert lines[11:15] == ["2", "0", "1", "null"]
    assert any("(a: int, b: int = 1) -> int" in line for line in lines)
    assert all(len(line) <= 80 for line in lines if line[:1] in "┏┃┡│└")  # tables fit
    description = json.loads(out.stdout[out.stdout.index('{\n  "version"') :])
    assert "ping" in [m["name"] for m in description["methods"]]
    assert out.stdout.count('"PONG"') == 1  # nothing ran after quit
    assert out.stderr.splitlines() == [
        "error: [UNIMPLEMENTED] method 'pnig' is not registered (did you mean 'ping'?)",
        "error: argument 1 '{a' is not valid JSON: Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1)",
        "error: unknown command 'frobnicate' (try 'help')",
        "error: usage: call METHOD [ARG]... [OPTIONS]",
    ]


def test_ctrl_c_cancels_the_running_call_and_the_prompt_comes_back(
    address: str, terminal: Any, tmp_path: Path
) -> None:
    term = terminal("shell", address)
    term.expect("rpc> ")
    term.type("call ping\n")
    assert '"PONG"' in term.expect("rpc> ")
    marker = tmp_path / "entered"
    term.type(f"call hold {marker} 60\n")
    wait_for(marker, term.proc)
    start = time.monotonic()
    term.type("\x03")  # Ctrl-C
    shown = term.expect("rpc> ", timeout=10)
    assert time.monotonic() - start < 5
    assert "cancelled" in shown and "Traceback" not in shown, shown
    assert term.proc.poll() is None
    term.type("call echo ECHO:after\n")
    assert '"REPLY:after"' in term.expect("rpc> ")
    term.type("\x04")  # Ctrl-D at the prompt: the end
    assert term.wait() == 0
    assert "Traceback" not in term.output


def test_ctrl_c_at_the_prompt_drops_the_line_typed_so_far(address: str, terminal: Any) -> None:
    # Each round types Ctrl-C just after the shell echoed the last character: the
    # moment readline is still out of its select(), where a SIGINT used to be noted
    # but not acted on until the next key (the prompt did not come back).
    term = terminal("shell", address)
    term.expect("rpc> ")
    for partial in ("cal", "list --wi", ""):
        term.type(partial)
        term.expect(partial)  # the shell has read it: readline's echo shows it
        term.type("\x03")
        term.expect("rpc> ", timeout=10)
    term.type("call ping\n")
    shown = term.expect("rpc> ")
    assert '"PONG"' in shown and "unknown command" not in shown, shown
    term.type("\x04")
    assert term.wait() == 0
    assert "Traceback" not in term.output


def test_ctrl_d_during_a_command_ends_the_shell_once_it_is_done(
    address: str, terminal: Any, tmp_path: Path
) -> None:
    term = terminal("shell", address)
    term.expect("rpc> ")
    marker = tmp_path / "entered"
    term.type(f"call hold {marker} 1\n")
    wait_for(marker, term.proc)
    term.type("\x04")  # Ctrl-D while the call runs
    assert term.wait() == 0, term.output
    assert '"DONE"' in term.output and "Traceback" not in term.output, term.output


def test_sigint_from_a_pipe_cancels_the_command_and_the_next_one_runs(
    address: str, procs: Procs, tmp_path: Path
) -> None:
    import subprocess

    marker = tmp_path / "entered"
    shell = procs.start(UCXRPC, "shell", address, stdin=subprocess.PIPE)
    assert shell.stdin is not None
    shell.stdin.write(f"call hold {marker} 60\n")
    shell.stdin.flush()
    wait_for(marker, shell)
    os.kill(shell.pid, signal.SIGINT)
    shell.stdin.write("call echo ECHO:next\nquit\n")
    shell.stdin.flush()
    out, err = shell.communicate(timeout=30)
    assert shell.returncode == 0, err
    assert out.splitlines()[1:] == ['"REPLY:next"'], out
    assert err.splitlines() == ["error: cancelled"], err


def test_shell_against_a_messaging_endpoint_keeps_the_tag_commands(spawn: Any) -> None:
    proc = spawn(str(ROOT / "examples" / "raw_echo_server.py"))
    (port,) = proc.read_ready()
    where = f"127.0.0.1:{port}"
    out = ucxrpc("shell", where, stdin="send 1 7 PING\nreceive 1 7\nbroadcast 3 hi\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"connected to {where}: endpoint 1",
        "sent 4 bytes to endpoint 1 on tag 7",
        "received from endpoint 1 on tag 7: PONG",
        "broadcast 2 bytes on tag 3 to 1 endpoint",
    ]


def test_shell_at_a_peer_that_does_not_speak_ucxrpc() -> None:
    with tcp_peer(b"HTTP/1.1 400 Bad Request\r\n\r\n") as where:
        line = one_error_line(ucxrpc("shell", where, stdin=""))
    assert f"{where} does not speak ucxrpc" in line
    with tcp_peer(None) as where:
        line = one_error_line(ucxrpc("shell", where, "--connect-timeout", "1", stdin=""))
    assert f"no ucxrpc answer from {where} within 1 s" in line
