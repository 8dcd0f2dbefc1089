"""A hostile peer: the real handshake, then arbitrary UCX tag traffic from raw ucxx.

It speaks the control protocol with ucxrpc's own handshake code (so it is a connected,
verified peer), then sends whatever a test crafts: frames with any seq, secret or call
id, parts on any tag, parts of the wrong length. Replies are found by probe, at their
exact size, as the library does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from ucxx._lib import libucxx as lib
from ucxx._lib.arr import Array

from ucxrpc.config import Config
from ucxrpc.io.control import initiate_handshake
from ucxrpc.io.link import key_parts
from ucxrpc.io.runtime import LOOPBACK_DEVICE
from ucxrpc.protocol import Outbound
from ucxrpc.wire import codec

__all__ = ["RawPeer"]

_FRAMES = (lib.UCXXTag(codec.FRAME_PROBE_TAG), lib.UCXXTagMask(codec.FRAME_PROBE_MASK))


class RawPeer:
    """A peer written against ucxx's low-level API."""

    def __init__(self, role: str | None = None) -> None:
        # On loopback only, as a manager confines itself when it serves on 127.0.0.1:
        # a raw context on every device listens on the host's other interfaces too.
        self.ctx = lib.UCXContext(
            {"NET_DEVICES": LOOPBACK_DEVICE}, (lib.Feature.TAG, lib.Feature.WAKEUP)
        )
        self.worker = lib.UCXWorker(self.ctx)
        self.cid = 4242
        self.key = bytes(range(16))
        self.role = role
        self.keep: list[Any] = []
        self.inbox: list[tuple[int, bytearray]] = []

    async def connect(self, port: int, config: Config | None = None) -> None:
        """Handshake with the server on ``port`` and make the UCX endpoint.

        By default the peer does not offer shared parts (so the server sends it
        nothing unasked); pass a config with ``shared_memory=True`` to offer them.
        """
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        extra: dict[str, Any] = {"slot": 4096, "win": 16}
        if self.role is not None:
            extra["role"] = self.role
        hs = await initiate_handshake(
            self.reader,
            self.writer,
            config or Config(shared_memory=False),
            bytes(self.worker.address.tobytes()),
            self.cid,
            extra,
            f"127.0.0.1:{port}",
            key=self.key,
        )
        if hs.peer_memory is not None:
            hs.peer_memory.close()  # this peer reads no memory: it only says it may
        self.reads = hs.peer_memory is not None
        self.server_cid = hs.peer_conn_id
        self.server_secret, self.server_key = key_parts(hs.peer_key)
        self.out = Outbound(hs.peer_conn_id, self.server_secret, self.server_key)
        self.secret, _ = key_parts(self.key)
        addr = lib.UCXAddress.create_from_buffer(hs.peer_address)
        self.ep = self.worker.create_endpoint_from_worker_address(addr, True)

    async def progress_until(self, req: Any, seconds: float = 5.0) -> None:
        end = time.monotonic() + seconds
        while not req.completed:
            self.worker.progress()
            if time.monotonic() > end:
                raise TimeoutError("raw request did not complete")
            await asyncio.sleep(0.0005)

    async def send_tagged(self, tag: int, data: Any, *, wait: bool = True) -> None:
        """Send ``data`` on exactly ``tag`` (and wait until it has left)."""
        self.keep.append(data)
        req = self.ep.tag_send(Array(data), lib.UCXXTag(tag))
        self.keep.append(req)
        if wait:
            await self.progress_until(req)

    async def send_raw(self, call_id: int, data: bytes) -> None:
        """Send ``data`` as a frame of ``call_id`` (no seq or secret stamped)."""
        await self.send_tagged(codec.frame_tag(self.server_cid, call_id), data)

    async def send(self, call_id: int, encoded: codec.Encoded, *, wait: bool = True) -> None:
        """Send a frame the way ucxrpc does: numbered, stamped, parts tagged."""
        for tag, buf in self.out.send(call_id, encoded):
            await self.send_tagged(tag, buf, wait=wait)

    def stamp_next(self, frame: bytearray, secret: int | None = None) -> bytearray:
        """Give ``frame`` the next seq (consumed) and the server's (or another) secret."""
        seq = self.out.next_seq
        self.out._seq = (seq + 1) % codec.SEQ_MOD
        codec.stamp(frame, seq, self.server_secret if secret is None else secret)
        return frame

    async def next_frame(self, seconds: float = 5.0) -> tuple[int, bytearray]:
        """The next frame the server sent (any call), received at its exact size."""
        end = time.monotonic() + seconds
        while True:
            self.worker.progress()
            probe = self.worker.tag_probe(*_FRAMES, True)
            if probe.matched:
                buf = bytearray(probe.length)
                req = self.worker.tag_recv_with_handle(Array(buf), probe)
                await self.progress_until(req)
                req.check_error()
                return probe.sender_tag.value, buf
            if time.monotonic() > end:
                raise TimeoutError("no frame from the server")
            await asyncio.sleep(0.0005)

    async def expect_reply(self, call_id: int, seconds: float = 5.0) -> tuple[codec.Header, Any]:
        """The next frame for ``call_id`` (others are kept in ``inbox``), decoded."""
        while True:
            for i, (_, buf) in enumerate(self.inbox):
                if codec.peek(buf).call_id == call_id:
                    del self.inbox[i]
                    header, payload = codec.decode_header(buf)
                    return header, codec.decode_payload(header, payload, [])
            tag, buf = await self.next_frame(seconds)
            assert codec.peek(buf).secret == self.secret
            if codec.peek(buf).kind == codec.Kind.BATCH:
                _, payload = codec.decode_header(buf)
                self.inbox.extend((tag, bytearray(f)) for f in codec.split_batch(payload))
            else:
                self.inbox.append((tag, buf))

    def close(self) -> None:
        self.writer.close()

    @classmethod
    @contextlib.asynccontextmanager
    async def connected(
        cls, port: int, role: str | None = None, config: Config | None = None
    ) -> AsyncIterator[RawPeer]:
        """A peer connected to the server on ``port``, closed when the block ends."""
        raw = cls(role)
        await raw.connect(port, config)
        try:
            yield raw
        finally:
            raw.close()
