"""A test server in its own process: prints ``READY <port>`` and serves until killed."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import numpy as np

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


@server.rpc
async def echo_view(data: memoryview) -> memoryview:
    return data


@server.rpc
async def held(data: memoryview, seconds: float) -> int:
    """The length of ``data``, ``seconds`` after it arrived."""
    await asyncio.sleep(seconds)
    return data.nbytes


@server.rpc
async def reverse(data: bytes) -> bytes:
    return data[::-1]


@server.rpc
async def doubled(values: np.ndarray) -> np.ndarray:
    values *= 2  # a received array is writable
    return values


@server.rpc
async def blobs(sizes: list[int]) -> AsyncIterator[bytes]:
    for i, size in enumerate(sizes):
        yield bytes([i % 251]) * size


@server.rpc
async def stats() -> dict[str, int]:
    sent, received, held = MANAGER[0].shared_parts
    fds = len(os.listdir("/proc/self/fd"))
    read = MANAGER[0].shared_reads
    return {"sent": sent, "received": received, "held": held, "fds": fds, "read": read}


MANAGER: list[ucxrpc.Manager] = []


async def main() -> None:
    async with ucxrpc.Manager() as manager:
        MANAGER.append(manager)
        port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
        await server.start(manager, "127.0.0.1", port)
        print(f"READY {server.port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    ucxrpc.run(main())
    sys.exit(0)
