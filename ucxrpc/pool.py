"""A pool of client connections to one server, opened on demand and shared out one at a time.

Opening a connection costs a TCP handshake plus a UCX endpoint, so programs that make
calls from many tasks keep a few connections open and lend them out::

    async with ClientPool(manager, "127.0.0.1", port, max_connections=4) as pool:
        async with pool.acquire() as client:      # this task's alone until the block ends
            await client.call("ping")
        await pool.call("echo", "hi")             # acquire, call, give back

Connections are opened lazily, never more than ``max_connections`` at once (those being
opened count). Tasks that find every connection taken wait in a FIFO queue, for at most
``acquire_timeout`` seconds. A connection found closed or lost, whether when it is given
back or when it is taken from the idle set, is discarded and a new one opened in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from .calls.context import call_deadline
from .calls.interceptors import Interceptor
from .errors import DeadlineExceeded, ResourceExhausted, Unavailable

if TYPE_CHECKING:
    from .calls.client import Client
    from .calls.manager import Manager

__all__ = ["ClientPool"]


class _Slot:
    """Handed to a waiter instead of a client: room to open a new connection."""

    __repr__ = object.__repr__


#: The one slot token; receiving it means the pool has already counted the new connection.
_SLOT: Final = _Slot()


class ClientPool:
    """Up to ``max_connections`` clients of one server, each lent to one task at a time.

    Args:
        manager: The manager that opens the connections.
        host: The server's host.
        port: The server's port.
        max_connections: Connections open (or being opened) at most.
        acquire_timeout: Seconds a task may wait for a connection when all are taken
            (None: wait as long as it takes). Opening a connection is bounded separately,
            by ``Config.connect_timeout``.
        interceptors: Client interceptors installed on every connection the pool opens.

    Raises:
        ValueError: ``max_connections`` is below 1 or ``acquire_timeout`` is negative.
    """

    def __init__(
        self,
        manager: Manager,
        host: str,
        port: int,
        *,
        max_connections: int = 4,
        acquire_timeout: float | None = None,
        interceptors: Sequence[Interceptor] = (),
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if acquire_timeout is not None and acquire_timeout < 0:
            raise ValueError("acquire_timeout must not be negative")
        self._manager = manager
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.acquire_timeout = acquire_timeout
        self._interceptors = tuple(interceptors)
        # Most recently returned last: reusing it keeps the others free to be closed by
        # the server's idle policies, and its UCX endpoint is the warmest.
        self._idle: list[Client] = []
        self._in_use: set[Client] = set()
        self._opening = 0  # counted slots whose connection is not open yet
        self._waiters: deque[asyncio.Future[Client | _Slot]] = deque()
        self._closed = False

    # -- state ------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Connections open or being opened (idle, lent out, or connecting)."""
        return len(self._idle) + len(self._in_use) + self._opening

    @property
    def idle(self) -> int:
        """Open connections that no task holds."""
        return len(self._idle)

    @property
    def in_use(self) -> int:
        """Connections lent out to tasks."""
        return len(self._in_use)

    @property
    def waiting(self) -> int:
        """Tasks waiting for a connection."""
        return sum(1 for fut in self._waiters if not fut.done())

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def __repr__(self) -> str:
        return (
            f"<ClientPool {self.host}:{self.port} size={self.size}/{self.max_connections} "
            f"idle={self.idle} in_use={self.in_use} waiting={self.waiting}>"
        )

    # -- lending ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def acquire(self, *, timeout: float | None = None) -> AsyncIterator[Client]:
        """Borrow a connection for the body of an ``async with`` block.

        The client is the task's alone until the block ends; it goes back to the pool
        then, or is discarded if it was closed or lost meanwhile.

        Args:
            timeout: Seconds to wait for a connection, overriding ``acquire_timeout``.

        Yields:
            A connected :class:`~ucxrpc.Client`.

        Raises:
            ResourceExhausted: No connection became free within the timeout.
            Unavailable: The pool is closed, or a new connection could not be opened.
        """
        limit = self.acquire_timeout if timeout is None else timeout
        client = await self._acquire(limit, None)
        try:
            yield client
        finally:
            await self._release(client)

    async def call(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        priority: int | None = None,
        metadata: Mapping[str, str | bytes] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Borrow a connection, make one call on it and give it back.

        Args:
            method: The method name.
            *args: Positional arguments.
            timeout: Seconds until the call's deadline, counting the wait for a
                connection (None: no deadline). Inside a handler, the deadline of the
                call being handled applies too (the earlier of the two).
            priority: The call's priority.
            metadata: Request metadata.
            **kwargs: Keyword arguments.

        Returns:
            The handler's result.

        Raises:
            ResourceExhausted: No connection became free within ``acquire_timeout``.
            DeadlineExceeded: The deadline passed, waiting for a connection or the reply.
            RpcError: Whatever :meth:`Client.call <ucxrpc.Client.call>` raises.
        """
        loop = asyncio.get_running_loop()
        deadline = call_deadline(timeout, loop.time())
        client = await self._acquire(self.acquire_timeout, deadline)
        try:
            remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
            return await client.call(
                method, *args, timeout=remaining, priority=priority, metadata=metadata, **kwargs
            )
        finally:
            await self._release(client)

    async def _acquire(self, limit: float | None, deadline: float | None) -> Client:
        grant = self._take()
        if grant is None:
            grant = await self._wait(limit, deadline)
        if isinstance(grant, _Slot):
            return await self._open(None)
        if grant.closed:
            # Lost while idle: its place in the pool passes to a new connection.
            self._in_use.discard(grant)
            self._opening += 1
            return await self._open(grant)
        return grant

    def _take(self) -> Client | _Slot | None:
        """A connection or a slot at once, or None if the caller must queue."""
        if self._closed:
            raise Unavailable(f"the pool of {self.host}:{self.port} is closed")
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()
        if self._waiters:
            return None  # FIFO: a newcomer does not overtake the queue
        if self._idle:
            client = self._idle.pop()
            self._in_use.add(client)
            return client
        if self.size < self.max_connections:
            self._opening += 1
            return _SLOT
        return None

    async def _wait(self, limit: float | None, deadline: float | None) -> Client | _Slot:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Client | _Slot] = loop.create_future()
        self._waiters.append(fut)
        until = None if limit is None else loop.time() + limit
        by_deadline = deadline is not None and (until is None or deadline < until)
        if by_deadline:
            until = deadline
        try:
            async with asyncio.timeout_at(until):
                return await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Granted in the same loop iteration as the timeout or cancellation.
                self._give_back(fut.result())
            else:
                fut.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            if isinstance(exc, TimeoutError):
                if by_deadline:
                    raise DeadlineExceeded(
                        f"waited past the deadline for a connection to {self.host}:{self.port}"
                    ) from None
                raise ResourceExhausted(
                    f"no connection to {self.host}:{self.port} became free within {limit}s "
                    f"(all {self.max_connections} in use)"
                ) from None
            raise

    async def _open(self, broken: Client | None) -> Client:
        """Open a connection in a slot already counted in ``_opening``."""
        try:
            if broken is not None:
                await _close_quietly(broken)
            client = await self._manager.connect(
                self.host, self.port, interceptors=self._interceptors
            )
        except BaseException:
            self._opening -= 1
            self._dispatch()
            raise
        self._opening -= 1
        if self._closed:
            await _close_quietly(client)
            self._dispatch()
            raise Unavailable(f"the pool of {self.host}:{self.port} was closed")
        self._in_use.add(client)
        return client

    async def _release(self, client: Client) -> None:
        self._in_use.discard(client)
        if client.closed or self._closed:
            self._dispatch()  # its slot is free: a waiter may open a new connection
            await _close_quietly(client)
            return
        self._idle.append(client)
        self._dispatch()

    def _give_back(self, grant: Client | _Slot) -> None:
        """Undo a grant its waiter can no longer use."""
        if isinstance(grant, _Slot):
            self._opening -= 1
        else:
            self._in_use.discard(grant)
            if not self._closed:
                self._idle.append(grant)  # if it is broken, the next taker replaces it
        self._dispatch()

    def _dispatch(self) -> None:
        """Serve queued waiters, oldest first, while there is a connection or room."""
        while self._waiters:
            fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            grant: Client | _Slot
            if self._idle:
                grant = self._idle.pop()
                self._in_use.add(grant)
            elif self.size < self.max_connections and not self._closed:
                self._opening += 1
                grant = _SLOT
            else:
                return
            self._waiters.popleft()
            fut.set_result(grant)

    # -- shutdown ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every connection, idle or lent out, and refuse further use.

        Calls still in flight on lent-out connections fail with
        :class:`~ucxrpc.Cancelled`; tasks waiting for a connection get
        :class:`~ucxrpc.Unavailable`.
        """
        if self._closed:
            return
        self._closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(Unavailable(f"the pool of {self.host}:{self.port} was closed"))
        clients = [*self._idle, *self._in_use]
        self._idle.clear()
        for client in clients:
            await _close_quietly(client)

    async def __aenter__(self) -> ClientPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _close_quietly(client: Client) -> None:
    # A lost connection still holds its control socket and UCX endpoint until closed.
    with contextlib.suppress(Exception):
        await client.close()
