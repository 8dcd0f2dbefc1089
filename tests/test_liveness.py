"""Heartbeats and reconnection against real server processes over UCX."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any

import pytest
from conftest import until

import ucxrpc
from ucxrpc.liveness import KeepAlive, Reconnect


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_silent_server_is_noticed_by_the_heartbeat(spawn: Any) -> None:
    proc = spawn("serve.py")
    (port,) = proc.read_ready()
    async with ucxrpc.Manager() as manager:
        client = await manager.connect(
            "127.0.0.1", int(port), keepalive=KeepAlive(interval=0.1, timeout=0.3)
        )
        assert await client.call("ping") == "PONG"
        pending = asyncio.ensure_future(client.call("sleep", 30.0))
        os.kill(proc.pid, signal.SIGSTOP)  # alive, sockets open, but silent
        t0 = time.perf_counter()
        with pytest.raises(ucxrpc.ConnectionLost, match="did not answer a heartbeat"):
            await pending
        assert time.perf_counter() - t0 < 2.0
        assert client.closed
        with pytest.raises(ucxrpc.Unavailable):
            await client.call("ping")
        await client.close()
    os.kill(proc.pid, signal.SIGCONT)


async def test_heartbeats_keep_a_healthy_connection(served: Any) -> None:
    server, _ = served
    async with ucxrpc.Manager() as manager:
        client = await manager.connect(
            "127.0.0.1", server.port, keepalive=KeepAlive(interval=0.02, timeout=1.0)
        )
        for _ in range(10):  # spans about ten heartbeats
            assert await client.call("sleep", 0.02) == "AWAKE"
        assert not client.closed
        await client.close()


async def test_reconnects_with_backoff_after_the_server_restarts(spawn: Any) -> None:
    port = free_port()
    first = spawn("serve.py", str(port))
    first.read_ready()
    async with ucxrpc.Manager() as manager:
        client = await manager.connect(
            "127.0.0.1", port, reconnect=Reconnect(initial=0.05, maximum=0.2)
        )
        assert await client.call("ping") == "PONG"
        pending = asyncio.ensure_future(client.call("sleep", 30.0))
        first.kill()
        with pytest.raises(ucxrpc.ConnectionLost):
            await pending
        with pytest.raises(ucxrpc.Unavailable):  # fails fast while reconnecting
            await client.call("ping")
        second = spawn("serve.py", str(port))
        second.read_ready()
        await client.wait_connected(timeout=10)
        assert await client.call("ping") == "PONG"
        assert client.reconnects == 1
        assert manager.connections == 1  # the old connection's state is gone
        await client.close()


async def test_reconnection_gives_up_after_its_attempts(spawn: Any) -> None:
    proc = spawn("serve.py")
    (port,) = proc.read_ready()
    async with ucxrpc.Manager() as manager:
        client = await manager.connect(
            "127.0.0.1", int(port), reconnect=Reconnect(initial=0.01, maximum=0.02, attempts=2)
        )
        proc.kill()
        await until(lambda: client.closed)  # the loss has been noticed
        with pytest.raises(ucxrpc.Unavailable, match="not connected"):
            await client.wait_connected(timeout=1.0)
        await until_no_tasks(client)
        assert client.reconnects == 0
        await client.close()
        with pytest.raises(ucxrpc.Unavailable, match="closed"):
            await client.wait_connected(timeout=1.0)


async def until_no_tasks(client: ucxrpc.Client) -> None:
    async with asyncio.timeout(5):
        while client._tasks:
            await asyncio.wait(list(client._tasks))


def test_policies_validate_and_compute_delays() -> None:
    policy = Reconnect(initial=0.1, maximum=1.0, multiplier=2.0, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    jittery = Reconnect(initial=1.0, maximum=1.0, jitter=0.5)
    assert all(0.5 <= jittery.delay(1) <= 1.5 for _ in range(100))
    with pytest.raises(ValueError):
        Reconnect(initial=2.0, maximum=1.0)
    with pytest.raises(ValueError):
        Reconnect(attempts=0)
    with pytest.raises(ValueError):
        KeepAlive(interval=0)


async def test_each_failed_call_gets_its_own_error(spawn: Any) -> None:
    proc = spawn("serve.py")
    (port,) = proc.read_ready()
    async with ucxrpc.Manager() as manager:
        client = await manager.connect("127.0.0.1", int(port))
        proc.kill()
        await until(lambda: client.closed)
        errors = []
        for _ in range(3):
            with pytest.raises(ucxrpc.ConnectionLost) as info:
                await client.call("ping")
            errors.append(info.value)
        # Fresh instances: a shared one would pile every traceback onto itself.
        assert len({id(e) for e in errors}) == 3
        assert all(len(list(_frames(e))) < 10 for e in errors)
        await client.close()


def _frames(exc: BaseException) -> Any:
    tb = exc.__traceback__
    while tb is not None:
        yield tb
        tb = tb.tb_next
