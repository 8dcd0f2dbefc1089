"""The server of the load, fairness and soak runs, in a process of its own.

Prints ``READY <port>`` and serves until killed (or until its parent is gone).

Usage::

    load_server.py [--concurrency N|none] [--port P]

Methods:

* ``echo(cid, seq, data)``: checks that ``data`` is the payload of call ``(cid, seq)``
  (see ``load_common.payload``), counts the call under its id and returns
  ``[cid, seq, data]``; ``tally(clients, calls)`` then says which ids were never seen,
  seen more than once, or carried the wrong bytes;
* ``ping()``, ``work(data)`` (returns ``data``): the fairness run's pings and flood;
* the soak's ``blob(data)`` (returns ``data``), ``nap(seconds)`` (sleeps),
  ``capped(seconds)`` (sleeps, with a 5 ms server-side timeout), ``sync_nap(seconds)``
  (a plain function: sleeps in the thread pool) and ``fail(message)`` (raises
  ``ValueError(message)``);
* ``stats()``: what the server holds (calls, tasks, posted receives, received frames
  and parts waiting, memory), for the soak's before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

from load_common import ID, orphan_guard, payload, rss_bytes, say

import ucxrpc

COUNTS: dict[int, bytearray] = {}  # cid -> number of calls seen per seq (capped at 255)
BAD: list[str] = []  # calls whose bytes were not their payload (first few)
EVENTS: Counter[str] = Counter()
CAP_SECONDS = 0.005  # capped()'s server-side timeout
STATE: dict[str, Any] = {}


def build(concurrency: int | None) -> ucxrpc.Server:
    """The server with every method of the three runs."""
    server = ucxrpc.Server(max_concurrency=concurrency)

    @server.rpc
    async def echo(cid: int, seq: int, data: bytes) -> list[Any]:
        counts = COUNTS.get(cid)
        if counts is None:
            counts = COUNTS[cid] = bytearray()
        if seq >= len(counts):
            counts.extend(bytes(seq + 1 - len(counts)))
        if counts[seq] < 255:
            counts[seq] += 1
        if len(data) < ID.size or data != payload(cid, seq, len(data)):
            EVENTS["bad"] += 1
            if len(BAD) < 10:
                BAD.append(f"({cid}, {seq}): {len(data)} bytes, starting {data[:8].hex()}")
        await asyncio.sleep(0)  # let other calls run: the concurrency limit then bites
        return [cid, seq, data]

    @server.rpc
    async def tally(clients: int, calls: int) -> dict[str, Any]:
        missing = duplicated = unexpected = 0
        examples: list[str] = []
        for cid, counts in COUNTS.items():
            if cid >= clients:
                unexpected += sum(1 for c in counts if c)
                continue
            for seq, c in enumerate(counts):
                if seq >= calls:
                    unexpected += c
                elif c > 1:
                    duplicated += c - 1
                    if len(examples) < 10:
                        examples.append(f"({cid}, {seq}) seen {c} times")
        for cid in range(clients):
            counts = COUNTS.get(cid, bytearray())
            gone = counts[:calls].count(0) + max(0, calls - len(counts))
            missing += gone
            if gone and len(examples) < 20:
                examples.append(f"client {cid}: {gone} of {calls} calls never arrived")
        seen = sum(sum(c) for c in COUNTS.values())
        return {
            "seen": seen,
            "missing": missing,
            "duplicated": duplicated,
            "unexpected": unexpected,
            "bad": EVENTS["bad"],
            "examples": examples + BAD,
        }

    @server.rpc
    async def ping() -> str:
        return "PONG"

    @server.rpc
    async def work(data: memoryview) -> memoryview:
        return data

    @server.rpc
    async def blob(data: memoryview) -> memoryview:
        return data

    async def sleeping(kind: str, seconds: float, tag: str = "") -> str:
        EVENTS[f"{kind}_started"] += 1
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            EVENTS[f"{kind}_cancelled"] += 1
            raise
        EVENTS[f"{kind}_finished"] += 1
        if tag:  # which kind of soak call let its handler run to the end
            EVENTS[f"{kind}_finished_{tag}"] += 1
        return "AWAKE"

    @server.rpc
    async def nap(seconds: float, tag: str = "") -> str:
        return await sleeping("nap", seconds, tag)

    @server.rpc(timeout=CAP_SECONDS)
    async def capped(seconds: float) -> str:
        return await sleeping("capped", seconds)

    @server.rpc
    def sync_nap(seconds: float) -> str:
        time.sleep(seconds)
        return "AWAKE"

    @server.rpc
    async def fail(message: str) -> None:
        EVENTS["fail"] += 1
        raise ValueError(message)

    @server.rpc
    async def stats(objects: bool = False) -> dict[str, Any]:
        return snapshot(server, objects)

    return server


def snapshot(server: ucxrpc.Server, objects: bool) -> dict[str, Any]:
    """What the server holds now. (The per-connection tables are read from the server's
    private connection set: no public API names them.)"""
    manager: ucxrpc.Manager = STATE["manager"]
    conns = list(server._conns)
    links = [c.link for c in conns if c.link is not None]
    sent, received, held = manager.shared_parts
    out: dict[str, Any] = {
        "rss": rss_bytes(),
        "tasks": len(asyncio.all_tasks()),
        "threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
        "connections": server.connections,
        "inflight": server.inflight,
        "streams_credit": sum(len(c.credits) for c in conns),
        "input_streams": sum(len(c.inputs) for c in conns),
        "notes": sum(len(c.notes) for c in conns),
        "posted_receives": manager.posted_receives,
        "ucx_requests": manager.engine.in_flight,
        "awaited_parts": manager.awaited_parts,
        "announced_bytes": manager.announced_bytes,
        "waiting_frames": sum(link.inbound.waiting_frames + link.inbound.pending for link in links),
        "pending_sends": sum(link.pending_sends for link in links),
        "shared_held": held,
        "shared_sent": sent,
        "shared_received": received,
        "dropped": manager.dropped,
        "events": dict(EVENTS),
    }
    if objects:
        gc.collect()
        out["gc_objects"] = len(gc.get_objects())
    return out


async def main(concurrency: int | None, port: int) -> None:
    guard = asyncio.get_running_loop().create_task(orphan_guard())
    server = build(concurrency)
    async with ucxrpc.Manager(connect_timeout=60.0) as manager:
        STATE["manager"] = manager
        await server.start(manager, "127.0.0.1", port)
        say("READY", server.port)
        await server.serve_forever()
    guard.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", default="1024")
    parser.add_argument("--port", type=int, default=0)
    ns = parser.parse_args()
    limit = None if ns.concurrency == "none" else int(ns.concurrency)
    ucxrpc.run(main(limit, ns.port))
    sys.exit(0)
