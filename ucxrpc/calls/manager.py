"""The manager: the runtime (UCX, the progress engine, links) plus ``connect()``.

:class:`Manager` is what applications create. Its I/O half lives in
:mod:`ucxrpc.runtime`; this module adds what needs the RPC layer: connecting clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..io.config import Config
from ..io.runtime import Runtime, run, ucx_info
from .client import Client

if TYPE_CHECKING:
    from .interceptors import Interceptor
    from .liveness import KeepAlive, Reconnect

__all__ = ["Config", "Manager", "run", "ucx_info"]


class Manager(Runtime):
    """Owns one UCX context and worker, the progress engine, servers and clients.

    Use it as an async context manager, or call :meth:`start` and :meth:`shutdown`;
    shutdown closes every client connected through it, then every server started on
    it, then UCX.

    Args:
        config: The configuration (default: ``Config()``, which reads ``UCXRPC_*``).
        **overrides: Fields that replace those of ``config``.

    Two managers alive in one process are fully independent: each has its own UCX
    context, worker and progress engine, and they can connect to each other.
    """

    def __init__(self, config: Config | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)

    async def __aenter__(self) -> Manager:
        await self.start()
        return self

    async def connect(
        self,
        host: str,
        port: int,
        *,
        timeout: float | None = None,
        interceptors: Sequence[Interceptor] = (),
        keepalive: KeepAlive | None = None,
        reconnect: Reconnect | None = None,
    ) -> Client:
        """Connect to a ucxrpc server.

        Args:
            host: The server's host name or address.
            port: The server's port.
            timeout: Seconds to wait for the connection (default ``config.connect_timeout``).
            interceptors: Client interceptors, outermost first (see
                :mod:`ucxrpc.interceptors`).
            keepalive: Heartbeats that notice a silent server (see
                :mod:`ucxrpc.liveness`); None: only a closed connection is noticed.
            reconnect: Set the connection up again after it is lost; calls made
                meanwhile fail at once with :class:`~ucxrpc.Unavailable`.

        Returns:
            A connected :class:`~ucxrpc.Client`.

        Raises:
            Unavailable: The server cannot be reached.
            Unauthenticated: The server refused the credentials.
        """
        await self.start()
        self.prepare(host)  # refuses at once in a forked child, or beyond a kept loopback
        return await Client.connect(
            self,
            host,
            port,
            timeout=timeout,
            interceptors=interceptors,
            keepalive=keepalive,
            reconnect=reconnect,
        )
