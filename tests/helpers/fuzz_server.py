"""A server under attack, in its own process: prints ``READY <port>`` and serves until
killed.

Its configuration comes from the environment (``UCXRPC_*``, e.g. ``UCXRPC_AUTH_TOKEN``,
``UCXRPC_CONNECT_TIMEOUT``). Besides ``ping`` and ``echo`` it has ``stats``: what the
server and its engine hold (posted receives, call tables, connections, requests in
flight, drive counters), its resident memory and its open descriptors, so a test can
compare them before and after an attack.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import ucxrpc

server = ucxrpc.Server()
MANAGER: list[ucxrpc.Manager] = []
_PAGE = os.sysconf("SC_PAGE_SIZE")


@server.rpc
async def ping() -> str:
    return "PONG"


@server.rpc
async def echo(data: bytes) -> bytes:
    return data


def rss() -> int:
    """Resident memory of this process in bytes (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


@server.rpc
async def stats() -> dict[str, Any]:
    manager = MANAGER[0]
    engine = manager.engine
    return {
        "rss": rss(),
        "fds": len(os.listdir("/proc/self/fd")),
        "posted_receives": manager.posted_receives,
        "awaited_parts": manager.awaited_parts,
        "announced_bytes": manager.announced_bytes,
        "dropped": manager.dropped,
        "worker_connections": manager.connections,
        "server_connections": server.connections,
        "inflight": server.inflight,
        "engine_in_flight": engine.in_flight,
        "drives": engine.drives,
        "checked": engine.checked,
        "discarded": engine.discarded,
        "sleeps": engine.sleeps,
    }


def raise_nofile(want: int = 8192) -> None:
    """Allow ``want`` descriptors (a thousand held control connections need them)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def main() -> None:
    raise_nofile()
    async with ucxrpc.Manager() as manager:
        MANAGER.append(manager)
        await server.start(manager, "127.0.0.1", 0)
        print(f"READY {server.port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    ucxrpc.run(main())
    sys.exit(0)
