"""The ``ucxrpc`` command, run as installed, in subprocesses against real servers."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
APP = "tests.helpers.cli_app:server"
_installed = shutil.which("ucxrpc", path=str(Path(sys.executable).parent))
COMMAND = [_installed] if _installed else [sys.executable, "-m", "ucxrpc.cli"]
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def ucxrpc(
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the command to completion (bounded)."""
    return subprocess.run(
        [*COMMAND, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**ENV, **(env or {})},
    )


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The next stdout line of ``proc``, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output within {timeout} s")
    return proc.stdout.readline()


def one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line on stderr, and no traceback."""
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


class Procs:
    """Processes started by a test; every one is stopped by pid at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=ENV,
        )
        self.procs.append(proc)
        return proc

    def serve(self, *options: str) -> tuple[subprocess.Popen[str], str]:
        """Start ``ucxrpc serve`` and return it with the address it serves on."""
        proc = self.start(*COMMAND, "serve", APP, "--port", "0", *options)
        line = read_line(proc)
        if not line.startswith(f"serving {APP} on "):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"serve did not start: {line!r} {err}")
        return proc, line.split()[-1]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    """One ``ucxrpc serve`` shared by the tests that only call it."""
    p = Procs()
    try:
        _, addr = p.serve()
        yield addr
    finally:
        p.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- call ---------------------------------------------------------------------------------------


def test_call_positional_arguments_are_json_or_strings(address: str) -> None:
    out = ucxrpc("call", address, "add", "2", "3")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == 5
    out = ucxrpc("call", address, "echo", "ECHO:hello world")
    assert json.loads(out.stdout) == "REPLY:hello world"
    out = ucxrpc("call", address, "ping")
    assert (out.returncode, json.loads(out.stdout), out.stderr) == (0, "PONG", "")


def test_call_with_json_keywords_options_and_metadata(address: str) -> None:
    out = ucxrpc("call", address, "norm", "--json", '{"p": {"x": 3, "y": -4}}')
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"x": 3, "y": -4, "l1": 7}
    out = ucxrpc("call", address, "add", "--json", "[40, 2]", "--priority", "high")
    assert json.loads(out.stdout) == 42
    out = ucxrpc(
        "call", address, "metadata_echo", "-m", "user=ann", "--metadata", "trace=1=2",
        "--timeout", "5", "--priority", "7",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"user": "ann", "trace": "1=2"}
    out = ucxrpc("call", address, "blob", "bytes back")
    assert json.loads(out.stdout) == "bytes back"


def test_call_a_stream_prints_one_item_per_line(address: str) -> None:
    out = ucxrpc("call", address, "count", "4")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fail", "boom"], "error: [UNKNOWN] ValueError: boom"),
        (["pnig"], "did you mean 'ping'?"),
        (["add", "x", "y"], "[INVALID_ARGUMENT] a:"),
        (["sleep", "2", "--timeout", "0.2"], "[DEADLINE_EXCEEDED]"),
        (["add", "--json", "{a"], "error: --json is not valid JSON"),
        (["add", "--json", "3"], "error: --json must be an object"),
        (["ping", "--priority", "urgent"], "error: priority must be high, normal, low"),
        (["ping", "-m", "novalue"], "error: metadata must be KEY=VALUE"),
    ],
)
def test_call_errors_are_one_line(address: str, args: list[str], expected: str) -> None:
    line = one_error_line(ucxrpc("call", address, *args))
    assert expected in line


@pytest.mark.parametrize("where", ["nohost", "127.0.0.1:http", "127.0.0.1:70000"])
def test_bad_address_is_one_line(where: str) -> None:
    line = one_error_line(ucxrpc("call", where, "ping"))
    assert "expected HOST:PORT" in line


def test_unreachable_server_is_one_line() -> None:
    line = one_error_line(ucxrpc("call", f"127.0.0.1:{free_port()}", "ping"))
    assert "[UNAVAILABLE]" in line


# -- list, bench, info --------------------------------------------------------------------------


def test_list_shows_every_method(address: str) -> None:
    out = ucxrpc("list", address)
    assert out.returncode == 0, out.stderr
    for text in ("add", "count", "stream of int", "a: int, b: int = 1", "data: bytes", "p: Point"):
        assert text in out.stdout, out.stdout
    assert "Add two integers." in out.stdout
    assert "client_stream" in out.stdout and "numbers: stream of int" in out.stdout
    out = ucxrpc("list", address, "--schemas")
    assert '"required"' in out.stdout
    out = ucxrpc("list", address, "--json")
    description = json.loads(out.stdout)
    names = [m["name"] for m in description["methods"]]
    assert {"ping", "echo", "count", "ucxrpc.describe"} <= set(names)


