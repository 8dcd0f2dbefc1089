"""A test server in its own process: prints ``READY <port>`` and serves until killed."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import ucxrpc

server = ucxrpc.Server()


@server.rpc
async def ping() -> str:
    return "PONG"


@server.rpc
async def sleep(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "AWAKE"


@server.rpc
async def ticks(period: float) -> AsyncIterator[int]:
    n = 0
    while True:
        yield n
        n += 1
        await asyncio.sleep(period)


async def main() -> None:
    async with ucxrpc.Manager() as manager:
        port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
        await server.start(manager, "127.0.0.1", port)
        print(f"READY {server.port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    ucxrpc.run(main())
    sys.exit(0)
