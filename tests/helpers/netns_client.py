"""A client for the two-host tests (tests/test_two_hosts.py), run inside a network namespace.

It talks to ``netns_server.py`` in another namespace and prints one JSON object per line
(an event for the test to assert on). Times are ``time.monotonic()``, one clock for every
process on the machine whatever its network namespace, so the test can subtract the moment
it took the link down. UCX settings come from ``UCXRPC_UCX_OPTIONS``.

Modes::

    netns_client.py mix HOST PORT --calls N [--seed S] [--concurrency C]
        N calls of deposit (not idempotent), echo (idempotent) and burst (a server
        stream), sizes from 0 B to 1 MiB, C at a time; one {"ev": "call"} line per call
        (its reply checked byte for byte), then {"ev": "done"} with the server's counts.

    netns_client.py linkdown HOST PORT --interval I --timeout T [--holds K]
        connects with KeepAlive(I, T) (none with --no-keepalive) and Reconnect; leaves
        K hold calls and a stream pending, prints {"ev": "pending"}, then one
        {"ev": "failed"} per pending call as it fails, and {"ev": "during"} for a call
        made while disconnected. An idempotent lookup, pending too, is retried by a
        Retry interceptor. Once it was refused a few times ({"ev": "down_done"}) it reads
        ``up`` on stdin, waits for the reconnection ({"ev": "reconnected"}) and the
        retried lookup ({"ev": "retried"}), checks calls on it and on a fresh connection
        ({"ev": "after"}), waits until the server holds two connections and prints its
        counts ({"ev": "tally"}).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import zlib
from typing import Any

import ucxrpc

SIZES = [0, 1, 100, 4096, 16 * 1024, 64 * 1024, 256 * 1024, 1 << 20]
WEIGHTS = [2, 3, 4, 4, 3, 3, 2, 1]
CALL_TIMEOUT = 30.0


def say(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def payload(call_id: int, size: int) -> bytes:
    return random.Random(call_id).randbytes(size)


async def one_call(client: ucxrpc.Client, kind: str, call_id: int, size: int) -> dict[str, Any]:
    """Make one call and check its reply; never raises."""
    out: dict[str, Any] = {"ev": "call", "kind": kind, "id": call_id, "size": size}
    t0 = time.monotonic()
    try:
        if kind == "deposit":
            data = payload(call_id, size)
            reply = await client.call("deposit", call_id, data, timeout=CALL_TIMEOUT)
            out["n"] = reply["n"]
            out["check"] = reply == {
                "id": call_id,
                "n": 1,
                "size": size,
                "crc": zlib.crc32(data),
            }
        elif kind == "echo":
            data = payload(call_id, size)
            reply = await client.call("echo", call_id, data, timeout=CALL_TIMEOUT)
            out["check"] = reply == data
        else:
            sizes = [size, size // 2, 1, 0]
            items = [
                bytes(item)
                async for item in client.stream("burst", call_id, sizes, timeout=CALL_TIMEOUT)
            ]
            out["check"] = items == [bytes([(call_id + i) % 251]) * s for i, s in enumerate(sizes)]
        out["ok"] = True
    except ucxrpc.RpcError as exc:
        out.update(ok=False, check=False, err=type(exc).__name__, msg=str(exc))
    out["s"] = round(time.monotonic() - t0, 4)
    return out


async def mix(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    plan = [
        (
            rng.choices(["deposit", "echo", "burst"], [9, 9, 2])[0],
            i + 1,
            rng.choices(SIZES, WEIGHTS)[0],
        )
        for i in range(args.calls)
    ]
    async with ucxrpc.Manager() as manager:
        t0 = time.monotonic()
        client = await manager.connect(args.host, args.port)
        say(ev="connected", s=round(time.monotonic() - t0, 4))
        gate = asyncio.Semaphore(args.concurrency)

        async def run(kind: str, call_id: int, size: int) -> None:
            async with gate:
                say(**await one_call(client, kind, call_id, size))

        t1 = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            for kind, call_id, size in plan:
                tg.create_task(run(kind, call_id, size))
        seconds = time.monotonic() - t1
        tally = await client.call("tally", timeout=CALL_TIMEOUT)
        say(
            ev="done",
            seconds=round(seconds, 3),
            counts=tally["counts"],
            sent=client.bytes_sent,
            received=client.bytes_received,
            shared=list(manager.shared_parts),
        )
        await client.close()


async def linkdown(args: argparse.Namespace) -> None:
    keepalive = (
        None
        if args.no_keepalive
        else ucxrpc.KeepAlive(interval=args.interval, timeout=args.timeout)
    )
    reconnect = ucxrpc.Reconnect(initial=0.05, maximum=0.5, multiplier=2.0, jitter=0.1)
    loop = asyncio.get_running_loop()
    async with ucxrpc.Manager() as manager:
        # lookup is idempotent: Retry sends it again once the connection is back.
        retry = ucxrpc.Retry(
            ucxrpc.RetryPolicy(attempts=100, backoff=0.1, max_backoff=0.2), methods=["lookup"]
        )
        client = await manager.connect(
            args.host, args.port, keepalive=keepalive, reconnect=reconnect, interceptors=[retry]
        )
        warm = await one_call(client, "deposit", 1, 1024)
        assert warm["ok"] and warm["check"], warm
        holds = [100 + k for k in range(args.holds)]
        pending: dict[int, asyncio.Task[Any]] = {
            i: asyncio.create_task(client.call("hold", i, 60.0)) for i in holds
        }
        stream = client.stream("trickle", 200)
        first = await anext(stream)
        assert first == 200, first
        pending[200] = asyncio.create_task(anext(stream))
        lookup = asyncio.create_task(client.call("lookup", 250, 60.0))
        # Every call must be running on the server before the link goes down.
        async with asyncio.timeout(10):
            while True:
                counts = (await client.call("tally"))["counts"]
                if all(counts.get(f"hold:{i}") == 1 for i in holds) and counts.get("lookup:250"):
                    break
                await asyncio.sleep(0.01)
        say(ev="pending", t=time.monotonic(), ids=sorted(pending))

        done_at: dict[asyncio.Task[Any], float] = {}
        for task in pending.values():
            task.add_done_callback(lambda t: done_at.setdefault(t, time.monotonic()))
        await asyncio.wait(pending.values(), timeout=30)
        for call_id, task in pending.items():
            if not task.done():
                say(ev="failed", id=call_id, err="still pending", msg="", t=None)
                task.cancel()
                continue
            exc = task.exception()
            say(
                ev="failed",
                id=call_id,
                err=None if exc is None else type(exc).__name__,
                msg=str(exc),
                t=done_at[task],
            )
        await stream.aclose()

        # A call made while the connection is down fails at once; it is never sent.
        t0 = time.monotonic()
        try:
            await client.call("deposit", 300, b"x", timeout=CALL_TIMEOUT)
            say(ev="during", err=None, s=round(time.monotonic() - t0, 4))
        except ucxrpc.RpcError as exc:
            say(
                ev="during", err=type(exc).__name__, msg=str(exc), s=round(time.monotonic() - t0, 4)
            )

        # Stay down until the lookup's retries have been refused a few times: the outage
        # outlasts the detection, and reconnection attempts fail meanwhile.
        async with asyncio.timeout(10):
            while retry.retries < 3:  # noqa: ASYNC110 - a counter the interceptor keeps
                await asyncio.sleep(0.01)
        say(ev="down_done", retries=retry.retries, t=time.monotonic())
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "up":
            return
        t_up = time.monotonic()
        try:
            await client.wait_connected(timeout=args.reconnect_within)
            say(
                ev="reconnected",
                t=time.monotonic(),
                s=round(time.monotonic() - t_up, 4),
                reconnects=client.reconnects,
            )
        except ucxrpc.Unavailable as exc:
            say(ev="reconnected", t=None, err=str(exc), reconnects=client.reconnects)
            return
        try:
            value = await asyncio.wait_for(lookup, CALL_TIMEOUT)
            say(ev="retried", value=value, retries=retry.retries, t=time.monotonic())
        except ucxrpc.RpcError as exc:
            say(ev="retried", value=None, err=type(exc).__name__, msg=str(exc))
        results = [
            await one_call(client, "deposit", 400, 1 << 20),
            await one_call(client, "echo", 401, 64 * 1024),
            await one_call(client, "burst", 402, 1 << 20),
        ]
        t0 = time.monotonic()
        fresh = await manager.connect(args.host, args.port)
        fresh_s = time.monotonic() - t0
        results.append(await one_call(fresh, "deposit", 500, 256 * 1024))
        say(ev="after", results=results, fresh_connect_s=round(fresh_s, 4))
        # The server frees the connection that was lost once it learns of it (the old
        # control connection's close reaches it when the link is back): two are left.
        t0 = time.monotonic()
        while True:
            tally = await fresh.call("tally", timeout=CALL_TIMEOUT)
            if tally["connections"] <= 2 or time.monotonic() - t0 > args.reconnect_within:
                break
            await asyncio.sleep(0.05)
        say(
            ev="tally",
            counts=tally["counts"],
            connections=tally["connections"],
            freed_s=round(time.monotonic() - t_up, 3),
        )
        await fresh.close()
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["mix", "linkdown"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--holds", type=int, default=4)
    parser.add_argument("--no-keepalive", action="store_true", help="no heartbeats")
    parser.add_argument("--reconnect-within", type=float, default=20.0)
    args = parser.parse_args()
    ucxrpc.run(mix(args) if args.mode == "mix" else linkdown(args))


if __name__ == "__main__":
    main()
