"""``ucxrpc shell``: an interactive tool for an RPC server or a messaging endpoint.

Against an RPC server it offers ``call``, ``stream``, ``list`` and ``describe`` (like an
interactive grpcurl); against a messaging endpoint (:mod:`ucxrpc.transport`) the tag
commands: ``send``, ``receive``, ``broadcast``, ``benchmark``... The kind is found by
the handshake: an RPC connection first, and a messaging one when the peer answers
that it is a messaging endpoint.

Commands are read from stdin, one per line (with readline editing and history when
stdin is a terminal). A bad command prints one line and the session goes on; Ctrl-C
cancels the running command (or the line being typed) and Ctrl-D ends the session.

The connections live on an event loop in a second thread, and the main thread reads
the commands: there Ctrl-C arrives as :class:`KeyboardInterrupt`, in the middle of
``input()`` or of the wait for a command, and cancels only that (:class:`_Interrupts`
makes sure it does arrive).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import select
import shlex
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from . import Client, Manager, MethodNotFound, RpcError, ServerDescription
from ._cli_call import (
    build_arguments,
    call_method,
    open_client,
    parse_metadata,
    parse_priority,
    print_methods,
    print_value,
)
from ._cli_common import CliError, console, format_address, load_config, one_line, parse_address

if TYPE_CHECKING:
    from .messaging.worker import Worker

__all__ = [
    "BENCHMARK_TAG",
    "HELP",
    "RPC_HELP",
    "RpcShell",
    "Shell",
    "ShellError",
    "run_shell",
]

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
  quit | exit                    leave (so do Ctrl-D and end of input)
TAGs are integers from 0 to 2**32 - 1 (0x.. for hex). Ctrl-C cancels a command."""

RPC_HELP = """\
commands:
  call METHOD [ARG]... [OPTIONS]    call a method and print its result as JSON
                                    (a streaming method: one item per line)
  stream METHOD [ARG]... [OPTIONS]  the same, as a server stream
  list [--wide]                     the server's methods
  describe [METHOD]                 a method's signature, attributes and JSON
                                    Schemas (no METHOD: the whole description)
  help                              this text
  quit | exit                       leave (so do Ctrl-D and end of input)
ARGs are JSON if they parse as JSON, else strings; quote them as in a shell
('hello world', '{"x": 1}'). OPTIONS: --json JSON (keyword arguments as an
object, or positional ones as an array), --timeout S, --priority P (high,
normal, low or an integer), -m KEY=VALUE (metadata, repeatable).
Ctrl-C cancels the running command."""


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

    prompt = "ucx> "

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
        n = len(results)
        line = f"broadcast {len(data)} bytes on tag {tag} to {n} endpoint{'' if n == 1 else 's'}"
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


class _Commands(Protocol):
    """What the read loop drives: :class:`Shell` or :class:`RpcShell`."""

    prompt: str

    async def execute(self, line: str) -> bool: ...


