"""A server for the two-host tests (tests/test_two_hosts.py), run inside a network namespace.

``netns_server.py HOST`` binds to ``HOST`` (the address of its end of a veth pair), port 0,
prints ``READY <port>`` and serves until killed. UCX settings come from
``UCXRPC_UCX_OPTIONS`` (the tests pass ``TLS=tcp`` and ``NET_DEVICES=<veth>``).

Every method takes a call id and counts the requests it received under that id, so the
client can check that each call ran exactly once:

* ``deposit(call_id, data)``: not idempotent; returns the count so far for the id, the
  size and the CRC-32 of what arrived;
* ``echo(call_id, data)``: idempotent; returns the data;
* ``burst(call_id, sizes)``: a server stream of one item per size, item ``i`` filled with
  ``(call_id + i) % 251``;
* ``hold(call_id, seconds)``: sleeps, then returns the id (calls left pending);
* ``lookup(call_id, seconds)``: idempotent; sleeps the first time an id is asked for;
* ``trickle(call_id)``: a stream that yields one item, then waits for a long time;
* ``tally()``: the counts, keyed ``"<method>:<id>"``, and the live connections.
"""

from __future__ import annotations

import asyncio
import sys
import zlib
from collections import Counter
from collections.abc import AsyncIterator

import ucxrpc

server = ucxrpc.Server()
seen: Counter[str] = Counter()
MANAGER: list[ucxrpc.Manager] = []


def count(method: str, call_id: int) -> int:
    key = f"{method}:{call_id}"
    seen[key] += 1
    return seen[key]


@server.rpc
async def deposit(call_id: int, data: bytes) -> dict[str, int]:
    n = count("deposit", call_id)
    return {"id": call_id, "n": n, "size": len(data), "crc": zlib.crc32(data)}


@server.rpc(idempotent=True)
async def echo(call_id: int, data: bytes) -> bytes:
    count("echo", call_id)
    return data


@server.rpc
async def burst(call_id: int, sizes: list[int]) -> AsyncIterator[bytes]:
    count("burst", call_id)
    for i, size in enumerate(sizes):
        yield bytes([(call_id + i) % 251]) * size


@server.rpc
async def hold(call_id: int, seconds: float) -> int:
    count("hold", call_id)
    await asyncio.sleep(seconds)
    return call_id


@server.rpc(idempotent=True)
async def lookup(call_id: int, seconds: float) -> int:
    if count("lookup", call_id) == 1:
        await asyncio.sleep(seconds)  # slow the first time only, as a cache being filled
    return call_id


@server.rpc
async def trickle(call_id: int) -> AsyncIterator[int]:
    count("trickle", call_id)
    yield call_id
    await asyncio.sleep(120)
    yield call_id


@server.rpc(idempotent=True)
async def tally() -> dict[str, object]:
    return {"counts": dict(seen), "connections": MANAGER[0].connections}


async def main() -> None:
    async with ucxrpc.Manager() as manager:
        MANAGER.append(manager)
        await server.start(manager, sys.argv[1], 0)
        print(f"READY {server.port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    ucxrpc.run(main())
