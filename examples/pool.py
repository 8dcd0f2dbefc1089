"""A pool of connections shared by many tasks.

Run it (server and clients in one process)::

    python examples/pool.py

Twenty tasks share three connections: each borrows one for a call and gives it back.
A task that finds all three taken waits its turn, for at most ``acquire_timeout``
seconds; a connection that broke while borrowed is replaced by a new one.
"""

from __future__ import annotations

import asyncio

import ucxrpc
from ucxrpc.pool import ClientPool

server = ucxrpc.Server()


@server.rpc
async def work(n: int) -> int:
    await asyncio.sleep(0.005)  # long enough for the tasks to compete for connections
    return n * n


async def main() -> None:
    async with ucxrpc.Manager() as manager:
        await server.start(manager, "127.0.0.1", 0)
        pool = ClientPool(manager, "127.0.0.1", server.port, max_connections=3, acquire_timeout=0.2)
        async with pool:
            peak = 0

            async def user(n: int) -> int:
                nonlocal peak
                async with pool.acquire() as client:
                    peak = max(peak, pool.in_use, server.connections)
                    result: int = await client.call("work", n)
                    return result

            results = await asyncio.gather(*(user(n) for n in range(20)))
            print(f"20 tasks: sum of squares {sum(results)}, at most {peak} connections at once")
            print(f"pool: size={pool.size} idle={pool.idle} in_use={pool.in_use}")

            async with pool.acquire(), pool.acquire(), pool.acquire():
                try:
                    await pool.call("work", 1)
                except ucxrpc.ResourceExhausted as exc:
                    print(f"all three taken: ResourceExhausted: {exc.message}")

            async with pool.acquire() as client:
                await client.close()  # as if the connection broke while borrowed
            print(f"a connection broke while borrowed: discarded, size={pool.size}")
            await asyncio.gather(*(user(n) for n in range(20)))
            print(f"the next rush opened a new one: size={pool.size}")
        await server.stop(grace=1.0)


if __name__ == "__main__":
    ucxrpc.run(main())
