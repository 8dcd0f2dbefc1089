"""The runtime: owns the UCX context and worker, the progress engine, the links of
every connection made through it, and the order things close in at shutdown.

This is the I/O layer's half of :class:`ucxrpc.Manager` (which adds ``connect()``, in
the RPC layer); the messaging layer's :class:`~ucxrpc.transport.Worker` runs on it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import os
import re
import secrets
import socket
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Final, TypeVar

from ..errors import ResourceExhausted, RpcError, StatusCode, Unavailable
from ..protocol import Budget, random_id
from ..wire import codec
from ..wire.ucxaddr import validate_worker_address
from . import shared
from .config import Config
from .engine import FORKED_MESSAGE, Engine
from .link import Link, Owner
from .ucx import lib, ucx_version

__all__ = [
    "FORKED",
    "LOOPBACK_DEVICE",
    "Closer",
    "Config",
    "Runtime",
    "is_loopback",
    "run",
    "ucx_info",
]

log = logging.getLogger("ucxrpc")
T = TypeVar("T")

#: Closes something the runtime owns at shutdown; gets the grace period in seconds.
Closer = Callable[[float], Awaitable[None]]
#: Seconds shutdown waits for plain handlers still running in their threads after the
#: grace: a thread cannot be interrupted, and one that runs on is left to finish by
#: itself (the interpreter waits for it at exit) rather than block the event loop.
THREAD_WAIT = 0.5


class Runtime:
    """Owns one UCX context and worker, the progress engine and the connections' links.

    Use it as an async context manager, or call :meth:`start` and :meth:`shutdown`.

    Args:
        config: The configuration (default: ``Config()``, which reads ``UCXRPC_*``).
        **overrides: Fields that replace those of ``config``.

    Two runtimes alive in one process are fully independent: each has its own UCX
    context, worker and progress engine, and they can connect to each other.
    """

    #: Runtimes that created a UCX context in this process and are not closed yet.
    _started: ClassVar[weakref.WeakSet[Runtime]] = weakref.WeakSet()
    #: Whether a UCX context was ever created in this process or a process it was
    #: forked from (a forked child's UCX state is its parent's: it must not use it).
    _inherited: ClassVar[bool] = False
    _initialised: ClassVar[bool] = False

    def __init__(self, config: Config | None = None, **overrides: Any) -> None:
        base = config if config is not None else Config()
        if overrides:
            base = Config.model_validate({**base.model_dump(), **overrides})
        self.config = base
        self._ctx: Any = None
        self._worker: Any = None
        self._engine: Engine | None = None
        self._conns: dict[int, Link] = {}
        #: Every link opened, while something still holds it (see shutdown).
        self._links: weakref.WeakSet[Link] = weakref.WeakSet()
        self._dropped = 0  # frames for no connection of this worker
        #: What to close at shutdown, by stage (clients 0, servers 1), in order added.
        self._owned: dict[object, tuple[int, Closer]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._leftover: list[Any] = []
        self._state = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._confined = False
        self._watched: weakref.WeakSet[asyncio.StreamWriter | asyncio.Server] = weakref.WeakSet()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> Runtime:
        """Start the runtime (idempotent).

        The UCX context and worker are made now when ``ucx_options`` (or
        ``UCX_NET_DEVICES``) choose the network devices; otherwise on first use
        (:meth:`prepare`), so that a runtime whose first server or connection is on
        loopback can keep UCX on loopback too.

        Raises:
            Unavailable: UCX refuses the options, or this process is a forked child of
                one that started ucxrpc.
        """
        if self._state == "running":
            return self
        if self._state == "forked" or Runtime._inherited:
            raise Unavailable(FORKED)
        if self._state != "new":
            raise Unavailable("this manager has been shut down")
        unified = self.config.ucx_options.get(
            "UNIFIED_MODE", os.environ.get("UCX_UNIFIED_MODE", "n")
        )
        if unified.strip().lower() in ("y", "yes", "1", "on", "true"):
            # Its worker addresses are packed differently: peers' addresses could not be
            # validated before UCX reads them.
            raise Unavailable("UCX_UNIFIED_MODE is not supported by ucxrpc")
        self._loop = asyncio.get_running_loop()
        if not self._confinable():
            self._state = "running"
            try:
                self._create(confined=False)
            except BaseException:
                self._state = "new"
                raise
            return self
        # UCX starts on first use: its options are checked now all the same.
        try:
            opts = _ucx_options(self.config).items()
            lib.UCXConfig({k.encode(): v.encode() for k, v in opts})
        except Exception as exc:
            raise self._refused(exc) from None
        self._state = "running"
        return self

    def _refused(self, exc: Exception) -> Unavailable:
        opts = ", ".join(f"UCX_{k}={v}" for k, v in self.config.ucx_options.items()) or "none"
        return Unavailable(
            f"cannot initialise UCX: {exc} (ucx_options: {opts}; `ucxrpc info` or "
            "`ucx_info -c` lists the valid ones)"
        )

    def _confinable(self) -> bool:
        # The user chose the devices: theirs, at once.
        return "NET_DEVICES" not in self.config.ucx_options and "UCX_NET_DEVICES" not in (
            os.environ
        )

    def prepare(self, host: str | None) -> None:
        """Make the UCX context and worker, if not made yet, for traffic with ``host``.

        The first server or connection decides: on loopback (127.0.0.0/8, ::1,
        localhost) UCX uses the loopback device only (``NET_DEVICES=lo``; shared
        memory is not a network device), so nothing of this process listens beyond
        this host; anywhere else, every device. ``None`` (use not tied to a host) makes
        it with every device.

        Raises:
            Unavailable: UCX cannot start, or UCX is confined to loopback and ``host``
                is not on it.
        """
        if self._state != "running" or Runtime._inherited:
            forked = self._state == "forked" or Runtime._inherited
            raise Unavailable(FORKED if forked else "the manager is not running")
        if self._worker is None:
            self._create(confined=host is not None and is_loopback(host) and self._confinable())
        elif self._confined and host is not None and not is_loopback(host):
            raise Unavailable(
                f"this manager's UCX traffic is kept on loopback (its first server or "
                f"connection was on loopback), so it cannot reach {host}: set "
                "ucx_options={'NET_DEVICES': 'all'} (or UCXRPC_UCX_OPTIONS) to use every "
                "network device from the start"
            )

    @property
    def ucx_ready(self) -> bool:
        """Whether the UCX context and worker are made (see :meth:`prepare`)."""
        return self._engine is not None

    @property
    def confined(self) -> bool:
        """Whether UCX was kept on the loopback device (see :meth:`prepare`)."""
        return self._confined

    def _create(self, confined: bool) -> None:
        cfg = self.config
        options = _ucx_options(cfg)
        if confined:
            options["NET_DEVICES"] = LOOPBACK_DEVICE
        try:
            self._ctx = lib.UCXContext(options, (lib.Feature.TAG, lib.Feature.WAKEUP))
            self._worker = lib.UCXWorker(self._ctx)
            self._worker.init_blocking_progress_mode()
        except Exception as exc:
            self._ctx = self._worker = None
            raise self._refused(exc) from None
        assert self._loop is not None
        try:
            self._engine = Engine(
                self._worker,
                self._loop,
                mode=cfg.progress_mode,
                spin=cfg.spin_us / 1e6,
                reply_spin=max(cfg.spin_us, cfg.reply_spin_us) / 1e6,
                router=self,
                junk_limit=max(cfg.max_message_size, 256 << 20),
                sched_slice=cfg.sched_slice_us / 1e6,
            )
        except BaseException:
            self._ctx = self._worker = None  # nothing half made: the next use tries again
            raise
        self._confined = confined
        Runtime._started.add(self)
        Runtime._initialised = True

    async def __aenter__(self) -> Runtime:
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
        if self._state == "forked":
            # Close what the event loop holds (its fds now name stand-ins, see
            # _forked; links are closed and UCX is never called), so that nothing is
            # left for the loop's teardown to free late.
            owned, self._owned = list(self._owned.values()), {}
            for _, closer in sorted(owned, key=lambda entry: entry[0]):
                try:
                    await closer(0.0)
                except Exception:  # best effort in a child that is leaving
                    pass
            return
        if self._state != "running":
            self._state = "closed"
            return
        self._state = "closing"
        Runtime._started.discard(self)
        # Clients (stage 0) first: their pending calls end with Cancelled, not with
        # ConnectionLost from our own servers going away underneath them.
        for _, closer in sorted(self._owned.values(), key=lambda entry: entry[0]):
            await closer(grace)
        self._owned.clear()
        engine = self._engine
        if engine is not None:  # None: UCX was never needed
            self._leftover = engine.close()
        if self._executor is not None:
            await _retire(self._executor, THREAD_WAIT)
            self._executor = None
        self._engine = None
        # Links outlive the shutdown: a client the caller still holds, or connections
        # only the garbage collector frees (they are in reference cycles). Their UCX
        # endpoints, closed by now, would keep the worker alive with them, and with it
        # its sockets and UCX's async thread, until a collection happens to run.
        for link in list(self._links):
            link.ep = None
        # The worker must go before the buffers of requests it might still write into.
        self._worker = None
        self._ctx = None
        self._leftover.clear()
        self._state = "closed"

    # -- services for servers and clients ------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The progress engine (raises when the manager is not running)."""
        if self._engine is None:
            self.prepare(None)
        assert self._engine is not None
        if self._state != "running":
            raise Unavailable(FORKED if self._state == "forked" else "the manager is not running")
        return self._engine

    def _forked(self) -> None:
        """In a forked child: the UCX context, worker and endpoints are the parent's.

        Nothing of them may run here, not even their destructors at exit (closing an
        inherited endpoint would close the parent's connection), so the runtime is
        kept alive for good and its engine stops without a UCX call.
        """
        self._state = "forked"
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(self))
        fds = []
        if self._engine is not None:
            self._engine.forget()
            fds += self._engine.fds()
        for link in self._conns.values():
            link.closed = True  # sends fail at once; closing it touches nothing
        for watched in list(self._watched):
            if isinstance(watched, asyncio.StreamWriter):
                sock = watched.get_extra_info("socket")
                fds.append(-1 if sock is None else sock.fileno())
            else:
                fds += [sock.fileno() for sock in watched.sockets]
        _blind([fd for fd in fds if fd >= 0])

    def watch(self, stream: asyncio.StreamWriter | asyncio.Server) -> None:
        """Note a control connection or listener of this runtime's (see :meth:`_forked`:
        a forked child must not touch it)."""
        self._watched.add(stream)

    @property
    def worker_address(self) -> bytes:
        """This worker's UCX address (what peers connect to)."""
        self.engine  # noqa: B018 - raises when not running
        return bytes(self._worker.address.tobytes())

    def endpoint_to(self, address: bytes) -> Any:
        """Create a UCX endpoint to a peer worker from its (validated) address.

        Raises:
            ProtocolError: ``address`` is not a UCX worker address.
            Unavailable: UCX cannot reach it.
        """
        validate_worker_address(address)
        self.engine  # noqa: B018 - makes the worker if it is not made yet
        try:
            addr = lib.UCXAddress.create_from_buffer(address)
            return self._worker.create_endpoint_from_worker_address(
                addr, self.config.peer_error_handling
            )
        except Exception as exc:
            raise Unavailable(f"cannot reach the peer's UCX worker: {exc}") from None

    def check_peer_mode(self, hello: dict[str, Any]) -> None:
        """Refuse a peer whose endpoints use the other error-handling mode: the two
        modes pick different UCX transports and would not reach each other.

        Raises:
            RpcError: ``FAILED_PRECONDITION``, naming the setting to change.
        """
        theirs = bool(hello.get("eh", 1))
        ours = self.config.peer_error_handling
        if theirs != ours:
            raise RpcError(
                StatusCode.FAILED_PRECONDITION,
                f"the peer has peer_error_handling={theirs} and this side {ours}: "
                "set the same on both (UCXRPC_PEER_ERROR_HANDLING)",
            )

    async def close_endpoint(self, ep: Any, timeout: float = 1.0) -> None:
        """Close a UCX endpoint, waiting at most ``timeout`` for the flush."""
        if self._engine is None or ep is None or self._state == "forked":
            return
        try:
            if not ep.alive:
                return  # UCX closed it when the peer failed: closing again would crash
        except Exception:
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

        self._engine.add(req, closed)
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            log.debug("ucxrpc: endpoint close did not finish in %.1fs", timeout)

    def open_link(self, owner: Owner, key: bytes | None = None) -> Link:
        """A new connection's link, under a random id unique among this worker's live
        connections.

        Args:
            owner: What the link delivers to.
            key: The connection's 16-byte key (default: a fresh random one).

        Returns:
            The link, not yet joined to an endpoint (:meth:`Link.connect`).
        """
        if len(self._conns) >= codec.MAX_CONN_ID // 2:
            raise ResourceExhausted("too many connections on this worker")
        key = secrets.token_bytes(16) if key is None else key
        cfg = self.config
        budget = Budget(
            max_message=cfg.max_message_size,
            max_bytes=max(cfg.receive_budget, cfg.max_message_size),
            max_held=min(64 << 20, max(cfg.receive_budget, cfg.max_message_size)),
            part_timeout=cfg.part_timeout,
        )
        conn_id = random_id(codec.MAX_CONN_ID, self._conns)
        link = Link(self.engine, conn_id, key, owner, budget)
        if cfg.shared_memory and shared.available():
            link.share_min = max(cfg.shared_min, codec.SHARED_MIN)
            link.offer_memory = cfg.shared_reads
            link.offer_rings = cfg.shared_reads and cfg.shared_frames
        self._conns[conn_id] = link
        self._links.add(link)
        return link

    def unregister(self, conn_id: int) -> None:
        """Forget a connection id (its link stops receiving)."""
        link = self._conns.pop(conn_id, None)
        if link is not None:
            link.close()

    # -- the engine's router ------------------------------------------------------------

    def on_frame(self, tag: int, buf: bytearray) -> None:
        """Route a frame to its connection; drop (and count) it when there is none."""
        link = self._conns.get((tag >> 40) & codec.MAX_CONN_ID)
        if link is None:
            self._dropped += 1
        else:
            link.on_frame(tag, buf)

    def on_part(self, tag: int, length: int, handle: Any) -> None:
        """Route a probed data part to its connection; throw it away when there is none."""
        link = self._conns.get((tag >> 40) & codec.MAX_CONN_ID)
        if link is None:
            self.engine.discard(handle, length)
        else:
            link.on_part(tag, length, handle)

    def on_oversized(self, tag: int, length: int) -> None:
        """A frame longer than any frame may be: its sender's connection is broken."""
        link = self._conns.get((tag >> 40) & codec.MAX_CONN_ID)
        if link is None:
            self._dropped += 1
        else:
            link.on_oversized(tag, length)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The thread pool that runs plain (non-async) handlers."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(thread_name_prefix="ucxrpc-handler")
        return self._executor

    # -- what closes at shutdown --------------------------------------------------------

    def own(self, owner: object, stage: int, closer: Closer) -> None:
        """Close ``owner`` with ``closer(grace)`` at :meth:`shutdown` (lower stages first).

        Clients use stage 0, servers and messaging workers stage 1.
        """
        self._owned[owner] = (stage, closer)

    def disown(self, owner: object) -> None:
        """``owner`` closed itself: nothing to do for it at shutdown."""
        self._owned.pop(owner, None)

    @property
    def posted_receives(self) -> int:
        """Receives posted on the worker and not yet completed or cancelled."""
        return 0 if self._engine is None else self._engine.posted_receives

    @property
    def dropped(self) -> int:
        """Frames dropped unanswered: for no connection of this worker, carrying another
        connection's secret, or for a call the connection does not have (late replies,
        cancels of calls that ended)."""
        return self._dropped + sum(
            link.inbound.dropped + link.unmatched for link in self._conns.values()
        )

    @property
    def awaited_parts(self) -> int:
        """Data parts announced by peers and not yet arrived, over every connection."""
        return sum(link.inbound.awaited_parts for link in self._conns.values())

    @property
    def announced_bytes(self) -> int:
        """Data-part bytes announced by peers and not yet delivered, over every connection."""
        return sum(link.inbound.announced_bytes for link in self._conns.values())

    @property
    def connections(self) -> int:
        """Live connections (client and server side) on this worker."""
        return len(self._conns)

    @property
    def shared_parts(self) -> tuple[int, int, int]:
        """Shared parts over the live connections: ``(sent, received, held)``, where
        ``held`` counts the shared parts sent and not yet released by the peer."""
        links = self._conns.values()
        return (
            sum(link.shared_sent for link in links),
            sum(link.shared_received for link in links),
            sum(len(link.exports) for link in links if link.exports is not None),
        )

    @property
    def shared_reads(self) -> int:
        """Shared parts received over the live connections by reading the sender's
        memory (the rest of :attr:`shared_parts`' received were memory files)."""
        return sum(link.shared_read for link in self._conns.values())


