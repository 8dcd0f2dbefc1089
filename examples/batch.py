"""Many calls at once: results in order, one error per failing item, bounded concurrency.

Run it (server and client in one process)::

    python examples/batch.py

A hundred calls go out with at most eight in flight. Every tenth number is refused by
the server; those slots hold the error, and the other ninety results are unaffected.
"""

from __future__ import annotations

import asyncio

import ucxrpc
from ucxrpc.batch import BatchCall, call_many, split_results

CONCURRENCY = 8
server = ucxrpc.Server()
running = 0
peak = 0


@server.rpc
async def square(n: int) -> int:
    global running, peak
    running += 1
    peak = max(peak, running)
    try:
        await asyncio.sleep(0.001)  # some work, so that calls overlap
        if n % 10 == 7:
            raise ucxrpc.InvalidArgument(f"{n} ends in 7")
        return n * n
    finally:
        running -= 1


async def main() -> None:
    async with ucxrpc.Manager() as manager:
        await server.start(manager, "127.0.0.1", 0)
        async with await manager.connect("127.0.0.1", server.port) as client:
            calls: list[BatchCall | tuple[str, int]] = [("square", n) for n in range(99)]
            calls.append(BatchCall("square", (), {"n": 99}))  # the long form, with kwargs
            results = await call_many(client, calls, concurrency=CONCURRENCY, timeout=10.0)
        await server.stop(grace=1.0)

    ok, failed = split_results(results)
    print(f"{len(results)} calls: {len(ok)} ok, {len(failed)} failed")
    print(f"results[:7] = {results[:7]}")
    first = min(failed)
    print(f"results[{first}] = {type(failed[first]).__name__}: {failed[first].message}")
    print(f"failed at: {sorted(failed)}")
    print(f"the server ran at most {peak} calls at once (concurrency={CONCURRENCY})")


if __name__ == "__main__":
    ucxrpc.run(main())
