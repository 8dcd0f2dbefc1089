"""The client: calls, notifications and streams over one connection."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import (
    Cancelled,
    ConnectionLost,
    DeadlineExceeded,
    InvalidArgument,
    ProtocolError,
    RpcError,
    Unavailable,
    error_from_payload,
)
from ..io import copier
from ..io.control import initiate_handshake, read_message, write_message
from ..io.link import Link
from ..io.sched import PriorityLimiter
from ..io.timers import Timer, Timers
from ..protocol import CallIds
from ..wire import codec
from ..wire.codec import Flags, Kind
from .context import CallContext, CallKind, Metadata, call_deadline
from .handlers import Priority
from .interceptors import Interceptor, run_chain
from .liveness import KeepAlive, Reconnect
from .reflection import DESCRIBE_METHOD, ServerDescription
from .service import Service, make_stub
from .stream import Pump, Stream, StreamCall, is_input_stream
from .values import from_array, plain, to_wire

if TYPE_CHECKING:
    from ..io.runtime import Runtime

__all__ = ["Client"]

log = logging.getLogger("ucxrpc.client")

S = TypeVar("S", bound=Service)
T = TypeVar("T")


class _Call:
    """A call awaiting its reply."""

    __slots__ = ("call_id", "fut", "metadata", "timer")

    def __init__(self, call_id: int, fut: asyncio.Future[Any]) -> None:
        self.call_id = call_id
        self.fut = fut
        self.timer: Timer | None = None
        self.metadata: Metadata | None = None


class _Live:
    """The call ids in use: pending calls and open streams."""

    __slots__ = ("client",)

    def __init__(self, client: Client) -> None:
        self.client = client

    def __contains__(self, call_id: object) -> bool:
        c = self.client
        return call_id in c._pending or call_id in c._streams


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _has_input(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    return any(map(is_input_stream, args)) or any(map(is_input_stream, kwargs.values()))


def _take_input(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """Take the async iterable a caller streams into the call out of its arguments.

    Returns:
        The arguments with the iterable replaced by None, and the iterable (or None).

    Raises:
        InvalidArgument: More than one async iterable was passed.
    """
    found = [i for i, a in enumerate(args) if is_input_stream(a)]
    named = [k for k, v in kwargs.items() if is_input_stream(v)]
    if not found and not named:
        return args, kwargs, None
    if len(found) + len(named) > 1:
        raise InvalidArgument("a call takes at most one stream of items (one async iterable)")
    if found:
        (i,) = found
        return (*args[:i], None, *args[i + 1 :]), kwargs, args[i]
    (k,) = named
    return args, {**kwargs, k: None}, kwargs[k]


def _check_metadata(metadata: Mapping[str, Any] | None) -> Metadata | None:
    if not metadata:
        return None
    out: Metadata = {}
    for key, value in metadata.items():
        if type(key) is not str or not isinstance(value, (str, bytes)):
            raise InvalidArgument(
                f"metadata must map str to str or bytes, got {key!r}: {type(value).__name__}"
            )
        out[key] = value
    return out


class Client:
    """A connection to one server. Create it with :meth:`Manager.connect`.

    Many calls may be in flight at once; each waits for its own reply, which UCX
    matches to it by tag. Use ``async with client:`` to close it when done.
    """

    def __init__(
        self,
        manager: Runtime,
        interceptors: Sequence[Interceptor] = (),
        keepalive: KeepAlive | None = None,
        reconnect: Reconnect | None = None,
    ) -> None:
        self._manager = manager
        self._loop = asyncio.get_running_loop()
        # The deadlines of the calls and streams in flight (one loop timer for all).
        self._timers = Timers(self._loop)
        self._pending: dict[int, _Call] = {}
        self._streams: dict[int, StreamCall] = {}
        self._pumps: dict[int, Pump] = {}
        self._interceptors: list[Interceptor] = list(interceptors)
        self._ids = CallIds(codec.MAX_CALL_ID)
        self._live = _Live(self)
        cfg = manager.config
        self._slot_size = cfg.reply_slot_size
        self._oob = cfg.oob_threshold
        self._window = cfg.stream_window
        self._gate = PriorityLimiter(cfg.max_inflight)
        self.link: Link | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lost: RpcError | None = None
        self._keepalive = keepalive
        self._reconnect = reconnect
        self._tasks: set[asyncio.Task[None]] = set()  # watcher, heartbeat, reconnection
        self._connected = asyncio.Event()
        self._closing = False
        self._host, self._port = "", 0
        self._pong = asyncio.Event()
        self._ep_open = False
        #: Successful reconnections so far.
        self.reconnects = 0
        self.peer = ""

    # -- connection -----------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        manager: Runtime,
        host: str,
        port: int,
        *,
        timeout: float | None = None,
        interceptors: Sequence[Interceptor] = (),
        keepalive: KeepAlive | None = None,
        reconnect: Reconnect | None = None,
    ) -> Client:
        """Connect to the server at ``host:port`` (see :meth:`Manager.connect`)."""
        self = cls(manager, interceptors, keepalive, reconnect)
        self._host, self._port, self.peer = host, port, f"{host}:{port}"
        await self._establish(timeout)
        manager.own(self, 0, self._close_for_shutdown)
        return self

    async def _close_for_shutdown(self, _grace: float) -> None:
        await self.close()

    async def _establish(self, timeout: float | None = None) -> None:
        """Set up the connection (again); on failure leave nothing registered."""
        host, port = self._host, self._port
        limit = self._manager.config.connect_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                await self._handshake(host, port)
        except TimeoutError:
            await self._abort()
            raise Unavailable(f"connecting to {host}:{port} timed out after {limit}s") from None
        except OSError as exc:
            await self._abort()
            raise Unavailable(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        except BaseException:
            await self._abort()
            raise
        self._lost = None
        self._spawn(self._watch(self._reader))
        if self._keepalive is not None:
            assert self._writer is not None
            self._spawn(self._heartbeat(self._writer, self._keepalive))
        self._connected.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(self, host: str, port: int) -> None:
        manager = self._manager
        manager.prepare(host)
        reader, writer = await asyncio.open_connection(host, port)
        manager.watch(writer)
        self._reader, self._writer = reader, writer
        link = self.link = manager.open_link(self)
        extra = {
            "slot": self._slot_size,
            "win": self._window,
            "eh": int(manager.config.peer_error_handling),
        }
        hs = await initiate_handshake(
            reader,
            writer,
            manager.config,
            manager.worker_address,
            link.local_id,
            extra,
            f"{host}:{port}",
            key=link.key,
        )
        try:
            ep = manager.endpoint_to(hs.peer_address)
        except BaseException:
            if hs.peer_memory is not None:
                hs.peer_memory.close()
            raise
        self._ep_open = True
        link.connect(
            ep,
            hs.peer_conn_id,
            hs.peer_key,
            hs.peer_max,
            peer_pid=hs.peer_pid,
            peer_maps=hs.peer_maps,
            peer_memory=hs.peer_memory,
            peer_reads=hs.peer_reads,
        )

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        # The control stream ends when the server's process dies or it closes us.
        try:
            while (msg := await read_message(reader)) is not None:
                if msg.get("t") == "pong":
                    self._pong.set()
        except (RpcError, OSError):
            pass
        self._lose(ConnectionLost(f"connection to {self.peer} lost"))

    async def _heartbeat(self, writer: asyncio.StreamWriter, keepalive: KeepAlive) -> None:
        beat = 0
        while not writer.is_closing():
            await asyncio.sleep(keepalive.interval)
            beat += 1
            self._pong.clear()
            try:
                write_message(writer, {"t": "ping", "n": beat})
                async with asyncio.timeout(keepalive.timeout):
                    await self._pong.wait()
            except TimeoutError:
                self._lose(
                    ConnectionLost(
                        f"{self.peer} did not answer a heartbeat within {keepalive.timeout} s"
                    )
                )
                return
            except (OSError, RuntimeError):
                return  # the stream is closing; the watcher reports the loss

    def _lose(self, exc: RpcError) -> None:
        """The connection is gone: fail what is pending and, if asked, reconnect."""
        if self._lost is not None:
            return
        self._connected.clear()
        self._fail(exc)
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.close()
        if self._closing:
            return
        if self._reconnect is None:
            return  # close() releases the endpoint
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self.link is not None and self._ep_open:
            self._ep_open = False  # the new connection gets a new endpoint
            self._spawn(self._manager.close_endpoint(self.link.ep))
        self._spawn(self._reconnect_loop(self._reconnect))

    async def _reconnect_loop(self, policy: Reconnect) -> None:
        attempt = 0
        while not self._closing:
            attempt += 1
            if policy.attempts is not None and attempt > policy.attempts:
                log.warning(
                    "giving up reconnecting to %s after %d attempts", self.peer, attempt - 1
                )
                return
            await asyncio.sleep(policy.delay(attempt))
            try:
                await self._establish()
            except RpcError as exc:
                log.info("reconnecting to %s failed (attempt %d): %s", self.peer, attempt, exc)
                continue
            self.reconnects += 1
            log.info("reconnected to %s after %d attempts", self.peer, attempt)
            return

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the connection is up (after a loss, until it has reconnected).

        Raises:
            Unavailable: Not connected within ``timeout``, or the client is closed.
        """
        if self._closing:
            raise Unavailable(f"the client of {self.peer} is closed")
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            raise Unavailable(f"not connected to {self.peer} within {timeout} s") from None

    def _lost_error(self) -> RpcError:
        """A fresh copy of the error the connection was lost with.

        Raising the one stored instance again and again would chain every failed call's
        traceback (and the frames it holds) onto it while a server is down.
        """
        lost = self._lost
        assert lost is not None
        if type(lost) is RpcError:
            return RpcError(lost.code, lost.message, lost.details)
        return type(lost)(lost.message, lost.details)  # type: ignore[arg-type]

    def _fail(self, exc: RpcError) -> None:
        """Fail every pending call with ``exc`` and mark the connection unusable."""
        if self._lost is not None:
            return
        self._lost = exc
        for call in list(self._pending.values()):
            if not call.fut.done():
                call.fut.set_exception(exc)
        self._pending.clear()
        for stream in list(self._streams.values()):
            stream.fail(exc)
        if self.link is not None:
            self._manager.unregister(self.link.local_id)

    async def _abort(self) -> None:
        if self.link is not None:
            self._manager.unregister(self.link.local_id)
        if self._writer is not None:
            self._writer.close()

    @property
    def closed(self) -> bool:
        """True once the connection is closed or lost."""
        return self._lost is not None

    @property
    def pending(self) -> int:
        """Calls awaiting their reply (streams included)."""
        return len(self._pending) + len(self._streams)

    @property
    def bytes_sent(self) -> int:
        """Bytes sent to the server over UCX (frames and data parts)."""
        return 0 if self.link is None else self.link.bytes_sent

    @property
    def bytes_received(self) -> int:
        """Bytes received from the server over UCX (frames and data parts)."""
        return 0 if self.link is None else self.link.bytes_received

    def add_interceptor(self, interceptor: Interceptor) -> None:
        """Add a client interceptor (innermost of those added so far)."""
        self._interceptors.append(interceptor)

    async def close(self) -> None:
        """Close the connection; calls still pending fail with :class:`Cancelled`."""
        if self._closing:
            return
        self._closing = True
        self._connected.clear()
        self._fail(Cancelled("the client was closed"))
        writer, self._writer = self._writer, None
        if writer is not None and not writer.is_closing():
            try:
                write_message(writer, {"t": "bye"})
            except (OSError, RuntimeError):
                pass
            writer.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if writer is not None:
            try:
                await writer.wait_closed()
            except OSError:
                pass
        if self.link is not None and self._ep_open:
            self._ep_open = False
            await self._manager.close_endpoint(self.link.ep)
        self._manager.disown(self)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- calls ------------------------------------------------------------------------------------

    def _encode(
        self,
        kind: Kind,
        call_id: int,
        method: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        priority: int | None,
        timeout: float | None,
        metadata: Metadata | None,
        flags: int = 0,
    ) -> codec.Encoded:
        link = self.link
        assert link is not None
        try:
            return codec.encode(
                kind,
                call_id,
                [list(args), kwargs],
                flags=flags,
                method=method,
                priority=None if priority is None else int(priority),
                timeout=timeout,
                metadata=metadata,
                oob_threshold=self._oob,
                max_size=link.max_size,
                default=to_wire,
            )
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"cannot serialize the arguments of {method!r}: {exc}") from None

    def _deadline(self, timeout: float | None) -> float | None:
        """The call's deadline: its own timeout, capped by the handler's it is made from."""
        return call_deadline(timeout, self._loop.time())

    async def call(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        priority: int | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``method`` on the server and return its result.

        Inside a handler, the call also inherits the deadline of the call being
        handled (the earlier of the two applies).

        Args:
            method: The method name.
            *args: Positional arguments.
            timeout: Seconds until the call's deadline (None: no deadline). The server
                gets the remaining budget and cancels the handler when it passes.
            priority: The call's priority (default: the method's own default).
            metadata: Request metadata (str keys; str or bytes values).
            **kwargs: Keyword arguments.

        Returns:
            The handler's result.

        Raises:
            DeadlineExceeded: The deadline passed, whatever the server was doing.
            ConnectionLost: The connection was lost while the call was pending.
            RpcError: The server answered with an error (see :mod:`ucxrpc.errors`).
        """
        if self._interceptors:
            return plain(await self._call(method, args, kwargs, timeout, priority, metadata))
        return plain(
            await self._send_call(
                method, args, kwargs, self._deadline(timeout), priority, _check_metadata(metadata)
            )
        )

    async def call_with_metadata(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        priority: int | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, Metadata]:
        """Like :meth:`call`, and also return the metadata the server sent back."""
        kind: CallKind = "client_stream" if _has_input(args, kwargs) else "unary"
        ctx = self._context(kind, method, args, kwargs, timeout, priority, metadata)
        value = await self._run(ctx)
        return plain(value), ctx.response_metadata

    def _context(
        self,
        kind: CallKind,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        priority: int | None,
        metadata: Mapping[str, str | bytes] | None,
        idempotent: bool = False,
    ) -> CallContext:
        return CallContext(
            method,
            kind=kind,
            side="client",
            metadata=dict(_check_metadata(metadata) or {}),
            deadline=self._deadline(timeout),
            priority=priority,
            peer=self.peer,
            args=args,
            kwargs=kwargs,
            idempotent=idempotent,
        )

    async def _call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        priority: int | None,
        metadata: Mapping[str, str | bytes] | None,
        idempotent: bool = False,
    ) -> Any:
        if self._interceptors:
            kind: CallKind = "client_stream" if _has_input(args, kwargs) else "unary"
            ctx = self._context(kind, method, args, kwargs, timeout, priority, metadata, idempotent)
            return await self._run(ctx)
        return await self._send_call(
            method, args, kwargs, self._deadline(timeout), priority, _check_metadata(metadata)
        )

    def _run(self, ctx: CallContext) -> Any:
        async def final() -> Any:
            return await self._send_call(
                ctx.method,
                ctx.args,
                ctx.kwargs,
                ctx.deadline,
                ctx.priority,
                _check_metadata(ctx.metadata),
                ctx,
            )

        return run_chain(self._interceptors, ctx, final) if self._interceptors else final()

    async def _admit(self, method: str, deadline: float | None, priority: int | None) -> None:
        """Wait for a slot under ``max_inflight`` (in priority order)."""
        gate = self._gate
        if gate.try_acquire():
            return
        try:
            if deadline is None:
                await gate.acquire(Priority.NORMAL if priority is None else priority)
            else:
                async with asyncio.timeout_at(deadline):
                    await gate.acquire(Priority.NORMAL if priority is None else priority)
        except TimeoutError:
            raise DeadlineExceeded(f"{method!r} waited past its deadline to be sent") from None

    async def _send_call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None,
        priority: int | None,
        metadata: Metadata | None,
        ctx: CallContext | None = None,
    ) -> Any:
        if self._lost is not None:
            raise self._lost_error()
        loop = self._loop
        await self._admit(method, deadline, priority)
        try:
            if self._lost is not None:
                raise self._lost_error()
            call_id = self._ids.allocate(self._live, len(self._pending) + len(self._streams))
            remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
            args, kwargs, source = _take_input(args, kwargs)
            encoded = self._encode(
                Kind.REQUEST,
                call_id,
                method,
                args,
                kwargs,
                priority,
                remaining,
                metadata,
                0 if source is None else Flags.INPUT_STREAM,
            )
            fut: asyncio.Future[Any] = loop.create_future()
            call = _Call(call_id, fut)
            link = self.link
            assert link is not None
            self._pending[call_id] = call
            if deadline is not None:
                call.timer = self._timers.at(deadline, self._expire, call, method)
            pump = None
            engine = link.engine
            # The reply to a request whose large part the peer reads out of this
            # process is at least that copy away: polling for it would take the core
            # the peer copies on.
            spin = 1
            if (
                encoded.parts
                and link.peer_reads
                and max(map(codec.nbytes, encoded.parts)) >= copier.SPLIT_BYTES
            ):
                spin = 0
            engine.awaiting += spin
            try:
                link.send(call_id, encoded)
                if source is not None:
                    pump = self._pump(call_id, source, functools.partial(_fail, fut))
                return await fut
            except asyncio.CancelledError:
                self._abandon(call, cancel=True)
                raise
            except DeadlineExceeded:
                # The server holds the same deadline and stops the handler itself.
                self._abandon(call, cancel=False)
                raise
            finally:
                engine.awaiting -= spin
                if pump is not None:
                    pump.stop()
                    self._pumps.pop(call_id, None)
                if call.timer is not None:
                    call.timer.cancel()
                self._pending.pop(call_id, None)
                if ctx is not None and call.metadata:
                    ctx.response_metadata = call.metadata
        finally:
            self._gate.release()

    def _pump(self, call_id: int, source: Any, fail: Callable[[BaseException], None]) -> Pump:
        """Start streaming ``source`` into call ``call_id`` (as the server grants credit)."""

        def send(kind: Kind, value: Any) -> None:
            link = self.link
            if link is None or self._lost is not None:
                raise self._lost_error() if self._lost is not None else Unavailable("closed")
            try:
                encoded = codec.encode(
                    kind,
                    call_id,
                    value,
                    oob_threshold=self._oob,
                    max_size=link.max_size,
                    default=to_wire,
                )
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"cannot serialize a stream item: {exc}") from None
            link.send(call_id, encoded)

        def failed(exc: BaseException) -> None:
            self._send_cancel(call_id)
            fail(exc)

        pump = self._pumps[call_id] = Pump(source, self._window, send)
        pump.start(failed)
        return pump

    async def notify(
        self,
        method: str,
        *args: Any,
        priority: int | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        **kwargs: Any,
    ) -> None:
        """Send a one-way call: the server runs ``method`` and sends no reply.

        Client interceptors run around the send (``ctx.kind == "notify"``).

        Raises:
            ConnectionLost: The connection is closed.
        """
        if not self._interceptors:
            self._send_notify(method, args, kwargs, priority, _check_metadata(metadata))
            return
        ctx = self._context("notify", method, args, kwargs, None, priority, metadata)

        async def final() -> None:
            md = _check_metadata(ctx.metadata)
            self._send_notify(ctx.method, ctx.args, ctx.kwargs, ctx.priority, md)

        await run_chain(self._interceptors, ctx, final)

    def _send_notify(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        priority: int | None,
        metadata: Metadata | None,
    ) -> None:
        if self._lost is not None:
            raise self._lost_error()
        # Notifications get no reply: call id 0, which no call ever has.
        encoded = self._encode(Kind.NOTIFY, 0, method, args, kwargs, priority, None, metadata)
        assert self.link is not None
        self.link.send(0, encoded)

    def stream(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        priority: int | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        **kwargs: Any,
    ) -> Stream[Any]:
        """Call a streaming method: ``async for item in client.stream("count", 10)``.

        The request is sent when iteration starts. The deadline covers the whole
        stream. Leaving ``async for x in client.stream(...)`` early cancels the
        generator on the server; a stream kept in a variable must be closed
        (``await s.aclose()`` or ``async with client.stream(...) as s``).

        Args:
            method: The method name.
            *args: Positional arguments.
            timeout: Seconds until the stream's deadline (None: no deadline).
            priority: The call's priority.
            metadata: Request metadata.
            **kwargs: Keyword arguments.

        Returns:
            An async iterator of the items (also an async context manager).
        """
        return self._stream(method, args, kwargs, timeout, priority, metadata, plain)

    def _stream(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        priority: int | None,
        metadata: Mapping[str, str | bytes] | None,
        convert: Callable[[Any], T] | None,
    ) -> Stream[T]:
        md = _check_metadata(metadata)
        return Stream(
            self,
            method,
            args,
            kwargs,
            timeout=timeout,
            priority=priority,
            metadata=md,
            convert=convert,
        )

    async def _open_stream(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        priority: int | None,
        metadata: Metadata | None,
    ) -> StreamCall:
        kind: CallKind = "bidi" if _has_input(args, kwargs) else "stream"
        ctx = self._context(kind, method, args, kwargs, timeout, priority, metadata)

        async def final() -> StreamCall:
            return await self._send_stream(ctx)

        if self._interceptors:
            opened = await run_chain(self._interceptors, ctx, final)
            if not isinstance(opened, StreamCall):
                raise TypeError("a client interceptor must return what proceed() returned")
            return opened
        return await final()

    async def _send_stream(self, ctx: CallContext) -> StreamCall:
        if self._lost is not None:
            raise self._lost_error()
        method, deadline = ctx.method, ctx.deadline
        await self._admit(method, deadline, ctx.priority)
        loop = self._loop
        call_id = self._ids.allocate(self._live, len(self._pending) + len(self._streams))
        call = StreamCall(self, call_id, self._window)
        self._streams[call.call_id] = call  # from here on, _end_stream releases the gate
        try:
            if self._lost is not None:
                raise self._lost_error()
            remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
            args, kwargs, source = _take_input(ctx.args, ctx.kwargs)
            encoded = self._encode(
                Kind.STREAM,
                call.call_id,
                method,
                args,
                kwargs,
                ctx.priority,
                remaining,
                _check_metadata(ctx.metadata),
                0 if source is None else Flags.INPUT_STREAM,
            )
            if deadline is not None:
                call.timer = self._timers.at(deadline, self._expire_stream, call, method)
            assert self.link is not None
            self.link.send(call.call_id, encoded)
            if source is not None:
                self._pump(call_id, source, call.fail)
        except BaseException:
            call.done = True
            self._end_stream(call)
            raise
        return call

    def _expire_stream(self, call: StreamCall, method: str) -> None:
        call.fail(DeadlineExceeded(f"stream {method!r} did not finish in time"))

    def _grant(self, call_id: int, count: int) -> None:
        if self._lost is None and self.link is not None:
            try:
                self.link.send(call_id, codec.encode(Kind.CREDIT, call_id, count))
            except RpcError:
                pass

    def _end_stream(self, call: StreamCall, *, cancel: bool = False) -> None:
        if self._streams.pop(call.call_id, None) is None:
            return
        pump = self._pumps.pop(call.call_id, None)
        if pump is not None:
            pump.stop()
        if call.timer is not None:
            call.timer.cancel()
        self._gate.release()
        if cancel:
            self._send_cancel(call.call_id)

    def stub(
        self,
        service: Callable[..., S],
        *,
        timeout: float | None = None,
        priority: int | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
    ) -> S:
        """A typed stub of a service interface: ``client.stub(EchoApi).shout(req)``.

        Type checkers see the stub as an instance of ``service``. Replies (and stream
        items) are validated into the declared result types; a reply that does not
        match raises :class:`~ucxrpc.errors.InvalidReply`.

        Args:
            service: The :class:`~ucxrpc.Service` interface (abstract or not) or an
                implementation. (Typed as a callable returning the service so that
                type checkers accept abstract interfaces.)
            timeout: The timeout of every call made through the stub.
            priority: The priority of every call made through the stub.
            metadata: Metadata sent with every call made through the stub.
        """
        md = _check_metadata(metadata)
        return make_stub(self, service, timeout=timeout, priority=priority, metadata=md)

    async def describe(self, *, timeout: float | None = None) -> ServerDescription:
        """The server's methods, kinds, priorities and JSON Schemas (reflection)."""
        value = await self._call(DESCRIBE_METHOD, (), {}, timeout, None, None, True)
        try:
            return ServerDescription.model_validate(value)
        except ValueError as exc:
            raise ProtocolError(f"malformed description from {self.peer}: {exc}") from None

    def _expire(self, call: _Call, method: str) -> None:
        if not call.fut.done():
            call.fut.set_exception(DeadlineExceeded(f"{method!r} did not answer in time"))

    def _abandon(self, call: _Call, *, cancel: bool) -> None:
        """Forget a call (a late reply is dropped); with ``cancel``, tell the server."""
        if cancel:
            self._send_cancel(call.call_id)

    def _send_cancel(self, call_id: int) -> None:
        if self._lost is None and self.link is not None:
            try:
                self.link.send(call_id, codec.encode(Kind.CANCEL, call_id))
            except RpcError:
                pass

    # -- frames from the server, in order (the link's owner) ------------------------------------

    def deliver(self, header: codec.Header, payload: memoryview, parts: list[Any]) -> None:
        """Take one frame from the server, in order (called by the connection's link).

        Args:
            header: The frame's decoded header.
            payload: The frame's msgpack payload.
            parts: The data parts that came with the frame.
        """
        call_id = header.call_id
        if header.kind is Kind.CREDIT:
            self._on_credit(call_id, header, payload)
            return
        call = self._pending.get(call_id)
        if call is not None:
            self._finish(call, header, payload, parts)
            return
        stream = self._streams.get(call_id)
        if stream is not None:
            stream.on_frame(header, payload, parts)
        elif self.link is not None:
            # The reply of a call abandoned (timed out or cancelled): dropped.
            self.link.unmatched += 1

    def _on_credit(self, call_id: int, header: codec.Header, payload: memoryview) -> None:
        pump = self._pumps.get(call_id)
        if pump is None:
            return  # the call has ended; credits may cross its end
        try:
            count = codec.decode_payload(header, payload)
        except ProtocolError:
            count = None
        if type(count) is not int or count <= 0:
            self.failed(call_id, Kind.CREDIT, ProtocolError("malformed CREDIT frame"))
            return
        pump.credit.grant(count)

    def failed(self, call_id: int, kind: Kind | None, error: RpcError) -> None:
        """Fail one call or stream (called by the link when its frame or parts were bad).

        Args:
            call_id: The call to fail.
            kind: The kind of the frame that failed, when known.
            error: What the call raises.
        """
        call = self._pending.get(call_id)
        if call is not None and not call.fut.done():
            call.fut.set_exception(error)
        stream = self._streams.get(call_id)
        if stream is not None:
            stream.fail(error)

    def broken(self, error: RpcError) -> None:
        """Fail every pending call with ``error``: the connection is lost (called by
        the link).

        Args:
            error: What the pending calls raise (a ``ConnectionLost`` as a rule).
        """
        self._lose(error)

    def _finish(
        self, call: _Call, header: codec.Header, payload: memoryview, parts: list[Any]
    ) -> None:
        fut = call.fut
        if fut.done():
            return
        try:
            value = codec.decode_payload(header, payload, parts, array_hook=from_array)
        except RpcError as err:
            fut.set_exception(err)
            return
        call.metadata = header.metadata
        if header.kind is Kind.REPLY:
            fut.set_result(value)
        elif header.kind is Kind.ERROR:
            error = error_from_payload(value)
            error.metadata = header.metadata or {}
            fut.set_exception(error)
        else:
            fut.set_exception(ProtocolError(f"unexpected {header.kind.name} frame as a reply"))
