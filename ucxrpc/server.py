"""The server: a handler table, connection handling, scheduling and deadlines."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hmac
import logging
import os
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import codec
from ._control import auth_proof, check_version, read_message, tune_socket, write_message
from ._handlers import Handler, Priority, make_handler, to_wire
from ._sched import PriorityLimiter
from .codec import Kind
from .errors import (
    DeadlineExceeded,
    MethodNotFound,
    ProtocolError,
    ResourceExhausted,
    RpcError,
    Unauthenticated,
    Unavailable,
)
from .transport import Link

if TYPE_CHECKING:
    from .manager import Manager

__all__ = ["Priority", "Server"]

log = logging.getLogger("ucxrpc.server")
F = TypeVar("F", bound=Callable[..., Any])


class Server:
    """Serves registered functions to ucxrpc clients.

    Args:
        max_concurrency: Handlers that may run at once across all connections; calls
            beyond it wait and start in priority order (FIFO within a priority).
            ``None`` means no limit.
    """

    def __init__(self, *, max_concurrency: int | None = 1024) -> None:
        self._handlers: dict[str, Handler] = {}
        self._limiter = PriorityLimiter(max_concurrency)
        self._manager: Manager | None = None
        self._tcp: asyncio.Server | None = None
        self._conns: set[_ServerConn] = set()
        self._accepting: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
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
        priority: int = Priority.NORMAL,
        timeout: float | None = None,
    ) -> Callable[[F], F]: ...

    def rpc(
        self,
        func: F | None = None,
        /,
        *,
        name: str | None = None,
        priority: int = Priority.NORMAL,
        timeout: float | None = None,
    ) -> F | Callable[[F], F]:
        """Register a function as a remote method (a decorator, with or without arguments).

        Args:
            func: The function (async, or plain: plain ones run in a thread).
            name: The method name (default: the function's ``__name__``).
            priority: Default priority of calls to this method.
            timeout: Longest time a call may run on the server (seconds).
        """

        def register(f: F) -> F:
            self.add_handler(f, name=name, priority=priority, timeout=timeout)
            return f

        return register(func) if func is not None else register

    def add_handler(
        self,
        func: Callable[..., Any],
        *,
        name: str | None = None,
        priority: int = Priority.NORMAL,
        timeout: float | None = None,
    ) -> Handler:
        """Register ``func`` under ``name``; the non-decorator form of :meth:`rpc`."""
        method = name or getattr(func, "__name__", None)
        if not method:
            raise ValueError("a method name is required")
        if method in self._handlers:
            raise ValueError(f"method {method!r} is already registered")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        handler = make_handler(func, name=method, priority=priority, timeout=timeout)
        self._handlers[method] = handler
        return handler

    @property
    def handlers(self) -> dict[str, Handler]:
        """The handler table (method name -> :class:`Handler`), read-only by convention."""
        return self._handlers

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, manager: Manager, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start serving.

        Args:
            manager: The manager whose UCX worker carries the calls.
            host: Interface to listen on (127.0.0.1 unless told otherwise).
            port: TCP port of the control connection; 0 picks a free one.
        """
        if self._tcp is not None:
            raise RuntimeError("the server is already started")
        await manager.start()
        self._manager = manager
        self._stopped = asyncio.Event()
        self._draining = False
        try:
            self._tcp = await asyncio.start_server(self._accept, host, port)
        except OSError as exc:
            raise Unavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        sock = self._tcp.sockets[0].getsockname()
        self._host, self._port = host, int(sock[1])
        manager._add_server(self)

    @property
    def port(self) -> int:
        """The port the server listens on (after :meth:`start`)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (after :meth:`start`)."""
        return f"{self._host}:{self._port}"

    @property
    def inflight(self) -> int:
        """Calls currently running or queued."""
        return sum(len(c.calls) for c in self._conns)

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
        self._draining = True
        tcp.close()
        tasks = [t for c in self._conns for t in c.calls.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for conn in list(self._conns):
            await conn.close()
        # Closing the control streams ends every connection task (handshakes included).
        for writer in self._accepting.values():
            writer.close()
        if self._accepting:
            _, stuck = await asyncio.wait(list(self._accepting), timeout=5.0)
            for task in stuck:
                task.cancel()
        await tcp.wait_closed()
        if self._manager is not None:
            self._manager._forget_server(self)
        assert self._stopped is not None
        self._stopped.set()

    # -- connections ---------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._accepting[task] = writer
        try:
            await self._serve_connection(reader, writer)
        except asyncio.CancelledError:
            pass  # stop() gave up waiting; the task must still end normally
        finally:
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
        cfg = manager.config
        conn: _ServerConn | None = None
        tune_socket(writer)
        try:
            challenge = os.urandom(16)
            write_message(writer, {"v": codec.VERSION, "challenge": challenge})
            hello = await asyncio.wait_for(read_message(reader), cfg.connect_timeout)
            if hello is None:
                return
            check_version(hello)
            token = cfg.auth_token.get_secret_value() if cfg.auth_token else None
            if token is not None:
                proof = hello.get("proof")
                expected = auth_proof(token, challenge, b"client")
                if not isinstance(proof, bytes) or not hmac.compare_digest(proof, expected):
                    raise Unauthenticated("bad or missing auth token")
            if self._draining:
                raise Unavailable("the server is shutting down")
            conn = _ServerConn(self, manager, writer)
            conn.open(hello)
            self._conns.add(conn)
            welcome: dict[str, Any] = {
                "v": codec.VERSION,
                "addr": manager.worker_address,
                "cid": conn.link.local_id,
                "max": cfg.max_message_size,
            }
            if token is not None and isinstance(hello.get("nonce"), bytes):
                welcome["proof"] = auth_proof(token, hello["nonce"], b"server")
            write_message(writer, welcome)
            await writer.drain()
            while True:
                msg = await read_message(reader)
                if msg is None or msg.get("t") == "bye":
                    break
        except RpcError as exc:
            if not writer.is_closing():
                write_message(writer, {"error": int(exc.code), "message": exc.message})
        except (TimeoutError, ConnectionError):
            pass
        finally:
            if conn is not None:
                await conn.close()

    # -- calls -----------------------------------------------------------------------------------

    async def _run_call(
        self,
        conn: _ServerConn,
        header: codec.Header,
        payload: memoryview,
        parts: list[Any],
        deadline: float | None,
    ) -> None:
        call_id = header.call_id
        reply = header.kind is Kind.REQUEST
        handler = self._handlers.get(header.method)
        acquired = False
        try:
            if handler is None:
                raise MethodNotFound(f"method {header.method!r} is not registered")
            if handler.timeout is not None:
                cap = asyncio.get_running_loop().time() + handler.timeout
                deadline = cap if deadline is None else min(deadline, cap)
            priority = header.priority if header.priority is not None else handler.priority
            if not self._limiter.try_acquire():
                await self._limiter.acquire(priority)
            acquired = True
            args, kwargs = _split_args(codec.decode_payload(header, payload, parts))
            args, kwargs = handler.bind(args, kwargs)
            if deadline is None:
                result = await self._invoke(handler, args, kwargs)
            else:
                if deadline <= asyncio.get_running_loop().time():
                    raise DeadlineExceeded(f"deadline passed before {header.method!r} started")
                try:
                    async with asyncio.timeout_at(deadline):
                        result = await self._invoke(handler, args, kwargs)
                except TimeoutError:
                    if deadline <= asyncio.get_running_loop().time():
                        raise DeadlineExceeded(f"{header.method!r} ran past its deadline") from None
                    raise
            if reply:
                conn.reply(call_id, Kind.REPLY, to_wire(result))
        except asyncio.CancelledError:
            raise  # the caller cancelled (or the connection closed): nobody awaits a reply
        except RpcError as exc:
            if reply:
                conn.reply_error(call_id, exc)
        except Exception as exc:
            if reply:
                conn.reply_exception(call_id, exc)
            else:
                log.warning("notification %r failed: %r", header.method, exc)
        finally:
            if acquired:
                self._limiter.release()
            conn.calls.pop(call_id, None)

    async def _invoke(self, handler: Handler, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if handler.is_async:
            return await handler.func(*args, **kwargs)
        assert self._manager is not None
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, handler.func, *args, **kwargs)
        return await loop.run_in_executor(self._manager.executor, call)


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
    """The server's side of one client connection."""

    def __init__(self, server: Server, manager: Manager, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.manager = manager
        self.writer = writer
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.link: Link = None  # type: ignore[assignment]  # set by open()
        self._closed = False
        cfg = manager.config
        self._max_inflight = cfg.max_inflight
        self._oob = cfg.oob_threshold
        self._tracebacks = cfg.expose_tracebacks

    def open(self, hello: dict[str, Any]) -> None:
        addr, cid, slot = hello.get("addr"), hello.get("cid"), hello.get("slot")
        if (
            not isinstance(addr, bytes)
            or type(cid) is not int
            or not 0 < cid <= codec.MAX_CONN_ID
            or type(slot) is not int
            or slot < codec.PREFIX_SIZE + 64
        ):
            raise ProtocolError("malformed hello")
        peer_max = hello.get("max")
        max_size = self.manager.config.max_message_size
        if type(peer_max) is int and peer_max > 0:
            max_size = min(max_size, peer_max)
        ep = self.manager.endpoint_to(addr)
        local_id = self.manager.register(self)
        self.link = Link(self.manager.engine, ep, local_id, cid, slot, max_size, self._send_failed)

    # -- frames from the client -----------------------------------------------------------------

    def on_frame(self, call_id: int, buf: bytearray) -> None:
        if self._closed:
            return
        try:
            header, payload = codec.decode_header(buf, max_size=self.link.max_size)
        except ProtocolError as exc:
            self.reply_error(call_id, exc)
            return
        self.link.bytes_received += len(buf)
        kind = header.kind
        if kind is Kind.REQUEST or kind is Kind.NOTIFY:
            loop = asyncio.get_running_loop()
            deadline = None if header.timeout is None else loop.time() + header.timeout
            if header.parts:
                self.link.recv_parts(
                    call_id,
                    header.parts,
                    lambda exc, parts: self._start(header, payload, parts, deadline, exc),
                )
            else:
                self._start(header, payload, [], deadline, None)
        elif kind is Kind.CANCEL:
            task = self.calls.get(call_id)
            if task is not None:
                task.cancel()
        else:
            self.reply_error(call_id, ProtocolError(f"unexpected {kind.name} frame from a client"))

    def on_oversized(self, call_id: int, size: int) -> None:
        self.reply_error(
            call_id,
            ResourceExhausted(
                f"message of {size} bytes exceeds the server's limit of "
                f"{self.manager.config.max_message_size} bytes"
            ),
        )

    def _start(
        self,
        header: codec.Header,
        payload: memoryview,
        parts: list[Any],
        deadline: float | None,
        exc: BaseException | None,
    ) -> None:
        call_id = header.call_id
        if self._closed:
            return
        if exc is not None:
            self.reply_error(call_id, ProtocolError(f"a data part failed to arrive: {exc}"))
            return
        if self.server._draining:
            self.reply_error(call_id, Unavailable("the server is shutting down"))
            return
        if call_id in self.calls:
            self.reply_error(call_id, ProtocolError(f"call id {call_id} is already in flight"))
            return
        if len(self.calls) >= self._max_inflight:
            self.reply_error(
                call_id,
                ResourceExhausted(f"more than {self._max_inflight} calls in flight"),
            )
            return
        self.calls[call_id] = asyncio.get_running_loop().create_task(
            self.server._run_call(self, header, payload, parts, deadline)
        )

    # -- replies -----------------------------------------------------------------------------------

    def reply(self, call_id: int, kind: Kind, payload: Any) -> None:
        if self._closed:
            return
        link = self.link
        try:
            encoded = codec.encode(
                kind,
                call_id,
                payload,
                oob_threshold=self._oob,
                inline_limit=link.remote_slot,
                max_size=link.max_size,
            )
        except RpcError as exc:
            self.reply_error(call_id, exc)
            return
        except (TypeError, ValueError, OverflowError) as exc:
            self.reply_error(call_id, RpcError(13, f"the result cannot be serialized: {exc}"))
            return
        try:
            link.send(call_id, encoded)
        except RpcError as exc:
            self._send_failed(exc)

    def reply_error(self, call_id: int, exc: RpcError) -> None:
        self.reply(call_id, Kind.ERROR, [int(exc.code), exc.message, _plain(exc.details), "", ""])

    def reply_exception(self, call_id: int, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(exc)) if self._tracebacks else ""
        kind = type(exc)
        name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else (f"{kind.__module__}.{kind.__qualname__}")
        )
        self.reply(call_id, Kind.ERROR, [2, str(exc), None, name, tb])

    def _send_failed(self, exc: RpcError) -> None:
        log.info("connection to a client failed: %s", exc)
        asyncio.get_running_loop().create_task(self.close())

    async def close(self) -> None:
        """Cancel this connection's calls, free its state and close its endpoint."""
        if self._closed:
            return
        self._closed = True
        self.server._conns.discard(self)
        tasks = list(self.calls.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self.calls.clear()
        self.writer.close()
        if self.link is not None:
            self.link.closed = True
            self.manager.unregister(self.link.local_id)
            await self.manager.close_endpoint(self.link.ep)


def _plain(details: Any) -> Any:
    """Details must cross the wire; anything msgpack cannot carry becomes its repr."""
    if details is None or isinstance(details, (str, int, float, bool, bytes, list, dict)):
        return details
    return repr(details)
