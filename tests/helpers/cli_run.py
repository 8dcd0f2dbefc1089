"""Running the installed ``ucxrpc`` command the way a user does, for the CLI tests."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).parent.parent.parent
#: The console script pip installed beside the interpreter: what a user runs.
UCXRPC = str(Path(sys.executable).with_name("ucxrpc"))
APP = "tests.helpers.cli_app:server"
#: An 80-column terminal, no colour (the tables are compared as text).
ENV = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"}


def ucxrpc(
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the command to completion (bounded), in an 80-column environment."""
    return subprocess.run(
        [UCXRPC, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**ENV, **(env or {})},
    )


def one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line on stderr, and no traceback."""
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stdout + out.stderr, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The next stdout line of ``proc``, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output within {timeout} s")
    return proc.stdout.readline()


class Procs:
    """Processes started by a test; every one is stopped by pid at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            list(args),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=ENV,
        )
        self.procs.append(proc)
        return proc

    def serve(self, target: str = APP, *options: str) -> tuple[subprocess.Popen[str], str]:
        """Start ``ucxrpc serve`` and return it with the address it serves on."""
        proc = self.start(UCXRPC, "serve", target, "--port", "0", *options)
        line = read_line(proc)
        if not line.startswith(f"serving {target} on "):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"serve did not start: {line!r} {err}")
        return proc, line.split()[-1]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def tcp_peer(greeting: bytes | None) -> Iterator[str]:
    """A plain TCP server that accepts and sends ``greeting`` (None: says nothing).

    Yields its ``HOST:PORT``; connections stay open until the block ends.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conns.append(conn)
            if greeting is not None:
                conn.sendall(greeting)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in conns:
            conn.close()
        listener.close()


def elapsed(start: float) -> float:
    return time.monotonic() - start


#: Runs a command as the leader of a new session whose controlling terminal is its
#: stdin (a pty): Ctrl-C typed there then reaches it as SIGINT, as in a terminal.
_ON_A_TERMINAL = (
    "import os, sys; os.setsid(); os.close(os.open(os.ttyname(0), os.O_RDWR)); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class Terminal:
    """A command on a pseudo-terminal: type into it, read what it shows.

    Args:
        args: The command line.
        env: More environment variables (``HOME`` for the shell's history file).
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        import pty

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ON_A_TERMINAL, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            env={**ENV, "TERM": "dumb", **(env or {})},
        )
        os.close(slave)
        self.output = ""
        self._seen = 0

    def type(self, text: str) -> None:
        """Type ``text`` (``\\x03`` is Ctrl-C, ``\\x04`` Ctrl-D)."""
        os.write(self.master, text.encode())

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the command has exited and closed the terminal
            return False
        if not data:
            return False
        self.output += data.decode(errors="replace").replace("\r\n", "\n")
        return True

    def expect(self, text: str, timeout: float = 30.0) -> str:
        """Wait until ``text`` shows after what earlier calls saw; returns the output
        up to and including it."""
        deadline = time.monotonic() + timeout
        while True:
            at = self.output.find(text, self._seen)
            if at >= 0:
                seen, self._seen = self._seen, at + len(text)
                return self.output[seen : self._seen]
            left = deadline - time.monotonic()
            read = left > 0 and self._read(min(left, 0.5))
            if not read and (left <= 0 or self.proc.poll() is not None):
                raise AssertionError(f"{text!r} did not show; output so far:\n{self.output}")

    def wait(self, timeout: float = 30.0) -> int:
        """The exit status, the output drained."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0.1):
            pass
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        os.close(self.master)
