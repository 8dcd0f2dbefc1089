"""Frame rings over real processes: small frames between two processes on one host go
through shared memory, and hostile peers cannot use the ring announcement."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest
from conftest import PTRACE_SCOPE
from helpers.rawpeer import RawPeer

import ucxrpc
from ucxrpc.io import ring
from ucxrpc.wire import codec
from ucxrpc.wire.codec import Kind

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not ring.available(), reason="no frame rings on this system"),
]


READS = PTRACE_SCOPE == 0


@pytest.mark.skipif(not READS, reason="ptrace is restricted here: no memory reads, no rings")
async def test_small_frames_between_processes_travel_through_the_rings(remote: Any) -> None:
    _, client = remote
    assert await client.call("ping") == "PONG"  # both rings are taken by now
    link = client.link
    assert link.ring_in is not None and link.ring_out is not None
    sent, read = link.ring_out.frames, link.ring_in.frames
    for _ in range(200):
        assert await client.call("ping") == "PONG"
    assert link.ring_out.frames >= sent + 200  # every request went through the ring
    assert link.ring_in.frames >= read + 200  # and every reply
    # Large values still cross (their frames by ring, their parts as shared parts).
    data = os.urandom(3 << 20)
    assert await client.call("reverse", data) == data[::-1]
    # Mixed sizes in one stream, in order.
    sizes = [12_000, 300_000, 20, 17_000, 40_000, 5]
    items = [item async for item in client.stream("blobs", sizes)]
    assert [len(i) for i in items] == sizes


async def test_rings_off_keeps_frames_on_ucx(spawn: Any) -> None:
    port = int(spawn("serve.py").read_ready()[0])
    async with ucxrpc.Manager(shared_frames=False) as manager:
        client = await manager.connect("127.0.0.1", port)
        assert await client.call("ping") == "PONG"
        assert client.link.ring_in is None and client.link.ring_out is None
        await client.close()


async def test_a_ring_announcement_from_a_peer_not_proven_is_ignored(served: Any) -> None:
    server, client = served
    raw = RawPeer()
    await raw.connect(server.port)  # offers no shared memory: proves nothing
    try:
        await raw.send(0, codec.encode(Kind.RING, 0, [3, 4, ring.CAPACITY, 1]))
        await raw.send(7, codec.encode(Kind.REQUEST, 7, [[b"ok"], {}], method="blob"))
        header, value = await raw.expect_reply(7)
        assert header.kind is Kind.REPLY and value == b"ok"
    finally:
        raw.close()
    assert await client.call("blob", b"still") == b"still"


@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ([99_999, 99_998, ring.CAPACITY, 1], True),  # no such fds in the peer
        ([0, 1, ring.CAPACITY, 1], True),  # stdin and stdout: not a ring, not an eventfd
        ([3, 4, 3000, 1], True),  # not a power of two
        ([(1 << 32) + 3, 4, ring.CAPACITY, 1], True),  # an fd number that would wrap
        ([3, 4, ring.CAPACITY], False),  # malformed: ignored
        ("nonsense", False),
    ],
)
async def test_a_bad_ring_announcement_is_refused_and_the_connection_goes_on(
    served: Any, fields: Any, refused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    server, client = served
    caplog.set_level(logging.INFO, logger="ucxrpc")
    async with RawPeer.connected(server.port, config=ucxrpc.Config()) as raw:
        if not raw.reads:
            pytest.skip("the server cannot read this process's memory here")
        await raw.send(0, codec.encode(Kind.RING, 0, fields))
        await raw.send(7, codec.encode(Kind.REQUEST, 7, [[b"ok"], {}], method="blob"))
        header, value = await raw.expect_reply(7)
        assert header.kind is Kind.REPLY and value == b"ok"
    assert ("frame ring refused" in caplog.text) is refused, caplog.text
    assert await client.call("blob", b"still") == b"still"
