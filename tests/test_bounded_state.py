"""State a peer can make a connection hold stays bounded, and legitimate bursts lose
nothing: parts ahead of their frames over TCP, frames ahead of a gap, replies a peer
never takes, streams ended by a malformed CREDIT.

Each docstring tells the defect an earlier version of the data path had here, and how
it showed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import until
from helpers.rawpeer import RawPeer

import ucxrpc
from ucxrpc.wire import codec
from ucxrpc.wire.codec import Flags, Kind

pytestmark = pytest.mark.timeout(90)


def _server_links(server: ucxrpc.Server) -> list[Any]:
    return [c.link for c in server._conns if c.link is not None]


async def test_a_burst_of_calls_with_parts_over_tcp_loses_no_part() -> None:
    """Legitimate data parts are thrown away when more than ``Budget.max_early`` (256)
    of them arrive before their frames (``Inbound.on_part``: "len(self._early) >=
    self.budget.max_early -> Discard").

    Over TCP (``UCX_TLS=tcp``, what two hosts use) a frame of 8-64 KiB travels by
    rendezvous and completes after the eager-probed parts of later calls, so a burst
    of a few hundred concurrent calls each carrying a ~60 KB string and a 20 KB bytes
    value makes the server discard hundreds of the client's own parts. Each such call
    then waits ``part_timeout`` (30 s by default) and fails with ProtocolError, and,
    since delivery is in order, every later frame of the connection waits behind it.
    """
    opts = {"TLS": "tcp"}
    async with (
        ucxrpc.Manager(part_timeout=3.0, ucx_options=opts) as server_side,
        ucxrpc.Manager(ucx_options=opts) as client_side,
    ):
        server = ucxrpc.Server()

        @server.rpc
        async def sizes(text: str, data: bytes) -> int:
            return len(text) + len(data)

        await server.start(server_side)
        client = await client_side.connect("127.0.0.1", server.port)
        try:
            results = await asyncio.gather(
                *(
                    client.call("sizes", "x" * 60_000, b"y" * 20_000, timeout=30)
                    for _ in range(800)
                ),
                return_exceptions=True,
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            assert not failures, (
                f"{len(failures)} of 800 calls failed (server discarded "
                f"{server_side.engine.discarded} messages): {failures[0]!r}"
            )
        finally:
            await client.close()
            await server.stop()


async def test_frames_ahead_of_a_gap_are_bounded_by_the_byte_budget() -> None:
    """Frames received ahead of a missing seq are held with their whole buffers
    (``Inbound._entries``), bounded only by count (``max_ahead`` = 4096 frames of up
    to 64 KiB: 256 MiB per connection) and never by ``receive_budget``; nor do they
    ever expire (``Inbound.expire`` only looks at parts). A peer that skips seq 0
    and sends frames 1..4095 pins 256 MiB of server memory for as long as it stays
    connected, per connection. Here the server's receive budget is 1 MiB and the
    peer parks ~6 MB ahead of a gap; the server keeps all of it.
    """
    async with ucxrpc.Manager(
        max_message_size=1 << 20, receive_budget=1 << 20, part_timeout=0.5
    ) as manager:
        server = ucxrpc.Server()

        @server.rpc
        async def echo(text: str) -> str:
            return text

        await server.start(manager)
        async with RawPeer.connected(server.port) as raw:
            raw.out._seq = 1  # seq 0 never comes
            for call in range(1, 101):
                enc = codec.encode(Kind.REQUEST, call, [["t" * 60_000], {}], method="echo")
                # Not waiting: once the server drops the connection, nothing completes.
                await raw.send(call, enc, wait=False)
            (link,) = _server_links(server)
            await until(
                lambda: raw.worker.progress() or link.inbound.waiting_frames == 100 or link.closed
            )
            held = 0 if link.closed else link.inbound.waiting_frames * 60_000
            assert held <= manager.config.receive_budget, (
                f"{held} bytes of frames held ahead of a gap, budget "
                f"{manager.config.receive_budget}"
            )
        await server.stop()


async def test_a_gap_in_the_frame_sequence_does_not_pin_frames_for_good() -> None:
    """The same defect seen in time: frames after a seq that never arrives are kept
    for the life of the connection. ``Inbound.expire`` fails frames that wait for
    their *parts*, but a missing *frame* (a hostile peer, or a frame whose receive
    failed in ``Engine._frame_done``, which only logs) blocks every later frame of the
    connection forever, with no error to anyone and no timeout.
    """
    async with ucxrpc.Manager(part_timeout=0.3) as manager:
        server = ucxrpc.Server()

        @server.rpc
        async def ping() -> str:
            return "PONG"

        await server.start(manager)
        async with RawPeer.connected(server.port) as raw:
            raw.out._seq = 1
            await raw.send(1, codec.encode(Kind.REQUEST, 1, [[], {}], method="ping"))
            (link,) = _server_links(server)
            await until(lambda: link.inbound.waiting_frames == 1)
            # Ten part timeouts later, the frame is still held and the peer still served.
            await asyncio.sleep(3.0)
            assert link.closed or link.inbound.waiting_frames == 0, (
                "a frame ahead of a gap is still held after 10 part timeouts"
            )
        await server.stop()


async def test_replies_a_peer_never_receives_do_not_pile_up_on_the_server() -> None:
    """Sends are tracked in ``Engine._ops`` until UCX completes them, with no bound per
    connection. A rendezvous send (a reply part of >= 16 KiB, or a reply frame of
    8-64 KiB) completes only when the peer receives it, so a connected peer that
    makes calls and never receives the replies makes the server keep every reply
    buffer forever (``max_inflight`` does not count them: the call ended when its
    reply was handed to the link). Each drive that made progress also walks the whole
    list (``Engine._reap``), so the cost of every later drive -- for every client --
    grows with what this peer left unreceived. Here the server allows 16 calls in
    flight per connection, yet holds 300 reply sends for one peer.
    """
    async with ucxrpc.Manager(max_inflight=16) as manager:
        server = ucxrpc.Server()

        @server.rpc
        async def echo(data: Any) -> Any:
            return data

        await server.start(manager)
        async with RawPeer.connected(server.port) as raw:
            for call in range(1, 301):
                enc = codec.encode(Kind.REQUEST, call, [[b"r" * 20_000], {}], method="echo")
                await raw.send(call, enc)
            await until(lambda: manager.engine.in_flight >= 16 or manager.connections == 0)
            await until(lambda: server.inflight == 0)
            # Every request was answered or refused; the replies still unreceived are
            # bounded by max_inflight (plus the refusals' own frames, which are eager).
            assert manager.connections == 0 or manager.engine.in_flight <= 16, (
                f"{manager.engine.in_flight} sends held for a peer that never receives"
            )
        await server.stop()


async def test_a_malformed_credit_on_a_bidi_call_leaks_no_input_stream(
    manager: ucxrpc.Manager,
) -> None:
    """``_ServerConn._on_credit`` handles a malformed CREDIT by popping the call from
    ``calls`` itself and cancelling it; the task's done callback ``_ended`` then finds
    the call gone (``self.calls.get(call_id) is task`` is False) and so never pops
    ``inputs[call_id]``. Every bidirectional (or client-streaming) call ended this way
    leaves its ``InputStream`` in ``conn.inputs`` for the life of the connection --
    outside ``max_inflight`` -- and ITEM frames for that call id are still accepted
    and buffered into it (up to a window each). Unbounded per connection.
    """
    server = ucxrpc.Server()

    @server.rpc
    async def chat(msgs: AsyncIterator[str]) -> AsyncIterator[str]:
        async for m in msgs:
            yield m

    await server.start(manager)
    async with RawPeer.connected(server.port) as raw:
        for call in range(1, 51):
            enc = codec.encode(
                Kind.STREAM, call, [[None], {}], method="chat", flags=Flags.INPUT_STREAM
            )
            await raw.send(call, enc)
            await raw.send(call, codec.encode(Kind.CREDIT, call, 0))  # malformed: 0
        for call in range(1, 51):
            header, _ = await raw.expect_reply(call)
            assert header.kind is Kind.ERROR
        await until(lambda: server.inflight == 0)
        (conn,) = server._conns
        assert len(conn.inputs) == 0, f"{len(conn.inputs)} input streams left behind"
    await server.stop()


async def test_a_client_at_its_in_flight_limit_is_never_refused(spawn: Any) -> None:
    """A client keeps ``max_inflight`` calls in flight all the time (each caller sends
    its next call as soon as its reply arrives). The server must not count a reply
    whose send it has not reaped yet as a running call: that client never exceeds the
    limit, so none of its calls may fail with ResourceExhausted."""
    port = int(spawn("serve.py", env={"UCXRPC_MAX_INFLIGHT": "8"}).read_ready()[0])
    async with ucxrpc.Manager(max_inflight=8) as manager:
        client = await manager.connect("127.0.0.1", port)
        failures: list[BaseException] = []

        async def caller() -> None:
            for _ in range(1000):
                try:
                    await client.call("ping")
                except ucxrpc.RpcError as exc:
                    failures.append(exc)

        await asyncio.gather(*(caller() for _ in range(8)))
        assert failures == []
        await client.close()


async def test_a_broken_duplicate_of_a_queued_call_gets_one_answer(
    manager: ucxrpc.Manager,
) -> None:
    # A connection starts a slice of calls per loop iteration; the rest wait, queued.
    # An unreadable frame with the id of a queued call must not answer it a second time.
    server = ucxrpc.Server()

    @server.rpc
    async def echo(text: str) -> str:
        return text

    await server.start(manager)
    async with RawPeer.connected(server.port) as raw:
        for call in range(1, 41):
            enc = codec.encode(Kind.REQUEST, call, [[f"t{call}"], {}], method="echo")
            await raw.send(call, enc, wait=False)
        bad = codec.encode(Kind.REQUEST, 40, [["dup"], {}], method="echo")
        bad.frame[codec.PREFIX_SIZE] = 0xC1  # a header msgpack cannot read
        await raw.send(40, bad, wait=False)
        kinds = []
        for _ in range(3):
            try:
                header, _ = await raw.expect_reply(40, seconds=1.0)
            except TimeoutError:
                break
            kinds.append(header.kind)
        assert kinds == [Kind.REPLY] or kinds == [Kind.ERROR], kinds
    await server.stop()
