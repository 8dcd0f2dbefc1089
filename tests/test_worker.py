"""The tag-messaging layer (``ucxrpc.transport``) over real UCX."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pydantic
import pytest
from conftest import until

import ucxrpc
from ucxrpc.transport import MAX_TAG, Message, Worker, WorkerConfig


@pytest.fixture
async def pair(manager: ucxrpc.Manager) -> AsyncIterator[tuple[Worker, Worker, int, int]]:
    """A listening worker and a worker connected to it: (server, client, srv_ep, cli_ep)."""
    server, client = Worker(manager=manager), Worker(manager=manager)
    port = await server.listen()
    cli_ep = await client.connect("127.0.0.1", port)
    await client.send_tag(cli_ep, 0, b"hello")
    srv_ep, first = await server.next_message(timeout=5)
    assert first.data == b"hello"
    yield server, client, srv_ep, cli_ep
    await client.close_all()
    await server.close_all()


Pair = tuple[Worker, Worker, int, int]


async def test_send_receive_and_try_receive(pair: Pair) -> None:
    server, client, srv_ep, cli_ep = pair
    assert server.try_recv_tag(srv_ep, 7) is None  # nothing there: None at once
    await client.send_tag(cli_ep, 7, b"PING")
    assert await server.recv_tag(srv_ep, 7, timeout=5) == b"PING"
    await server.send_tag(srv_ep, 7, "PONG")  # str is sent as UTF-8
    assert await client.recv_tag(cli_ep, 7, timeout=5) == b"PONG"
    for i in range(5):
        await client.send_tag(cli_ep, 9, bytes([i]))
    await client.send_tag(cli_ep, 8, b"other tag")
    got = [await server.recv_tag(srv_ep, 9, timeout=5) for _ in range(5)]
    assert got == [bytes([i]) for i in range(5)]
    assert await server.recv_tag(srv_ep, 8, timeout=5) == b"other tag"
    assert server.is_connected(srv_ep) and client.endpoint_ids() == [cli_ep]
    assert server.peer(srv_ep).startswith("127.0.0.1:")


async def test_large_and_small_messages_keep_their_order(pair: Pair) -> None:
    server, client, srv_ep, cli_ep = pair
    sizes = [10, 4 << 20, 20, 300_000, 1, 2 << 20]
    payloads = [bytes([i]) * n for i, n in enumerate(sizes)]
    await asyncio.gather(*(client.send_tag(cli_ep, 5, p) for p in payloads))
    got = [await server.recv_tag(srv_ep, 5, max_size=8 << 20, timeout=10) for _ in sizes]
    assert got == payloads


async def test_next_message_returns_the_oldest_from_anyone(pair: Pair) -> None:
    server, client, srv_ep, cli_ep = pair
    for tag in (3, 1, 2):
        await client.send_tag(cli_ep, tag, f"t{tag}")
    await server.recv_tag(srv_ep, 2, timeout=5)  # taken out of order by tag
    seen = []
    for _ in range(2):
        ep, msg = await server.next_message(timeout=5)
        assert ep == srv_ep and isinstance(msg, Message)
        seen.append((msg.tag, msg.as_text()))
    assert seen == [(3, "t3"), (1, "t1")]
    with pytest.raises(ucxrpc.DeadlineExceeded, match="no message within"):
        await server.next_message(timeout=0.05)


async def test_a_too_small_receive_is_a_clear_error_and_loses_nothing(pair: Pair) -> None:
    server, client, srv_ep, cli_ep = pair
    big = b"z" * 100_000
    await client.send_tag(cli_ep, 4, big)
    with pytest.raises(ucxrpc.ResourceExhausted, match="100000 bytes on tag 4 exceeds"):
        await server.recv_tag(srv_ep, 4, timeout=5)  # buffer_size is 64 KiB by default
    with pytest.raises(ucxrpc.ResourceExhausted, match="stays queued"):
        server.try_recv_tag(srv_ep, 4, max_size=10)
    assert await server.recv_tag(srv_ep, 4, max_size=len(big), timeout=5) == big


async def test_a_tag_mismatch_times_out_naming_the_waiting_tags(pair: Pair) -> None:
    server, client, srv_ep, cli_ep = pair
    await client.send_tag(cli_ep, 12, b"wrong tag")
    await client.send_tag(cli_ep, 13, b"also")
    t0 = time.perf_counter()
    with pytest.raises(ucxrpc.DeadlineExceeded) as info:
        await server.recv_tag(srv_ep, 11, timeout=0.2)
    assert time.perf_counter() - t0 < 2
    assert "no message on tag 11" in str(info.value)
    assert "messages are waiting on tags [12, 13]" in str(info.value)


async def test_bad_input_is_refused_clearly(pair: Pair) -> None:
    _, client, _, cli_ep = pair
    with pytest.raises(ucxrpc.InvalidArgument, match=r"no endpoint 999 \(connected: "):
        await client.send_tag(999, 1, b"x")
    with pytest.raises(ucxrpc.InvalidArgument, match="tag must be an integer"):
        await client.send_tag(cli_ep, MAX_TAG + 1, b"x")
    with pytest.raises(ucxrpc.InvalidArgument, match="tag must be an integer"):
        await client.send_tag(cli_ep, -1, b"x")
    with pytest.raises(ucxrpc.InvalidArgument, match="bytes-like or str, not int"):
        await client.send_tag(cli_ep, 1, 5)  # type: ignore[arg-type]
    with pytest.raises(ucxrpc.InvalidArgument, match="no endpoint 42"):
        await client.recv_tag(42, 1, timeout=1)
    with pytest.raises(pydantic.ValidationError, match="only tag messaging"):
        WorkerConfig(enable_rma=True)
    with pytest.raises(pydantic.ValidationError, match="enable_tag cannot be turned off"):
        WorkerConfig(enable_tag=False)


async def test_broadcast_reaches_every_peer(manager: ucxrpc.Manager) -> None:
    hub = Worker(manager=manager)
    port = await hub.listen()
    spokes = [Worker(manager=manager) for _ in range(3)]
    eps = [await s.connect("127.0.0.1", port) for s in spokes]
    for s, ep in zip(spokes, eps, strict=True):
        await s.send_tag(ep, 1, b"join")
    for _ in spokes:
        await hub.next_message(timeout=5)
    results = await hub.broadcast_tag(2, b"to all")
    assert sorted(results) == sorted(hub.endpoint_ids()) and len(results) == 3
    assert all(r is None for r in results.values())
    for s, ep in zip(spokes, eps, strict=True):
        assert await s.recv_tag(ep, 2, timeout=5) == b"to all"
    for s in spokes:
        await s.close_all()
    await hub.close_all()


async def test_listen_and_connect_at_once_peer_to_peer(manager: ucxrpc.Manager) -> None:
    left, right = Worker(manager=manager), Worker(manager=manager)
    left_port, right_port = await left.listen(), await right.listen()
    to_right, to_left = await asyncio.gather(
        left.connect("127.0.0.1", right_port), right.connect("127.0.0.1", left_port)
    )
    await left.send_tag(to_right, 1, b"from left")
    await right.send_tag(to_left, 1, b"from right")
    _, at_right = await right.next_message(timeout=5)
    _, at_left = await left.next_message(timeout=5)
    assert (at_right.data, at_left.data) == (b"from left", b"from right")
    assert len(left.endpoint_ids()) == 2 and len(right.endpoint_ids()) == 2  # both directions
    await left.close_all()
    await right.close_all()


async def test_higher_priority_sends_leave_first(manager: ucxrpc.Manager) -> None:
    receiver = Worker(manager=manager)
    sender = Worker(WorkerConfig(send_window=1), manager=manager)
    port = await receiver.listen()
    ep = await sender.connect("127.0.0.1", port)
    first = asyncio.create_task(sender.send_tag(ep, 1, b"x" * (8 << 20)))
    queued = [
        asyncio.create_task(sender.send_tag(ep, 100 + i, b"low", priority=ucxrpc.Priority.LOW))
        for i in range(3)
    ] + [
        asyncio.create_task(sender.send_tag(ep, 200 + i, b"high", priority=ucxrpc.Priority.HIGH))
        for i in range(3)
    ]
    await asyncio.gather(first, *queued)
    order = []
    for _ in range(7):
        _, msg = await receiver.next_message(timeout=10)
        order.append(msg.tag)
    assert order == [1, 200, 201, 202, 100, 101, 102]
    await sender.close_all()
    await receiver.close_all()


async def test_stats_count_messages_bytes_and_errors(pair: Pair) -> None:
    server, client, srv_ep, cli_ep = pair
    for _ in range(10):
        await client.send_tag(cli_ep, 1, b"12345")
    for _ in range(10):
        await server.recv_tag(srv_ep, 1, timeout=5)
    sent, received = client.stats(), server.stats()
    assert (sent.messages_sent, sent.bytes_sent) == (11, 55)  # with the fixture's hello
    assert (received.messages_received, received.bytes_received) == (11, 55)
    assert sent.connections == 1 and sent.errors == 0
    assert sent.message_rate() > 0 and sent.throughput_mbps() > 0
    as_dict: dict[str, Any] = sent.as_dict()
    assert as_dict["messages_sent"] == 11 and "throughput_mbps" in as_dict
    assert "messages sent 11 / received 0" in str(sent)
    assert isinstance(client.progress(), int)
    assert await client.run_progress_loop(0.02) >= 0


async def test_a_peer_going_away_fails_its_receivers(pair: Pair) -> None:
    server, client, srv_ep, cli_ep = pair
    waiting = asyncio.create_task(server.recv_tag(srv_ep, 77))
    await until(lambda: any(server._inbox._waiters.values()))  # the receive is waiting
    await client.disconnect(cli_ep)
    with pytest.raises(ucxrpc.ConnectionLost, match=f"endpoint {srv_ep}"):
        await asyncio.wait_for(waiting, 5)
    assert not client.is_connected(cli_ep)
    assert not server.is_connected(srv_ep)
    assert server.stats().errors == 0  # a disconnect is a clean close, not an error


async def test_a_worker_owns_its_manager_when_given_none() -> None:
    async with Worker() as server, Worker() as client:
        port = await server.listen()
        ep = await client.connect("127.0.0.1", port)
        await client.send_tag(ep, 3, Message.text(3, "hi").data)
        _, msg = await server.next_message(timeout=5)
        assert msg.as_text() == "hi"
        own = server.manager
    assert not own.running


async def test_connect_errors_are_unavailable() -> None:
    async with Worker() as worker:
        with pytest.raises(ucxrpc.Unavailable, match=r"cannot connect to 127\.0\.0\.1:1"):
            await worker.connect("127.0.0.1", 1)
        assert worker.endpoint_ids() == []


async def test_rpc_and_messaging_endpoints_refuse_each_other_clearly(
    manager: ucxrpc.Manager,
) -> None:
    worker = Worker(manager=manager)
    port = await worker.listen()
    with pytest.raises(ucxrpc.MethodNotFound, match=r"messaging endpoint .* Worker\.connect"):
        await manager.connect("127.0.0.1", port)
    server = ucxrpc.Server()
    await server.start(manager)
    with pytest.raises(ucxrpc.MethodNotFound, match=r"RPC server: connect with manager\.connect"):
        await worker.connect("127.0.0.1", server.port)
    assert worker.endpoint_ids() == [] and server.connections == 0
    await worker.close_all()
    await server.stop()


async def test_a_killed_peer_process_fails_receivers_promptly(spawn: Any, tmp_path: Any) -> None:
    script = tmp_path / "peer.py"
    script.write_text(
        "import asyncio, ucxrpc\n"
        "from ucxrpc.transport import Worker\n"
        "async def main():\n"
        "    async with Worker() as w:\n"
        "        print('READY', await w.listen(), flush=True)\n"
        "        await asyncio.Event().wait()\n"
        "ucxrpc.run(main())\n"
    )
    proc = spawn(str(script))
    (port,) = proc.read_ready()
    async with Worker() as worker:
        ep = await worker.connect("127.0.0.1", int(port))
        waiting = asyncio.create_task(worker.recv_tag(ep, 5))
        await until(lambda: any(worker._inbox._waiters.values()))
        t0 = time.perf_counter()
        proc.kill()
        with pytest.raises(ucxrpc.ConnectionLost):
            await asyncio.wait_for(waiting, 5)
        assert time.perf_counter() - t0 < 2.0
        assert not worker.is_connected(ep)
        assert worker.stats().errors == 1  # a lost connection is
        with pytest.raises(ucxrpc.InvalidArgument, match="no endpoint"):
            await worker.send_tag(ep, 5, b"x")


async def test_a_clean_close_is_not_an_error(pair: Pair) -> None:
    server, client, srv_ep, _ = pair
    await client.close_all()
    await until(lambda: not server.is_connected(srv_ep))
    assert server.stats().errors == 0 and client.stats().errors == 0


async def test_a_connection_lost_two_ways_counts_one_error(pair: Pair) -> None:
    """A link that breaks (a UCX error) and then loses its control connection is one
    connection lost: one error, whichever is noticed first."""
    _, client, _, cli_ep = pair
    client._peers[cli_ep].broken(ucxrpc.ProtocolError("injected"))
    await until(lambda: not client.is_connected(cli_ep))
    assert client.stats().errors == 1
