"""What a new user meets on the command line: the installed ``ucxrpc``, run in
subprocesses in an 80-column environment, against real servers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from helpers.cli_run import (
    UCXRPC,
    Procs,
    one_error_line,
    tcp_peer,
    ucxrpc,
)

import ucxrpc as package


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    """One ``ucxrpc serve`` of tests/helpers/cli_app.py shared by the tests that call it."""
    p = Procs()
    try:
        _, addr = p.serve()
        yield addr
    finally:
        p.stop()


def test_the_command_is_the_installed_script() -> None:
    assert UCXRPC.endswith("/ucxrpc")
    out = ucxrpc("--help")
    assert out.returncode == 0 and "Usage: ucxrpc" in out.stdout


# -- list fits 80 columns -----------------------------------------------------------------------


def test_list_fits_80_columns_with_whole_headers_and_one_line_docs(address: str) -> None:
    out = ucxrpc("list", address)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, out.stdout
    assert "…" not in out.stdout, out.stdout  # no header nor cell cut short
    header = next(line for line in lines if "method" in line)
    assert "signature" in header
    text = out.stdout
    for expected in (
        "(a: int, b: int = 1) -> int",
        "Add two integers.",
        "(text: str) -> str",
        "priority high, timeout 5 s, idempotent",
        "(n: int) -> stream of int",
        "(numbers: stream of int) -> int",
        "client_stream",
        "(p: Point) -> dict[str, int]",
    ):
        assert expected in text, (expected, text)
    # Parameters are not broken one word per line: each signature sits on one line.
    assert any("(marker: str, seconds: float) -> str" in line for line in lines)
    # Rows: about two lines per method, not ten.
    methods = json.loads(ucxrpc("list", address, "--json").stdout)["methods"]
    assert len(lines) <= 4 * len(methods) + 5, text


def test_list_wide_and_json_have_every_attribute(address: str) -> None:
    out = ucxrpc("list", address, "--wide")
    assert out.returncode == 0, out.stderr
    header = next(line for line in out.stdout.splitlines() if "method" in line)
    for column in ("kind", "priority", "timeout", "idempotent", "parameters", "result", "doc"):
        assert f" {column} " in header, header
    echo = next(line for line in out.stdout.splitlines() if " echo " in line)
    assert "high" in echo and "5 s" in echo and "yes" in echo
    assert "…" not in out.stdout
    description = json.loads(ucxrpc("list", address, "--json").stdout)
    echo_info = next(m for m in description["methods"] if m["name"] == "echo")
    assert (echo_info["timeout"], echo_info["idempotent"]) == (5.0, True)


def test_list_uses_the_full_table_when_it_fits(address: str) -> None:
    wide = ucxrpc("list", address, "--wide").stdout
    width = max(len(line) for line in wide.splitlines())
    assert width > 80
    out = ucxrpc("list", address, env={"COLUMNS": str(width)})
    assert out.stdout == wide
    out = ucxrpc("list", address, env={"COLUMNS": str(width - 1)})
    header = next(line for line in out.stdout.splitlines() if "method" in line)
    assert " idempotent " not in header and "signature" in header


# -- --version ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    out = ucxrpc(flag)
    assert (out.returncode, out.stdout, out.stderr) == (0, f"ucxrpc {package.__version__}\n", "")


# -- a peer that does not speak ucxrpc ----------------------------------------------------------


@pytest.mark.parametrize(
    "greeting",
    [b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", b"\x00\x01\x67garbage"],
    ids=["http", "garbage"],
)
@pytest.mark.parametrize("command", ["call", "list"])
def test_a_peer_that_sends_garbage_does_not_speak_ucxrpc(greeting: bytes, command: str) -> None:
    with tcp_peer(greeting) as where:
        start = time.monotonic()
        args = (where, "ping") if command == "call" else (where,)
        line = one_error_line(ucxrpc(command, *args))
        took = time.monotonic() - start
    assert f"{where} does not speak ucxrpc" in line, line
    assert "timed out" not in line
    assert took < 8, took  # not the 10 s connect timeout


@pytest.mark.parametrize("command", ["call", "list"])
def test_a_silent_peer_did_not_answer_within_the_connect_timeout(command: str) -> None:
    with tcp_peer(None) as where:
        start = time.monotonic()
        args = (where, "ping") if command == "call" else (where,)
        line = one_error_line(ucxrpc(command, *args, "--connect-timeout", "1"))
        took = time.monotonic() - start
    assert f"no ucxrpc answer from {where} within 1 s" in line, line
    assert took < 8, took


# -- arguments that look like JSON --------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "position"),
    [('{"a": 1,}', "char 8"), ("[1, 2", "char 5"), ('"unterminated', "char 0")],
)
def test_an_argument_that_looks_like_json_must_be_json(
    address: str, arg: str, position: str
) -> None:
    line = one_error_line(ucxrpc("call", address, "echo", arg))
    assert f"argument 1 {arg!r} is not valid JSON" in line, line
    assert position in line, line


def test_strings_and_valid_json_still_pass(address: str) -> None:
    out = ucxrpc("call", address, "echo", "ECHO:{not json, a string")
    assert json.loads(out.stdout) == "REPLY:{not json, a string"
    out = ucxrpc("call", address, "norm", '{"x": 1, "y": 2}')
    assert json.loads(out.stdout) == {"x": 1, "y": 2, "l1": 3}


# -- smaller ------------------------------------------------------------------------------------


def test_no_result_prints_null(address: str) -> None:
    out = ucxrpc("call", address, "no_result")
    assert (out.returncode, out.stdout) == (0, "null\n"), out.stderr


def test_help_has_no_bool_type_nor_doubled_brackets() -> None:
    for command in ((), ("call",), ("list",), ("bench",), ("shell",), ("serve",)):
        out = ucxrpc(*command, "--help")
        assert out.returncode == 0, out.stderr
        assert "<bool>" not in out.stdout, (command, out.stdout)
        assert "[[" not in out.stdout and "]...]" not in out.stdout, out.stdout
        assert max(len(line) for line in out.stdout.splitlines()) <= 80
    assert "[ARG]..." in ucxrpc("call", "--help").stdout


def test_an_option_error_points_at_the_subcommand_help(address: str) -> None:
    out = ucxrpc("call", address, "ping", "--bogus")
    assert out.returncode == 2
    assert one_error_line(out).endswith("(see 'ucxrpc call --help')")
    out = ucxrpc("--bogus")
    assert one_error_line(out).endswith("(see 'ucxrpc --help')")


def test_the_demo_fits_80_columns_in_microseconds() -> None:
    out = ucxrpc("demo", "--pings", "50")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), out.stdout
    rtt = next(line for line in lines if line.startswith("round trip over 50 pings:"))
    assert rtt.count("µs") == 3 and " us" not in out.stdout, out.stdout
    at = lines.index("call with a 0.1 s timeout to a 2 s handler:")
    assert lines[at + 1].startswith("  DeadlineExceeded: ") and len(lines) == at + 2


# -- examples/raw_echo_server.py ----------------------------------------------------------------


def test_raw_echo_server_is_quiet_by_default(procs: Procs) -> None:
    import signal
    import sys

    from helpers.cli_run import ROOT, read_line

    server = procs.start(sys.executable, str(ROOT / "examples" / "raw_echo_server.py"))
    port = read_line(server).split()[1]
    out = ucxrpc("shell", f"127.0.0.1:{port}", stdin="benchmark 1 300 16\n")
    assert out.returncode == 0 and "300 round trips" in out.stdout, out.stderr
    server.send_signal(signal.SIGTERM)
    rest, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert rest.splitlines()[0] == "answered 300 messages", rest
    assert len(rest.splitlines()) <= 6 and "endpoint 1 tag" not in rest, rest


def test_raw_echo_server_help_keeps_its_layout_and_a_taken_port_is_one_line() -> None:
    import socket
    import subprocess
    import sys

    from helpers.cli_run import ROOT

    script = str(ROOT / "examples" / "raw_echo_server.py")
    out = subprocess.run(
        [sys.executable, script, "--help"], capture_output=True, text=True, timeout=60
    )
    assert "\n    python examples/raw_echo_server.py --port 13337\n" in out.stdout, out.stdout
    assert "--verbose" in out.stdout
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, script, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1 and out.stdout == ""
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("error: cannot listen on 127.0.0.1:") and "in use" in out.stderr
