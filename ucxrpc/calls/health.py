"""Health checking, like gRPC's ``grpc.health.v1``: every server answers two built-in
methods with the status of the whole server (service ``""``) and of each service.

- :data:`HEALTH_CHECK_METHOD` (``ucxrpc.health.check``, unary): the status of one
  service. A service the server does not know raises an :class:`~ucxrpc.RpcError`
  with :attr:`~ucxrpc.StatusCode.NOT_FOUND`.
- :data:`HEALTH_WATCH_METHOD` (``ucxrpc.health.watch``, server streaming): the status
  at once, then each change. A service the server does not know is reported as
  ``SERVICE_UNKNOWN`` and watched until it appears. When the server drains
  (:meth:`Server.stop`), every watch reports ``NOT_SERVING`` and ends.

The application sets statuses on :attr:`Server.health` (a :class:`Health`):
``server.health.set("echo.v1", "NOT_SERVING")``. The whole server is ``SERVING`` from
creation and each service from :meth:`Server.add_service` on; while the server drains,
every known service reads ``NOT_SERVING``. Clients ask through the typed interface
:class:`HealthApi`: ``await client.stub(ucxrpc.HealthApi).check("echo.v1")``.
"""

from __future__ import annotations

import asyncio
import threading
from abc import abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from enum import StrEnum
from typing import Any

from ..errors import RpcError, StatusCode
from .service import Service, rpc

__all__ = [
    "HEALTH_CHECK_METHOD",
    "HEALTH_METHODS",
    "HEALTH_SERVICE",
    "HEALTH_WATCH_METHOD",
    "Health",
    "HealthApi",
    "HealthStatus",
    "health_methods",
]

#: The name of the built-in health service.
HEALTH_SERVICE = "ucxrpc.health"
#: The built-in unary method: the status of one service.
HEALTH_CHECK_METHOD = f"{HEALTH_SERVICE}.check"
#: The built-in server-streaming method: the status of one service, then each change.
HEALTH_WATCH_METHOD = f"{HEALTH_SERVICE}.watch"
#: Both built-in health methods (still answered while the server drains).
HEALTH_METHODS = frozenset({HEALTH_CHECK_METHOD, HEALTH_WATCH_METHOD})

#: Changes kept for a watcher that has not sent the previous ones yet; beyond it the
#: oldest go (the latest status is always kept), so a slow watcher costs bounded memory.
WATCH_BACKLOG = 16


class HealthStatus(StrEnum):
    """The serving status of a server or of one of its services (gRPC's names)."""

    #: The status is not known (set by the application, e.g. while it starts).
    UNKNOWN = "UNKNOWN"
    #: The service answers calls.
    SERVING = "SERVING"
    #: The service does not answer calls (or the server is draining).
    NOT_SERVING = "NOT_SERVING"
    #: Only from a watch: the server does not know the service (yet).
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"


class HealthApi(Service, name=HEALTH_SERVICE):
    """The built-in health service, as clients see it: ``client.stub(HealthApi)``.

    Every :class:`~ucxrpc.Server` implements it; there is nothing to register.
    """

    @rpc(idempotent=True)
    @abstractmethod
    async def check(self, service: str = "") -> HealthStatus:
        """The status of ``service`` ("" for the whole server).

        Raises:
            RpcError: ``NOT_FOUND`` when the server does not know ``service``.
        """

    @rpc(idempotent=True)
    @abstractmethod
    def watch(self, service: str = "") -> AsyncIterator[HealthStatus]:
        """The status of ``service`` at once, then each change (SERVICE_UNKNOWN when
        the server does not know it). Ends when the server drains."""