class RpcShell:
    """The commands of ``ucxrpc shell`` against an RPC server.

    Args:
        client: The connected client.
        address: ``HOST:PORT``, for titles.
        description: What the server serves (None: it does not describe itself).
    """

    prompt = "rpc> "

    def __init__(self, client: Client, address: str, description: ServerDescription | None) -> None:
        self.client = client
        self.address = address
        self.description = description

    async def execute(self, line: str) -> bool:
        """Run one command line; False once the user asked to leave.

        Raises:
            ShellError: Bad input; the message says what was wrong.
            CliError: Bad arguments (as ``ucxrpc call`` says them).
            RpcError: The call failed.
        """
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise ShellError(f"cannot split the line: {exc}") from None
        if not words:
            return True
        name, args = words[0].lower(), words[1:]
        if name in ("quit", "exit"):
            return False
        if name in ("call", "stream"):
            await self.call(args, stream=name == "stream")
        elif name == "list":
            if args not in ([], ["--wide"]):
                raise ShellError("usage: list [--wide]")
            await self.list(wide=bool(args))
        elif name == "describe":
            if len(args) > 1:
                raise ShellError("usage: describe [METHOD]")
            await self.describe(args[0] if args else None)
        elif name == "help":
            _say(RPC_HELP)
        else:
            raise ShellError(f"unknown command {words[0]!r} (try 'help')")
        return True

    async def call(self, args: list[str], *, stream: bool) -> None:
        """``call METHOD [ARG]... [OPTIONS]`` (or ``stream``)."""
        options: dict[str, list[str]] = {"--json": [], "--timeout": [], "--priority": [], "-m": []}
        aliases = {"--metadata": "-m"}
        positional: list[str] = []
        rest = iter(args)
        for word in rest:
            if word == "--":
                positional.extend(rest)
                break
            key = aliases.get(word, word)
            if key in options:
                value = next(rest, None)
                if value is None:
                    raise ShellError(f"{word} needs a value")
                options[key].append(value)
            elif word.startswith("--") and len(word) > 2:
                raise ShellError(f"unknown option {word!r} (try 'help')")
            else:
                positional.append(word)
        if not positional:
            raise ShellError(f"usage: {'stream' if stream else 'call'} METHOD [ARG]... [OPTIONS]")
        method, call_args = positional[0], positional[1:]
        for key in ("--json", "--timeout", "--priority"):
            if len(options[key]) > 1:
                raise ShellError(f"{key} given twice")
        json_text = options["--json"][0] if options["--json"] else None
        timeout: float | None = None
        if options["--timeout"]:
            timeout = _float(options["--timeout"][0], "--timeout")
        priority = parse_priority(options["--priority"][0] if options["--priority"] else None)
        metadata = parse_metadata(options["-m"])
        positional_values, keywords = build_arguments(call_args, json_text)
        info = self.description.get(method) if self.description is not None else None
        names = self.description.names if self.description is not None else []
        await call_method(
            self.client, method, positional_values, keywords,
            kind=None if info is None else info.kind, names=names, timeout=timeout,
            priority=priority, metadata=metadata, stream=stream,
        )  # fmt: skip

    async def _describe(self) -> ServerDescription:
        self.description = await self.client.describe()
        return self.description

    async def list(self, *, wide: bool) -> None:
        """``list [--wide]``: asks the server again (it may have changed)."""
        description = await self._describe()
        title = f"{self.address} (ucxrpc {description.version})"
        print_methods(description, title, wide=wide, schemas=False)

    async def describe(self, method: str | None) -> None:
        """``describe [METHOD]``."""
        description = await self._describe()
        if method is None:
            print_value(description.model_dump(mode="json"))
            return
        info = description.get(method)
        if info is None:
            import difflib

            close = difflib.get_close_matches(method, description.names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ShellError(f"the server has no method {method!r}{hint}")
        from rich.text import Text

        from ._cli_call import narrow_table

        console.print(narrow_table(ServerDescription(version=description.version, methods=[info])))
        doc = info.doc.strip()
        if "\n" in doc:  # the table shows its first line
            console.print(Text(doc))
        print_value({"params": info.params, "result": info.result})


class _Input:
    """Lines from stdin, read on the main thread (where Ctrl-C raises KeyboardInterrupt).

    On a terminal, what is typed while a command runs is read too (:meth:`take`):
    lines typed ahead run next, and Ctrl-D ends the session once the command is done
    (the terminal would drop it when readline takes over again).
    """

    def __init__(self) -> None:
        self.tty = sys.stdin.isatty()
        self.pending: list[str] = []
        self.eof = False
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

    def watched(self) -> int | None:
        """The descriptor to read from while a command runs (terminals only)."""
        return sys.stdin.fileno() if self.tty and not self.eof else None

    def take(self) -> None:
        """Read what was typed while a command ran (a line, or Ctrl-D)."""
        data = os.read(sys.stdin.fileno(), 65536)
        if not data:
            self.eof = True
            return
        text = data.decode(errors="replace")
        self.pending.extend(text.splitlines())

    def line(self, prompt: str) -> str | None:
        """The next line without its newline; None at end of input.

        Raises:
            KeyboardInterrupt: Ctrl-C while the line was typed.
        """
        if self.pending:
            return self.pending.pop(0)
        if self.eof:
            return None
        if self.tty:
            try:
                return input(prompt)
            except EOFError:
                print(flush=True)  # end the prompt's line: the terminal's prompt follows
                return None
        text = sys.stdin.readline()
        return text.rstrip("\r\n") if text else None


def _say(line: str) -> None:
    print(line, flush=True)


def _complain(message: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.stderr.flush()


#: The signal that interrupts the main thread's read after a Ctrl-C; SIGURG because its
#: default action is to ignore it (one sent late, after the shell, does nothing) and
#: nothing else in the process uses it.
_POKE = signal.SIGURG
#: Seconds between two pokes while the main thread has not taken the Ctrl-C yet.
_POKE_EVERY = 0.02
#: Seconds of pokes after one Ctrl-C at most (a Ctrl-C the main thread took before
#: the watcher saw it leads to pokes that find nothing to do, until then).
_POKE_FOR = 2.0


class _Interrupts:
    """Makes every Ctrl-C reach the main thread as :class:`KeyboardInterrupt`, promptly.

    Python runs its SIGINT handler, which raises the :class:`KeyboardInterrupt`, only
    in the main thread and only between bytecodes or when a blocking call fails
    with EINTR. ``input()`` with readline waits in a ``select()`` without timeout
    and checks for signals only when that ``select()`` fails with EINTR
    (``readline_until_enter_or_signal`` in CPython's Modules/readline.c; see
    python/cpython#112585). A SIGINT that lands while the main thread is out of that
    ``select()`` (echoing the character just typed, drawing the prompt) or in
    another thread (OpenBLAS's, started by numpy's import before any mask could be
    set, takes signals too) only marks the handler as due: the ``select()`` then
    waits for the next key, and the prompt does not come back.

    So every SIGINT, in whichever thread, also writes to a wakeup fd
    (:func:`signal.set_wakeup_fd`); a thread reading it sends :data:`_POKE` to the
    main thread, whose handler does nothing, until the SIGINT handler has run: the
    poke fails the ``select()`` with EINTR and readline then raises the
    :class:`KeyboardInterrupt`. A poke is a signal of its own, not SIGINT again,
    so one too many cannot raise a second :class:`KeyboardInterrupt`.
    """

    def __init__(self) -> None:
        self._handled = 0  # SIGINT handler runs, written by the main thread only
        self._main = threading.main_thread().ident
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # set_wakeup_fd wants it so
        self._previous: Any = None
        self._thread = threading.Thread(target=self._watch, name="ucxrpc-shell-sigint", daemon=True)
        self._installed = False

    def install(self) -> None:
        """Take over SIGINT (main thread only; nothing if SIGINT is not Python's)."""
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return  # ignored (started in the background) or someone else's handler
        signal.signal(_POKE, _ignore)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True
        self._thread.start()

    def uninstall(self) -> None:
        """Give SIGINT back and stop the watching thread (bounded)."""
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.set_wakeup_fd(self._previous)
            self._installed = False
            try:
                os.write(self._write, b"\0")  # the watcher's signal to stop
            except BlockingIOError:
                pass  # 64 KiB of signals unread: the daemon thread is left behind
            self._thread.join(timeout=5)
            signal.signal(_POKE, signal.SIG_DFL)
        if not self._thread.is_alive():
            os.close(self._read)
            os.close(self._write)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._handled += 1
        raise KeyboardInterrupt

    def _watch(self) -> None:
        acked = self._handled
        while True:
            data = os.read(self._read, 512)
            if not data or 0 in data:
                return
            if signal.SIGINT not in data:
                continue  # the pokes' own bytes
            # Poke until the handler has run since the last Ctrl-C seen here.
            deadline = time.monotonic() + _POKE_FOR
            while self._handled == acked and self._installed and time.monotonic() < deadline:
                assert self._main is not None
                signal.pthread_kill(self._main, _POKE)
                time.sleep(_POKE_EVERY)
            acked = self._handled


def _ignore(signum: int, frame: Any) -> None:
    """A handler that does nothing: its signal is only there to fail a blocking call."""


#: Seconds a cancelled command may take to unwind before the prompt comes back anyway.
CANCEL_WAIT = 5.0
#: Seconds between checks for Ctrl-C while a command runs (signals reach the main
#: thread only when it runs Python code).
_POLL = 0.1


class _Session:
    """The connection and its event loop, in a thread of their own."""

    def __init__(self, address: str, connect_timeout: float | None) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.commands: _Commands | None = None
        self._ready: concurrent.futures.Future[_Commands] = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="ucxrpc-shell-loop", daemon=True)
        self._error: BaseException | None = None
        # Written when a command ends: the main thread waits on it and on stdin at once.
        self._wake_r, self._wake_w = os.pipe()

    def start(self) -> _Commands:
        """Connect; returns the commands for the kind of peer found.

        Raises:
            CliError: The address is malformed or the peer does not speak ucxrpc.
            RpcError: The connection failed.
        """
        self._thread.start()
        while True:
            done, _ = concurrent.futures.wait([self._ready], timeout=_POLL)
            if done:
                self.commands = self._ready.result()
                return self.commands

    def _run(self) -> None:
        from . import run

        # Ctrl-C is the main thread's business: blocked here (and so in the threads UCX
        # starts from here, which inherit the mask), it interrupts none of the loop's
        # or UCX's system calls. Threads started before this one may still take it:
        # _Interrupts then passes it on to the main thread.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            run(self._main())
        except BaseException as exc:  # reported by start() or close()
            if not self._ready.done():
                self._ready.set_exception(exc)
            else:
                self._error = exc

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        config = load_config(connect_timeout=self.connect_timeout)
        async with Manager(config) as manager:
            commands, close = await _open(manager, self.address)
            try:
                self._ready.set_result(commands)
                await self._stop.wait()
            finally:
                await close()

    def run(self, coro: Coroutine[Any, Any, bool], stdin: _Input) -> bool:
        """Run one command on the loop and wait for it; Ctrl-C cancels it.

        Raises:
            KeyboardInterrupt: The command was cancelled (it has ended, or
                :data:`CANCEL_WAIT` passed).
        """
        loop = self.loop
        assert loop is not None
        # The outcome comes back through a list, an Event read with is_set() and the
        # wake pipe: none takes a lock in this thread, where a KeyboardInterrupt
        # raised while one is held could leave it held for the loop's thread.
        finished = threading.Event()
        outcome: list[tuple[bool, Any]] = []
        tasks: list[asyncio.Task[bool]] = []
        wake = self._wake_w

        def done(task: asyncio.Task[bool]) -> None:  # on the loop
            if task.cancelled():  # by Ctrl-C, or by the loop's end: reported as Ctrl-C's
                outcome.append((False, KeyboardInterrupt()))
            elif (exc := task.exception()) is not None:
                outcome.append((False, exc))
            else:
                outcome.append((True, task.result()))
            finished.set()
            os.write(wake, b"!")

        def start() -> None:  # on the loop
            task = loop.create_task(coro)
            task.add_done_callback(done)
            tasks.append(task)

        def cancel() -> None:  # on the loop, after start(): call_soon keeps the order
            for task in tasks:
                task.cancel()

        loop.call_soon_threadsafe(start)
        try:
            while not finished.is_set():
                fd = stdin.watched()
                fds = [self._wake_r] if fd is None else [self._wake_r, fd]
                ready, _, _ = select.select(fds, [], [], _POLL)
                if self._wake_r in ready:
                    os.read(self._wake_r, 64)
                if fd is not None and fd in ready:
                    stdin.take()
        except KeyboardInterrupt:
            self._cancel(loop, cancel, finished)
            raise
        ok, value = outcome[0]
        if not ok:
            raise value
        return bool(value)

    def _cancel(
        self, loop: asyncio.AbstractEventLoop, cancel: Callable[[], None], finished: threading.Event
    ) -> None:
        """Cancel the running command and wait for it to end (bounded)."""
        deadline = time.monotonic() + CANCEL_WAIT
        asked = False
        while not finished.is_set() and time.monotonic() < deadline:
            try:
                if not asked:
                    loop.call_soon_threadsafe(cancel)  # twice is harmless
                    asked = True
                select.select([self._wake_r], [], [], _POLL)
            except KeyboardInterrupt:
                if asked:
                    return  # a second Ctrl-C: stop waiting for it

    def close(self) -> None:
        """Close the connection and stop the loop (bounded)."""
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass  # the loop has already ended
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)


