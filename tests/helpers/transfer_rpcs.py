"""The handlers the fault-test server and the kill-matrix server both serve: ``ping``,
and ``sink``, ``echo`` and ``big`` for large transfers.

Used by ``fault_server.py`` (tests/test_faults.py) and ``kill_peer.py serve``
(benchmarks/kill_matrix.py, tests/test_kill_matrix.py), each in a process of its own.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ucxrpc

__all__ = ["add_transfer_rpcs"]

#: ``big``'s replies, one per size (made once: the server's time goes to the transfer).
_PAYLOADS: dict[int, bytes] = {}


def add_transfer_rpcs(server: ucxrpc.Server, buffer: type[bytes] | type[memoryview]) -> None:
    """Register ``ping`` (``"PONG"``), ``sink(data)`` (its length), ``echo(data)`` (the
    same bytes back) and ``big(n)`` (``n`` random bytes, the same for every call with
    that ``n``) on ``server``.

    Args:
        server: The server.
        buffer: How ``data`` is declared, so what the handlers get and ``echo`` returns
            (types follow the declaration): ``bytes`` or ``memoryview``. The
            annotations name this local, which the library resolves in this function's
            scope.
    """

    @server.rpc
    async def ping() -> str:
        return "PONG"

    @server.rpc
    async def sink(data: buffer) -> int:  # type: ignore[valid-type]
        return len(data)

    @server.rpc
    async def echo(data: buffer) -> buffer:  # type: ignore[valid-type]
        return data

    @server.rpc
    async def big(n: int) -> bytes:
        payload = _PAYLOADS.get(n)
        if payload is None:
            payload = _PAYLOADS[n] = os.urandom(n)
        return payload
