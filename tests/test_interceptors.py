"""Interceptors and metadata on both sides, over real UCX."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import until

import ucxrpc
from ucxrpc.context import CallContext
from ucxrpc.interceptors import MetricsInterceptor, Proceed


def recorder(name: str, log: list[str]) -> ucxrpc.Interceptor:
    async def intercept(ctx: CallContext, proceed: Proceed) -> Any:
        log.append(f"{name}>{ctx.side}:{ctx.method}")
        try:
            return await proceed()
        finally:
            log.append(f"{name}<")

    return intercept


def make_server(**kwargs: Any) -> ucxrpc.Server:
    server = ucxrpc.Server(**kwargs)

    @server.rpc
    async def echo(text: str) -> str:
        call = ucxrpc.current_call()
        assert call is not None
        call.response_metadata["echoed-by"] = "server"
        if "who" in call.metadata:
            call.response_metadata["who"] = call.metadata["who"]
        return text

    @server.rpc
    async def refuse() -> None:
        call = ucxrpc.current_call()
        assert call is not None
        call.response_metadata["reason"] = b"\x00binary"
        raise ucxrpc.RpcError(ucxrpc.StatusCode.PERMISSION_DENIED, "no")

    @server.rpc
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @server.rpc
    async def slow() -> None:
        await asyncio.sleep(5)

    return server


async def test_interceptors_run_outermost_first_on_both_sides(manager: ucxrpc.Manager) -> None:
    log: list[str] = []
    server = make_server(interceptors=[recorder("s1", log)])
    server.add_interceptor(recorder("s2", log))
    await server.start(manager)
    client = await manager.connect(
        "127.0.0.1", server.port, interceptors=[recorder("c1", log), recorder("c2", log)]
    )
    assert await client.call("echo", "x") == "x"
    assert log == [
        "c1>client:echo",
        "c2>client:echo",
        "s1>server:echo",
        "s2>server:echo",
        "s2<",
        "s1<",
        "c2<",
        "c1<",
    ]
    log.clear()
    assert [x async for x in client.stream("count", 3)] == [0, 1, 2]
    # The client side covers opening the stream; the server side covers all of it.
    assert log[:3] == ["c1>client:count", "c2>client:count", "c2<"]
    assert "s1>server:count" in log and log[-1] == "s1<"
    await client.close()
    await server.stop()


async def test_metadata_travels_both_ways(manager: ucxrpc.Manager) -> None:
    server = make_server()
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        value, metadata = await client.call_with_metadata("echo", "hi", metadata={"who": "alice"})
        assert value == "hi"
        assert metadata == {"echoed-by": "server", "who": "alice"}
        with pytest.raises(ucxrpc.RpcError) as info:
            await client.call("refuse", metadata={"who": b"bytes are fine"})
        assert info.value.code is ucxrpc.StatusCode.PERMISSION_DENIED
        assert info.value.metadata == {"reason": b"\x00binary"}
        with pytest.raises(ucxrpc.InvalidArgument, match="metadata must map str to str or bytes"):
            await client.call("echo", "x", metadata={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(ucxrpc.InvalidArgument, match="metadata must map"):
            client.stream("count", 1, metadata={1: "x"})  # type: ignore[dict-item]
    await server.stop()


async def test_a_server_interceptor_can_short_circuit(manager: ucxrpc.Manager) -> None:
    ran: list[str] = []

    async def only_echo(ctx: CallContext, proceed: Proceed) -> Any:
        if ctx.method != "echo":
            raise ucxrpc.RpcError(ucxrpc.StatusCode.PERMISSION_DENIED, f"{ctx.method} is off")
        ran.append(ctx.method)
        return await proceed()

    server = make_server(interceptors=[only_echo])
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        with pytest.raises(ucxrpc.RpcError, match="slow is off") as info:
            await client.call("slow")
        assert info.value.code is ucxrpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(ucxrpc.RpcError, match="count is off"):
            async for _ in client.stream("count", 2):
                pass
        assert await client.call("echo", "ok") == "ok"
    assert ran == ["echo"]
    assert server.inflight == 0
    await server.stop()


async def test_a_client_interceptor_can_answer_without_the_network(
    manager: ucxrpc.Manager,
) -> None:
    server = make_server()
    await server.start(manager)
    cache = {"echo": "cached"}

    async def cached(ctx: CallContext, proceed: Proceed) -> Any:
        if ctx.method in cache:
            return cache[ctx.method]
        return await proceed()

    async with await manager.connect("127.0.0.1", server.port, interceptors=[cached]) as client:
        assert await client.call("echo", "live") == "cached"
        with pytest.raises(ucxrpc.RpcError, match="no"):
            await client.call("refuse")
    await server.stop()


async def test_token_auth(manager: ucxrpc.Manager) -> None:
    server = make_server(interceptors=[ucxrpc.TokenAuth("s3cret", exempt=["ucxrpc.describe"])])
    notes: list[str] = []

    @server.rpc
    async def note(text: str) -> None:
        notes.append(text)

    await server.start(manager)
    good = await manager.connect(
        "127.0.0.1", server.port, interceptors=[ucxrpc.TokenAuth("s3cret")]
    )
    wrong = await manager.connect(
        "127.0.0.1", server.port, interceptors=[ucxrpc.TokenAuth("guess")]
    )
    none = await manager.connect("127.0.0.1", server.port)
    assert await good.call("echo", "in") == "in"
    assert [x async for x in good.stream("count", 2)] == [0, 1]
    await good.notify("note", "with the token")
    await none.notify("note", "without")
    await good.notify("note", "again")
    await until(lambda: len(notes) >= 2)
    assert notes == ["with the token", "again"]  # the one without a token was refused
    for client in (wrong, none):
        with pytest.raises(ucxrpc.Unauthenticated, match="'echo' needs a valid bearer token"):
            await client.call("echo", "in")
        with pytest.raises(ucxrpc.Unauthenticated):
            async for _ in client.stream("count", 2):
                pass
    with pytest.raises(ucxrpc.Unauthenticated):
        await none.call("echo", "in", metadata={"authorization": "Bearer s3cre"})
    assert await none.call("echo", "in", metadata={"authorization": "Bearer s3cret"}) == "in"
    assert "echo" in (await none.describe()).names  # exempt
    with pytest.raises(ValueError, match="must not be empty"):
        ucxrpc.TokenAuth("")
    for client in (good, wrong, none):
        await client.close()
    await server.stop()


async def test_metrics_count_calls_errors_and_latency(manager: ucxrpc.Manager) -> None:
    server_metrics = MetricsInterceptor()
    client_metrics = MetricsInterceptor()
    server = make_server(interceptors=[server_metrics])
    await server.start(manager)
    async with await manager.connect(
        "127.0.0.1", server.port, interceptors=[client_metrics]
    ) as client:
        for i in range(20):
            await client.call("echo", str(i))
        for _ in range(3):
            with pytest.raises(ucxrpc.RpcError):
                await client.call("refuse")
        with pytest.raises(ucxrpc.DeadlineExceeded):
            await client.call("slow", timeout=0.05)
        with pytest.raises(ucxrpc.InvalidArgument):
            await client.call("echo", 5)
    await server.stop()
    echo = server_metrics.get("echo")
    assert echo is not None
    assert echo.calls == 21 and echo.errors == {"INVALID_ARGUMENT": 1}
    assert sum(echo.counts) == 21
    assert 0 < echo.quantile(0.5) <= echo.quantile(0.99) < 1.0
    snapshot = server_metrics.snapshot()
    assert snapshot["refuse"]["errors"] == {"PERMISSION_DENIED": 3}
    assert snapshot["slow"]["errors"] == {"DEADLINE_EXCEEDED": 1}
    assert snapshot["slow"]["mean_seconds"] >= 0.04
    client_side = client_metrics.snapshot()
    assert client_side["echo"]["calls"] == 21 and client_side["slow"]["calls"] == 1
    assert client_side["slow"]["errors"] == {"DEADLINE_EXCEEDED": 1}
    server_metrics.reset()
    assert server_metrics.snapshot() == {}
    with pytest.raises(ValueError, match="increasing"):
        MetricsInterceptor(buckets=[1.0, 0.5])
    with pytest.raises(ValueError):
        echo.quantile(1.5)


async def test_logging_interceptor(
    manager: ucxrpc.Manager, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server(interceptors=[ucxrpc.LoggingInterceptor()])
    await server.start(manager)
    with caplog.at_level(logging.INFO, logger="ucxrpc.calls"):
        async with await manager.connect("127.0.0.1", server.port) as client:
            await client.call("echo", "x")
            with pytest.raises(ucxrpc.RpcError):
                await client.call("refuse")
    await server.stop()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "ucxrpc.calls"]
    assert lines[0][0] == logging.INFO
    assert lines[0][1].startswith("server unary echo peer=127.0.0.1:")
    assert " -> OK in " in lines[0][1]
    assert lines[1][0] == logging.WARNING and "refuse" in lines[1][1]
    assert "-> PERMISSION_DENIED" in lines[1][1]


async def test_only_the_deadline_becomes_deadline_exceeded_on_the_server(
    manager: ucxrpc.Manager,
) -> None:
    # A handler with a deadline of its own, cancelled by its caller or by the server's
    # stop, is cancelled, not past its deadline; one that swallows its deadline's
    # cancellation returns, and an enclosing scope sees no cancellation left over.
    outcomes: list[tuple[str, str, int]] = []

    async def seen(ctx: CallContext, proceed: Proceed) -> Any:
        task = asyncio.current_task()
        assert task is not None
        try:
            result = await proceed()
        except BaseException as exc:
            outcomes.append((ctx.method, type(exc).__name__, task.cancelling()))
            raise
        outcomes.append((ctx.method, "ok", task.cancelling()))
        return result

    server = ucxrpc.Server(interceptors=[seen])
    entered = asyncio.Event()

    @server.rpc(timeout=30)
    async def hang() -> None:
        entered.set()
        await asyncio.sleep(60)

    @server.rpc(timeout=0.02)
    async def swallow() -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            return "partial"
        return "never"

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        call = asyncio.ensure_future(client.call("hang"))
        await entered.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await until(lambda: len(outcomes) == 1)
        assert await client.call("swallow") == "partial"
        entered.clear()
        call = asyncio.ensure_future(client.call("hang"))
        await entered.wait()
        await server.stop(grace=0)
        with pytest.raises(ucxrpc.RpcError):
            await call
    assert outcomes == [
        ("hang", "CancelledError", 1),
        ("swallow", "ok", 0),
        ("hang", "CancelledError", 1),
    ]
