"""Start and shut down managers with traffic, then report what is left running."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import ucxrpc


def os_threads() -> int:
    """OS threads of this process, once the count has settled.

    ``Thread.join()`` (the handler pool's shutdown joins its threads) returns when the
    thread has released its Python state, a moment before the kernel task is gone; so
    read until the count has been steady for 50 ms (at most 2 s).
    """
    deadline = time.monotonic() + 2.0
    count, since = len(os.listdir("/proc/self/task")), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < 0.05:
        now = len(os.listdir("/proc/self/task"))
        if now != count:
            count, since = now, time.monotonic()
        time.sleep(0.005)
    return count


async def one_round() -> None:
    server = ucxrpc.Server()

    @server.rpc
    async def echo(text: str) -> str:
        return text

    @server.rpc
    def plain(x: int) -> int:
        return x * 2

    @server.rpc
    async def hang() -> None:
        await asyncio.sleep(60)

    async with ucxrpc.Manager() as manager:
        await server.start(manager, "127.0.0.1", 0)
        client = await manager.connect("127.0.0.1", server.port)
        assert await client.call("echo", "x" * 100_000) == "x" * 100_000
        assert await client.call("plain", 21) == 42
        pending = asyncio.ensure_future(client.call("hang"))
        await asyncio.sleep(0)
        # Shutdown with a call in flight and the client left open on purpose.
    try:
        await pending
    except ucxrpc.RpcError as exc:
        print(f"pending call ended with {type(exc).__name__}")


async def main() -> None:
    await one_round()
    after_first = os_threads()
    for _ in range(3):
        await one_round()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    print(f"tasks {len(others)}")
    print(f"threads {threading.active_count()}")
    print(f"os_threads_growth {os_threads() - after_first}")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "uvloop"
    if mode == "uvloop":
        ucxrpc.run(main())
    else:  # the default asyncio loop
        asyncio.run(main())