def test_call_of_a_client_streaming_method_says_why_it_cannot(address: str) -> None:
    out = ucxrpc("call", address, "total", "1")
    assert out.returncode == 1
    assert "'total' takes a stream of items (client_stream)" in out.stderr, out.stderr


def test_bench_writes_json_and_a_plot(address: str, tmp_path: Path) -> None:
    numbers, plot = tmp_path / "bench.json", tmp_path / "latency.png"
    out = ucxrpc(
        "bench", address, "--duration", "1", "--concurrency", "4",
        "--json", str(numbers), "--plot", str(plot),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "calls/s" in out.stdout and "p99" in out.stdout
    data = json.loads(numbers.read_text())
    assert data["method"] == "ping" and data["concurrency"] == 4
    assert data["calls"] > 0 and data["errors"] == 0 and data["calls_per_s"] > 0
    lat = data["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_with_a_size_picks_a_bytes_method(address: str, tmp_path: Path) -> None:
    numbers = tmp_path / "bench.json"
    out = ucxrpc("bench", address, "--duration", "0.5", "--size", "4096", "--json", str(numbers))
    assert out.returncode == 0, out.stderr
    data = json.loads(numbers.read_text())
    assert (data["method"], data["size"]) == ("blob", 4096)
    assert data["mib_per_s"] > 0


def test_bench_rejects_a_stream(address: str) -> None:
    assert "streaming" in one_error_line(ucxrpc("bench", address, "--method", "count"))


def test_bench_needs_an_address_unless_it_compares(address: str) -> None:
    assert "HOST:PORT" in one_error_line(ucxrpc("bench"))
    assert "no HOST:PORT" in one_error_line(ucxrpc("bench", address, "--compare"))


@pytest.mark.timeout(300)
def test_bench_compare_measures_ucxrpc_beside_its_peers_in_one_run(tmp_path: Path) -> None:
    numbers = tmp_path / "compare.json"
    out = ucxrpc("bench", "--compare", "--quick", "--json", str(numbers), timeout=280)
    assert out.returncode == 0, out.stderr
    data = json.loads(numbers.read_text())
    rows = data["results"]
    for system in ("ucxrpc", "ucxrpc-tcp", "msgpack-rpc", "raw-ucxx"):
        assert rows[system]["p50_us"] > 0, (system, data.get("skipped"))
    assert "| system | p50 µs |" in out.stdout
    assert numbers.with_suffix(".png").exists() or "matplotlib" in out.stdout


def test_info_json() -> None:
    out = ucxrpc("info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["ucxrpc"] and info["ucx"]["version"].count(".") >= 1
    assert "tcp" in info["ucx"]["transports"]
    assert info["config"]["progress_mode"] == {
        "value": "blocking",
        "source": "default",
        "description": info["config"]["progress_mode"]["description"],
    }


def test_info_reads_the_environment() -> None:
    out = ucxrpc("info", "--json", env={"UCXRPC_MAX_INFLIGHT": "7"})
    inflight = json.loads(out.stdout)["config"]["max_inflight"]
    assert (inflight["value"], inflight["source"]) == (7, "UCXRPC_MAX_INFLIGHT")
    line = one_error_line(ucxrpc("info", env={"UCXRPC_MAX_INFLIGHT": "-1"}))
    assert "UCXRPC_MAX_INFLIGHT" in line


# -- serve --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_drains_calls_in_flight_on_a_signal(
    procs: Procs, tmp_path: Path, sig: signal.Signals
) -> None:
    server, addr = procs.serve("--grace", "10")
    marker = tmp_path / "entered"
    caller = procs.start(*COMMAND, "call", addr, "hold", str(marker), "1.0")
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "the call never reached the handler"
        assert caller.poll() is None, caller.communicate()
        time.sleep(0.02)
    server.send_signal(sig)
    assert server.wait(timeout=30) == 0
    out, err = caller.communicate(timeout=30)
    assert (caller.returncode, json.loads(out)) == (0, "DONE"), err
    assert "Traceback" not in server.communicate(timeout=10)[1]


def test_serve_with_metrics(procs: Procs) -> None:
    server, addr = procs.serve("--metrics-port", "0")
    # Printed right after the serving line: it may sit in the pipe's read buffer already,
    # where select() does not see it (bounded by the test's timeout).
    assert server.stdout is not None
    line = server.stdout.readline()
    assert line.startswith("metrics on http://127.0.0.1:"), line
    url = line.split()[-1]
    assert ucxrpc("call", addr, "ping").returncode == 0
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    assert 'ucxrpc_calls_total{method="ping",side="server"} 1.0' in text
    server.terminate()
    assert server.wait(timeout=30) == 0


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("tests.helpers.cli_app", "expected MODULE:ATTR"),
        ("no_such_module:server", "cannot import 'no_such_module'"),
        ("tests.helpers.cli_app:nothing", "has no attribute 'nothing'"),
        ("tests.helpers.cli_app:Point", "must be a Server or take no arguments"),
        ("tests.helpers.cli_app:add", "must be a Server or take no arguments"),
        ("json:dumps", "must be a Server or take no arguments"),
    ],
)
def test_serve_errors_are_one_line(target: str, expected: str) -> None:
    assert expected in one_error_line(ucxrpc("serve", target))


