"""The client pool over real UCX: bounded size, bounded FIFO waiting, broken connections."""

from __future__ import annotations

import asyncio

import pytest
from conftest import until

import ucxrpc
from ucxrpc.pool import ClientPool


def make_server() -> ucxrpc.Server:
    server = ucxrpc.Server()

    @server.rpc
    async def work(n: int) -> int:
        await asyncio.sleep(0.002)  # stands for real work, long enough to overlap callers
        return n * 2

    @server.rpc
    async def ping() -> str:
        return "PONG"

    return server


async def test_never_more_than_max_connections(manager: ucxrpc.Manager) -> None:
    server = make_server()
    await server.start(manager, "127.0.0.1", 0)
    pool = ClientPool(manager, "127.0.0.1", server.port, max_connections=4)
    assert pool.size == 0  # lazy: nothing is opened before the first use
    seen_sizes: list[int] = []
    seen_server: list[int] = []
    holders: set[int] = set()

    async def user(i: int) -> list[int]:
        out = []
        for j in range(5):
            async with pool.acquire() as client:
                # Exclusive: no other task holds this client right now.
                assert id(client) not in holders
                holders.add(id(client))
                seen_sizes.append(pool.size)
                seen_server.append(server.connections)
                out.append(await client.call("work", i * 100 + j))
                holders.discard(id(client))
        out.append(await pool.call("work", i, timeout=10.0))
        return out

    async with asyncio.timeout(30):
        results = await asyncio.gather(*(user(i) for i in range(50)))
    assert results == [[(i * 100 + j) * 2 for j in range(5)] + [i * 2] for i in range(50)]
    assert max(seen_sizes) == 4  # all four were used ...
    assert max(seen_server) <= 4  # ... and never more, as the server counts them
    assert pool.size == pool.idle == 4
    assert pool.in_use == 0 and pool.waiting == 0
    await pool.close()
    assert pool.size == 0 and pool.closed
    with pytest.raises(ucxrpc.Unavailable, match="closed"):
        await pool.call("ping")
    await until(lambda: server.connections == 0)
    await server.stop()


async def test_waiting_is_fifo(manager: ucxrpc.Manager) -> None:
    server = make_server()
    await server.start(manager, "127.0.0.1", 0)
    order: list[int] = []
    async with ClientPool(manager, "127.0.0.1", server.port, max_connections=1) as pool:

        async def waiter(i: int) -> None:
            async with pool.acquire() as client:
                order.append(i)
                await client.call("ping")

        async with pool.acquire() as held:
            tasks = []
            for i in range(6):
                tasks.append(asyncio.create_task(waiter(i)))
                await until(lambda: pool.waiting == len(tasks))
            # A waiter that gives up leaves the queue without disturbing the others.
            tasks[2].cancel()
            await until(lambda: pool.waiting == 5)
            assert await held.call("ping") == "PONG"
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks, return_exceptions=True)
        assert order == [0, 1, 3, 4, 5]
        assert tasks[2].cancelled()
        assert pool.size == 1 and pool.waiting == 0
    await server.stop()


async def test_waiting_is_bounded(manager: ucxrpc.Manager) -> None:
    server = make_server()
    await server.start(manager, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    pool = ClientPool(manager, "127.0.0.1", server.port, max_connections=2, acquire_timeout=0.1)
    async with pool.acquire(), pool.acquire():
        start = loop.time()
        with pytest.raises(ucxrpc.ResourceExhausted, match=r"within 0\.1s \(all 2 in use\)"):
            async with pool.acquire():
                pass
        assert 0.09 <= loop.time() - start < 5.0
        # The call's own deadline, when shorter, bounds the wait instead.
        with pytest.raises(ucxrpc.DeadlineExceeded, match="waited past the deadline"):
            await pool.call("ping", timeout=0.05)
        assert pool.waiting == 0 and pool.in_use == 2
    # The waiters that gave up took no connection with them.
    assert pool.idle == 2
    async with pool.acquire(timeout=0.0) as client:
        assert await client.call("ping") == "PONG"
    with pytest.raises(ValueError):
        ClientPool(manager, "127.0.0.1", server.port, max_connections=0)
    await pool.close()
    await server.stop()


async def test_a_connection_closed_in_use_is_replaced(manager: ucxrpc.Manager) -> None:
    server = make_server()
    await server.start(manager, "127.0.0.1", 0)
    async with ClientPool(manager, "127.0.0.1", server.port, max_connections=1) as pool:
        async with pool.acquire() as first:
            await first.close()  # as if it broke while this task held it
        assert pool.size == 0  # discarded on return
        async with pool.acquire() as second:
            assert second is not first and not second.closed
            assert await second.call("ping") == "PONG"
        assert pool.size == 1
    await server.stop()


async def test_connections_lost_while_idle_are_replaced(manager: ucxrpc.Manager) -> None:
    server = make_server()
    await server.start(manager, "127.0.0.1", 0)
    port = server.port
    async with ClientPool(manager, "127.0.0.1", port, max_connections=2) as pool:
        async with pool.acquire() as a, pool.acquire() as b:
            old = {a, b}
        assert pool.idle == 2
        await server.stop()  # the server goes away: both idle connections are lost
        await until(lambda: all(c.closed for c in old))
        with pytest.raises(ucxrpc.Unavailable):
            await pool.call("ping")  # nothing to reconnect to yet
        assert pool.size == 1  # the failed replacement gave its slot back

        server = make_server()
        await server.start(manager, "127.0.0.1", port)  # back, on the same port
        async with pool.acquire() as c, pool.acquire() as d:
            assert not {c, d} & old
            assert [await c.call("ping"), await d.call("ping")] == ["PONG", "PONG"]
            assert pool.size == 2 and server.connections == 2
    await server.stop()


async def test_closing_the_pool_fails_waiters_and_lent_connections(
    manager: ucxrpc.Manager,
) -> None:
    server = make_server()
    await server.start(manager, "127.0.0.1", 0)
    pool = ClientPool(manager, "127.0.0.1", server.port, max_connections=1)
    async with pool.acquire() as held:
        waiter = asyncio.create_task(pool.call("ping"))
        await until(lambda: pool.waiting == 1)
        await pool.close()
        with pytest.raises(ucxrpc.Unavailable, match="was closed"):
            async with asyncio.timeout(10):
                await waiter
        assert held.closed
        with pytest.raises(ucxrpc.Cancelled):
            await held.call("ping")
    assert pool.size == 0
    await until(lambda: server.connections == 0)
    await server.stop()