async def _open(manager: Manager, address: str) -> tuple[_Commands, Callable[[], Awaitable[None]]]:
    """Connect to ``address`` as an RPC client, or as a messaging endpoint if it is one.

    Returns:
        The commands for that kind of peer and how to close the connection.
    """
    try:
        client = await open_client(manager, address)
    except MethodNotFound:  # the peer says it is a messaging endpoint, not an RPC server
        return await _open_messaging(manager, address)
    try:
        description: ServerDescription | None = await client.describe()
    except RpcError:
        description = None  # a server that does not describe itself: call still works
    methods = "" if description is None else f", {len(description.methods)} methods"
    version = "" if description is None else f" {description.version}"
    _say(f"connected to {address}: ucxrpc server{version}{methods}")
    return RpcShell(client, address, description), client.close


async def _open_messaging(
    manager: Manager, address: str
) -> tuple[_Commands, Callable[[], Awaitable[None]]]:
    from .messaging.worker import Worker, WorkerConfig

    host, port = parse_address(address)
    worker = Worker(WorkerConfig(), manager=manager)
    shell = Shell(worker, _say)
    try:
        await shell.connect([format_address(host, port)])
    except (OSError, TimeoutError) as exc:  # RpcErrors already say where
        await worker.close_all()
        raise CliError(f"cannot connect to {address}: {exc}") from None
    except BaseException:
        await worker.close_all()
        raise
    return shell, worker.close_all


