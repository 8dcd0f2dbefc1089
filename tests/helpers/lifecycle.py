"""Start and shut down managers with traffic, then report what is left running."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import ucxrpc


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


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
