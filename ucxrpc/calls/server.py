"""The server: a handler table, connection handling, scheduling and deadlines."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import secrets
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ..errors import (
    DeadlineExceeded,
    InsecureWarning,
    InvalidArgument,
    MethodNotFound,
    ProtocolError,
    RemoteError,
    ResourceExhausted,
    RpcError,
    Unavailable,
    error_payload,
)
from ..io.control import KEY_SIZE, answer, listen, refuse, serve_control
from ..io.engine import Engine
from ..io.link import Link
from ..io.runtime import is_loopback
from ..io.sched import PriorityLimiter
from ..io.timers import Timers
from ..protocol.starts import StartQueue
from ..wire import codec
from ..wire.codec import Flags, Kind
from .context import CallContext, enter
from .handlers import Handler, Priority, make_handler
from .health import HEALTH_METHODS, Health, health_methods
from .interceptors import Interceptor, run_chain
from .reflection import DESCRIBE_METHOD, describe
from .service import Service, rpc_methods, rpc_options
from .stream import Credit, InputStream
from .values import from_array, to_wire

if TYPE_CHECKING:
    from ..io.runtime import Runtime

__all__ = ["Priority", "Server"]

log = logging.getLogger("ucxrpc.server")
# Plain ints: an IntFlag operation costs microseconds on every call.
_INPUT_STREAM = int(Flags.INPUT_STREAM)
#: Stream items a server may send ahead of the consumer when the client names none.
DEFAULT_WINDOW = 16
#: The largest stream window (and credit grant) accepted.
MAX_WINDOW = 1 << 16
#: Seconds a cancelled call may take to end (its ``finally`` blocks) before its
#: connection is closed without it: a handler that catches CancelledError and goes on
#: must not hold up ``stop()`` or the cleanup of a dead client for as long as it runs.
CANCEL_WAIT = 0.5
F = TypeVar("F", bound=Callable[..., Any])


class Server:
    """Serves registered functions to ucxrpc clients.

    Args:
        max_concurrency: Handlers that may run at once across all connections; calls
            beyond it wait and start in priority order (FIFO within a priority).
            ``None`` means no limit.
        interceptors: Server interceptors, outermost first (see
            :mod:`ucxrpc.interceptors`).
    """

    def __init__(
        self,
        *,
        max_concurrency: int | None = 1024,
        interceptors: Sequence[Interceptor] = (),
    ) -> None:
        self._handlers: dict[str, Handler] = {}
        self._interceptors: list[Interceptor] = list(interceptors)
        self._gone_bytes = [0, 0]  # sent, received by connections already closed
        #: The serving status of the server and of its services (:class:`Health`).
        self.health = Health()
        self._add_builtin_methods()
        self._limiter = PriorityLimiter(max_concurrency)
        #: Calls delivered but not started yet, of every connection (see START_BUDGET).
        self._starts: StartQueue[_Queued] = StartQueue(START_BUDGET, SHARED_START_BUDGET)
        self._turn_pending = False
        self._turn_on: Engine | None = None
        self._manager: Runtime | None = None
        # The deadlines of running handlers (one loop timer for all: see io.timers).
        self._timers: Timers | None = None
        self._tcp: asyncio.Server | None = None
        self._conns: set[_ServerConn] = set()
        self._accepting: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        # The accepted connections whose handshake has not ended, oldest first.
        self._handshaking: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._stopped: asyncio.Event | None = None
        self._draining = False
        self._port = 0
        self._host = ""

    # -- registration -----------------------------------------------------------------------

    @overload
    def rpc(self, func: F, /) -> F: ...

    @overload
    def rpc(
        self,
        func: None = None,
        /,
        *,
        name: str | None = None,
        priority: int | None = None,
        timeout: float | None = None,
        idempotent: bool | None = None,
    ) -> Callable[[F], F]: ...

    def rpc(
        self,
        func: F | None = None,
        /,
        *,
        name: str | None = None,
        priority: int | None = None,
        timeout: float | None = None,
        idempotent: bool | None = None,
    ) -> F | Callable[[F], F]:
        """Register a function as a remote method (a decorator, with or without arguments).

        Args:
            func: The function: async, an async generator (server streaming), or
                plain (plain ones run in a thread).
            name: The method name (default: the function's ``__name__``).
            priority: Default priority of calls to this method (default NORMAL).
            timeout: Longest time a call may run on the server (seconds).
            idempotent: Calls may safely be retried (default False).
        """

        def register(f: F) -> F:
            self.add_handler(
                f, name=name, priority=priority, timeout=timeout, idempotent=idempotent
            )
            return f

        return register(func) if func is not None else register

    def add_handler(
        self,
        func: Callable[..., Any],
        *,
        name: str | None = None,
        priority: int | None = None,
        timeout: float | None = None,
        idempotent: bool | None = None,
        hints_from: Callable[..., Any] | None = None,
    ) -> Handler:
        """Register ``func``; the non-decorator form of :meth:`rpc`.

        Options not given come from :func:`ucxrpc.rpc` if it marked ``func``.
        """
        marked = rpc_options(func) or rpc_options(hints_from)
        if marked is not None:
            name = name or marked.name
            priority = marked.priority if priority is None else priority
            timeout = marked.timeout if timeout is None else timeout
            idempotent = marked.idempotent if idempotent is None else idempotent
        method = name or getattr(func, "__name__", None)
        if not method:
            raise ValueError("a method name is required")
        if method in self._handlers:
            raise ValueError(f"method {method!r} is already registered")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        handler = make_handler(
            func,
            name=method,
            priority=Priority.NORMAL if priority is None else priority,
            timeout=timeout,
            idempotent=bool(idempotent),
            hints_from=hints_from,
        )
        self._handlers[method] = handler
        return handler

    def add_service(self, service: Service) -> list[Handler]:
        """Register every remote method of a service instance.

        Method names are ``"<service name>.<method>"``, for example ``"echo.v1.shout"``.

        Args:
            service: An instance of a :class:`~ucxrpc.Service` implementation.

        Returns:
            The registered handlers.
        """
        if isinstance(service, type) or not isinstance(service, Service):
            raise TypeError(f"add_service() needs a Service instance, not {service!r}")
        decls = rpc_methods(type(service))
        if not decls:
            raise TypeError(f"{type(service).__qualname__} declares no @ucxrpc.rpc methods")
        clash = [d.wire_name for d in decls if d.wire_name in self._handlers]
        if clash:
            raise ValueError(f"methods already registered: {', '.join(clash)}")
        self.health.add(type(service).__service_name__)
        handlers = []
        for decl in decls:
            impl = getattr(service, decl.attr)
            if decl.is_stream is not _is_stream(impl):
                kind = "an async generator" if decl.is_stream else "not an async generator"
                raise TypeError(
                    f"{type(service).__qualname__}.{decl.attr} must be {kind}, "
                    "as its interface declares"
                )
            handlers.append(self.add_handler(impl, name=decl.wire_name, hints_from=decl.func))
        return handlers

    def add_interceptor(self, interceptor: Interceptor) -> None:
        """Add a server interceptor (innermost of those added so far)."""
        self._interceptors.append(interceptor)

    def _add_builtin_methods(self) -> None:
        from .. import __version__

        async def describe_server() -> dict[str, Any]:
            """This server's methods, with the JSON Schema of their arguments and results."""
            return describe(self._handlers, __version__).model_dump()

        self.add_handler(
            describe_server, name=DESCRIBE_METHOD, priority=Priority.HIGH, idempotent=True
        )
        for method, func in health_methods(self.health):
            self.add_handler(func, name=method, priority=Priority.HIGH, idempotent=True)

    @property
    def handlers(self) -> dict[str, Handler]:
        """The handler table (method name -> :class:`Handler`), read-only by convention."""
        return self._handlers

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, manager: Runtime, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start serving.

        Args:
            manager: The manager whose UCX worker carries the calls.
            host: Interface to listen on (127.0.0.1 unless told otherwise).
            port: TCP port of the control connection; 0 picks a free one.
        """
        if self._tcp is not None:
            raise RuntimeError("the server is already started")
        if manager.config.auth_token is None and not is_loopback(host):
            warnings.warn(
                f"ucxrpc: serving on {host or '*'} without auth_token: anyone who can reach "
                "this port can call every method (set Config.auth_token)",
                InsecureWarning,
                stacklevel=2,
            )
        await manager.start()
        manager.prepare(host)
        self._manager = manager
        self._stopped = asyncio.Event()
        self._draining = False
        # A new start: a turn left pending by an engine that closed never comes.
        self._starts = StartQueue(START_BUDGET, SHARED_START_BUDGET)
        self._turn_pending = False
        self._timers = Timers(asyncio.get_running_loop())
        self.health.resume()
        try:
            self._tcp = await listen(self._accept, host, port)
        except OSError as exc:
            raise Unavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        manager.watch(self._tcp)
        # A busy server gives its core up now and then: a client waiting, runnable, for
        # the same core (its reply is ready) runs then, not at the kernel's next tick.
        # (The manager's one engine: from now on its own connections share too.)
        manager.engine.share_core = True
        sock = self._tcp.sockets[0].getsockname()
        self._host, self._port = host, int(sock[1])
        manager.own(self, 1, self.stop)

    @property
    def port(self) -> int:
        """The port the server listens on (after :meth:`start`)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (after :meth:`start`)."""
        return f"{self._host}:{self._port}"

    @property
    def bytes_sent(self) -> int:
        """Bytes sent to clients over UCX (frames and data parts), since creation."""
        return self._gone_bytes[0] + sum(c.link.bytes_sent for c in self._conns if c.link)

    @property
    def bytes_received(self) -> int:
        """Bytes received from clients over UCX (frames and data parts), since creation."""
        return self._gone_bytes[1] + sum(c.link.bytes_received for c in self._conns if c.link)

    @property
    def connections(self) -> int:
        """Client connections currently open."""
        return len(self._conns)

    @property
    def inflight(self) -> int:
        """Calls currently running or queued."""
        return sum(len(c.calls) for c in self._conns) + len(self._starts)

    async def serve_forever(self) -> None:
        """Wait until :meth:`stop` is called (from another task or a signal handler)."""
        if self._stopped is None:
            raise RuntimeError("the server is not started")
        await self._stopped.wait()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight calls finish for up to ``grace`` seconds, then
        cancel the rest and close every connection.

        Args:
            grace: Seconds to wait for in-flight calls (None: wait for all of them).
        """
        if self._tcp is None:
            return
        tcp, self._tcp = self._tcp, None
        for conn in self._conns:
            # Calls that arrived before the stop and wait for their turn to be handed
            # over (the rest of a batch) are accepted like those already delivered.
            if conn.link is not None:
                conn.link.deliver_pending()
        self._draining = True
        self.health.shutdown()  # watches say NOT_SERVING and end: the grace is not spent on them
        tcp.close()
        for conn in self._conns:
            conn.start_all()
        tasks = [t for c in self._conns for t in (*c.calls.values(), *c.notes)]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        # At once: each close may wait CANCEL_WAIT for calls that ignore cancellation.
        await asyncio.gather(*(conn.close() for conn in list(self._conns)))
        # Closing the control streams ends every connection task (handshakes included).
        for writer in self._accepting.values():
            writer.close()
        if self._accepting:
            _, stuck = await asyncio.wait(list(self._accepting), timeout=5.0)
            for task in stuck:
                task.cancel()
        await tcp.wait_closed()
        if self._timers is not None:
            self._timers.close()  # (a call that ignored its cancellation runs unbounded)
        if self._manager is not None:
            self._manager.disown(self)
        assert self._stopped is not None
        self._stopped.set()

    # -- connections ---------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._accepting[task] = writer
        self._handshaking[task] = writer
        assert self._manager is not None
        self._manager.watch(writer)
        if len(self._handshaking) > self._manager.config.max_handshakes:
            # Memory before authentication stays bounded, and a flood of stalled
            # handshakes cannot lock good clients out: the oldest one goes.
            oldest = next(iter(self._handshaking))
            self._handshaking.pop(oldest).transport.abort()
        try:
            await self._serve_connection(reader, writer)
        except asyncio.CancelledError:
            pass  # stop() gave up waiting; the task must still end normally
        finally:
            self._handshaking.pop(task, None)
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass
            del self._accepting[task]

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert self._manager is not None
        manager = self._manager
        conn: _ServerConn | None = None

        def open_conn(hello: dict[str, Any]) -> int:
            nonlocal conn
            if self._draining:
                raise Unavailable("the server is shutting down")
            conn = _ServerConn(self, manager, writer)
            local_id = conn.open(hello, key)
            self._conns.add(conn)
            return local_id

        key = secrets.token_bytes(KEY_SIZE)
        try:
            done = await answer(
                reader, writer, manager.config, manager.worker_address, open_conn, key=key
            )
            task = asyncio.current_task()
            if task is not None:
                self._handshaking.pop(task, None)  # past it: no longer counted
            if done:
                await serve_control(reader, writer)
        except RpcError as exc:
            refuse(writer, exc)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            if conn is not None:
                await conn.close()

    # -- calls -----------------------------------------------------------------------------------

    def _offer(self, conn: _ServerConn, key: int, priority: int, item: _Queued) -> bool:
        """A call was delivered: True if it starts now, False if it waits for a turn."""
        now = self._starts.offer(conn, key, priority, item)
        if conn.link is not None:  # (it is: the call arrived over it)
            self._schedule_turn(conn.link.engine)
        return now

    def _schedule_turn(self, engine: Engine) -> None:
        # At the end of the next drive: the calls that drive delivers (another
        # connection's single call) are started before the waiting ones of a burst.
        if not self._turn_pending:
            self._turn_pending = True
            self._turn_on = engine
            engine.after_drive(self._turn)

    def _turn(self) -> None:
        """A new loop iteration: start the calls whose turn it is."""
        self._turn_pending = False
        starts = self._starts
        for conn, header, payload, parts, deadline in starts.turn():
            conn._launch(header, payload, parts, deadline)
        if starts.busy and self._turn_on is not None:
            # The budget starts again on the next drive, or calls still wait.
            self._schedule_turn(self._turn_on)

    async def _run_call(
        self,
        conn: _ServerConn,
        header: codec.Header,
        payload: memoryview,
        parts: list[Any],
        deadline: float | None,
    ) -> None:
        call_id = header.call_id
        kind = header.kind
        reply = kind is not Kind.NOTIFY
        handler = self._handlers.get(header.method)
        acquired = False
        ctx: CallContext | None = None
        loop = asyncio.get_running_loop()
        try:
            if handler is None:
                raise MethodNotFound(f"method {header.method!r} is not registered")
            if handler.is_stream is not (kind is Kind.STREAM) or (
                handler.input_param is not None
            ) is not bool(header.flags & _INPUT_STREAM):
                raise InvalidArgument(_kind_mismatch(handler))
            if handler.timeout is not None:
                cap = loop.time() + handler.timeout
                deadline = cap if deadline is None else min(deadline, cap)
            priority = header.priority if header.priority is not None else handler.priority
            ctx = CallContext(  # positional: this runs for every call
                header.method,
                handler.kind if reply else "notify",
                "server",
                header.metadata,
                deadline,
                priority,
                conn.peer,
            )
            enter(ctx)
            if not self._limiter.try_acquire():
                await self._admit(priority, deadline, header.method, conn)
            acquired = True
            if deadline is not None and deadline <= loop.time():
                raise DeadlineExceeded(f"deadline passed before {header.method!r} started")
            if self._interceptors:
                proceed = functools.partial(
                    self._proceed, conn, handler, header, payload, parts, deadline
                )
                result = await run_chain(self._interceptors, ctx, proceed)
            else:
                result = await self._proceed(conn, handler, header, payload, parts, deadline)
            if reply:
                end = Kind.END if handler.is_stream else Kind.REPLY
                conn.reply(call_id, end, result, ctx.response_metadata or None)
        except asyncio.CancelledError:
            raise  # the caller cancelled (or the connection closed): nobody awaits a reply
        except RpcError as exc:
            if reply:
                conn.reply_error(call_id, exc, ctx.response_metadata if ctx else None)
        except Exception as exc:
            if reply:
                conn.reply_exception(call_id, exc, ctx.response_metadata if ctx else None)
            else:
                log.warning("notification %r failed: %r", header.method, exc)
        finally:
            if acquired:
                self._limiter.release()
            # Off the table now, not in the task's done callback a loop iteration
            # later: by then the caller may have sent its next call.
            conn.finished(call_id)

    async def _admit(
        self, priority: int, deadline: float | None, method: str, conn: _ServerConn
    ) -> None:
        """Wait for a slot under ``max_concurrency`` (connections take turns within a
        priority); a call whose deadline passes while it waits leaves the queue."""
        if deadline is None:
            await self._limiter.acquire(priority, conn)
            return
        try:
            async with asyncio.timeout_at(deadline):
                await self._limiter.acquire(priority, conn)
        except TimeoutError:
            raise DeadlineExceeded(f"deadline passed while {method!r} waited to start") from None

    async def _proceed(
        self,
        conn: _ServerConn,
        handler: Handler,
        header: codec.Header,
        payload: memoryview,
        parts: list[Any],
        deadline: float | None,
    ) -> Any:
        """Validate the arguments and run the handler (the innermost step of the chain).

        The deadline is enforced here, so interceptors see :class:`DeadlineExceeded`
        rather than a bare cancellation.
        """
        decoded = codec.decode_payload(header, payload, parts, array_hook=from_array)
        args, kwargs = handler.bind(*_split_args(decoded), oob=bool(parts))
        if handler.input_param is not None:
            _feed_input(conn.inputs[header.call_id], handler, args, kwargs)
        if deadline is None:
            if handler.is_async:  # the common case, without another coroutine layer
                return await handler.func(*args, **kwargs)
            return await self._execute(conn, header.call_id, handler, args, kwargs)
        # What asyncio.timeout_at does, on the server's one heap of timers (a scope
        # per call cost about a tenth of a small call's time on the server).
        task = asyncio.current_task()
        assert task is not None and self._timers is not None
        cancelling = task.cancelling()
        timer = self._timers.at(deadline, task.cancel)
        withdrawn = False
        try:
            return await self._execute(conn, header.call_id, handler, args, kwargs)
        except asyncio.CancelledError:
            # Only the deadline's own cancellation becomes DeadlineExceeded: not the
            # caller's cancel or the connection's close, even when they come too.
            if timer.fired:
                withdrawn = True
                if task.uncancel() <= cancelling:
                    raise DeadlineExceeded(f"{header.method!r} ran past its deadline") from None
            raise
        finally:
            timer.cancel()
            if timer.fired and not withdrawn:
                # The handler swallowed the deadline's cancellation (or turned it into
                # something else): withdraw the request anyway, as asyncio.timeout
                # does, or an enclosing timeout or task group would take it for theirs.
                task.uncancel()

    async def _execute(
        self,
        conn: _ServerConn,
        call_id: int,
        handler: Handler,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        if handler.is_async:
            return await handler.func(*args, **kwargs)
        if handler.is_stream:
            await self._stream(conn, call_id, handler, args, kwargs)
            return None
        assert self._manager is not None
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, handler.func, *args, **kwargs)
        return await loop.run_in_executor(self._manager.executor, call)

    async def _stream(
        self,
        conn: _ServerConn,
        call_id: int,
        handler: Handler,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> None:
        credit = Credit(conn.window)
        conn.credits[call_id] = credit
        agen = handler.func(*args, **kwargs)
        try:
            async for item in agen:
                if credit.available > 0:
                    credit.available -= 1
                else:
                    await credit.take()
                conn.send_item(call_id, item)
        finally:
            conn.credits.pop(call_id, None)
            await agen.aclose()


def _is_stream(func: Any) -> bool:
    return inspect.isasyncgenfunction(func)


def _kind_mismatch(handler: Handler) -> str:
    name = handler.name
    takes = (
        f"takes a stream of items as {handler.input_param!r} (pass an async iterable)"
        if handler.input_param is not None
        else "takes no stream of items (pass no async iterable)"
    )
    if handler.is_stream:
        return f"{name!r} streams its results and {takes}: iterate client.stream({name!r}, ...)"
    return f"{name!r} returns one result and {takes}: use client.call({name!r}, ...)"


def _feed_input(
    inp: InputStream, handler: Handler, args: list[Any], kwargs: dict[str, Any]
) -> None:
    """Put the call's input stream where the handler's ``AsyncIterator`` parameter is."""
    item = handler.input_item
    if item is not None:
        inp.convert = item.validate
    name = handler.input_param
    if name in kwargs:
        kwargs[name] = inp
        return
    for i, param in enumerate(handler.params):
        if param.name == name:
            if i < len(args):
                args[i] = inp
            else:
                kwargs[param.name] = inp
            return


#: Calls the server starts per loop iteration, over all its connections; more wait for
#: later iterations, connections taking turns (:class:`~ucxrpc.protocol.starts.StartQueue`).
START_BUDGET = 8
#: The same for 32 turns after another connection's call started past a burst's waiting
#: calls: a turn's calls all run before the loop reads the next frames, so that other
#: connection's next call waits for the whole turn (four calls keep a flooded server's
#: turn to about half a millisecond).
SHARED_START_BUDGET = 4

#: A call waiting to start: its connection, header, payload, parts and deadline.
_Queued = tuple["_ServerConn", codec.Header, memoryview, list[Any], "float | None"]


def _split_args(payload: Any) -> tuple[list[Any], dict[str, Any]]:
    if (
        type(payload) is not list
        or len(payload) != 2
        or type(payload[0]) is not list
        or type(payload[1]) is not dict
    ):
        raise ProtocolError("request payload must be [args, kwargs]")
    kwargs = payload[1]
    if any(type(k) is not str for k in kwargs):
        raise ProtocolError("keyword argument names must be strings")
    return payload[0], kwargs


class _ServerConn:
    """The server's side of one client connection (the owner of its link)."""

    def __init__(self, server: Server, manager: Runtime, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.manager = manager
        self.writer = writer
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.notes: set[asyncio.Task[None]] = set()
        #: The key of the next notification waiting to start (a call waits under its
        #: id; notifications have none, so they take negative keys).
        self._next_note = -1
        self.credits: dict[int, Credit] = {}
        self.inputs: dict[int, InputStream] = {}
        self.link: Link | None = None
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        self.window = DEFAULT_WINDOW
        self._closed = False
        cfg = manager.config
        self._max_inflight = cfg.max_inflight
        self._oob = cfg.oob_threshold
        self._tracebacks = cfg.expose_tracebacks
        self._loop = asyncio.get_running_loop()

    def open(self, hello: dict[str, Any], key: bytes) -> int:
        """Set the connection up from a (checked) hello; returns its connection id."""
        if hello.get("role") == "messages":
            raise MethodNotFound(
                "this is an RPC server: connect with manager.connect(), not Worker.connect()"
            )
        self.manager.check_peer_mode(hello)
        window = hello.get("win")
        if type(window) is int and 0 < window <= MAX_WINDOW:
            self.window = window
        max_size = min(self.manager.config.max_message_size, hello["max"])
        ep = self.manager.endpoint_to(hello["addr"])
        link = self.manager.open_link(self, key)
        link.connect(
            ep,
            hello["cid"],
            hello["key"],
            max_size,
            peer_pid=hello.get("pid"),
            probe=hello.get("probe"),
            peer_memory=hello.get("memory"),
        )
        self.link = link
        return link.local_id

    # -- frames from the client, in order (the link's owner) ----------------------------------

    def deliver(self, header: codec.Header, payload: memoryview, parts: list[Any]) -> None:
        if self._closed:
            return
        kind = header.kind
        call_id = header.call_id
        if kind is Kind.REQUEST or kind is Kind.STREAM or kind is Kind.NOTIFY:
            deadline = None if header.timeout is None else self._loop.time() + header.timeout
            self._start(header, payload, parts, deadline)
        elif kind is Kind.CANCEL:
            task = self.calls.get(call_id)
            if task is not None:
                task.cancel()
            elif not self._drop_queued(call_id) and self.link is not None:
                self.link.unmatched += 1  # a call that has ended (or never was)
        elif kind is Kind.CREDIT:
            self._on_credit(call_id, header, payload)
        elif kind is Kind.ITEM or kind is Kind.END:
            inp = self.inputs.get(call_id)
            if inp is None:
                if self.link is not None:
                    self.link.unmatched += 1  # the call has ended: items it left are dropped
                return
            try:
                value = codec.decode_payload(header, payload, parts, array_hook=from_array)
            except ProtocolError as exc:
                inp.error = exc
                value = None
            inp.put(kind, value)
        else:
            self.reply_error(call_id, ProtocolError(f"unexpected {kind.name} frame from a client"))

    def failed(self, call_id: int, kind: Kind | None, error: RpcError) -> None:
        if self._closed or kind is Kind.NOTIFY:
            return
        task = self.calls.get(call_id)
        running = task is not None or self.server._starts.has(self, call_id)
        if kind is not Kind.REQUEST and kind is not Kind.STREAM:
            if task is not None:
                task.cancel()  # a broken CANCEL or CREDIT for a running call ends it
            else:
                self._drop_queued(call_id)  # or a call not started yet
            running = False
        if not running or kind is not Kind.REQUEST:
            self.reply_error(call_id, error)

    def broken(self, error: RpcError) -> None:
        log.info("connection from %s broken: %s", self.peer, error)
        self._loop.create_task(self.close())

    def _on_credit(self, call_id: int, header: codec.Header, payload: memoryview) -> None:
        try:
            count = codec.decode_payload(header, payload) if not header.parts else None
        except ProtocolError:
            count = None
        if type(count) is not int or not 0 < count <= MAX_WINDOW:
            task = self.calls.get(call_id)
            if task is not None:
                task.cancel()  # its done callback frees the call's state
            else:
                self._drop_queued(call_id)  # not started yet: it never will
            self.reply_error(call_id, ProtocolError("malformed CREDIT frame"))
            return
        credit = self.credits.get(call_id)
        if credit is not None:  # else the stream has ended; credits may cross its END
            credit.grant(count)

    def _start(
        self,
        header: codec.Header,
        payload: memoryview,
        parts: list[Any],
        deadline: float | None,
    ) -> None:
        call_id = header.call_id
        notify = header.kind is Kind.NOTIFY
        if self.server._draining and header.method not in HEALTH_METHODS:
            if not notify:
                self.reply_error(call_id, Unavailable("the server is shutting down"))
            return
        starts = self.server._starts
        if not notify and (call_id in self.calls or starts.has(self, call_id)):
            self.reply_error(call_id, ProtocolError(f"call id {call_id} is already in flight"))
            return
        # Replies the peer has not taken yet are bounded too, on their own: a peer that
        # never receives cannot make the server hold more than max_inflight of them.
        # (Not added to the running calls: a reply's send may complete only after
        # the client, which counts the call until its reply arrives, sent the next.)
        pending = 0 if self.link is None else self.link.pending_sends
        running = len(self.calls) + len(self.notes) + starts.waiting(self)
        if running >= self._max_inflight or pending >= self._max_inflight:
            if not notify:
                self.reply_error(
                    call_id,
                    ResourceExhausted(f"more than {self._max_inflight} calls in flight"),
                )
            return
        if header.flags & _INPUT_STREAM and not notify:
            # Registered now: its items may arrive before the call starts.
            self.inputs[call_id] = InputStream(self.window, functools.partial(self._grant, call_id))
        key = call_id
        if notify:
            key, self._next_note = self._next_note, self._next_note - 1
        priority = header.priority
        if priority is None:
            handler = self.server._handlers.get(header.method)
            priority = Priority.NORMAL if handler is None else handler.priority
        if self.server._offer(self, key, priority, (self, header, payload, parts, deadline)):
            self._launch(header, payload, parts, deadline)

    def _drop_queued(self, call_id: int) -> bool:
        """Forget a call not started yet; False if there is none of that id."""
        if self.server._starts.drop(self, call_id) is None:
            return False
        self.inputs.pop(call_id, None)
        return True

    def start_all(self) -> None:
        """Start every queued call now (the server is draining: they were accepted)."""
        for _, header, payload, parts, deadline in self.server._starts.remove(self):
            self._launch(header, payload, parts, deadline)

    def _launch(
        self,
        header: codec.Header,
        payload: memoryview,
        parts: list[Any],
        deadline: float | None,
    ) -> None:
        call_id = header.call_id
        task = self._loop.create_task(self.server._run_call(self, header, payload, parts, deadline))
        if header.kind is Kind.NOTIFY:
            self.notes.add(task)
            task.add_done_callback(self.notes.discard)
        else:
            self.calls[call_id] = task
            # Also when the task is cancelled before it ever ran (its finally never runs).
            task.add_done_callback(functools.partial(self._ended, call_id))

    def finished(self, call_id: int) -> None:
        """The running task's call has answered (or ended): it no longer counts
        against ``max_inflight``."""
        task = asyncio.current_task()
        if task is None:
            return
        if self.calls.get(call_id) is task:
            del self.calls[call_id]
            self.inputs.pop(call_id, None)
        else:
            self.notes.discard(task)

    def _ended(self, call_id: int, task: asyncio.Task[None]) -> None:
        if self.calls.get(call_id) is task:
            del self.calls[call_id]
            self.inputs.pop(call_id, None)

    def _grant(self, call_id: int, count: int) -> None:
        if call_id in self.inputs and not self._closed:
            self._send(call_id, codec.encode(Kind.CREDIT, call_id, count))

    # -- replies -----------------------------------------------------------------------------------

    def _encode(
        self, call_id: int, kind: Kind, payload: Any, metadata: dict[str, Any] | None
    ) -> codec.Encoded:
        link = self.link
        assert link is not None
        try:
            return codec.encode(
                kind,
                call_id,
                payload,
                metadata=metadata,
                oob_threshold=self._oob,
                max_size=link.max_size,
                default=to_wire,
            )
        except (TypeError, ValueError, OverflowError) as exc:
            what = "metadata" if "metadata" in str(exc) else "result"
            raise RpcError(13, f"the {what} cannot be serialized: {exc}") from None

    def _send(self, call_id: int, encoded: codec.Encoded) -> None:
        link = self.link
        if link is None:
            return
        try:
            link.send(call_id, encoded)
        except RpcError as exc:
            self.broken(exc)

    def reply(
        self, call_id: int, kind: Kind, payload: Any, metadata: dict[str, Any] | None = None
    ) -> None:
        """Send a reply (or the end of a stream); a result or metadata that cannot be
        sent becomes an error reply (without that metadata)."""
        if self._closed:
            return
        try:
            encoded = self._encode(call_id, kind, payload, metadata)
        except RpcError as exc:
            if kind is Kind.ERROR:
                log.error("cannot send the error of call %d: %s", call_id, exc)
                return
            self.reply_error(call_id, exc)
            return
        self._send(call_id, encoded)

    def send_item(self, call_id: int, item: Any) -> None:
        """Send one stream item.

        Raises:
            RpcError: The item cannot be serialized (the stream ends with it).
        """
        if not self._closed:
            self._send(call_id, self._encode(call_id, Kind.ITEM, item, None))

    def reply_error(
        self, call_id: int, exc: RpcError, metadata: dict[str, Any] | None = None
    ) -> None:
        payload = error_payload(exc)
        if not self._tracebacks:
            payload[4] = ""  # also for a RemoteError passed on from a nested call
        if metadata:
            try:
                codec.check_metadata(metadata)
            except ValueError as bad:
                exc = RpcError(13, f"the response metadata cannot be sent: {bad}")
                payload, metadata = error_payload(exc), None
        self.reply(call_id, Kind.ERROR, payload, metadata)

    def reply_exception(
        self, call_id: int, exc: BaseException, metadata: dict[str, Any] | None = None
    ) -> None:
        tb = "".join(traceback.format_exception(exc)) if self._tracebacks else ""
        kind = type(exc)
        name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else (f"{kind.__module__}.{kind.__qualname__}")
        )
        error = RemoteError(str(exc), remote_type=name, remote_traceback=tb)
        self.reply_error(call_id, error, metadata)

    async def close(self) -> None:
        """Cancel this connection's calls, free its state and close its endpoint."""
        if self._closed:
            return
        self._closed = True
        self.server._conns.discard(self)
        self.server._starts.discard(self)  # never started: nobody awaits them now
        tasks = [*self.calls.values(), *self.notes]
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=CANCEL_WAIT)
            if stuck:
                # Left to end on their own: their replies go nowhere (closed).
                log.info(
                    "connection from %s closed with %d calls that ignored cancellation",
                    self.peer,
                    len(stuck),
                )
        self.calls.clear()
        self.notes.clear()
        self.writer.close()
        link = self.link
        if link is not None:
            self.server._gone_bytes[0] += link.bytes_sent
            self.server._gone_bytes[1] += link.bytes_received
            self.manager.unregister(link.local_id)
            await self.manager.close_endpoint(link.ep)
