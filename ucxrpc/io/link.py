"""One connection's data path: the protocol machines joined to a UCX endpoint.

A :class:`Link` is the I/O side of one connection. It feeds what the engine found for
this connection (frames, probed parts) into the connection's :class:`Inbound` machine
and carries out the actions it answers with (receive a part, discard one, deliver a
frame to the owner, fail a call, drop the connection). Sends go through the
connection's :class:`Outbound` machine, which numbers and tags them.

Coalescing: the first frame sent in a loop iteration leaves at once; frames sent
while that send's flush is pending (the rest of the iteration) are queued and leave
together as one BATCH message. A lone frame therefore costs no added latency, and a
burst costs one UCX message.

Buffers: a send keeps a reference to each buffer until UCX reports it sent (the
engine's op holds it), so a caller may reuse a buffer it passed once the awaited call
or ``send_tag`` returned; a notification or a stream item may be reused once the next
call on the connection has been made. A receive buffer is handed to the owner only
after UCX completed the receive.

Shared parts: when the handshake proved both peers can open each other's memory files
(one host, see :mod:`ucxrpc.io.shared`), the parts of a frame with a part of at least
``share_min`` bytes travel outside UCX, and only a 32-byte descriptor crosses it. If
the peer reads this side's memory, the descriptor is the part's address: the peer
copies the bytes out and answers with a RELEASE frame, and the buffer is kept until
then (as for a UCX send: reuse it once the call returned). Otherwise the part travels
as a sealed memory file: the sender writes each once, the receiver maps it (no copy)
and answers with a RELEASE; the bytes are copied at the send, so the caller may reuse
its buffer as soon as ``send`` returns for those frames.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConnectionLost, ProtocolError, RpcError, Unavailable
from ..protocol import Action, Budget, Deliver, Discard, Fail, Inbound, Outbound, Receive, Violation
from ..wire import codec
from ..wire import shared as wire_shared
from ..wire.codec import Flags, Header, Kind
from . import regions, ring, shared
from .engine import FORKED_MESSAGE

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["DELIVER_SLICE", "Link", "Owner", "key_parts"]

log = logging.getLogger("ucxrpc")

Done = Callable[[BaseException | None], None]


class Owner(Protocol):
    """What a link delivers to (a server connection, a client, a messaging peer)."""

    def deliver(self, header: Header, payload: memoryview, parts: list[Any]) -> None:
        """The next frame from the peer, in order, with its parts."""

    def failed(self, call_id: int, kind: Kind | None, error: RpcError) -> None:
        """The next frame from the peer could not be used (fail that call only)."""

    def broken(self, error: RpcError) -> None:
        """The connection cannot go on (a protocol violation or a failed send)."""


def key_parts(key: bytes) -> tuple[int, int]:
    """A 16-byte connection key as ``(secret, data-tag key)``."""
    return int.from_bytes(key[:8], "big"), int.from_bytes(key[8:13], "big")


def _joined(count: int, done: Done) -> Done:
    """A callback that calls ``done`` once it was called ``count`` times (with the
    first error reported, if any)."""
    remaining = count
    first: list[BaseException] = []

    def one(exc: BaseException | None) -> None:
        nonlocal remaining
        if exc is not None and not first:
            first.append(exc)
        remaining -= 1
        if remaining == 0:
            done(first[0] if first else None)

    return one


#: Frames handed to the owner per drive, and again at its end: the rest of a batch
#: (up to a thousand small frames) waits for the next drive, so that a peer's batch
#: delays another connection's next call by a slice, not by the whole batch.
DELIVER_SLICE = 16

#: The keys a RELEASE carries to say "I read your memory" (no part has key 0) and
#: "I cannot read your memory after all: send files".
_READS = 0
_NO_READS = -1


def _alloc(size: int) -> Any:
    """A part's receive buffer.

    Large buffers are recycled regions (:mod:`ucxrpc.io.regions`: memory already
    faulted in; not zero-filled, UCX writes every byte before the buffer is handed
    out) and are handed out as a memoryview; small ones are bytearrays.
    """
    if size < regions.MIN_SIZE:
        return bytearray(size)
    return regions.region(size)


class Link:
    """Frames and data parts to and from one peer.

    Args:
        engine: The manager's progress engine.
        local_id: The connection id this side assigned (in the tags it receives).
        local_key: This side's 16-byte key (the secret in frames it receives).
        owner: Receives what arrives.
        budget: Limits on what the peer may have announced and not delivered.
    """

    def __init__(
        self,
        engine: Engine,
        local_id: int,
        local_key: bytes,
        owner: Owner,
        budget: Budget,
    ) -> None:
        self.engine = engine
        self.local_id = local_id
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.key = local_key
        secret, key = key_parts(local_key)
        self.inbound = Inbound(local_id, secret, key, budget, alloc=_alloc, clock=self.loop.time)
        self.outbound: Outbound | None = None
        self.ep: Any = None
        self.remote_id = 0
        self.max_size = budget.max_message
        self.closed = False
        self.bytes_sent = 0
        self.bytes_received = 0
        #: Frames delivered for a call the owner does not have (counted by the owner).
        self.unmatched = 0
        #: UCX sends handed over and not yet completed (a peer that does not receive
        #: what is sent makes this grow: the server counts it against max_inflight).
        self.pending_sends = 0
        self._flush_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._resuming = False  # the rest of the inbound actions wait for a drive's end
        self._acting = False  # carrying out actions (a completion may call back)
        self._again = False  # ... and one did
        self._lost_error: RpcError | None = None  # a receive inside a slice found the peer gone
        self._slice_drive = -1  # the drive the slice below belongs to
        self._slice_left = 0  # deliveries left to this connection in that drive
        self.peer_key = b""
        #: The peer's pid when parts may travel shared (proven in the handshake).
        self.peer_pid: int | None = None
        #: Frames with a part this large send their parts shared, once the peer said
        #: it maps them (0: never share).
        self.share_min = 0
        self.exports: shared.Exports | None = None
        self._releases: list[int] = []
        self._export_timer: asyncio.TimerHandle | None = None
        self._probe: shared.Probe | None = None
        #: The peer's process when this side reads large parts out of its memory.
        self.peer_memory: shared.Peer | None = None
        #: The peer reads large parts out of this side's memory (it said so).
        self.peer_reads = False
        #: Whether this side lends its memory to a peer that says it reads it.
        self.offer_memory = True
        #: Whether small frames may travel through frame rings (:mod:`ucxrpc.io.ring`).
        self.offer_rings = False
        #: The ring this side reads the peer's frames from, and the one it writes to.
        self.ring_in: ring.Reader | None = None
        self.ring_out: ring.Writer | None = None
        self._ucx_pending = 0  # UCX sends not completed (frames wait behind them)
        # The peer's RING frame when it came before this side's handshake ended (the
        # server announces its ring before the client has read the welcome).
        self._early_ring: tuple[Header, bytes] | None = None
        #: Parts sent shared and received shared, and of those received, how many
        #: were read out of the peer's memory.
        self.shared_sent = 0
        self.shared_received = 0
        self.shared_read = 0

    def connect(
        self,
        ep: Any,
        remote_id: int,
        peer_key: bytes,
        max_size: int,
        *,
        peer_pid: int | None = None,
        peer_maps: bool = False,
        probe: shared.Probe | None = None,
        peer_memory: shared.Peer | None = None,
        peer_reads: bool = False,
    ) -> None:
        """Join the link to the peer's endpoint once the handshake is done.

        Args:
            ep: The UCX endpoint to the peer.
            remote_id: The connection id the peer assigned.
            peer_key: The peer's 16-byte key.
            max_size: The largest message the peer accepts.
            peer_pid: The peer's pid, when the handshake proved this side can map
                the peer's shared parts: the link then tells the peer so (an empty
                RELEASE), and accepts shared parts from that process only.
            peer_maps: The handshake proved the peer maps this side's files: send
                large parts shared at once (else once the peer says so).
            probe: This side's handshake probe, if the peer may still have to read
                it: let go when the peer's first RELEASE comes (it has read it) or
                the link closes.
            peer_memory: The peer's process, when the handshake proved this side may
                read its memory: the link says so (RELEASE ``[0]``) and accepts
                memory descriptors. Owned by the link from here.
            peer_reads: The handshake proved the peer reads this side's memory: send
                large parts as their address (else memory files).
        """
        secret, key = key_parts(peer_key)
        self.ep = ep
        self.remote_id = remote_id
        self.peer_key = peer_key
        self.outbound = Outbound(remote_id, secret, key)
        self.max_size = min(self.max_size, max_size)
        # Owned from here (closed with the link, also if what follows fails).
        self._probe = probe
        sharing = peer_pid is not None and self.share_min > 0
        if sharing and peer_memory is not None and peer_memory.pid == peer_pid:
            self.peer_memory = peer_memory
        elif peer_memory is not None:
            peer_memory.close()
        if sharing:
            self.peer_pid = peer_pid
            reads = self.peer_memory is not None
            self.send(0, codec.encode(Kind.RELEASE, 0, [_READS] if reads else []))
            if peer_maps:
                self._start_sharing()
                self.peer_reads = peer_reads and self.offer_memory
            if reads and self.offer_rings:
                self._open_ring()
        early, self._early_ring = self._early_ring, None
        if early is not None:
            self._on_ring(early[0], memoryview(early[1]))

    # -- arrivals (from the manager's router) ----------------------------------------------

    def on_frame(self, tag: int, buf: bytearray) -> None:
        """A frame for this connection arrived."""
        n = len(buf)
        if n > codec.PREFIX_SIZE and buf[1] == Kind.BATCH:
            n -= codec.PREFIX_SIZE  # count frames, as the sender does, not their container
        self.bytes_received += n
        self.inbound.on_frame(tag, buf)
        self._act()

    def on_part(self, tag: int, length: int, handle: Any) -> None:
        """A data part for this connection waits in UCX."""
        self.inbound.on_part(tag, length, handle)
        self._act()

    def on_oversized(self, tag: int, length: int) -> None:
        """The peer sent a frame longer than any frame may be."""
        self._broken(ProtocolError(f"the peer sent a {length}-byte frame"))

    def deliver_pending(self) -> None:
        """Hand over at once every frame that arrived and waits for its turn (the
        server stops: they arrived before it did)."""
        if not self.closed and not self._acting:
            self._act(None)

    def _act(self, limit: int | None = DELIVER_SLICE) -> None:
        if self._acting:
            # Called back from inside an action (a receive that completed at once):
            # what it made follows the actions being carried out, in order.
            self._again = True
            return
        inbound = self.inbound
        if limit is not None:
            # One slice per drive, however many of this connection's frames it brings:
            # a slice per frame let a ring pass (eight frames) hand over eight slices
            # of the batches waiting before them, 128 calls and 2 ms in one drive.
            drive = self.engine.drives
            if drive != self._slice_drive:
                self._slice_drive, self._slice_left = drive, limit
        self._acting = True
        try:
            # Again while callbacks made more (a receive completed at once), but a
            # few rounds only: a slice must stay a slice.
            for _ in range(4):
                self._again = False
                if limit is None:
                    actions = inbound.take(None)
                else:
                    actions = inbound.take(self._slice_left)
                    delivered = sum(type(action) is Deliver for action in actions)
                    self._slice_left = max(0, self._slice_left - delivered)
                self._carry_out(actions)
                if not (self._again and inbound.pending):
                    break
        finally:
            self._acting = False
        lost, self._lost_error = self._lost_error, None
        if lost is not None:
            self._lost(lost)
            return
        if inbound.pending and not self._resuming and not self.closed:
            # The rest of a batch: handed over at the end of the drive, after what it
            # brought from other connections, a slice a time.
            self._resuming = True
            self.engine.after_drive(self._resume)
        if (
            (inbound.awaited_parts or inbound.waiting_frames)
            and self._timer is None
            and not self.closed
        ):
            self._timer = self.loop.call_later(inbound.budget.part_timeout / 2, self._expire)

    def _carry_out(self, actions: list[Action]) -> None:
        owner = self.owner
        for action in actions:
            if type(action) is Deliver:
                if action.header.kind is Kind.RELEASE:
                    self._on_release(action.header, action.payload)
                elif action.header.kind is Kind.RING:
                    self._on_ring(action.header, action.payload)
                else:
                    owner.deliver(action.header, action.payload, action.parts)
            elif type(action) is Receive:
                if action.shared is not None:
                    self.engine.receive(action.handle, action.buffer, self._shared_done(action))
                    continue
                self.bytes_received += len(action.buffer)
                self.engine.receive(action.handle, action.buffer, self._part_done(action.token))
            elif type(action) is Discard:
                self.engine.discard(action.handle, action.length)
                if action.release is not None:
                    self._queue_release(action.release)
            elif type(action) is Fail:
                owner.failed(action.call_id, action.kind, action.error)
            elif type(action) is Violation:
                self._broken(action.error)

    def _lost(self, error: RpcError) -> None:
        """A receive found the peer gone: what arrived before it is handed over first
        (replies already here are not turned into lost calls), then the link breaks."""
        if self._acting:
            # Inside a slice (the receive failed at once): after the slice.
            if self._lost_error is None:
                self._lost_error = error
            return
        self.deliver_pending()
        self._broken(error)

    def _resume(self) -> None:
        self._resuming = False
        if not self.closed:
            self._slice_drive = -1  # the drive's end has a slice of its own
            self._act()

    def _part_done(self, token: Any) -> Done:
        def done(exc: BaseException | None) -> None:
            if isinstance(exc, ConnectionLost):
                self._lost(exc)  # the peer is gone, not just this part
            self.inbound.on_part_done(token, exc is None)
            self._act()

        return done

    def _shared_done(self, action: Receive) -> Done:
        token, desc, where = action.token, action.buffer, action.shared
        assert where is not None

        def done(exc: BaseException | None) -> None:
            if self.closed:
                return  # the connection is gone, and the peer's parts with it
            self._queue_release((where.seq << 8) | where.part)
            if exc is not None:
                if isinstance(exc, ConnectionLost):
                    self._lost(exc)
                self.inbound.on_part_done(token, False)
                self._act()
                return
            try:
                kind, ref, length, ticket, value = wire_shared.parse_descriptor(desc)
                if self.peer_pid is None:
                    raise ProtocolError("shared part from a peer that may not share")
                if length != where.length:
                    raise ProtocolError(
                        f"shared part of {length} bytes where {where.length} were announced"
                    )
                if kind == wire_shared.MEMORY:
                    if self.peer_memory is None:
                        raise ProtocolError("shared part in the memory of a peer not read")
                    mapped = self.peer_memory.read(ref, length, ticket, value)
                    self.shared_read += 1
                else:
                    key = self.key

                    def check(got: bytes) -> bool:
                        return wire_shared.check_trailer(key, where.seq, where.part, length, got)

                    mapped = shared.open_part(self.peer_pid, ref, length, check)
            except Exception as exc:
                err = (
                    exc
                    if isinstance(exc, RpcError)
                    else ProtocolError(
                        f"shared part {where.part} of frame {where.seq} not received: {exc!r}"
                    )
                )
                if isinstance(err, ConnectionLost):
                    self._lost(err)  # the peer died before we opened its file
                elif self.peer_memory is not None and self.peer_memory.forbidden:
                    self._stop_reading()
                self.inbound.on_part_done(token, False, error=err)
            else:
                self.bytes_received += length
                self.shared_received += 1
                self.inbound.on_part_done(token, True, mapped)
            self._act()

        return done

    # -- frame rings ----------------------------------------------------------------------

    def _open_ring(self) -> None:
        """Make the ring the peer writes this side's frames to, and tell the peer (it
        may read this side's memory, so it may take the ring's fds)."""
        capacity = ring.capacity_for(self.inbound.budget.max_ahead)
        if not ring.available() or not capacity:
            return
        try:
            wake = self.engine.wake_fd()
            reader = ring.Reader(self._ring_frame, self._broken, capacity)
        except OSError as exc:
            log.debug("ucxrpc: no frame ring (%s)", exc)
            return
        assert reader.fd is not None
        self.ring_in = reader
        self.engine.add_ring(reader)
        fields = [reader.fd, wake, reader.capacity, reader.nonce]
        self.send(0, codec.encode(Kind.RING, 0, fields))

    def _ring_frame(self, tag: int, buf: bytearray) -> None:
        if (tag >> 40) & codec.MAX_CONN_ID != self.local_id or tag & codec.DATA_BIT:
            # A ring carries this connection's frames only.
            self._broken(ProtocolError("a frame for another connection in the frame ring"))
            return
        self.on_frame(tag, buf)

    def _on_ring(self, header: Header, payload: memoryview) -> None:
        if self.outbound is None:  # not connected yet: the peer is not known yet
            if self._early_ring is None:
                self._early_ring = (header, bytes(payload))
            return
        try:
            fields = codec.decode_payload(header, payload)
        except ProtocolError:
            fields = None
        memory = self.peer_memory
        if (
            memory is None
            or not self.offer_rings
            or self.ring_out is not None
            or type(fields) is not list
            or len(fields) != 4
            or not all(type(f) is int and 0 <= f < 1 << 64 for f in fields)
        ):
            self.unmatched += 1  # rings only between peers that may read each other
            return
        try:
            self.ring_out = memory.attach_ring(*fields)
        except (OSError, RpcError) as exc:
            log.info("ucxrpc: connection %d: frame ring refused: %s", self.local_id, exc)

    def _stop_reading(self) -> None:
        """The kernel refuses to let this side read the peer's memory after all (its
        credentials changed, say): ask for memory files from now on."""
        memory, self.peer_memory = self.peer_memory, None
        if memory is not None:
            memory.close()
        try:
            self.send(0, codec.encode(Kind.RELEASE, 0, [_NO_READS]))
        except RpcError:
            pass

    def _start_sharing(self) -> shared.Exports:
        """The peer maps our files: from now on large parts go shared."""
        budget = self.inbound.budget
        self.exports = shared.Exports(budget.max_bytes, budget.part_timeout, self.loop.time)
        return self.exports

    def _close_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()

    def _queue_release(self, key: int) -> None:
        if not self._releases:
            self.loop.call_soon(self._send_releases)
        self._releases.append(key)

    def _send_releases(self) -> None:
        keys, self._releases = self._releases, []
        if keys and not self.closed and self.outbound is not None:
            try:
                self.send(0, codec.encode(Kind.RELEASE, 0, keys))
            except RpcError:
                pass  # the link is broken; the peer's files close with it

    def _on_release(self, header: Header, payload: memoryview) -> None:
        try:
            keys = codec.decode_payload(header, payload)
        except ProtocolError:
            keys = None
        if type(keys) is not list or not self.share_min or self.peer_pid is None:
            # Shared parts go only to a peer this side proved is on this host too.
            self.unmatched += 1
            return
        self._close_probe()
        exports = self.exports if self.exports is not None else self._start_sharing()
        for key in keys:
            if type(key) is int:
                if key == _READS:
                    self.peer_reads = self.offer_memory
                elif key == _NO_READS:
                    self.peer_reads = False
                else:
                    exports.release(key)

    def _expire_exports(self) -> None:
        self._export_timer = None
        exports = self.exports
        if exports is not None and not self.closed:
            exports.expire()
            if len(exports):
                self._export_timer = self.loop.call_later(exports.hold / 2, self._expire_exports)

    def _share(
        self, seq: int, encoded: codec.Encoded, done: Done | None
    ) -> tuple[codec.Encoded, Done | None]:
        """``encoded`` with its large parts moved into sealed memory files (or as it
        is, if they do not fit what may be held or cannot be made).

        With ``done``, returns the callback for the UCX sends: ``done`` itself runs
        once they completed and the peer released every file (a send that waits for
        its bytes to arrive, as one over UCX does).
        """
        exports = self.exports
        assert exports is not None
        sizes = [codec.nbytes(p) for p in encoded.parts]
        if max(sizes) < self.share_min:
            return encoded, done
        large = [n for n in sizes if n >= codec.SHARED_MIN]
        if not exports.room(sum(large), len(large)):
            return encoded, done
        parts: list[Any] = []
        made: list[tuple[int, Any, int]] = []
        reads = self.peer_reads
        try:
            for i, (part, n) in enumerate(zip(encoded.parts, sizes, strict=True), 1):
                if n < codec.SHARED_MIN:
                    parts.append(part)
                    continue
                if reads:
                    # The peer copies it out of this buffer: lend it (with its ticket)
                    # until the peer says it did.
                    lent = shared.Lent(codec.contiguous(part))
                    made.append(((seq << 8) | i, lent, n))
                    desc = wire_shared.descriptor(
                        wire_shared.MEMORY, lent.address, n, lent.ticket, lent.value
                    )
                else:
                    mac = wire_shared.trailer(self.peer_key, seq, i, n)
                    fd = shared.export([codec.contiguous(part), mac])
                    made.append(((seq << 8) | i, fd, n))
                    desc = wire_shared.descriptor(wire_shared.FILE, fd, n)
                parts.append(desc)
        except BaseException as exc:
            for _, fd, _ in made:
                if type(fd) is int:
                    os.close(fd)
            if not isinstance(exc, OSError):
                raise
            log.debug("ucxrpc: cannot share parts (%s); sending them over UCX", exc)
            return encoded, done
        if done is not None:
            done = _joined(1 + len(made), done)
        for key, fd, n in made:
            exports.add(key, fd, n, done)
        self.shared_sent += len(made)
        if self._export_timer is None:
            self._export_timer = self.loop.call_later(exports.hold / 2, self._expire_exports)
        codec.add_flags(encoded.frame, Flags.SHARED_PARTS)
        return codec.Encoded(encoded.frame, parts), done

    def _expire(self) -> None:
        self._timer = None
        if not self.closed:
            self.inbound.expire(self.loop.time())
            self._act()

    def _broken(self, error: RpcError) -> None:
        if not self.closed:
            log.info("ucxrpc: connection %d broken: %s", self.local_id, error)
            self.owner.broken(error)

    # -- sending --------------------------------------------------------------------------

    def send(self, call_id: int, encoded: codec.Encoded, done: Done | None = None) -> None:
        """Send a frame and its parts for ``call_id``.

        Args:
            call_id: The call (or, for raw messages, the tag) the frame belongs to.
            encoded: The frame and its parts.
            done: Called once every piece has left (with the first error, if any);
                such a frame is not coalesced.

        Raises:
            ConnectionLost: The link is closed or UCX refused the send.
        """
        outbound = self.outbound
        if self.closed or outbound is None:
            if self.engine.forked:
                raise Unavailable(FORKED_MESSAGE)
            raise ConnectionLost("connection closed")
        self.bytes_sent += encoded.size
        if self.exports is not None and encoded.parts:
            # The seq this frame gets, whichever way it leaves (queued ones are
            # numbered when queued).
            encoded, done = self._share(outbound.next_seq, encoded, done)
        try:
            if done is not None:
                if outbound.queued:
                    self._flush()
                self._put(outbound.send(call_id, encoded), done)
            elif self._flush_pending:
                outbound.queue(call_id, encoded)
            else:
                self._flush_pending = True
                self.loop.call_soon(self._flush)
                self._put(outbound.send(call_id, encoded), None)
        except RpcError as exc:
            # A frame may have left without its parts: the peer's order is broken.
            self._broken(exc)
            raise

    def _flush(self) -> None:
        self._flush_pending = False
        outbound = self.outbound
        if outbound is not None and outbound.queued and not self.closed:
            try:
                self._put(outbound.flush(), None)
            except RpcError as exc:
                self._broken(exc)

    def _put(self, messages: list[tuple[int, Any]], done: Done | None) -> None:
        engine, ep, out = self.engine, self.ep, self.ring_out
        cb: Done
        ucx_cb: Done
        if done is None:
            cb, ucx_cb = self._sent, self._ucx_sent
        else:
            cb, ucx_cb = self._counting(len(messages), done)
        # Frames take the ring only when nothing of theirs (parts) nor before them
        # waits on UCX: frames overtaking their parts without bound would make the
        # receiver hold them all (its limits would refuse them under load).
        # (A lone message is a frame: parts follow their frame.)
        if out is not None and (
            self._ucx_pending
            or (len(messages) > 1 and any(tag & codec.DATA_BIT for tag, _ in messages))
        ):
            out = None
        for tag, buf in messages:
            if out is not None:
                # A ProtocolError here: the peer broke its ring, and the connection.
                if out.put(tag, buf):  # it has left: it is in the peer's memory
                    if done is not None:
                        self.pending_sends += 1
                        self.loop.call_soon(cb, None)  # never inside the caller's send
                    continue
                out = None  # the ring is full: the rest follow this one over UCX
            self.pending_sends += 1
            self._ucx_pending += 1
            try:
                engine.send(ep, buf, tag, ucx_cb)
            except RpcError:
                self.pending_sends -= 1
                self._ucx_pending -= 1
                raise
        # A busy server gives a waiting peer the core now and then: once the frames
        # are handed over, so that the peer they wake (often onto this core) reads
        # them during the yield.
        engine.share()

    def _ucx_sent(self, exc: BaseException | None) -> None:
        self._ucx_pending -= 1
        self._sent(exc)

    def _sent(self, exc: BaseException | None) -> None:
        self.pending_sends -= 1
        if exc is not None:
            self._broken(exc if isinstance(exc, RpcError) else ConnectionLost(str(exc)))

    def _counting(self, pieces: int, done: Done) -> tuple[Done, Done]:
        """Callbacks for ``pieces`` sends that run ``done`` once all completed: for
        those through the ring, and for those over UCX."""
        joined = _joined(pieces, done)

        def one(exc: BaseException | None) -> None:
            self._sent(exc)  # counts the send as done
            joined(exc)

        def ucx(exc: BaseException | None) -> None:
            self._ucx_pending -= 1
            one(exc)

        return one, ucx

    # -- shutdown -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop delivering and sending; throw away parts held for frames not yet seen."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._export_timer is not None:
            self._export_timer.cancel()
            self._export_timer = None
        if self.exports is not None:
            self.exports.close()
        self._close_probe()
        if self.ring_in is not None:
            self.engine.remove_ring(self.ring_in)
            self.ring_in.close()
        if self.ring_out is not None:
            self.ring_out.close()
        if self.peer_memory is not None:
            self.peer_memory.close()
        self.inbound.close()
        for action in self.inbound.take():
            if type(action) is Discard:
                self.engine.discard(action.handle, action.length)