class _Watcher:
    """One running watch: the changes it has not sent yet, and how to wake it."""

    __slots__ = ("changes", "ended", "loop", "service", "wake")

    def __init__(self, service: str, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop
        self.wake = asyncio.Event()
        self.changes: deque[HealthStatus] = deque(maxlen=WATCH_BACKLOG)
        self.ended = False

    def push(self, status: HealthStatus | None) -> None:
        """Queue ``status`` (None: the watch ends) and wake the watch, from any thread."""
        if status is None:
            self.ended = True
        else:
            self.changes.append(status)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.wake.set()
        else:
            try:
                self.loop.call_soon_threadsafe(self.wake.set)
            except RuntimeError:
                pass  # that loop is closed: so is the watch


def _status(value: HealthStatus | str) -> HealthStatus:
    try:
        status = HealthStatus(value)
    except ValueError:
        raise ValueError(
            f"a health status is SERVING, NOT_SERVING or UNKNOWN, not {value!r}"
        ) from None
    if status is HealthStatus.SERVICE_UNKNOWN:
        raise ValueError("SERVICE_UNKNOWN is what a watch reports, not a status to set")
    return status


class Health:
    """The serving status of a server (service ``""``) and of each of its services.

    Every :class:`~ucxrpc.Server` has one, :attr:`Server.health`; its methods may be
    called from any thread (plain handlers run in a thread pool).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._statuses: dict[str, HealthStatus] = {"": HealthStatus.SERVING}
        self._watchers: set[_Watcher] = set()
        self._draining = False

    def set(self, service: str, status: HealthStatus | str) -> None:
        """Set the status of ``service`` ("" for the whole server); watchers are told.

        While the server drains, the status is recorded but reads ``NOT_SERVING``
        until the server starts again.

        Args:
            service: The service name, as the server knows it (``"echo.v1"``), or "".
            status: ``SERVING``, ``NOT_SERVING`` or ``UNKNOWN`` (enum or name).

        Raises:
            ValueError: ``status`` is not one of those.
        """
        if not isinstance(service, str):
            raise TypeError(f"a service name is a str, not {type(service).__name__}")
        new = _status(status)
        with self._lock:
            before = self._effective(service)
            self._statuses[service] = new
            after = self._effective(service)
            if after is not before:
                for watcher in self._watchers:
                    if watcher.service == service:
                        watcher.push(after)

    def get(self, service: str = "") -> HealthStatus | None:
        """The status of ``service`` now (NOT_SERVING while draining); None if unknown."""
        with self._lock:
            return self._lookup(service)

    def add(self, service: str) -> None:
        """Make ``service`` known as ``SERVING`` unless it already has a status.

        :meth:`Server.add_service` calls this for each service it registers.
        """
        with self._lock:
            known = service in self._statuses
        if not known:
            self.set(service, HealthStatus.SERVING)

    @property
    def statuses(self) -> dict[str, HealthStatus]:
        """Every known service and its status now, sorted by name ("" first)."""
        with self._lock:
            return {name: self._effective(name) for name in sorted(self._statuses)}

    @property
    def draining(self) -> bool:
        """True between :meth:`shutdown` and :meth:`resume`."""
        return self._draining

    def shutdown(self) -> None:
        """Every known service reads ``NOT_SERVING`` and every watch ends after saying so.

        The server calls this when it starts draining (:meth:`Server.stop`).
        """
        with self._lock:
            self._draining = True
            for watcher in self._watchers:
                if watcher.service in self._statuses:
                    watcher.push(HealthStatus.NOT_SERVING)
                watcher.push(None)

    def resume(self) -> None:
        """The statuses the application set apply again (the server calls this when it
        starts)."""
        with self._lock:
            self._draining = False

    # -- the built-in methods ------------------------------------------------------------------

    def _effective(self, service: str) -> HealthStatus:
        """The status of ``service`` (lock held); SERVICE_UNKNOWN if unknown."""
        return self._lookup(service) or HealthStatus.SERVICE_UNKNOWN

    def _lookup(self, service: str) -> HealthStatus | None:
        status = self._statuses.get(service)
        if status is None:
            return None
        return HealthStatus.NOT_SERVING if self._draining else status

    async def check(self, service: str = "") -> HealthStatus:
        """The serving status of a service ("" for the whole server).

        This is the handler of ``ucxrpc.health.check``.

        Raises:
            RpcError: ``NOT_FOUND`` when ``service`` is unknown.
        """
        status = self.get(service)
        if status is None:
            raise RpcError(StatusCode.NOT_FOUND, f"unknown service {service!r}")
        return status

    async def watch(self, service: str = "") -> AsyncIterator[HealthStatus]:
        """The serving status of a service at once, then each change.

        This is the handler of ``ucxrpc.health.watch``; it ends when the server drains.
        """
        watcher = _Watcher(service, asyncio.get_running_loop())
        with self._lock:
            last = self._effective(service)
            if self._draining:
                watcher.ended = True
            else:
                self._watchers.add(watcher)
        try:
            yield last
            while not watcher.ended or watcher.changes:
                if not watcher.changes and not watcher.ended:
                    await watcher.wake.wait()
                    watcher.wake.clear()
                # Taken under the lock: set() may append from another thread.
                with self._lock:
                    changes = list(watcher.changes)
                    watcher.changes.clear()
                for status in changes:
                    if status is not last:
                        last = status
                        yield status
        finally:
            with self._lock:
                self._watchers.discard(watcher)


def health_methods(health: Health) -> list[tuple[str, Callable[..., Any]]]:
    """The built-in health methods of a server: ``(name, handler)`` pairs."""
    return [(HEALTH_CHECK_METHOD, health.check), (HEALTH_WATCH_METHOD, health.watch)]
