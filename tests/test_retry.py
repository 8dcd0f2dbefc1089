"""Retries over real UCX: idempotent methods only, retryable statuses only, within the deadline."""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest

import ucxrpc
from ucxrpc.errors import StatusCode
from ucxrpc.retry import RETRY_ATTEMPT_KEY, Retry, RetryPolicy

FAST = RetryPolicy(attempts=5, backoff=0.001, jitter=0.0)


class Flaky:
    """Server methods that fail the first ``failures`` calls of each key, then succeed."""

    def __init__(
        self, failures: int, error: Callable[[str], ucxrpc.RpcError] = ucxrpc.Unavailable
    ) -> None:
        self.failures = failures
        self.error = error
        self.calls: Counter[str] = Counter()
        self.attempt_headers: list[str] = []

    async def __call__(self, key: str) -> str:
        call = ucxrpc.current_call()
        assert call is not None
        self.attempt_headers.append(str(call.metadata.get(RETRY_ATTEMPT_KEY, "-")))
        self.calls[key] += 1
        if self.calls[key] <= self.failures:
            raise self.error(f"{key} failure {self.calls[key]}")
        return f"{key} ok"


class KvApi(ucxrpc.Service, name="kv.v1"):
    @ucxrpc.rpc(idempotent=True)
    @abstractmethod
    async def get(self, key: str) -> str: ...

    @ucxrpc.rpc
    @abstractmethod
    async def put(self, key: str) -> str: ...


class KvImpl(KvApi):
    def __init__(self, flaky: Flaky) -> None:
        self.flaky = flaky

    async def get(self, key: str) -> str:
        return await self.flaky(key)

    async def put(self, key: str) -> str:
        return await self.flaky(key)


async def serve(manager: ucxrpc.Manager, flaky: Flaky) -> ucxrpc.Server:
    server = ucxrpc.Server()
    server.add_handler(flaky.__call__, name="flaky")
    server.add_service(KvImpl(flaky))
    await server.start(manager, "127.0.0.1", 0)
    return server


async def test_idempotent_calls_are_retried_until_they_succeed(manager: ucxrpc.Manager) -> None:
    flaky = Flaky(failures=3)
    server = await serve(manager, flaky)
    retry = Retry(FAST, methods=["flaky"])
    async with await manager.connect("127.0.0.1", server.port, interceptors=[retry]) as client:
        assert await client.call("flaky", "a") == "a ok"  # named in methods=
        assert flaky.calls["a"] == 4
        assert flaky.attempt_headers == ["-", "2", "3", "4"]
        assert (retry.attempts_made, retry.retries) == (4, 3)

        stub = client.stub(KvApi)
        assert await stub.get("b") == "b ok"  # declared idempotent
        assert flaky.calls["b"] == 4
    await server.stop()


async def test_calls_give_up_after_the_last_attempt(manager: ucxrpc.Manager) -> None:
    flaky = Flaky(failures=10)
    server = await serve(manager, flaky)
    retry = Retry(RetryPolicy(attempts=3, backoff=0.001, jitter=0.0), methods=["flaky"])
    async with await manager.connect("127.0.0.1", server.port, interceptors=[retry]) as client:
        with pytest.raises(ucxrpc.Unavailable, match="a failure 3") as info:
            await client.call("flaky", "a")
        assert flaky.calls["a"] == 3
        assert "ucxrpc: gave up after 3 attempts" in info.value.__notes__
    await server.stop()


async def test_calls_not_known_to_be_idempotent_are_not_retried(manager: ucxrpc.Manager) -> None:
    flaky = Flaky(failures=1)
    server = await serve(manager, flaky)
    retry = Retry(FAST)
    async with await manager.connect("127.0.0.1", server.port, interceptors=[retry]) as client:
        with pytest.raises(ucxrpc.Unavailable):
            await client.call("flaky", "a")  # by name, and not in methods=
        with pytest.raises(ucxrpc.Unavailable):
            await client.stub(KvApi).put("b")  # a stub method not declared idempotent
        assert flaky.calls == {"a": 1, "b": 1}
        assert retry.retries == 0
    await server.stop()


