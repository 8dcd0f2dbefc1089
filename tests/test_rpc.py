"""Calls over real UCX on 127.0.0.1: results, errors, validation, concurrency, deadlines."""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import hanging_server, until

import ucxrpc
from ucxrpc import Priority

Served = tuple[ucxrpc.Server, ucxrpc.Client]


async def test_basic_calls(served: Served) -> None:
    _, client = served
    assert await client.call("ping") == "PONG"
    assert await client.call("echo", "hi", timeout=1.0, priority=Priority.HIGH) == "REPLY:hi"
    assert await client.call("echo", text="kw") == "REPLY:kw"
    assert await client.call("add", 2, b=3) == 5


async def test_name_defaults_and_duplicates() -> None:
    server = ucxrpc.Server()

    @server.rpc
    async def alpha() -> None: ...

    @server.rpc(name="beta", priority=Priority.HIGH, timeout=2.0)
    async def gamma() -> None: ...

    builtin = {"ucxrpc.describe", "ucxrpc.health.check", "ucxrpc.health.watch"}
    assert set(server.handlers) == {"alpha", "beta", *builtin}
    assert server.handlers["beta"].priority == Priority.HIGH
    assert server.handlers["beta"].timeout == 2.0
    with pytest.raises(ValueError, match="already registered"):
        server.add_handler(alpha)


async def test_plain_functions_run_off_the_loop(manager: ucxrpc.Manager) -> None:
    server = ucxrpc.Server()
    loop_thread = threading.get_ident()

    @server.rpc
    def where() -> bool:
        return threading.get_ident() != loop_thread

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        assert await client.call("where") is True
    await server.stop()


async def test_large_payloads_both_ways(served: Served) -> None:
    _, client = served
    for size in (0, 100, 4000, 5000, 20_000, 16 * 1024 * 1024):
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        out = await client.call("blob", data)
        assert bytes(out) == data
    # A reply larger than the reply slot but made of small items (not a bytes value).
    text = "y" * 50_000
    assert await client.call("echo", text) == "REPLY:" + text


async def test_validation_names_the_argument(served: Served) -> None:
    _, client = served
    with pytest.raises(ucxrpc.InvalidArgument, match=r"^\[INVALID_ARGUMENT\] a: Input should"):
        await client.call("add", "x", 2)
    with pytest.raises(ucxrpc.InvalidArgument, match="missing a required argument: 'b'"):
        await client.call("add", 1)
    with pytest.raises(ucxrpc.InvalidArgument, match="unexpected keyword argument 'c'"):
        await client.call("add", 1, 2, c=3)
    assert await client.call("add", "4", 2) == 6  # pydantic's lax mode converts


async def test_unknown_method(served: Served) -> None:
    _, client = served
    with pytest.raises(ucxrpc.MethodNotFound, match="'nope' is not registered"):
        await client.call("nope")


async def test_handler_errors(manager: ucxrpc.Manager) -> None:
    server = ucxrpc.Server()

    @server.rpc
    async def fail() -> None:
        raise KeyError("missing")

    @server.rpc
    async def refuse() -> None:
        raise ucxrpc.RpcError(ucxrpc.StatusCode.PERMISSION_DENIED, "no", {"user": "bob"})

    @server.rpc
    async def unserializable() -> object:
        return object()

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        with pytest.raises(ucxrpc.RemoteError) as info:
            await client.call("fail")
        assert info.value.remote_type == "KeyError"
        assert info.value.message == "'missing'"
        assert info.value.remote_traceback == ""  # not sent unless asked for
        with pytest.raises(ucxrpc.RpcError) as denied:
            await client.call("refuse")
        assert denied.value.code is ucxrpc.StatusCode.PERMISSION_DENIED
        assert denied.value.details == {"user": "bob"}
        with pytest.raises(ucxrpc.RpcError, match="cannot be serialized"):
            await client.call("unserializable")
    await server.stop()


async def test_thousand_concurrent_calls_on_one_connection(served: Served) -> None:
    _, client = served
    results = await asyncio.gather(*(client.call("echo", str(i)) for i in range(1000)))
    assert results == [f"REPLY:{i}" for i in range(1000)]
    assert client.pending == 0


async def test_priority_order_under_a_concurrency_limit_of_one(manager: ucxrpc.Manager) -> None:
    server = ucxrpc.Server(max_concurrency=1)
    gate = asyncio.Event()
    started: list[str] = []

    @server.rpc
    async def hold() -> None:
        await gate.wait()

    @server.rpc
    async def job(name: str) -> str:
        started.append(name)
        return name

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        holder = asyncio.ensure_future(client.call("hold"))
        await until(lambda: not (server.inflight < 1))
        calls = []
        for name, prio in [("low1", 0), ("norm1", 1), ("high1", 2), ("low2", 0), ("high2", 2)]:
            calls.append(asyncio.ensure_future(client.call("job", name, priority=prio)))
            # Make the arrival order at the server the order above.
            await until(lambda: not (server.inflight < len(calls) + 1))
        gate.set()
        await holder
        assert await asyncio.gather(*calls) == ["low1", "norm1", "high1", "low2", "high2"]
    assert started == ["high1", "high2", "norm1", "low1", "low2"]
    await server.stop()


