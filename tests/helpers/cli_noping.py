"""A server without ``ping``, whose first method fails: what ``ucxrpc bench`` must not pick."""

from __future__ import annotations

import ucxrpc

server = ucxrpc.Server()


@server.rpc
async def boom() -> None:
    """Raise RuntimeError."""
    raise RuntimeError("boom")


@server.rpc
def add(a: int, b: int = 1) -> int:
    """Add two integers."""
    return a + b
