"""The client: calls and notifications over one connection, many calls in flight."""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import TYPE_CHECKING, Any

from . import codec
from ._control import auth_proof, check_version, read_message, tune_socket, write_message
from ._handlers import Priority
from ._sched import PriorityLimiter
from .codec import Kind
from .errors import (
    Cancelled,
    ConnectionLost,
    DeadlineExceeded,
    ProtocolError,
    RpcError,
    Unauthenticated,
    Unavailable,
    error_from_status,
)
from .transport import Link

if TYPE_CHECKING:
    from ._engine import Op
    from .manager import Manager

__all__ = ["Client"]


class _Call:
    """A call awaiting its reply."""

    __slots__ = ("call_id", "fut", "op", "slot", "timer")

    def __init__(self, call_id: int, fut: asyncio.Future[Any], slot: bytearray) -> None:
        self.call_id = call_id
        self.fut = fut
        self.slot = slot
        self.op: Op | None = None
        self.timer: asyncio.TimerHandle | None = None


class Client:
    """A connection to one server. Create it with :meth:`Manager.connect`.

    Many calls may be in flight at once; each waits for its own reply, which UCX
    matches to it by tag. Use ``async with client:`` to close it when done.
    """

    def __init__(self, manager: Manager) -> None:
        self._manager = manager
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        cfg = manager.config
        self._slot_size = cfg.reply_slot_size
        self._oob = cfg.oob_threshold
        self._gate = PriorityLimiter(cfg.max_inflight)
        self.link: Link = None  # type: ignore[assignment]  # set by connect()
        self._writer: asyncio.StreamWriter | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._lost: RpcError | None = None
        self._local_id = 0
        self.peer = ""

    # -- connection -----------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, manager: Manager, host: str, port: int, *, timeout: float | None = None
    ) -> Client:
        """Connect to the server at ``host:port`` (see :meth:`Manager.connect`)."""
        self = cls(manager)
        limit = manager.config.connect_timeout if timeout is None else timeout
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
        self.peer = f"{host}:{port}"
        self._watcher = self._loop.create_task(self._watch(self._reader))
        return self

    async def _handshake(self, host: str, port: int) -> None:
        manager = self._manager
        cfg = manager.config
        reader, writer = await asyncio.open_connection(host, port)
        self._reader, self._writer = reader, writer
        tune_socket(writer)
        first = await read_message(reader)
        if first is None:
            raise Unavailable(f"{host}:{port} closed the connection during the handshake")
        check_version(first)
        self._local_id = manager.register(self)
        nonce = os.urandom(16)
        hello: dict[str, Any] = {
            "v": codec.VERSION,
            "addr": manager.worker_address,
            "cid": self._local_id,
            "slot": self._slot_size,
            "max": cfg.max_message_size,
            "nonce": nonce,
        }
        token = cfg.auth_token.get_secret_value() if cfg.auth_token else None
        challenge = first.get("challenge")
        if token is not None and isinstance(challenge, bytes):
            hello["proof"] = auth_proof(token, challenge, b"client")
        write_message(writer, hello)
        welcome = await read_message(reader)
        if welcome is None:
            raise Unavailable(f"{host}:{port} closed the connection during the handshake")
        if "error" in welcome:
            raise error_from_status(int(welcome["error"]), str(welcome.get("message", "")))
        check_version(welcome)
        if token is not None and welcome.get("proof") != auth_proof(token, nonce, b"server"):
            raise Unauthenticated(f"{host}:{port} did not prove it knows the auth token")
        addr, cid, peer_max = welcome.get("addr"), welcome.get("cid"), welcome.get("max")
        if not isinstance(addr, bytes) or type(cid) is not int or type(peer_max) is not int:
            raise ProtocolError("malformed welcome from the server")
        ep = manager.endpoint_to(addr)
        max_size = min(cfg.max_message_size, peer_max)
        self.link = Link(manager.engine, ep, self._local_id, cid, 0, max_size, self._fail)

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        # The control stream ends when the server's process dies or it closes us.
        try:
            while await read_message(reader) is not None:
                pass
        except (RpcError, OSError):
            pass
        self._fail(ConnectionLost(f"connection to {self.peer} lost"))

    def _fail(self, exc: RpcError) -> None:
        """Fail every pending call with ``exc`` and mark the connection unusable."""
        if self._lost is not None:
            return
        self._lost = exc
        if self.link is not None:
            self.link.closed = True
        engine = self._manager._engine
        for call in list(self._pending.values()):
            if call.op is not None and engine is not None:
                engine.cancel(call.op)
            if not call.fut.done():
                call.fut.set_exception(exc)
        self._pending.clear()
        self._manager.unregister(self._local_id)

    async def _abort(self) -> None:
        if self._local_id:
            self._manager.unregister(self._local_id)
        if self._writer is not None:
            self._writer.close()

    @property
    def closed(self) -> bool:
        """True once the connection is closed or lost."""
        return self._lost is not None

    @property
    def pending(self) -> int:
        """Calls awaiting their reply."""
        return len(self._pending)

    async def close(self) -> None:
        """Close the connection; calls still pending fail with :class:`Cancelled`."""
        if self._writer is None:
            return
        self._fail(Cancelled("the client was closed"))
        writer, self._writer = self._writer, None
        try:
            write_message(writer, {"t": "bye"})
        except (OSError, RuntimeError):
            pass
        writer.close()
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
        try:
            await writer.wait_closed()
        except OSError:
            pass
        await self._manager.close_endpoint(self.link.ep)
        self._manager._forget_client(self)

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
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        priority: int | None,
        timeout: float | None,
    ) -> codec.Encoded:
        try:
            return codec.encode(
                kind,
                call_id,
                [list(args), kwargs],
                method=method,
                priority=None if priority is None else int(priority),
                timeout=timeout,
                oob_threshold=self._oob,
                max_size=self.link.max_size,
            )
        except TypeError as exc:
            raise ProtocolError(f"cannot serialize the arguments of {method!r}: {exc}") from None

    async def call(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        priority: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``method`` on the server and return its result.

        Args:
            method: The method name.
            *args: Positional arguments.
            timeout: Seconds until the call's deadline (None: no deadline). The server
                gets the remaining budget and cancels the handler when it passes.
            priority: The call's priority (default: the method's own default).
            **kwargs: Keyword arguments.

        Returns:
            The handler's result.

        Raises:
            DeadlineExceeded: The deadline passed, whatever the server was doing.
            ConnectionLost: The connection was lost while the call was pending.
            RpcError: The server answered with an error (see :mod:`ucxrpc.errors`).
        """
        if self._lost is not None:
            raise self._lost
        loop = self._loop
        deadline = None if timeout is None else loop.time() + timeout
        gate = self._gate
        if not gate.try_acquire():
            try:
                if deadline is None:
                    await gate.acquire(Priority.NORMAL if priority is None else priority)
                else:
                    async with asyncio.timeout_at(deadline):
                        await gate.acquire(Priority.NORMAL if priority is None else priority)
            except TimeoutError:
                raise DeadlineExceeded(f"{method!r} waited past its deadline to be sent") from None
        try:
            if self._lost is not None:
                raise self._lost
            call_id = next(self._ids) & codec.MAX_CALL_ID
            remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
            encoded = self._encode(Kind.REQUEST, call_id, method, args, kwargs, priority, remaining)
            fut: asyncio.Future[Any] = loop.create_future()
            call = _Call(call_id, fut, bytearray(self._slot_size))
            link = self.link
            call.op = link.recv_frame(call_id, self._reply_cb(call), call.slot)
            self._pending[call_id] = call
            if deadline is not None:
                call.timer = loop.call_at(deadline, self._expire, call, method)
            try:
                link.send(call_id, encoded)
                return await fut
            except asyncio.CancelledError:
                self._abandon(call, notify=True)
                raise
            except DeadlineExceeded:
                self._abandon(call, notify=True)
                raise
            finally:
                if call.timer is not None:
                    call.timer.cancel()
                self._pending.pop(call_id, None)
        finally:
            gate.release()

    async def notify(
        self, method: str, *args: Any, priority: int | None = None, **kwargs: Any
    ) -> None:
        """Send a one-way call: the server runs ``method`` and sends no reply.

        Raises:
            ConnectionLost: The connection is closed.
        """
        if self._lost is not None:
            raise self._lost
        call_id = next(self._ids) & codec.MAX_CALL_ID
        encoded = self._encode(Kind.NOTIFY, call_id, method, args, kwargs, priority, None)
        self.link.send(call_id, encoded)

    def _expire(self, call: _Call, method: str) -> None:
        if not call.fut.done():
            call.fut.set_exception(DeadlineExceeded(f"{method!r} did not answer in time"))

    def _abandon(self, call: _Call, *, notify: bool) -> None:
        """Withdraw a call's posted receive and tell the server to stop working on it."""
        engine = self._manager._engine
        if call.op is not None and engine is not None:
            engine.cancel(call.op)
            call.op = None
        if notify and self._lost is None:
            try:
                self.link.send(call.call_id, codec.encode(Kind.CANCEL, call.call_id))
            except RpcError:
                pass

    def _reply_cb(self, call: _Call) -> Any:
        def done(exc: BaseException | None) -> None:
            call.op = None
            fut = call.fut
            if exc is not None:
                if not fut.done():
                    fut.set_exception(exc)
                return
            try:
                header, payload = codec.decode_header(
                    call.slot, max_size=self.link.max_size, exact=False
                )
            except RpcError as err:
                if not fut.done():
                    fut.set_exception(err)
                return
            self.link.bytes_received += codec.frame_size(call.slot)
            if header.parts:
                if fut.done():
                    self.link.drain_parts(call.call_id, len(header.parts))
                    return
                self.link.recv_parts(
                    call.call_id,
                    header.parts,
                    lambda e, parts: self._finish(fut, header, payload, parts, e),
                )
            else:
                self._finish(fut, header, payload, [], None)

        return done

    def _finish(
        self,
        fut: asyncio.Future[Any],
        header: codec.Header,
        payload: memoryview,
        parts: list[Any],
        exc: BaseException | None,
    ) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
            return
        try:
            value = codec.decode_payload(header, payload, parts)
        except RpcError as err:
            fut.set_exception(err)
            return
        if header.kind is Kind.REPLY:
            fut.set_result(value)
        elif header.kind is Kind.ERROR:
            fut.set_exception(_error_from_payload(value))
        else:
            fut.set_exception(ProtocolError(f"unexpected {header.kind.name} frame as a reply"))

    # -- frames that no call was waiting for -------------------------------------------------------

    def on_frame(self, call_id: int, buf: bytearray) -> None:
        # A reply whose call was abandoned (timed out or cancelled): consume its parts.
        try:
            header, _ = codec.decode_header(buf)
        except RpcError:
            return
        if header.parts:
            self.link.drain_parts(call_id, len(header.parts))

    def on_oversized(self, call_id: int, size: int) -> None:
        call = self._pending.get(call_id)
        if call is not None and not call.fut.done():
            call.fut.set_exception(ProtocolError(f"oversized reply of {size} bytes"))


def _error_from_payload(value: Any) -> RpcError:
    if type(value) is not list or len(value) != 5 or type(value[0]) is not int:
        return ProtocolError("malformed error reply")
    code, message, details, remote_type, tb = value
    return error_from_status(code, str(message), details, str(remote_type or ""), str(tb or ""))
