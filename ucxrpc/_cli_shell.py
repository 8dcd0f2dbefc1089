"""``ucxrpc shell``: an interactive tool over the tag-messaging layer (:mod:`ucxrpc.transport`).

Commands are read from stdin, one per line (with readline editing and history when
stdin is a terminal). A bad command prints one line and the session goes on.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from . import Manager, RpcError
from ._cli_common import CliError, format_address, load_config, one_line, parse_address

if TYPE_CHECKING:
    from .messaging.worker import Worker

__all__ = ["HELP", "BENCHMARK_TAG", "Shell", "run_shell"]

#: The tag ``benchmark`` sends its ECHO messages on.
BENCHMARK_TAG = 0xBE7C
#: Seconds ``receive`` waits when no timeout is given.
RECEIVE_TIMEOUT = 5.0
HISTORY_FILE = os.path.expanduser("~/.ucxrpc_history")

HELP = """\
commands:
  connect HOST:PORT              connect to another peer (prints its endpoint id)
  send ID TAG MESSAGE...         send MESSAGE to endpoint ID on TAG
  receive ID TAG [TIMEOUT]       wait for a message from endpoint ID on TAG (default 5 s)
  next [TIMEOUT]                 wait for the next message from any endpoint on any tag
  broadcast TAG MESSAGE...       send MESSAGE on TAG to every connected endpoint
  endpoints                      list the connected endpoint ids
  disconnect ID                  close endpoint ID
  stats                          messages, bytes, throughput and rate so far
  benchmark ID [COUNT] [SIZE]    COUNT round trips of ECHO:<SIZE bytes> (default 1000, 64)
  help                           this text
  quit | exit                    leave (so does end of input)