async def test_statuses_outside_retry_on_are_not_retried(manager: ucxrpc.Manager) -> None:
    flaky = Flaky(failures=1, error=ucxrpc.InvalidArgument)
    server = await serve(manager, flaky)
    retry = Retry(FAST, methods=["flaky"])
    async with await manager.connect("127.0.0.1", server.port, interceptors=[retry]) as client:
        with pytest.raises(ucxrpc.InvalidArgument, match="a failure 1") as info:
            await client.call("flaky", "a")
        assert flaky.calls["a"] == 1
        assert not getattr(info.value, "__notes__", [])

        # Opting in to another status works the same way.
        widened = Retry(
            RetryPolicy(backoff=0.001, retry_on=frozenset({StatusCode.INVALID_ARGUMENT})),
            methods=["flaky"],
        )
        client.add_interceptor(widened)
        assert await client.call("flaky", "b") == "b ok"
        assert flaky.calls["b"] == 2
    await server.stop()


async def test_retries_stop_before_the_deadline(manager: ucxrpc.Manager) -> None:
    flaky = Flaky(failures=100)
    server = await serve(manager, flaky)
    # Pauses of 0.2, 0.4, 0.6 s: the third would end after the 1 s deadline.
    policy = RetryPolicy(attempts=10, backoff=0.2, jitter=0.0)
    retry = Retry(policy, methods=["flaky"])
    loop = asyncio.get_running_loop()
    async with await manager.connect("127.0.0.1", server.port, interceptors=[retry]) as client:
        start = loop.time()
        with pytest.raises(ucxrpc.Unavailable) as info:  # the cause, not DeadlineExceeded
            await client.call("flaky", "a", timeout=1.0)
        elapsed = loop.time() - start
        assert flaky.calls["a"] == 3
        assert 0.55 <= elapsed < 1.0
        assert "ucxrpc: gave up after 3 attempts" in info.value.__notes__
    await server.stop()


async def test_streams_and_server_side_calls_pass_through(manager: ucxrpc.Manager) -> None:
    retry = Retry(FAST, methods=["flaky", "count"])
    flaky = Flaky(failures=1)
    server = ucxrpc.Server(interceptors=[retry])  # on a server it must do nothing
    server.add_handler(flaky.__call__, name="flaky")

    @server.rpc
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    await server.start(manager, "127.0.0.1", 0)
    async with await manager.connect("127.0.0.1", server.port, interceptors=[retry]) as client:
        assert [x async for x in client.stream("count", 3)] == [0, 1, 2]
        assert await client.call("flaky", "a") == "a ok"
    assert flaky.calls["a"] == 2  # retried once by the client, never by the server
    assert retry.retries == 1
    await server.stop()


def test_linear_delays() -> None:
    policy = RetryPolicy(backoff=0.1, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3)] == pytest.approx([0.1, 0.2, 0.3])
    capped = RetryPolicy(backoff=1.0, max_backoff=2.5, jitter=0.0)
    assert [capped.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 2.5, 2.5]


def test_exponential_delays() -> None:
    policy = RetryPolicy(backoff=0.1, backoff_kind="exponential", max_backoff=1.0, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])
    assert policy.delay(10_000) == 1.0  # no overflow for absurd attempt numbers


def test_jitter_stays_within_its_fraction() -> None:
    policy = RetryPolicy(backoff=1.0, jitter=0.1)
    delays = [policy.delay(2) for _ in range(1000)]
    assert all(1.8 <= d <= 2.2 for d in delays)
    assert len(set(delays)) > 100  # it does vary


def test_policy_validation() -> None:
    assert RetryPolicy().retry_on == frozenset({StatusCode.UNAVAILABLE})
    assert RetryPolicy(retry_on=frozenset({14, 4})).retry_on == {  # type: ignore[arg-type]
        StatusCode.UNAVAILABLE,
        StatusCode.DEADLINE_EXCEEDED,
    }
    for bad in (
        {"attempts": 0},
        {"backoff": -1.0},
        {"jitter": 1.5},
        {"backoff_kind": "cubic"},
        {"retry_on": frozenset({StatusCode.OK})},
    ):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
    with pytest.raises(ValueError):
        RetryPolicy().delay(0)
