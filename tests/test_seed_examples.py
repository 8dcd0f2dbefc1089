"""The examples of the design notes' patterns run and show what they claim to show.

Each example runs in a fresh interpreter. Server-style examples are started with
``Popen``; their ``READY <port>`` line is read, clients are run against them, and the
server is stopped by pid with a signal (it must exit 0 within a bounded wait; it is
killed in any case at the end of the test).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import match_each

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
#: The examples run without the caller's UCXRPC_* settings, so that defaults are defaults.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("UCXRPC_")}


def run_example(name: str, *args: str, returncode: int = 0) -> list[str]:
    """Run ``examples/<name>`` to completion; its stdout lines (stderr must be empty)."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=ENV,
    )
    assert out.returncode == returncode, out.stdout + out.stderr
    assert out.stderr == "", out.stderr
    return out.stdout.splitlines()


def after(lines: list[str], line: str, count: int) -> list[str]:
    """The ``count`` lines that follow ``line``."""
    i = lines.index(line)
    return lines[i + 1 : i + 1 + count]


class Served:
    """An example run as a server process; threads collect its stdout and stderr."""

    def __init__(self, name: str, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=ENV,
        )
        self.pid = self.popen.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._errors: list[str] = []
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(self.popen.stdout,), daemon=True),
            threading.Thread(target=self._collect, args=(self.popen.stderr,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _collect(self, stream: IO[str]) -> None:
        self._errors.extend(stream)

    def ready(self, timeout: float = 30.0) -> int:
        """Wait for the ``READY <port>`` line; the port."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no READY line within {timeout} s") from None
        if line is None or not line.startswith("READY "):
            self.kill()
            raise AssertionError(f"did not start: {line!r} {''.join(self._errors)}")
        return int(line.split()[1])

    def wait(self, timeout: float = 15.0) -> tuple[int, list[str]]:
        """Wait for the process to exit: its return code and the stdout lines after READY."""
        try:
            returncode = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pid {self.pid} did not exit within {timeout} s") from None
        for thread in self._threads:
            thread.join(timeout=10)
        lines = []
        while (line := self._lines.get(timeout=1)) is not None:
            lines.append(line)
        return returncode, lines

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> list[str]:
        """Stop the process with ``sig``; it must exit 0 with nothing on stderr."""
        os.kill(self.pid, sig)
        returncode, lines = self.wait()
        assert returncode == 0, "\n".join(lines) + "".join(self._errors)
        assert self.stderr == "", self.stderr
        return lines

    @property
    def stderr(self) -> str:
        return "".join(self._errors)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=10)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def serve() -> Iterator[Any]:
    """Start example servers; every one is killed by pid at the end of the test."""
    started: list[Served] = []

    def start(name: str, *args: str) -> Served:
        served = Served(name, *args)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- raw_echo_server.py and raw_echo_client.py -------------------------------------------------


def test_raw_echo_server_answers_the_client_until_sigterm(serve: Any) -> None:
    server = serve("raw_echo_server.py", "--verbose")
    port = server.ready()
    lines = run_example("raw_echo_client.py", f"127.0.0.1:{port}", "--rounds", "20")
    assert lines[0] == f"connected to 127.0.0.1:{port} (endpoint 1)"
    replies = match_each(r"(\S+) -> (\S+) in (\d+\.\d) us", lines[1:4])
    assert [(m[1], m[2]) for m in replies] == [
        ("PING", "PONG"),
        ("ECHO:hello", "REPLY:hello"),
        ("status?", "RECEIVED:status?"),
    ]
    assert all(float(m[3]) > 0 for m in replies)
    match_each(r"ping-pong x20: min \d+\.\d us, p50 \d+\.\d us, max \d+\.\d us", lines[4:5])
    assert lines[5:8] == [
        "messages sent 23 / received 23",
        "bytes sent 101 / received 111",
        "connections 1, errors 0",
    ]

    out = server.stop(signal.SIGTERM)
    assert out[:3] == [
        "endpoint 1 tag 1: 'PING' -> 'PONG'",
        "endpoint 1 tag 2: 'ECHO:hello' -> 'REPLY:hello'",
        "endpoint 1 tag 3: 'status?' -> 'RECEIVED:status?'",
    ]
    assert out[3:23] == ["endpoint 1 tag 1: 'PING' -> 'PONG'"] * 20
    assert out[23:25] == ["answered 23 messages", "messages sent 23 / received 23"]


def test_raw_echo_server_stops_by_itself_after_count_messages(serve: Any) -> None:
    server = serve("raw_echo_server.py", "--count", "3", "--quiet")
    port = server.ready()
    lines = run_example("raw_echo_client.py", f"127.0.0.1:{port}", "--rounds", "0")
    assert [line.split(" in ")[0] for line in lines[1:4]] == [
        "PING -> PONG",
        "ECHO:hello -> REPLY:hello",
        "status? -> RECEIVED:status?",
    ]
    returncode, out = server.wait()
    assert returncode == 0, server.stderr
    assert out[0] == "answered 3 messages"


def test_raw_echo_server_exits_0_on_sigint_without_clients(serve: Any) -> None:
    server = serve("raw_echo_server.py")
    server.ready()
    assert server.stop(signal.SIGINT)[0] == "answered 0 messages"


def test_raw_echo_client_reports_an_unreachable_server() -> None:
    port = free_port()
    lines = run_example("raw_echo_client.py", f"127.0.0.1:{port}", returncode=1)
    assert lines == [f"error: Unavailable: cannot connect to 127.0.0.1:{port}: Connection refused"]


# -- burst.py, timeouts.py, priority.py -------------------------------------------------------


def test_burst() -> None:
    lines = run_example("burst.py")
    assert len(lines) == 7, lines
    for i, what in ((0, "calls"), (3, "raw sends")):
        match_each(
            what + r": 1000 in flight at once, 995 ok, 5 failed \(InvalidArgument x5\) "
            r"in \d+\.\d ms",
            lines[i : i + 1],
        )
    assert lines[1:3] == [
        "  first failure: InvalidArgument: 199 is refused on purpose",
        "  995 of the 995 results are correct",
    ]
    assert lines[4:] == [
        "  first failure: InvalidArgument: no endpoint 999 (connected: 1)",
        "  the receiver got 995 distinct messages, all sent ones: True",
        "  sender stats: 995 messages sent",
    ]


def test_timeouts() -> None:
    lines = run_example("timeouts.py")
    assert len(lines) == 7, lines
    assert lines[:2] == [
        "rpc fetch('a') -> ok: 'value of a'",
        "rpc fetch('missing') -> error: InvalidArgument: no value for 'missing'",
    ]
    waited = match_each(
        r"rpc fetch\('slow'\) -> timed out after 0\.2 s \(waited (\d+\.\d+) s\)", lines[2:3]
    )
    assert lines[3] == "  the server cancelled the slow handler at the deadline"
    assert lines[4] == "raw PING -> ok: b'PONG'"
    assert lines[5].startswith(
        "raw BIG -> error: ResourceExhausted: message of 100000 bytes on tag 2 exceeds the "
        "receive limit of 65536 bytes"
    )
    waited += match_each(r"raw SILENT -> timed out after 0\.2 s \(waited (\d+\.\d+) s\)", lines[6:])
    assert all(0.19 <= float(m[1]) < 2.0 for m in waited), lines


def test_priority() -> None:
    lines = run_example("priority.py")
    assert lines == [
        "rpc: sent LOW, NORMAL, HIGH while 'hold' has the only slot",
        "rpc: calls running or queued on the server: 4",
        "rpc: start order: HIGH, NORMAL, LOW",
        "raw: sent 4 MiB, then LOW, NORMAL, HIGH with send_window=1",
        "raw: arrival order: 4 MiB, HIGH, NORMAL, LOW",
    ]


# -- heartbeat.py, ucx_tuning.py --------------------------------------------------------------


def test_heartbeat_reconnects_after_the_server_restarts() -> None:
    lines = run_example("heartbeat.py")
    assert len(lines) == 10, lines
    [listening] = match_each(r"server listening on 127\.0\.0\.1:(\d+)", lines[:1])
    port = listening[1]
    assert lines[1:5] == [
        "client connected: heartbeat every 0.2 s, answer within 0.5 s",
        "connected: ping -> PONG",
        "a 0.6 s call spanning 3 heartbeats -> done",
        "server stopped",
    ]
    down = match_each(
        r"server down: ping failed in (\d+\.\d) ms with Unavailable "
        r"\((ConnectionLost|Unavailable): .+\)",
        lines[5:7],
    )
    assert float(down[1][1]) < 100.0  # while reconnecting, calls fail at once
    assert lines[7:] == [
        f"server started again on port {port}",
        "client reconnected; reconnects: 1",
        "reconnected: ping -> PONG",
    ]


def test_ucx_tuning() -> None:
    lines = run_example("ucx_tuning.py")
    assert len(lines) == 7, lines
    assert lines[0] == "event loop: uvloop.Loop"
    settings = match_each(
        r"(\w+): progress_mode=(\w+) ucx_options=(\{.*\}) sched_slice_us=(\d+) "
        r"-> p50 (\d+\.\d) us over 200 calls",
        lines[1:4],
    )
    assert [(m[1], m[2], m[3], m[4]) for m in settings] == [
        ("defaults", "blocking", "{}", "100"),
        ("keywords", "polling", "{'TLS': 'tcp,self,sm', 'NET_DEVICES': 'lo'}", "100"),
        ("environment", "efficient", "{'TLS': 'tcp'}", "0"),
    ]
    assert all(float(m[5]) > 0 for m in settings)
    assert lines[4] == "UCX_ prefixes are dropped: {'UCX_TLS': 'tcp'} -> {'TLS': 'tcp'}"
    match_each(
        r"plain handlers run in the thread pool: ucxrpc-handler_\d+; async ones on the "
        r"loop's thread",
        lines[5:6],
    )
    assert lines[6].startswith("an unknown UCX option is refused at start: cannot initialise UCX")


# -- worker_pair.py, peer_to_peer.py ----------------------------------------------------------

CLIENT_LINES = [
    "client: HELLO -> welcome, client",
    "client: NEWS <- news 1 of 2",
    "client: NEWS <- news 2 of 2",
    "client: DATA -> ack 1: 64 bytes",
    "client: DATA -> ack 2: 1024 bytes",
    "client: DATA -> ack 3: 16384 bytes",
    "client: DATA -> ack 4: 100000 bytes",
    "client: DATA -> ack 5: 3 bytes",
    "client: BYE -> got 5 chunks, 117475 bytes",
]
CLIENT_STATS = [
    "  messages sent 7 / received 9",
    "  bytes sent 117,484 / received 146",
    "  connections 1, errors 0",
]


def check_client(lines: list[str], port: int | None = None) -> None:
    connected = [line for line in lines if line.startswith("client: connected to ")]
    assert len(connected) == 1, lines
    if port is not None:
        assert connected == [f"client: connected to 127.0.0.1:{port}"]
    assert [line for line in lines if line.startswith("client: ")][1:-1] == CLIENT_LINES
    assert after(lines, "client: stats:", 3) == CLIENT_STATS


def test_worker_pair_in_one_process() -> None:
    lines = run_example("worker_pair.py")
    check_client(lines)
    bye = "server: endpoint 1 said bye after 5 chunks (117475 bytes); stats so far:"
    assert after(lines, bye, 3) == [
        "  messages sent 9 / received 7",
        "  bytes sent 146 / received 117,484",
        "  connections 1, errors 0",
    ]
    assert "server: stopping; clients served: 1" in lines


def test_worker_pair_serve_and_two_clients(serve: Any) -> None:
    server = serve("worker_pair.py", "serve")
    port = server.ready()
    for _ in range(2):
        check_client(run_example("worker_pair.py", "client", f"127.0.0.1:{port}"), port)
    out = server.stop(signal.SIGINT)
    for endpoint, sent, received in ((1, 9, 7), (2, 18, 14)):
        bye = f"server: endpoint {endpoint} said bye after 5 chunks (117475 bytes); stats so far:"
        assert after(out, bye, 1) == [f"  messages sent {sent} / received {received}"], out
    assert out[-1] == "server: stopping; clients served: 2"


def test_peer_to_peer() -> None:
    lines = run_example("peer_to_peer.py")
    assert len(lines) == 12, lines
    [ports] = match_each(r"alice listens on port (\d+), bob on port (\d+)", lines[:1])
    alice_port, bob_port = ports[1], ports[2]
    assert lines[1:3] == ["alice endpoints: [1, 2]", "bob endpoints: [1, 2]"]
    greetings = sorted(lines[3:7])
    match_each(r".+ on endpoint [12] \((incoming|outgoing), 127\.0\.0\.1:\d+\)", greetings)
    assert [line.split(" on endpoint ")[0] for line in greetings] == [
        "alice <- 'bob thanks alice'",
        "alice <- 'hello from bob'",
        "bob <- 'alice thanks bob'",
        "bob <- 'hello from alice'",
    ]
    # Hellos come in on the endpoint each peer accepted, thanks on the one it connected.
    assert "(incoming" in greetings[1] and "(incoming" in greetings[3]
    assert greetings[0].endswith(f"(outgoing, 127.0.0.1:{bob_port})")
    assert greetings[2].endswith(f"(outgoing, 127.0.0.1:{alice_port})")

    assert lines[7] == "alice broadcast on tag 3: {1: 'sent', 2: 'sent'}"
    copies = match_each(
        r"bob <- 'news for everyone' on endpoint [12] \((incoming|outgoing), .+\)", lines[8:10]
    )
    assert sorted(m[1] for m in copies) == ["incoming", "outgoing"]  # one copy on each
    assert lines[10:] == [
        "alice stats: sent 4, received 2, connections 2, errors 0",
        "bob stats: sent 2, received 4, connections 2, errors 0",
    ]
