"""The seeds' tag-messaging layer: workers, endpoints, tagged messages, statistics.

Messages travel as MESSAGE frames (and data parts) over the same links, protocol
machines and handshake as the RPC layer (:class:`Link`, :mod:`ucxrpc.protocol`,
:mod:`ucxrpc.codec`), so they arrive in the order they were sent, per endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import (
    Cancelled,
    ConnectionLost,
    DeadlineExceeded,
    InvalidArgument,
    MethodNotFound,
    ResourceExhausted,
    RpcError,
    Unavailable,
)
from ..io import shared
from ..io.control import (
    KEY_SIZE,
    answer,
    initiate_handshake,
    listen,
    read_message,
    refuse,
    serve_control,
    write_message,
)
from ..io.link import Link
from ..io.runtime import Runtime
from ..io.sched import PriorityLimiter
from ..protocol import Priority
from ..wire import codec
from ..wire.codec import Kind
from .inbox import Inbox, Queued

__all__ = ["MAX_TAG", "Link", "Message", "Worker", "WorkerConfig", "WorkerStats"]

log = logging.getLogger("ucxrpc.transport")

# -- the messaging layer ---------------------------------------------------------------------

#: User tags are 32 bits: they travel in the call-id field of the tag layout.
MAX_TAG = codec.MAX_CALL_ID


class WorkerConfig(BaseModel):
    """Settings of a :class:`Worker` (the original design's ``WorkerConfig``, adapted).

    Attributes:
        progress_mode: How the worker is driven when it owns its manager:
            ``"blocking"`` (poll while busy, sleep on the UCX worker's fd when quiet),
            ``"polling"`` or ``"efficient"``. This replaces the original ``thread_mode``:
            one asyncio loop drives the UCX worker (UCX's single-threaded mode).
        buffer_size: The largest message :meth:`Worker.recv_tag` returns unless given
            ``max_size`` (a larger one raises and stays queued). Messages themselves
            are received at their exact size, so this is a limit, not an allocation.
        enable_tag: Tag messaging (UCP_FEATURE_TAG); always on.
        enable_stream: UCX stream messaging (UCP_FEATURE_STREAM); not offered.
        enable_rma: UCX RMA (UCP_FEATURE_RMA); not offered.
        progress_interval_us: How long the engine keeps polling after the last event
            before it sleeps (``Config.spin_us``) when the worker owns its manager.
        send_window: Sends in flight at once; further sends wait and leave in
            priority order (FIFO within a priority).
        max_queued: Received messages held for receivers at most; beyond it a
            message is refused and counted in ``WorkerStats.errors``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    progress_mode: str = "blocking"
    buffer_size: int = Field(64 * 1024, gt=0)
    enable_tag: bool = True
    enable_stream: bool = False
    enable_rma: bool = False
    progress_interval_us: float = Field(100.0, ge=0)
    send_window: int = Field(64, gt=0)
    max_queued: int = Field(100_000, gt=0)

    @model_validator(mode="after")
    def _features(self) -> WorkerConfig:
        if not self.enable_tag:
            raise ValueError("enable_tag cannot be turned off: tag messaging is the transport")
        if self.enable_stream or self.enable_rma:
            raise ValueError("only tag messaging is offered (enable_stream/enable_rma)")
        return self


@dataclass(frozen=True, slots=True)
class Message:
    """A tagged message: ``Message(tag, data, timestamp)``.

    Attributes:
        tag: The tag (0 to 2**32 - 1).
        data: The bytes.
        timestamp: When it was made or received (``time.time()``).
    """

    tag: int
    data: bytes
    timestamp: float = dataclasses.field(default_factory=time.time)

    @classmethod
    def text(cls, tag: int, text: str) -> Message:
        """A message carrying ``text`` as UTF-8."""
        return cls(tag, text.encode())

    def as_text(self) -> str:
        """The data decoded as UTF-8 (undecodable bytes replaced)."""
        return self.data.decode(errors="replace")


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """Counters of a :class:`Worker` at one moment.

    Attributes:
        messages_sent: Messages sent (each counted once its last piece left).
        messages_received: Messages received.
        bytes_sent: Payload bytes sent.
        bytes_received: Payload bytes received.
        connections: Endpoints connected now.
        errors: Failed sends, refused messages and lost connections.
        elapsed: Seconds since the worker was created.
    """

    messages_sent: int
    messages_received: int
    bytes_sent: int
    bytes_received: int
    connections: int
    errors: int
    elapsed: float

    def throughput_mbps(self) -> float:
        """Payload megabits per second, both directions, over the worker's life."""
        if self.elapsed <= 0:
            return 0.0
        return (self.bytes_sent + self.bytes_received) * 8 / 1e6 / self.elapsed

    def message_rate(self) -> float:
        """Messages per second, both directions, over the worker's life."""
        if self.elapsed <= 0:
            return 0.0
        return (self.messages_sent + self.messages_received) / self.elapsed

    def as_dict(self) -> dict[str, Any]:
        """Every counter, plus the two rates."""
        out = dataclasses.asdict(self)
        out["throughput_mbps"] = self.throughput_mbps()
        out["message_rate"] = self.message_rate()
        return out

    def summary(self) -> str:
        """A printable multi-line summary."""
        return (
            f"messages sent {self.messages_sent:,} / received {self.messages_received:,}\n"
            f"bytes sent {self.bytes_sent:,} / received {self.bytes_received:,}\n"
            f"connections {self.connections}, errors {self.errors}\n"
            f"{self.throughput_mbps():.2f} Mbit/s, {self.message_rate():.1f} msg/s "
            f"over {self.elapsed:.1f} s"
        )

    def __str__(self) -> str:
        return self.summary()


class _Peer:
    """One connected endpoint of a :class:`Worker` (the owner of its link)."""

    def __init__(self, worker: Worker, label: str, writer: asyncio.StreamWriter) -> None:
        self.worker = worker
        self.label = label
        self.writer = writer
        self.link: Link | None = None
        self.id = 0  # the endpoint id users see (small, per worker)

    def deliver(self, header: codec.Header, payload: memoryview, parts: list[Any]) -> None:
        if header.kind is not Kind.MESSAGE:
            self.worker._refused(f"unexpected {header.kind.name} frame from endpoint {self.id}")
            return
        try:
            data = codec.decode_payload(header, payload, parts)
        except RpcError as exc:
            self.worker._refused(f"undecodable message from endpoint {self.id}: {exc}")
            return
        if not isinstance(data, (bytes, bytearray, memoryview)):
            self.worker._refused(f"undecodable message from endpoint {self.id}: {data!r}")
            return
        self.worker._delivered(self.id, header.call_id, bytes(data))

    def failed(self, call_id: int, kind: Kind | None, error: RpcError) -> None:
        self.worker._refused(f"message on tag {call_id} from endpoint {self.id} refused: {error}")

    def broken(self, error: RpcError) -> None:
        # One error per connection lost, whichever notices first: this, or the
        # control connection's end (both end in _detach, which counts it once).
        log.warning("endpoint %s broke the protocol: %s", self.id, error)
        asyncio.get_running_loop().create_task(self.worker._detach(self, lost=True))


class Worker:
    """The tag-messaging layer: endpoints, tagged sends and receives, statistics.

    Peers connect with :meth:`connect` (to a worker that :meth:`listen` s); a worker
    can listen and connect at once (peer to peer). Messages carry a tag (0 to
    2**32 - 1) and bytes; UCX matches them by endpoint and tag, and large ones travel
    without a copy. Frames, data parts and the handshake are the ones the RPC layer
    uses (:class:`Link` and :mod:`ucxrpc.codec`).

    Args:
        config: The settings (default ``WorkerConfig()``).
        manager: The manager whose UCX worker carries the messages. Without one, the
            worker creates and owns a manager (closed by :meth:`close_all`).
    """

    def __init__(
        self, config: WorkerConfig | None = None, *, manager: Runtime | None = None
    ) -> None:
        self.config = config or WorkerConfig()
        self._own_manager = manager is None
        if manager is None:
            manager = Runtime(
                progress_mode=self.config.progress_mode,
                spin_us=self.config.progress_interval_us,
            )
        self.manager = manager
        self._peers: dict[int, _Peer] = {}
        self._ids = itertools.count(1)
        self._inbox = Inbox(self.config.max_queued)
        self._gate = PriorityLimiter(self.config.send_window)
        self._listener: asyncio.Server | None = None
        # Accepted connections whose handshake has not ended, oldest first (capped).
        self._handshaking: dict[asyncio.StreamWriter, None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = time.monotonic()
        self._sent = [0, 0]  # messages, bytes
        self._received = [0, 0]
        self._errors = 0
        self._closed = False

    async def __aenter__(self) -> Worker:
        await self.manager.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close_all()

    # -- connections -----------------------------------------------------------------------

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Accept peers on ``host:port`` (0: pick a free port). Returns the port.

        Raises:
            Unavailable: The address cannot be bound.
        """
        if self._listener is not None:
            raise RuntimeError("the worker is already listening")
        await self.manager.start()
        self.manager.prepare(host)
        try:
            self._listener = await listen(self._accept, host, port)
            self.manager.watch(self._listener)
        except OSError as exc:
            raise Unavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        return int(self._listener.sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        """The port :meth:`listen` bound (0 when not listening)."""
        if self._listener is None:
            return 0
        return int(self._listener.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        manager = self.manager
        peer_name = writer.get_extra_info("peername")
        label = f"{peer_name[0]}:{peer_name[1]}" if isinstance(peer_name, tuple) else "?"
        peer = _Peer(self, label, writer)

        key = secrets.token_bytes(KEY_SIZE)

        def open_conn(hello: dict[str, Any]) -> int:
            if hello.get("role") != "messages":
                raise MethodNotFound(
                    "this is a messaging endpoint (ucxrpc.transport.Worker), not an RPC "
                    "server: connect with Worker.connect()"
                )
            manager.check_peer_mode(hello)
            link = manager.open_link(peer, key)
            peer.link = link
            self._attach(
                peer,
                hello["addr"],
                hello["cid"],
                hello["key"],
                hello["max"],
                hello.get("pid"),
                hello.get("probe"),
                peer_memory=hello.get("memory"),
            )
            return link.local_id

        manager.watch(writer)
        self._handshaking[writer] = None
        if len(self._handshaking) > manager.config.max_handshakes:
            oldest = next(iter(self._handshaking))  # see Config.max_handshakes
            del self._handshaking[oldest]
            oldest.transport.abort()
        clean = False
        try:
            done = await answer(
                reader, writer, manager.config, manager.worker_address, open_conn, key=key
            )
            self._handshaking.pop(writer, None)
            if done:
                clean = await serve_control(reader, writer)
        except RpcError as exc:
            refuse(writer, exc)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._handshaking.pop(writer, None)
            await self._detach(peer, lost=not clean)

    async def connect(self, host: str, port: int, *, timeout: float | None = None) -> int:
        """Connect to a listening worker. Returns the new endpoint's id.

        Raises:
            Unavailable: The peer cannot be reached (or timed out).
            Unauthenticated: The peer refused the credentials.
        """
        await self.manager.start()
        self.manager.prepare(host)
        limit = self.manager.config.connect_timeout if timeout is None else timeout
        peer: _Peer | None = None
        try:
            async with asyncio.timeout(limit):
                reader, writer = await asyncio.open_connection(host, port)
                self.manager.watch(writer)
                peer = _Peer(self, f"{host}:{port}", writer)
                link = peer.link = self.manager.open_link(peer)
                hs = await initiate_handshake(
                    reader,
                    writer,
                    self.manager.config,
                    self.manager.worker_address,
                    link.local_id,
                    {"role": "messages", "eh": int(self.manager.config.peer_error_handling)},
                    peer.label,
                    key=link.key,
                )
                self._attach(
                    peer,
                    hs.peer_address,
                    hs.peer_conn_id,
                    hs.peer_key,
                    hs.peer_max,
                    hs.peer_pid,
                    peer_maps=hs.peer_maps,
                    peer_memory=hs.peer_memory,
                    peer_reads=hs.peer_reads,
                )
        except BaseException as exc:
            if peer is not None:
                await self._detach(peer, lost=False)
            if isinstance(exc, TimeoutError):
                raise Unavailable(f"connecting to {host}:{port} timed out after {limit}s") from None
            if isinstance(exc, OSError):
                raise Unavailable(
                    f"cannot connect to {host}:{port}: {exc.strerror or exc}"
                ) from None
            raise
        task = asyncio.get_running_loop().create_task(self._watch(peer, reader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return peer.id

    def _attach(
        self,
        peer: _Peer,
        addr: bytes,
        remote_id: int,
        peer_key: bytes,
        peer_max: int,
        peer_pid: int | None,
        probe: shared.Probe | None = None,
        *,
        peer_maps: bool = False,
        peer_memory: shared.Peer | None = None,
        peer_reads: bool = False,
    ) -> None:
        link = peer.link
        assert link is not None
        try:
            ep = self.manager.endpoint_to(addr)
        except BaseException:
            if peer_memory is not None:
                peer_memory.close()
            raise
        link.connect(
            ep,
            remote_id,
            peer_key,
            peer_max,
            peer_pid=peer_pid,
            peer_maps=peer_maps,
            probe=probe,
            peer_memory=peer_memory,
            peer_reads=peer_reads,
        )
        peer.id = next(self._ids)
        self._peers[peer.id] = peer

    async def _watch(self, peer: _Peer, reader: asyncio.StreamReader) -> None:
        clean = False
        try:
            while (msg := await read_message(reader)) is not None:
                if msg.get("t") == "bye":
                    clean = True
                    break
        except (RpcError, OSError):
            pass
        await self._detach(peer, lost=not clean)

    async def _detach(self, peer: _Peer, *, lost: bool) -> None:
        if peer.id and self._peers.get(peer.id) is peer:
            del self._peers[peer.id]
            if lost and not self._closed:
                self._errors += 1
            self._inbox.fail(peer.id, ConnectionLost(f"endpoint {peer.id} ({peer.label}) is gone"))
        link = peer.link
        if link is not None:
            self.manager.unregister(link.local_id)
        writer = peer.writer
        if not writer.is_closing():
            try:
                write_message(writer, {"t": "bye"})
            except (OSError, RuntimeError):
                pass
            writer.close()
        if link is not None and link.ep is not None:
            ep, link.ep = link.ep, None
            await self.manager.close_endpoint(ep)

    def is_connected(self, endpoint_id: int) -> bool:
        """True while ``endpoint_id`` is connected."""
        return endpoint_id in self._peers

    def endpoint_ids(self) -> list[int]:
        """The connected endpoints' ids, in connection order."""
        return list(self._peers)

    def peer(self, endpoint_id: int) -> str:
        """``host:port`` of an endpoint's peer (as seen from here)."""
        return self._peer(endpoint_id).label

    async def disconnect(self, endpoint_id: int) -> None:
        """Close one endpoint (its queued messages are kept until taken).

        Raises:
            InvalidArgument: No such endpoint.
        """
        await self._detach(self._peer(endpoint_id), lost=False)

    async def close_all(self) -> None:
        """Close every endpoint and the listener (and the manager, if the worker owns it)."""
        self._closed = True
        if self._listener is not None:
            listener, self._listener = self._listener, None
            listener.close()
        for peer in list(self._peers.values()):
            await self._detach(peer, lost=False)
        self._inbox.fail_all(Cancelled("the worker was closed"))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._own_manager:
            await self.manager.shutdown()

    def _peer(self, endpoint_id: int) -> _Peer:
        peer = self._peers.get(endpoint_id)
        if peer is None:
            known = ", ".join(map(str, self._peers)) or "none"
            raise InvalidArgument(f"no endpoint {endpoint_id} (connected: {known})")
        return peer

    # -- messages --------------------------------------------------------------------------

    async def send_tag(
        self,
        endpoint_id: int,
        tag: int,
        data: bytes | bytearray | memoryview | str,
        *,
        priority: int = Priority.NORMAL,
    ) -> None:
        """Send ``data`` on ``tag`` to an endpoint; returns once it has left.

        Beyond ``send_window`` sends in flight, sends wait and leave in priority order.

        Raises:
            InvalidArgument: Unknown endpoint, bad tag or data that is not bytes-like.
            ConnectionLost: The endpoint went away.
            ResourceExhausted: The message exceeds ``max_message_size``.
        """
        peer = self._peer(endpoint_id)
        _check_tag(tag)
        payload = _as_payload(data)
        if not self._gate.try_acquire():
            await self._gate.acquire(priority)
        try:
            link = peer.link
            if link is None or link.closed:
                raise ConnectionLost(f"endpoint {endpoint_id} is closed")
            encoded = codec.encode(
                Kind.MESSAGE,
                tag,
                payload,
                oob_threshold=self.manager.config.oob_threshold,
                max_size=link.max_size,
            )
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def sent(exc: BaseException | None) -> None:
                if not fut.done():
                    if exc is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(
                            exc if isinstance(exc, RpcError) else ConnectionLost(str(exc))
                        )

            link.send(tag, encoded, sent)
            await fut
        except RpcError:
            self._errors += 1
            raise
        finally:
            self._gate.release()
        self._sent[0] += 1
        self._sent[1] += len(payload)

    async def broadcast_tag(
        self,
        tag: int,
        data: bytes | bytearray | memoryview | str,
        *,
        priority: int = Priority.NORMAL,
    ) -> dict[int, BaseException | None]:
        """Send to every connected endpoint at once.

        Returns:
            Each endpoint id with None (sent) or the error its send raised.
        """
        _check_tag(tag)
        ids = self.endpoint_ids()
        results = await asyncio.gather(
            *(self.send_tag(i, tag, data, priority=priority) for i in ids), return_exceptions=True
        )
        out: dict[int, BaseException | None] = {}
        for endpoint_id, result in zip(ids, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # cancellation and the like are not per-peer results
            out[endpoint_id] = result
        return out

    async def recv_tag(
        self,
        endpoint_id: int,
        tag: int,
        *,
        max_size: int | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """Wait for the next message on ``tag`` from an endpoint.

        Args:
            endpoint_id: The endpoint.
            tag: The tag.
            max_size: The largest message accepted (default ``config.buffer_size``).
            timeout: Seconds to wait (None: until it comes or the endpoint goes away).

        Raises:
            ResourceExhausted: The message is larger than ``max_size``; it stays
                queued for a receive that accepts it.
            DeadlineExceeded: Nothing arrived in time; the message says which tags
                do have messages waiting from that endpoint.
            ConnectionLost: The endpoint went away.
        """
        _check_tag(tag)
        item = self._inbox.take(endpoint_id, tag)
        if item is None:
            self._peer(endpoint_id)
            fut = self._inbox.wait(endpoint_id, tag)
            engine = self.manager.engine
            engine.awaiting += 1  # a message is expected: poll for it a while
            try:
                async with asyncio.timeout(timeout):
                    item = await fut
            except TimeoutError:
                fut.cancel()
                waiting = self._inbox.tags_waiting(endpoint_id)
                hint = f"; messages are waiting on tags {waiting}" if waiting else ""
                raise DeadlineExceeded(
                    f"no message on tag {tag} from endpoint {endpoint_id} within {timeout} s{hint}"
                ) from None
            finally:
                engine.awaiting -= 1
        return self._accept_item(item, max_size)

    def try_recv_tag(
        self, endpoint_id: int, tag: int, *, max_size: int | None = None
    ) -> bytes | None:
        """The next message on ``tag`` from an endpoint, or None at once if there is none.

        Raises:
            ResourceExhausted: The message is larger than ``max_size`` (it stays queued).
        """
        _check_tag(tag)
        self.progress()
        item = self._inbox.take(endpoint_id, tag)
        return None if item is None else self._accept_item(item, max_size)

    async def next_message(self, *, timeout: float | None = None) -> tuple[int, Message]:
        """The oldest message from any endpoint on any tag: ``(endpoint_id, message)``.

        Raises:
            DeadlineExceeded: Nothing arrived in time.
        """
        item = self._inbox.take_any()
        if item is None:
            fut = self._inbox.wait_any()
            # No engine yet (no connection): nothing to poll, and none is made here.
            engine = self.manager.engine if self.manager.ucx_ready else None
            if engine is not None:
                engine.awaiting += 1
            try:
                async with asyncio.timeout(timeout):
                    _, item = await fut
            except TimeoutError:
                fut.cancel()
                raise DeadlineExceeded(f"no message within {timeout} s") from None
            finally:
                if engine is not None:
                    engine.awaiting -= 1
        return item.endpoint, Message(item.tag, item.data, item.timestamp)

    def _accept_item(self, item: Queued, max_size: int | None) -> bytes:
        limit = self.config.buffer_size if max_size is None else max_size
        if len(item.data) > limit:
            self._inbox.put_back(item)
            raise ResourceExhausted(
                f"message of {len(item.data)} bytes on tag {item.tag} exceeds the receive "
                f"limit of {limit} bytes (pass max_size= or raise WorkerConfig.buffer_size); "
                "it stays queued"
            )
        return item.data

    def _delivered(self, endpoint_id: int, tag: int, data: bytes) -> None:
        if self._inbox.put(endpoint_id, tag, data, time.time()):
            self._received[0] += 1
            self._received[1] += len(data)
        else:
            self._refused(
                f"inbox full ({self.config.max_queued} messages): refused a message on "
                f"tag {tag} from endpoint {endpoint_id}"
            )

    def _refused(self, why: str) -> None:
        self._errors += 1
        log.warning("%s", why)

    # -- progress and statistics -----------------------------------------------------------

    def progress(self) -> int:
        """Drive UCX once now; returns the completions and arrivals it handled.

        The manager's engine drives UCX in the background anyway; this is for loops
        that want to poll explicitly.
        """
        if not self.manager.running or not self.manager.ucx_ready:
            return 0  # nothing to drive yet (and UCX waits for the first connection)
        return self.manager.engine.progress()

    async def run_progress_loop(self, duration: float) -> int:
        """Poll for ``duration`` seconds, yielding to the event loop between polls.

        Returns:
            The total completions and arrivals handled.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + duration
        total = 0
        while loop.time() < end:
            total += self.progress()
            await asyncio.sleep(0)
        return total

    def stats(self) -> WorkerStats:
        """The counters now."""
        return WorkerStats(
            messages_sent=self._sent[0],
            messages_received=self._received[0],
            bytes_sent=self._sent[1],
            bytes_received=self._received[1],
            connections=len(self._peers),
            errors=self._errors,
            elapsed=time.monotonic() - self._started,
        )


def _check_tag(tag: int) -> None:
    if type(tag) is not int or not 0 <= tag <= MAX_TAG:
        raise InvalidArgument(f"tag must be an integer from 0 to {MAX_TAG}, not {tag!r}")


def _as_payload(data: Any) -> Any:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, memoryview):
        return data.cast("B") if data.c_contiguous and data.format != "B" else data
    raise InvalidArgument(f"data must be bytes-like or str, not {type(data).__name__}")