def run_shell(address: str, *, connect_timeout: float | None = None) -> int:
    """Connect to ``HOST:PORT`` and run commands from stdin until quit or end of input.

    Returns:
        The exit status: 0.

    Raises:
        CliError: ``address`` is malformed, or the peer does not speak ucxrpc.
        RpcError: The first connection failed.
    """
    parse_address(address)
    session = _Session(address, connect_timeout)
    interrupts = _Interrupts()
    try:
        commands = session.start()
        interrupts.install()
        stdin = _Input()
        if stdin.tty:
            _say("type 'help' for the commands; Ctrl-C cancels one, Ctrl-D leaves")
        try:
            _loop(session, commands, stdin)
        finally:
            stdin.save()
    finally:
        interrupts.uninstall()
        session.close()
    return 0


def _loop(session: _Session, commands: _Commands, stdin: _Input) -> None:
    prompt = commands.prompt if stdin.tty else ""
    while True:
        try:
            if not _step(session, commands, stdin, prompt):
                return
        except KeyboardInterrupt:  # between two reads, or while one was reported
            continue


def _step(session: _Session, commands: _Commands, stdin: _Input, prompt: str) -> bool:
    """Read and run one command; False once the session is over."""
    try:
        line = stdin.line(prompt)
    except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line typed so far
        print(flush=True)
        return True
    if line is None:
        return False
    try:
        return session.run(commands.execute(line), stdin)
    except KeyboardInterrupt:
        _complain("cancelled")
    except (ShellError, CliError, RpcError) as exc:
        _complain(str(exc))
    except Exception as exc:  # one failed command must not end the session
        _complain(f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc))
    return True