TAGs are integers from 0 to 2**32 - 1 (0x.. for hex)."""


class ShellError(Exception):
    """Bad input for one command: printed as one line, the shell goes on."""


def _int(text: str, what: str, *, low: int = 0, high: int | None = None) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ShellError(f"{what} must be an integer, got {text!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ShellError(f"{what} must be {bound}, got {value}")
    return value


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ShellError(f"{what} must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise ShellError(f"{what} must be positive, got {text}")
    return value


def _tag(text: str) -> int:
    from .messaging.worker import MAX_TAG

    return _int(text, "TAG", high=MAX_TAG)


def _show(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return text if text.isprintable() else repr(data)


class Shell:
    """The commands of ``ucxrpc shell`` over one :class:`~ucxrpc.transport.Worker`.

    Args:
        worker: The worker to drive.
        write: Where output lines go.
    """

    def __init__(self, worker: Worker, write: Callable[[str], None]) -> None:
        self.worker = worker
        self.write = write
        self.commands: dict[str, tuple[Callable[[list[str]], Awaitable[None]], int, int]] = {
            # name: (handler, least and most arguments; -1: the rest of the line is one)
            "connect": (self.connect, 1, 1),
            "send": (self.send, 3, -1),
            "receive": (self.receive, 2, 3),
            "recv": (self.receive, 2, 3),
            "next": (self.next, 0, 1),
            "broadcast": (self.broadcast, 2, -1),
            "endpoints": (self.endpoints, 0, 0),
            "disconnect": (self.disconnect, 1, 1),
            "stats": (self.stats, 0, 0),
            "benchmark": (self.benchmark, 1, 3),
            "help": (self.help, 0, 0),
        }
        self.usage = {
            line.split()[0]: line.strip().split("  ")[0]
            for line in HELP.splitlines()[1:]
            if line.startswith("  ")
        }
        self.usage["recv"] = self.usage["receive"].replace("receive", "recv")

    async def execute(self, line: str) -> bool:
        """Run one command line; False once the user asked to leave.

        Raises:
            ShellError: Bad input; the message says what was wrong.
        """
        words = line.split(maxsplit=1)
        if not words or words[0].startswith("#"):
            return True
        name = words[0].lower()
        if name in ("quit", "exit"):
            return False
        if name not in self.commands:
            raise ShellError(f"unknown command {words[0]!r} (try 'help')")
        handler, least, most = self.commands[name]
        rest = words[1] if len(words) > 1 else ""
        # The message is the rest of the line, its spacing kept.
        args = rest.split(maxsplit=least - 1) if most == -1 else rest.split()
        if len(args) < least or (most != -1 and len(args) > most):
            raise ShellError(f"usage: {self.usage[name]}")
        await handler(args)
        return True

    def _endpoint(self, text: str) -> int:
        ep = _int(text, "ID")
        known = self.worker.endpoint_ids()
        if ep not in known:
            ids = ", ".join(str(i) for i in sorted(known)) or "none"
            raise ShellError(f"unknown endpoint id {ep} (connected: {ids})")
        return ep

    async def connect(self, args: list[str]) -> None:
        """``connect HOST:PORT``."""
        try:
            host, port = parse_address(args[0])
        except CliError as exc:
            raise ShellError(str(exc)) from None
        ep = await self.worker.connect(host, port)
        self.write(f"connected to {format_address(host, port)}: endpoint {ep}")

    async def send(self, args: list[str]) -> None:
        """``send ID TAG MESSAGE...``."""
        ep, tag, data = self._endpoint(args[0]), _tag(args[1]), args[2].encode()
        await self.worker.send_tag(ep, tag, data)
        self.write(f"sent {len(data)} bytes to endpoint {ep} on tag {tag}")

    async def receive(self, args: list[str]) -> None:
        """``receive ID TAG [TIMEOUT]``."""
        ep, tag = self._endpoint(args[0]), _tag(args[1])
        timeout = _float(args[2], "TIMEOUT") if len(args) > 2 else RECEIVE_TIMEOUT
        # A timeout raises DeadlineExceeded, whose message names the tags that do
        # have messages waiting.
        data = await self.worker.recv_tag(ep, tag, timeout=timeout)
        self.write(f"received from endpoint {ep} on tag {tag}: {_show(data)}")

    async def next(self, args: list[str]) -> None:
        """``next [TIMEOUT]``."""
        timeout = _float(args[0], "TIMEOUT") if args else RECEIVE_TIMEOUT
        ep, msg = await self.worker.next_message(timeout=timeout)
        self.write(f"received from endpoint {ep} on tag {msg.tag}: {_show(bytes(msg.data))}")

    async def broadcast(self, args: list[str]) -> None:
        """``broadcast TAG MESSAGE...``."""
        tag, data = _tag(args[0]), args[1].encode()
        results = await self.worker.broadcast_tag(tag, data)
        failed = {ep: exc for ep, exc in results.items() if exc is not None}
        line = f"broadcast {len(data)} bytes on tag {tag} to {len(results)} endpoints"
        if failed:
            line += "; failed: " + ", ".join(f"{ep}: {exc}" for ep, exc in failed.items())
        self.write(line)

    async def endpoints(self, args: list[str]) -> None:
        """``endpoints``."""
        ids = sorted(self.worker.endpoint_ids())
        self.write("endpoints: " + (", ".join(str(i) for i in ids) if ids else "none"))

    async def disconnect(self, args: list[str]) -> None:
        """``disconnect ID``."""
        ep = self._endpoint(args[0])
        await self.worker.disconnect(ep)
        self.write(f"disconnected endpoint {ep}")

    async def stats(self, args: list[str]) -> None:
        """``stats``."""
        self.write(self.worker.stats().summary())

    async def benchmark(self, args: list[str]) -> None:
        """``benchmark ID [COUNT] [SIZE]``: ECHO round trips, each awaited."""
        ep = self._endpoint(args[0])
        count = _int(args[1], "COUNT", low=1, high=10_000_000) if len(args) > 1 else 1000
        size = _int(args[2], "SIZE", high=64 << 20) if len(args) > 2 else 64
        payload = b"x" * size
        message, expected = b"ECHO:" + payload, b"REPLY:" + payload
        worker, tag, pc = self.worker, BENCHMARK_TAG, time.perf_counter_ns
        rtt: list[float] = []
        start = pc()
        for i in range(count):
            t = pc()
            await worker.send_tag(ep, tag, message)
            try:
                reply = await worker.recv_tag(
                    ep, tag, max_size=len(expected), timeout=RECEIVE_TIMEOUT
                )
            except TimeoutError:
                raise ShellError(
                    f"benchmark: no reply to message {i + 1} within {RECEIVE_TIMEOUT:g} s "
                    "(the peer must answer ECHO:x with REPLY:x)"
                ) from None
            rtt.append((pc() - t) / 1000)
            if bytes(reply) != expected:
                raise ShellError(f"benchmark: unexpected reply {_show(bytes(reply)[:40])}")
        elapsed = (pc() - start) / 1e9
        rtt.sort()
        p50, p99 = rtt[len(rtt) // 2], rtt[min(len(rtt) - 1, int(len(rtt) * 0.99))]
        self.write(
            f"benchmark: {count} round trips of {len(message)} bytes to endpoint {ep}: "
            f"p50 {p50:.1f} µs, p99 {p99:.1f} µs, {count / elapsed:,.0f} msgs/s"
        )

    async def help(self, args: list[str]) -> None:
        """``help``."""
        self.write(HELP)


class _Input:
    """Lines from stdin without blocking the event loop.

    Each line is read by a daemon thread, so a read still pending when the shell ends
    (Ctrl-C, an error) does not keep the process alive.
    """

    def __init__(self) -> None:
        self.tty = sys.stdin.isatty()
        if self.tty:
            try:
                import readline

                readline.set_history_length(1000)
                if os.path.exists(HISTORY_FILE):
                    readline.read_history_file(HISTORY_FILE)
            except (ImportError, OSError):
                pass

    def save(self) -> None:
        """Keep the history for the next session (terminals only)."""
        if self.tty:
            try:
                import readline

                readline.write_history_file(HISTORY_FILE)
            except (ImportError, OSError):
                pass

    async def line(self, prompt: str) -> str | None:
        """The next line without its newline; None at end of input."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str | None] = loop.create_future()

        def deliver(value: str | None) -> None:
            if not fut.done():
                fut.set_result(value)

        def read() -> None:
            value: str | None
            try:
                if self.tty:
                    value = input(prompt)
                else:
                    text = sys.stdin.readline()
                    value = text.rstrip("\r\n") if text else None
            except EOFError:
                value = None
            loop.call_soon_threadsafe(deliver, value)

        threading.Thread(target=read, name="ucxrpc-shell-input", daemon=True).start()
        return await fut


def _say(line: str) -> None:
    print(line, flush=True)


def _complain(message: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.stderr.flush()


async def run_shell(address: str) -> None:
    """Connect to ``HOST:PORT`` and run commands from stdin until quit or end of input.

    Raises:
        CliError: ``address`` is malformed.
        RpcError: The first connection failed.
    """
    from .messaging.worker import Worker, WorkerConfig

    host, port = parse_address(address)
    async with Manager(load_config()) as manager:
        worker = Worker(WorkerConfig(), manager=manager)
        try:
            shell = Shell(worker, _say)
            try:
                await shell.connect([format_address(host, port)])
            except (OSError, TimeoutError) as exc:  # RpcErrors already say where
                raise CliError(f"cannot connect to {address}: {exc}") from None
            stdin = _Input()
            if stdin.tty:
                _say("type 'help' for the commands")
            try:
                while (line := await stdin.line("ucx> ")) is not None:
                    try:
                        if not await shell.execute(line):
                            break
                    except (ShellError, RpcError) as exc:
                        _complain(str(exc))
                    except Exception as exc:  # one failed command must not end the session
                        _complain(f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc))
            finally:
                stdin.save()
        finally:
            await worker.close_all()
