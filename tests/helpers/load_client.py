"""The clients of the load, fairness and soak runs, one role per process.

Every role connects to ``load_server.py`` on 127.0.0.1:PORT, prints ``READY`` and then
follows the driver (``benchmarks/load.py``, ``fairness.py``, ``soak.py``). Times are
``time.monotonic()``, one clock for every process on the machine. A role ends itself
when its parent is gone.

Roles::

    load PORT CID CALLS INFLIGHT SEED OUT   on GO: CALLS echo calls, INFLIGHT at a time,
                                            sizes and priorities from load_common.plan;
                                            every reply checked; results to OUT (JSON),
                                            then DONE
    tally PORT CLIENTS CALLS                TALLY <json>: the server's count of calls
    ping PORT                               commands: "run LABEL N PRIORITY GAP_MS"
                                            -> RESULT <json> (latency of N pings, one
                                            at a time, GAP_MS apart); "quit"
    flood PORT BURST                        "go": bursts of BURST concurrent calls until
                                            "stop" (FLOODING once the first burst is
                                            done; STOPPED <json> at the end)
    soak PORT CALLS CONCURRENCY SEED SEGMENTS OUT
                                            the soak (see benchmarks/soak.py); results
                                            to OUT, then DONE
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from load_common import (
    MIB,
    SIZES,
    WEIGHTS,
    orphan_guard,
    payload,
    plan,
    rss_bytes,
    say,
    stdin_reader,
)

import ucxrpc

CALL_TIMEOUT = 60.0  # no call may take longer: a hang shows as DeadlineExceeded


def _write(out: str, result: dict[str, Any]) -> None:
    """Write the results, once, after the run (blocking the loop is fine then)."""
    Path(out).write_text(json.dumps(result))


async def connect(manager: ucxrpc.Manager, port: int) -> ucxrpc.Client:
    return await manager.connect("127.0.0.1", port, timeout=60.0)


async def load(port: int, cid: int, calls: int, inflight: int, seed: int, out: str) -> None:
    steps = plan(cid, calls, seed)
    reader = await stdin_reader()
    lat: dict[int, list[float]] = {2: [], 1: [], 0: []}
    by_size: dict[int, list[float]] = {s: [] for s in SIZES}
    errors: Counter[str] = Counter()
    examples: list[str] = []
    wrong = 0
    async with ucxrpc.Manager(connect_timeout=60.0) as manager:
        client = await connect(manager, port)
        say("READY")
        if (await reader.readline()).strip() != b"GO":
            return
        seqs = iter(range(calls))
        perf = time.perf_counter

        async def worker() -> None:
            nonlocal wrong
            for seq in seqs:
                size, prio = steps[seq]
                data = payload(cid, seq, size)
                t = perf()
                try:
                    reply = await client.call(
                        "echo", cid, seq, data, priority=prio, timeout=CALL_TIMEOUT
                    )
                except Exception as exc:  # every failure is counted and reported
                    errors[type(exc).__name__] += 1
                    if len(examples) < 5:
                        examples.append(f"seq {seq} ({size} B): {type(exc).__name__}: {exc}")
                    continue
                us = (perf() - t) * 1e6
                lat[prio].append(us)
                by_size[size].append(us)
                if reply != [cid, seq, data]:
                    wrong += 1
                    if len(examples) < 5:
                        got = reply[:2] if isinstance(reply, list) else type(reply).__name__
                        examples.append(f"seq {seq} ({size} B): wrong reply {got}")

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        end = time.monotonic()
        await client.close()
    result = {
        "cid": cid,
        "start": start,
        "end": end,
        "ok": sum(len(v) for v in lat.values()),
        "wrong": wrong,
        "errors": dict(errors),
        "examples": examples,
        "lat_us": {str(p): [round(x, 1) for x in v] for p, v in lat.items()},
        "lat_by_size_us": {str(s): [round(x, 1) for x in v] for s, v in by_size.items()},
    }
    _write(out, result)
    say("DONE")


async def tally(port: int, clients: int, calls: int) -> None:
    async with ucxrpc.Manager(connect_timeout=60.0) as manager:
        client = await connect(manager, port)
        counted = await client.call("tally", clients, calls, timeout=60.0)
        # The other clients have closed: wait (bounded) until the server has seen it.
        end = time.monotonic() + 10.0
        while (stats := await client.call("stats", timeout=60.0))["connections"] > 1:
            if time.monotonic() > end:
                break
            await asyncio.sleep(0.01)
        await client.close()
    say("TALLY", json.dumps({"tally": counted, "stats": stats}))


async def ping(port: int) -> None:
    reader = await stdin_reader()
    async with ucxrpc.Manager() as manager:
        client = await connect(manager, port)
        for _ in range(200):  # warm-up: connection, rings, caches
            await client.call("ping", timeout=CALL_TIMEOUT)
        say("READY")
        while words := (await reader.readline()).decode().split():
            if words[0] == "quit":
                break
            label, n, prio, gap = words[1], int(words[2]), int(words[3]), float(words[4]) / 1e3
            lat: list[float] = []
            errors: Counter[str] = Counter()
            start = time.monotonic()
            for _ in range(n):
                t = time.perf_counter()
                try:
                    assert await client.call("ping", priority=prio, timeout=CALL_TIMEOUT) == "PONG"
                except Exception as exc:  # counted and reported
                    errors[type(exc).__name__] += 1
                    continue
                lat.append((time.perf_counter() - t) * 1e6)
                if gap:
                    await asyncio.sleep(gap)
            say(
                "RESULT",
                json.dumps(
                    {
                        "label": label,
                        "priority": prio,
                        "gap_ms": gap * 1e3,
                        "start": start,
                        "end": time.monotonic(),
                        "lat_us": [round(x, 1) for x in lat],
                        "errors": dict(errors),
                    }
                ),
            )
        await client.close()


async def flood(port: int, burst: int) -> None:
    reader = await stdin_reader()
    data = b"f" * 64
    done = 0
    errors: Counter[str] = Counter()
    started = asyncio.Event()
    stopping = False
    async with ucxrpc.Manager() as manager:
        client = await connect(manager, port)
        say("READY")

        async def one() -> None:
            nonlocal done
            try:
                await client.call("work", data, timeout=CALL_TIMEOUT)
                done += 1
            except Exception as exc:  # counted and reported
                errors[type(exc).__name__] += 1

        async def bursts() -> None:
            while not stopping:
                await asyncio.gather(*(one() for _ in range(burst)))
                if not started.is_set():
                    started.set()
                    say("FLOODING")

        task: asyncio.Task[None] | None = None
        t0 = time.monotonic()
        while words := (await reader.readline()).decode().split():
            if words[0] == "go":
                t0 = time.monotonic()
                task = asyncio.get_running_loop().create_task(bursts())
            elif words[0] == "stop":
                stopping = True
                if task is not None:
                    await task
                secs = time.monotonic() - t0
                say(
                    "STOPPED",
                    json.dumps(
                        {"calls": done, "seconds": secs, "rate": done / secs, "errors": errors}
                    ),
                )
            elif words[0] == "quit":
                break
        await client.close()


# -- the soak ----------------------------------------------------------------------------

#: What one soak call does, and how many of every 1,000 do it.
SOAK_MIX = {
    "blob": 935,  # an echo of a size drawn from SIZES; the reply must be the same bytes
    "deadline": 15,  # nap(0.02) with a 3 ms timeout: DeadlineExceeded
    "capped": 15,  # capped(0.05), no timeout of its own: the server's 5 ms -> DeadlineExceeded
    "sync_deadline": 2,  # sync_nap(0.01) in the thread pool, 2 ms timeout: DeadlineExceeded
    "cancel": 15,  # nap(0.5), the task cancelled 0-3 ms in: CancelledError
    "cancel_big": 3,  # a 1 MiB echo cancelled as soon as it is sent
    "fail": 15,  # fail(message): RemoteError(ValueError, message)
}
#: The outcome each kind of call must have (an exception class name, or "ok").
EXPECTED = {
    "blob": "ok",
    "deadline": "DeadlineExceeded",
    "capped": "DeadlineExceeded",
    "sync_deadline": "DeadlineExceeded",
    "cancel": "CancelledError",
    "cancel_big": "CancelledError|ok",
    "fail": "RemoteError",
}


def _outcome(exc: BaseException | None) -> str:
    return "ok" if exc is None else type(exc).__name__


async def _soak_call(
    client: ucxrpc.Client, kind: str, n: int, rng: random.Random, wrong: list[str]
) -> str:
    """Make one call of ``kind``; returns its outcome (the exception's class name)."""
    try:
        if kind == "blob":
            data = payload(0, n % 1_000_000, rng.choices(SIZES, WEIGHTS)[0])
            reply = await client.call("blob", data, timeout=CALL_TIMEOUT)
            if reply != data:
                wrong.append(f"call {n}: blob of {len(data)} B came back different")
                return "wrong"
        elif kind == "deadline":
            await client.call("nap", 0.02, "deadline", timeout=0.003)
        elif kind == "capped":
            await client.call("capped", 0.05)
        elif kind == "sync_deadline":
            await client.call("sync_nap", 0.01, timeout=0.002)
        elif kind == "fail":
            await client.call("fail", f"boom {n}", timeout=CALL_TIMEOUT)
        elif kind in ("cancel", "cancel_big"):
            # Long enough that a handler running to the end means its CANCEL was lost.
            args = (0.5, "cancel") if kind == "cancel" else (payload(0, 1, MIB),)
            method = "nap" if kind == "cancel" else "blob"
            task = asyncio.get_running_loop().create_task(
                client.call(method, *args, timeout=CALL_TIMEOUT)
            )
            await asyncio.sleep(rng.uniform(0, 0.003) if kind == "cancel" else 0)
            task.cancel()
            await asyncio.wait([task])
            if task.cancelled():
                return "CancelledError"
            exc = task.exception()
            if exc is None and kind == "cancel_big" and task.result() != args[0]:
                wrong.append(f"call {n}: a 1 MiB echo came back different")
                return "wrong"
            return _outcome(exc)
    except ucxrpc.RemoteError as exc:
        if kind == "fail" and (exc.remote_type != "ValueError" or f"boom {n}" not in str(exc)):
            wrong.append(f"call {n}: RemoteError {exc.remote_type}: {exc}")
            return "wrong"
        if kind != "fail":
            wrong.append(f"call {n} ({kind}): RemoteError {exc.remote_type}: {exc}")
        return "RemoteError"
    except ucxrpc.RpcError as exc:
        if EXPECTED[kind] != type(exc).__name__ and len(wrong) < 20:
            wrong.append(f"call {n} ({kind}): {type(exc).__name__}: {exc}")
        return type(exc).__name__
    except Exception as exc:  # anything else is wrong: counted and reported
        if len(wrong) < 20:
            wrong.append(f"call {n} ({kind}): {type(exc).__name__}: {exc}")
        return type(exc).__name__
    return "ok"


def _client_state(manager: ucxrpc.Manager, client: ucxrpc.Client) -> dict[str, Any]:
    return {
        "rss": rss_bytes(),
        "tasks": len(asyncio.all_tasks()),
        "pending": client.pending,
        "posted_receives": manager.posted_receives,
        "ucx_requests": manager.engine.in_flight,
        "awaited_parts": manager.awaited_parts,
        "dropped": manager.dropped,
    }


async def soak(port: int, calls: int, concurrency: int, seed: int, segments: int, out: str) -> None:
    kinds = list(SOAK_MIX)
    weights = list(SOAK_MIX.values())
    outcomes: dict[str, Counter[str]] = {k: Counter() for k in kinds}
    wrong: list[str] = []
    snaps: list[dict[str, Any]] = []
    async with ucxrpc.Manager() as manager:
        client = await connect(manager, port)
        say("READY")

        async def quiet_snapshot(done: int, elapsed: float) -> None:
            # Calls abandoned by a deadline or a cancel may still be ending on the
            # server: wait (bounded) until it holds none, then record its state.
            end = time.monotonic() + 10.0
            while True:
                server = await client.call("stats", True, timeout=CALL_TIMEOUT)
                if server["inflight"] <= 1 or time.monotonic() > end:  # 1: this stats call
                    break
                await asyncio.sleep(0.01)
            snaps.append(
                {
                    "calls": done,
                    "seconds": round(elapsed, 2),
                    "server": server,
                    "client": _client_state(manager, client),
                }
            )
            say("SNAPSHOT", done, round(elapsed, 1), server["rss"] >> 20)

        await quiet_snapshot(0, 0.0)
        per = -(-calls // segments)
        done = 0
        work = 0.0
        for segment in range(segments):
            todo = iter(range(done, min(calls, done + per)))

            async def worker(rng: random.Random, todo: Iterator[int]) -> None:
                for n in todo:
                    kind = rng.choices(kinds, weights)[0]
                    outcomes[kind][await _soak_call(client, kind, n, rng, wrong)] += 1

            t0 = time.monotonic()
            await asyncio.gather(
                *(
                    worker(random.Random(seed * 7_919 + segment * 1_000 + w), todo)
                    for w in range(concurrency)
                )
            )
            work += time.monotonic() - t0
            done = min(calls, done + per)
            await quiet_snapshot(done, work)
        await client.close()
    result = {
        "calls": calls,
        "concurrency": concurrency,
        "seconds": work,
        "outcomes": {k: dict(v) for k, v in outcomes.items()},
        "expected": EXPECTED,
        "wrong": wrong[:50],
        "wrong_count": len(wrong),
        "snapshots": snaps,
    }
    _write(out, result)
    say("DONE")


async def main(argv: list[str]) -> None:
    guard = asyncio.get_running_loop().create_task(orphan_guard())
    role, args = argv[0], argv[1:]
    try:
        if role == "load":
            port, cid, calls, inflight, seed = map(int, args[:5])
            await load(port, cid, calls, inflight, seed, args[5])
        elif role == "tally":
            await tally(*map(int, args[:3]))
        elif role == "ping":
            await ping(int(args[0]))
        elif role == "flood":
            await flood(int(args[0]), int(args[1]))
        elif role == "soak":
            port, calls, conc, seed, segments = map(int, args[:5])
            await soak(port, calls, conc, seed, segments, args[5])
        else:
            say("ERROR unknown role", role)
    except Exception as exc:
        say("ERROR", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500])
        raise
    finally:
        guard.cancel()


if __name__ == "__main__":
    ucxrpc.run(main(sys.argv[1:]))
    sys.exit(0)