def test_serve_rejects_a_bad_mode() -> None:
    assert "unknown progress mode" in one_error_line(ucxrpc("serve", APP, "--mode", "turbo"))


# -- shell --------------------------------------------------------------------------------------


@pytest.fixture
def raw_echo(spawn: Any) -> str:
    """The raw echo peer (``ucxrpc.transport``), as HOST:PORT."""
    # Quiet: nobody reads its stdout once it is ready.
    proc = spawn(str(ROOT / "examples" / "raw_echo_server.py"), "--quiet")
    (port,) = proc.read_ready()
    return f"127.0.0.1:{port}"


def test_shell_over_the_tag_layer(raw_echo: str) -> None:
    script = "\n".join(
        [
            "send 1 7 PING",
            "receive 1 7",
            "send 1 7 ECHO:hello world",
            "receive 1 7 5",
            "send 1 9 hi",
            "recv 1 9",
            "frobnicate",
            "send 1 7",
            "send one 7 PING",
            "send 1 x PING",
            "send 42 7 PING",
            "receive 1 8 0.2",
            "broadcast 3 PING",
            "receive 1 3",
            "benchmark 1 200 32",
            "stats",
            "help",
            "quit",
            "send 1 7 never sent",
        ]
    )
    out = ucxrpc("shell", raw_echo, stdin=script + "\n")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"connected to {raw_echo}: endpoint 1"
    assert "received from endpoint 1 on tag 7: PONG" in lines
    assert "received from endpoint 1 on tag 7: REPLY:hello world" in lines
    assert "received from endpoint 1 on tag 9: RECEIVED:hi" in lines
    assert "received from endpoint 1 on tag 3: PONG" in lines
    assert any(line == "broadcast 4 bytes on tag 3 to 1 endpoint" for line in lines)
    bench = next(line for line in lines if line.startswith("benchmark:"))
    assert "200 round trips" in bench and "p50" in bench and "msgs/s" in bench
    assert "messages sent 204 / received 204" in lines
    assert "never sent" not in out.stdout
    errors = out.stderr.splitlines()
    assert errors == [
        "error: unknown command 'frobnicate' (try 'help')",
        "error: usage: send ID TAG MESSAGE...",
        "error: ID must be an integer, got 'one'",
        "error: TAG must be an integer, got 'x'",
        "error: unknown endpoint id 42 (connected: 1)",
        errors[5],
    ]
    assert errors[5].startswith("error: [DEADLINE_EXCEEDED]") and "tag 8" in errors[5]


def test_shell_connects_again_and_ends_at_end_of_input(raw_echo: str) -> None:
    script = f"connect {raw_echo}\nsend 2 5 PING\nreceive 2 5\nconnect nowhere\n"
    out = ucxrpc("shell", raw_echo, stdin=script)
    assert out.returncode == 0, out.stderr
    assert f"connected to {raw_echo}: endpoint 2" in out.stdout
    assert "received from endpoint 2 on tag 5: PONG" in out.stdout
    assert out.stderr.startswith("error: expected HOST:PORT")


def test_shell_cannot_connect() -> None:
    line = one_error_line(ucxrpc("shell", f"127.0.0.1:{free_port()}", stdin=""))
    assert "cannot connect" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("call",), "Missing argument 'HOST:PORT'"),
        (("call", "127.0.0.1:1", "ping", "--timeout", "abc"), "Invalid value for '--timeout'"),
        (("nope",), "No such command 'nope'"),
    ],
)
def test_usage_mistakes_print_one_line(args: tuple[str, ...], expected: str) -> None:
    out = ucxrpc(*args)
    assert out.returncode == 2
    assert expected in one_error_line(out)
