"""The manager: owns the UCX context and worker, the progress engine and every
connection made through it."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import re
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from . import codec
from ._engine import Engine, Op
from ._ucx import lib, ucx_version
from .config import Config
from .errors import ResourceExhausted, RpcError, Unavailable

if TYPE_CHECKING:
    from .client import Client
    from .interceptors import Interceptor
    from .liveness import KeepAlive, Reconnect
    from .server import Server

__all__ = ["Config", "Manager", "run", "ucx_info"]

log = logging.getLogger("ucxrpc")
T = TypeVar("T")


class Conn(Protocol):
    """What the manager routes arriving frames to (client and server connections)."""

    def on_frame(self, call_id: int, buf: bytearray) -> None: ...

    def on_oversized(self, call_id: int, size: int) -> None: ...


class Manager:
    """Owns one UCX context and worker, the progress engine, servers and clients.

    Use it as an async context manager, or call :meth:`start` and :meth:`shutdown`.

    Args:
        config: The configuration (default: ``Config()``, which reads ``UCXRPC_*``).
        **overrides: Fields that replace those of ``config``.

    Two managers alive in one process are fully independent: each has its own UCX
    context, worker and progress engine, and they can connect to each other.
    """

    def __init__(self, config: Config | None = None, **overrides: Any) -> None:
        base = config if config is not None else Config()
        if overrides:
            base = Config.model_validate({**base.model_dump(), **overrides})
        self.config = base
        self._ctx: Any = None
        self._worker: Any = None
        self._engine: Engine | None = None
        self._conns: dict[int, Conn] = {}
        self._next_id = itertools.count(random.randrange(1, codec.MAX_CONN_ID))
        self._clients: set[Client] = set()
        self._servers: set[Server] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._closing: Op | None = None
        self._leftover: list[Op] = []
        self._state = "new"

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> Manager:
        """Create the UCX context and worker and start the progress engine (idempotent)."""
        if self._state == "running":
            return self
        if self._state != "new":
            raise Unavailable("this manager has been shut down")
        loop = asyncio.get_running_loop()
        cfg = self.config
        try:
            self._ctx = lib.UCXContext(dict(cfg.ucx_options), (lib.Feature.TAG, lib.Feature.WAKEUP))
            self._worker = lib.UCXWorker(self._ctx)
            self._worker.init_blocking_progress_mode()
        except Exception as exc:
            self._ctx = self._worker = None
            opts = ", ".join(f"UCX_{k}={v}" for k, v in cfg.ucx_options.items()) or "none"
            raise Unavailable(
                f"cannot initialise UCX: {exc} (ucx_options: {opts}; `ucxrpc info` or "
                "`ucx_info -c` lists the valid ones)"
            ) from None
        self._engine = Engine(
            self._worker,
            loop,
            mode=cfg.progress_mode,
            spin=cfg.spin_us / 1e6,
            max_frame=cfg.max_message_size,
            on_frame=self._on_frame,
            on_oversized=self._on_oversized,
        )
        self._state = "running"
        return self

    async def __aenter__(self) -> Manager:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`shutdown`."""
        return self._state == "running"

    async def shutdown(self, grace: float = 0.0) -> None:
        """Stop every server, close every client and endpoint, stop the engine.

        Args:
            grace: Seconds servers may spend draining in-flight calls.
        """
        if self._state != "running":
            self._state = "closed"
            return
        self._state = "closing"
        # Clients first: their pending calls end with Cancelled, not with ConnectionLost
        # from our own servers going away underneath them.
        for client in list(self._clients):
            await client.close()
        for server in list(self._servers):
            await server.stop(grace)
        engine = self._engine
        assert engine is not None
        self._leftover = engine.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._engine = None
        # The worker must go before the buffers of requests it might still write into.
        self._worker = None
        self._ctx = None
        self._leftover.clear()
        self._state = "closed"

    # -- services for servers and clients ------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The progress engine (raises when the manager is not running)."""
        if self._engine is None or self._state != "running":
            raise Unavailable("the manager is not running")
        return self._engine

    @property
    def worker_address(self) -> bytes:
        """This worker's UCX address (what peers connect to)."""
        self.engine  # noqa: B018 - raises when not running
        return bytes(self._worker.address.tobytes())

    def endpoint_to(self, address: bytes) -> Any:
        """Create a UCX endpoint to a peer worker from its address."""
        try:
            addr = lib.UCXAddress.create_from_buffer(address)
            return self._worker.create_endpoint_from_worker_address(addr, False)
        except Exception as exc:
            raise Unavailable(f"cannot reach the peer's UCX worker: {exc}") from None

    async def close_endpoint(self, ep: Any, timeout: float = 1.0) -> None:
        """Close a UCX endpoint, waiting at most ``timeout`` for the flush."""
        if self._engine is None:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        try:
            req = ep.close()
        except Exception:
            return
        if req.completed:
            return

        def closed(_exc: BaseException | None) -> None:
            if not done.done():
                done.set_result(None)

        op = Op(req, closed, None, False)
        self._engine._ops.append(op)
        self._engine.kick()
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            log.debug("ucxrpc: endpoint close did not finish in %.1fs", timeout)

    def register(self, conn: Conn) -> int:
        """Give ``conn`` a connection id unique among this worker's live connections."""
        if len(self._conns) >= codec.MAX_CONN_ID:
            raise ResourceExhausted("too many connections on this worker")
        while True:
            conn_id = next(self._next_id) & codec.MAX_CONN_ID
            if conn_id and conn_id not in self._conns:
                self._conns[conn_id] = conn
                return conn_id
            if conn_id >= codec.MAX_CONN_ID:
                self._next_id = itertools.count(1)

    def unregister(self, conn_id: int) -> None:
        """Forget a connection id."""
        self._conns.pop(conn_id, None)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The thread pool that runs plain (non-async) handlers."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(thread_name_prefix="ucxrpc-handler")
        return self._executor

    def _on_frame(self, tag: int, buf: bytearray) -> None:
        _, conn_id, call_id, _ = codec.split_tag(tag)
        conn = self._conns.get(conn_id)
        if conn is not None:
            conn.on_frame(call_id, buf)
            return
        # A frame for a connection that is gone: consume the parts it announced.
        try:
            header, _ = codec.decode_header(buf)
        except RpcError:
            return
        for i in range(1, len(header.parts) + 1):
            self.engine.drain(codec.data_tag(conn_id, call_id, i))

    def _on_oversized(self, tag: int, size: int) -> None:
        _, conn_id, call_id, _ = codec.split_tag(tag)
        conn = self._conns.get(conn_id)
        if conn is not None:
            conn.on_oversized(call_id, size)

    # -- public conveniences -----------------------------------------------------------------

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
        from .client import Client

        await self.start()
        client = await Client.connect(
            self,
            host,
            port,
            timeout=timeout,
            interceptors=interceptors,
            keepalive=keepalive,
            reconnect=reconnect,
        )
        self._clients.add(client)
        return client

    def _forget_client(self, client: Client) -> None:
        self._clients.discard(client)

    def _add_server(self, server: Server) -> None:
        self._servers.add(server)

    def _forget_server(self, server: Server) -> None:
        self._servers.discard(server)

    @property
    def posted_receives(self) -> int:
        """Receives posted on the worker and not yet completed or cancelled."""
        return 0 if self._engine is None else self._engine.posted_receives

    @property
    def connections(self) -> int:
        """Live connections (client and server side) on this worker."""
        return len(self._conns)


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """Run ``main`` to completion on a new event loop, with uvloop when it is installed.

    Args:
        main: The coroutine to run.
        debug: Run the loop in debug mode.

    Returns:
        What ``main`` returned.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(main, debug=debug)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop, debug=debug) as runner:
        return runner.run(main)


_RESOURCE = re.compile(r"^#\s*resource\s+\d+\s*:.*--\s*(\S+)/(\S+)\s*$", re.MULTILINE)


def ucx_info(config: Config | None = None) -> dict[str, Any]:
    """UCX's version, and the transports and devices a UCX context sees.

    Args:
        config: Whose ``ucx_options`` to apply (default: ``Config()``, which reads
            ``UCXRPC_*`` variables).

    Returns:
        ``{"version": ..., "transports": {name: [devices]}, "options": {...}}``: the
        UCX settings in effect for ``TLS``, ``NET_DEVICES``, the given options and any
        ``UCX_*`` environment variables; ``{"version": ..., "error": ...}`` when UCX
        refuses the options.
    """
    config = config or Config()
    out: dict[str, Any] = {"version": ucx_version()}
    try:
        ctx = lib.UCXContext(dict(config.ucx_options), (lib.Feature.TAG, lib.Feature.WAKEUP))
    except Exception as exc:  # a bad UCX_* setting: report it, the rest is still useful
        out["error"] = str(exc)
        return out
    transports: dict[str, list[str]] = {}
    for tl, dev in _RESOURCE.findall(str(ctx.info)):
        devices = transports.setdefault(tl, [])
        if dev not in devices:
            devices.append(dev)
    out["transports"] = transports
    ucx_config: dict[str, str] = dict(ctx.config)
    shown = {"TLS", "NET_DEVICES", *config.ucx_options}
    shown |= {k[4:] for k in os.environ if k.startswith("UCX_")}
    out["options"] = {k: ucx_config[k] for k in sorted(shown) if k in ucx_config}
    return out
