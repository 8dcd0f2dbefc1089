"""The service ``ucxrpc serve tests.helpers.cli_app:server`` serves in the CLI tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import BaseModel

import ucxrpc

server = ucxrpc.Server()


class Point(BaseModel):
    x: int
    y: int = 0


@server.rpc
async def ping() -> str:
    """Answer PONG."""
    return "PONG"


@server.rpc(priority=ucxrpc.Priority.HIGH, timeout=5.0, idempotent=True)
async def echo(text: str) -> str:
    """REPLY:x for ECHO:x, RECEIVED:x for anything else."""
    if text.startswith("ECHO:"):
        return "REPLY:" + text.removeprefix("ECHO:")
    return "RECEIVED:" + text


@server.rpc
def add(a: int, b: int = 1) -> int:
    """Add two integers."""
    return a + b


@server.rpc
async def blob(data: bytes) -> bytes:
    """Return the bytes it was given."""
    return data


@server.rpc
async def norm(p: Point) -> dict[str, int]:
    """A model argument, a dict result."""
    return {"x": p.x, "y": p.y, "l1": abs(p.x) + abs(p.y)}


@server.rpc
async def count(n: int) -> AsyncIterator[int]:
    """Stream 0 .. n-1."""
    for i in range(n):
        yield i


@server.rpc
async def total(numbers: AsyncIterator[int]) -> int:
    """Sum a stream of integers (client streaming)."""
    return sum([n async for n in numbers])


@server.rpc
async def metadata_echo() -> dict[str, str]:
    """The request metadata the handler saw."""
    ctx = ucxrpc.current_call()
    assert ctx is not None
    return {k: str(v) for k, v in ctx.metadata.items()}


@server.rpc
async def fail(message: str) -> None:
    """Raise ValueError(message)."""
    raise ValueError(message)


@server.rpc
async def sleep(seconds: float) -> str:
    """Wait, then answer AWAKE."""
    await asyncio.sleep(seconds)
    return "AWAKE"


@server.rpc
async def hold(marker: str, seconds: float) -> str:
    """Create the file ``marker``, then wait ``seconds`` and answer DONE."""
    await asyncio.to_thread(Path(marker).touch)
    await asyncio.sleep(seconds)
    return "DONE"


@server.rpc
async def no_result() -> None:
    """Return nothing."""