async def test_method_priority_is_the_default(manager: ucxrpc.Manager) -> None:
    server = ucxrpc.Server(max_concurrency=1)
    gate = asyncio.Event()
    started: list[str] = []

    @server.rpc
    async def hold() -> None:
        await gate.wait()

    @server.rpc(priority=Priority.HIGH)
    async def urgent() -> None:
        started.append("urgent")

    @server.rpc
    async def normal() -> None:
        started.append("normal")

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        holder = asyncio.ensure_future(client.call("hold"))
        await until(lambda: not (server.inflight < 1))
        first = asyncio.ensure_future(client.call("normal"))
        await until(lambda: not (server.inflight < 2))
        second = asyncio.ensure_future(client.call("urgent"))
        await until(lambda: not (server.inflight < 3))
        gate.set()
        await asyncio.gather(holder, first, second)
    assert started == ["urgent", "normal"]
    await server.stop()


async def test_deadline_cancels_the_handler(manager: ucxrpc.Manager) -> None:
    server, hanging = hanging_server("slow")

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ucxrpc.DeadlineExceeded):
            await client.call("slow", timeout=0.2)
        assert loop.time() - t0 < 1.0
        await asyncio.wait_for(hanging.cancelled.wait(), 5)
        assert hanging.entered.is_set()
        assert manager.posted_receives == 0
    await server.stop()


async def test_server_side_timeout_cap(manager: ucxrpc.Manager) -> None:
    server = ucxrpc.Server()

    @server.rpc(timeout=0.1)
    async def capped() -> None:
        await asyncio.sleep(30)

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        with pytest.raises(ucxrpc.DeadlineExceeded, match="ran past its deadline"):
            await client.call("capped")
    await server.stop()


async def test_client_deadline_whatever_the_server_does(manager: ucxrpc.Manager) -> None:
    server = ucxrpc.Server()
    release = threading.Event()

    @server.rpc
    def stubborn() -> str:  # a thread cannot be cancelled: the server answers late
        release.wait(10)
        return "late"

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ucxrpc.DeadlineExceeded):
            await client.call("stubborn", timeout=0.2)
        assert 0.15 < loop.time() - t0 < 1.0
        assert manager.posted_receives == 0
        release.set()
        # The late reply is consumed and dropped; the connection keeps working.
        assert await client.call("stubborn") == "late"
    await server.stop()


async def test_timed_out_and_cancelled_calls_leave_no_posted_receive(served: Served) -> None:
    server, client = served
    manager = client._manager
    assert manager.posted_receives == 0
    calls = [asyncio.ensure_future(client.call("sleep", 5.0)) for _ in range(20)]
    timed = [client.call("sleep", 5.0, timeout=0.1) for _ in range(20)]
    # Replies are found by probe: a waiting call posts no receive at all.
    await until(lambda: server.inflight >= 20)
    assert manager.posted_receives == 0
    results = await asyncio.gather(*timed, return_exceptions=True)
    assert all(isinstance(r, ucxrpc.DeadlineExceeded) for r in results)
    assert client.pending == 20 and manager.posted_receives == 0
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    assert manager.posted_receives == 0
    assert client.pending == 0
    # The server dropped the cancelled handlers too.
    await until(lambda: not (server.inflight))
    assert await client.call("ping") == "PONG"