def _ucx_options(cfg: Config) -> dict[str, str]:
    """The UCX options a runtime is created with.

    Without peer error handling (the shared-memory opt-in), CMA is left out unless the
    user chose the transports: a peer killed while CMA reads its memory aborts this
    process.
    """
    options = dict(cfg.ucx_options)
    if not cfg.peer_error_handling and "TLS" not in options and "UCX_TLS" not in os.environ:
        options["TLS"] = "^cma"
    return options


#: The network device UCX keeps to when confined to loopback.
LOOPBACK_DEVICE: Final = "lo"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().lower()
    if name in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


#: Why a forked child cannot use what its parent started.
FORKED: Final = FORKED_MESSAGE


def _blind(fds: list[int]) -> None:
    """Point ``fds`` at a socket of this process's own that never becomes ready.

    In a forked child the event loop's epoll instance, and every fd it watches, are
    the parent's: closing or unwatching them as the child's loop ends would take them
    out of the parent's epoll set (its control connections, listeners and UCX
    wake-ups would fall silent). Once each number names another file, what the child
    does with it touches nothing of the parent's, and an epoll-able stand-in keeps the
    child's loop from failing when it re-arms one.
    """
    if not fds:
        return
    stand_in = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for fd in fds:
            try:
                os.dup2(stand_in.fileno(), fd)
            except OSError:
                pass  # already closed
    finally:
        stand_in.close()


def _after_fork_in_child() -> None:
    Runtime._inherited = Runtime._initialised
    for runtime in list(Runtime._started):
        runtime._forked()
    Runtime._started = weakref.WeakSet()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


async def _retire(executor: ThreadPoolExecutor, timeout: float) -> None:
    """Shut ``executor`` down without blocking the loop: a thread of its own joins the
    executor's threads, and is waited for at most ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    joined: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not joined.done():
            joined.set_result(None)

    def join() -> None:
        executor.shutdown(wait=True, cancel_futures=True)
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the loop has closed meanwhile: nobody waits any more

    joiner = threading.Thread(target=join, name="ucxrpc-handler-join", daemon=True)
    joiner.start()
    try:
        await asyncio.wait_for(asyncio.shield(joined), timeout)
    except TimeoutError:
        log.info("ucxrpc: shutdown left plain handlers running after %.1fs", timeout)
        return
    joiner.join()  # it has only to return now


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