async def test_cancelling_the_caller_cancels_the_handler(manager: ucxrpc.Manager) -> None:
    server, hanging = hanging_server("wait_forever")

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        task = asyncio.ensure_future(client.call("wait_forever"))
        await asyncio.wait_for(hanging.entered.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(hanging.cancelled.wait(), 5)
        assert manager.posted_receives == 0
    await server.stop()


async def test_notify_runs_without_a_reply(manager: ucxrpc.Manager) -> None:
    server = ucxrpc.Server()
    got: asyncio.Queue[str] = asyncio.Queue()

    @server.rpc
    async def log(message: str) -> None:
        await got.put(message)

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        await client.notify("log", "fire and forget")
        assert await asyncio.wait_for(got.get(), 5) == "fire and forget"
        assert manager.posted_receives == 0
    await server.stop()


async def test_stop_drains_in_flight_calls(manager: ucxrpc.Manager) -> None:
    server = ucxrpc.Server()
    entered = asyncio.Event()

    @server.rpc
    async def work() -> str:
        entered.set()
        await asyncio.sleep(0.3)
        return "finished"

    await server.start(manager)
    client = await manager.connect("127.0.0.1", server.port)
    call = asyncio.ensure_future(client.call("work"))
    await asyncio.wait_for(entered.wait(), 5)
    await server.stop(grace=5.0)
    assert await call == "finished"
    with pytest.raises(ucxrpc.ConnectionLost):
        await client.call("work")
    await client.close()


async def test_stop_cancels_what_outlives_the_grace(manager: ucxrpc.Manager) -> None:
    server, hanging = hanging_server("forever")
    await server.start(manager)
    client = await manager.connect("127.0.0.1", server.port)
    call = asyncio.ensure_future(client.call("forever"))
    await asyncio.wait_for(hanging.entered.wait(), 5)
    await server.stop(grace=0.1)
    assert hanging.cancelled.is_set()
    with pytest.raises(ucxrpc.ConnectionLost):
        await call
    await client.close()


async def test_serve_forever_returns_after_stop(manager: ucxrpc.Manager) -> None:
    server = ucxrpc.Server()
    await server.start(manager)
    assert server.address == f"127.0.0.1:{server.port}" and server.port > 0
    serving = asyncio.ensure_future(server.serve_forever())
    await asyncio.sleep(0)
    assert not serving.done()
    await server.stop()
    await asyncio.wait_for(serving, 5)


async def test_server_max_inflight_refuses_the_excess() -> None:
    async with ucxrpc.Manager(max_inflight=4) as server_manager, ucxrpc.Manager() as client_manager:
        server = ucxrpc.Server()
        gate = asyncio.Event()

        @server.rpc
        async def hold() -> None:
            await gate.wait()

        await server.start(server_manager)
        async with await client_manager.connect("127.0.0.1", server.port) as client:
            calls = [asyncio.ensure_future(client.call("hold")) for _ in range(6)]
            await asyncio.wait(calls, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            gate.set()
            results = await asyncio.gather(*calls, return_exceptions=True)
        exhausted = [r for r in results if isinstance(r, ucxrpc.ResourceExhausted)]
        assert len(exhausted) == 2 and results.count(None) == 4
        await server.stop()


async def test_client_max_inflight_waits_in_priority_order() -> None:
    async with ucxrpc.Manager(max_inflight=1) as manager:
        server = ucxrpc.Server()
        gate = asyncio.Event()
        order: list[str] = []

        @server.rpc
        async def hold() -> None:
            await gate.wait()

        @server.rpc
        async def job(name: str) -> None:
            order.append(name)

        await server.start(manager)
        async with await manager.connect("127.0.0.1", server.port) as client:
            holder = asyncio.ensure_future(client.call("hold"))
            await until(lambda: not (server.inflight < 1))
            jobs = [
                asyncio.ensure_future(client.call("job", n, priority=p))
                for n, p in [("low", Priority.LOW), ("high", Priority.HIGH), ("norm", 1)]
            ]
            await until(lambda: not (client._gate.waiting < 3))
            gate.set()
            await asyncio.gather(holder, *jobs)
        assert order == ["high", "norm", "low"]
        await server.stop()


async def test_message_size_limit() -> None:
    async with ucxrpc.Manager(max_message_size=64 * 1024) as manager:
        server = ucxrpc.Server()

        @server.rpc
        async def blob(data: bytes) -> bytes:
            return data

        @server.rpc
        async def grow(n: int) -> bytes:
            return b"z" * n

        await server.start(manager)
        async with await manager.connect("127.0.0.1", server.port) as client:
            with pytest.raises(ucxrpc.ResourceExhausted, match="exceeds the limit"):
                await client.call("blob", b"x" * 100_000)
            with pytest.raises(ucxrpc.ResourceExhausted, match="exceeds the limit"):
                await client.call("grow", 100_000)
            assert await client.call("grow", 10) == b"z" * 10
        await server.stop()


async def test_two_managers_talk_to_each_other() -> None:
    async with ucxrpc.Manager() as a, ucxrpc.Manager() as b:
        server_a, server_b = ucxrpc.Server(), ucxrpc.Server()

        @server_a.rpc
        async def who() -> str:
            return "a"

        @server_b.rpc(name="who")
        async def who_b() -> str:
            return "b"

        await server_a.start(a)
        await server_b.start(b)
        to_b = await a.connect("127.0.0.1", server_b.port)
        to_a = await b.connect("127.0.0.1", server_a.port)
        async with to_a, to_b:
            assert await asyncio.gather(to_b.call("who"), to_a.call("who")) == ["b", "a"]


async def test_connect_errors(manager: ucxrpc.Manager) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ucxrpc.Unavailable, match="cannot connect"):
        await manager.connect("127.0.0.1", port)
    assert manager.connections == 0


async def test_auth_token() -> None:
    async with (
        ucxrpc.Manager(auth_token="s3cret") as good,
        ucxrpc.Manager(auth_token="wrong") as bad,
        ucxrpc.Manager() as none,
    ):
        server = ucxrpc.Server()

        @server.rpc
        async def ping() -> str:
            return "PONG"

        await server.start(good)
        async with await good.connect("127.0.0.1", server.port) as client:
            assert await client.call("ping") == "PONG"
        for other in (bad, none):
            with pytest.raises(ucxrpc.Unauthenticated):
                await other.connect("127.0.0.1", server.port)
        await server.stop()
