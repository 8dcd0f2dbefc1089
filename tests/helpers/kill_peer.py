"""Peers for the kill matrix (benchmarks/kill_matrix.py, tests/test_kill_matrix.py).

Each role runs in its own process, started with subprocess (fork+exec: nothing of UCX is
inherited) and reads its UCX settings from ``UCXRPC_UCX_OPTIONS``. Every line a role
prints is one event for the parent; times are ``time.monotonic()``, which is one clock
for every process on the machine, so the parent can subtract its own kill time.

Roles::

    kill_peer.py serve [PORT]       READY <port>; serves sink, echo, big, ping, stats
    kill_peer.py flood PORT SIZE    connects, does one warm-up call, prints
                                    GO <seconds per call>, then calls sink and echo with
                                    SIZE bytes back to back until it is killed
    kill_peer.py caller             a long-lived client driven by commands on stdin:
        probe PORT          a fresh connection must answer ping within 2 s, then stats:
                            PROBE ok <seconds> <stats json> | PROBE fail <seconds> <error>
        victim PORT SIZE    connect, one warm-up call, GO <seconds per call>, then echo
                            and big(SIZE) back to back until a call fails, then
                            LOST <json>: error type, monotonic time of the failure, the
                            engine's leftover requests and CPU share afterwards;
                            a call that neither finishes nor fails within --hang
                            seconds gives HANG <json>
        bench PORT          BENCH <json>: p50/p99 of a 64 B echo, 16 MiB echo MiB/s
        state               STATE <json>: the engine's pending UCX requests
        cancel              CANCELLED <json>: diagnostics, cancel every request in
                            flight on the worker, report which complete
        quit
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import resource
import signal
import sys
import time
from typing import Any

from transfer_rpcs import add_transfer_rpcs

import ucxrpc

HANG_SECONDS = float(os.environ.get("KILL_PEER_HANG", "10"))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(*words: object) -> None:
    print(*words, flush=True)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20), 1)


def _nbytes(buf: Any) -> int:
    try:
        return len(memoryview(buf).cast("B"))
    except TypeError:
        return 0


def engine_state(manager: ucxrpc.Manager) -> dict[str, Any]:
    """What the engine still tracks: UCX requests that never completed.

    Reads the engine's private request list (diagnostics only; every field is looked
    up defensively, so a reworked engine gives ``None`` rather than an error).
    """
    engine = getattr(manager, "_engine", None)
    raw = getattr(engine, "_ops", None)
    ops = [] if raw is None else [op for op in raw if getattr(op, "req", None) is not None]
    kinds = [getattr(op, "is_recv", None) for op in ops]
    return {
        "ops": None if raw is None else len(ops),
        "ops_recv": None if None in kinds else sum(1 for k in kinds if k),
        "ops_send": None if None in kinds else sum(1 for k in kinds if not k),
        "ops_mib": round(sum(_nbytes(getattr(op, "buf", None)) for op in ops) / (1 << 20), 1),
        "posted_receives": getattr(manager, "posted_receives", None),
        "connections": getattr(manager, "connections", None),
        "rss_mib": rss_mib(),
    }


# -- serve ------------------------------------------------------------------------------------


def make_server(manager_box: list[ucxrpc.Manager]) -> ucxrpc.Server:
    server = ucxrpc.Server()
    add_transfer_rpcs(server, bytes)  # ping, sink, echo, big

    @server.rpc
    async def stats() -> dict[str, Any]:
        out = engine_state(manager_box[0])
        out["pid"] = os.getpid()
        return out

    return server


async def serve(port: int) -> None:
    async with ucxrpc.Manager() as manager:
        server = make_server([manager])
        await server.start(manager, "127.0.0.1", port)
        say("READY", server.port)
        await server.serve_forever()


# -- flood (the client that gets killed) ------------------------------------------------------


async def flood(port: int, size: int) -> None:
    data = os.urandom(size)
    async with ucxrpc.Manager() as manager:
        client = await manager.connect("127.0.0.1", port)
        t0 = time.perf_counter()
        await client.call("echo", data)
        say("GO", round(time.perf_counter() - t0, 6))
        while True:
            await client.call("sink", data)
            await client.call("echo", data)


# -- caller (the client that must survive) ----------------------------------------------------


async def probe(manager: ucxrpc.Manager, port: int) -> str:
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(2.0):
            client = await manager.connect("127.0.0.1", port, timeout=2.0)
            try:
                assert await client.call("ping", timeout=2.0) == "PONG"
                stats = await client.call("stats", timeout=2.0)
            finally:
                await client.close()
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            raise
        return f"PROBE fail {time.monotonic() - t0:.4f} {type(exc).__name__}: {exc}"
    return f"PROBE ok {time.monotonic() - t0:.4f} {json.dumps(stats)}"


async def victim(manager: ucxrpc.Manager, port: int, size: int) -> str:
    data = os.urandom(size)
    client = await manager.connect("127.0.0.1", port, timeout=5.0)
    t0 = time.perf_counter()
    await asyncio.wait_for(client.call("big", size), 30)
    say("GO", round(time.perf_counter() - t0, 6))
    n = 0
    loop = asyncio.get_running_loop()
    while True:
        n += 1
        coro = client.call("echo", data) if n % 2 else client.call("big", size)
        call = loop.create_task(coro)
        done, _ = await asyncio.wait({call}, timeout=HANG_SECONDS)
        if not done:
            call.cancel()
            hang = {"when": time.monotonic(), "calls": n, **engine_state(manager)}
            await asyncio.wait({call}, timeout=2.0)
            return "HANG " + json.dumps(hang)
        exc = call.exception()
        if exc is None:
            continue
        when = time.monotonic()
        report: dict[str, Any] = {
            "error": type(exc).__name__,
            "message": str(exc)[:200],
            "when": when,
            "calls": n,
            "at_failure": engine_state(manager),
        }
        # Does anything still spin or stay posted once the call has failed?
        c0, w0 = cpu_seconds(), time.monotonic()
        await asyncio.sleep(0.5)
        report["cpu_pct_after"] = round(100 * (cpu_seconds() - c0) / (time.monotonic() - w0))
        c0 = time.monotonic()
        try:
            await asyncio.wait_for(client.close(), 5.0)
            report["close_s"] = round(time.monotonic() - c0, 4)
        except TimeoutError:
            report["close_s"] = None  # close() hung
        report["after_close"] = engine_state(manager)
        return "LOST " + json.dumps(report)


async def bench(manager: ucxrpc.Manager, port: int) -> str:
    client = await manager.connect("127.0.0.1", port, timeout=5.0)
    try:
        small = os.urandom(64)
        for _ in range(200):
            await client.call("echo", small)
        ns = []
        pc = time.perf_counter_ns
        for _ in range(3000):
            t = pc()
            await client.call("echo", small)
            ns.append(pc() - t)
        ns.sort()
        big = os.urandom(16 << 20)
        for _ in range(3):
            await client.call("echo", big)
        iters = 30
        t0 = time.perf_counter()
        for _ in range(iters):
            out = await client.call("echo", big)
        elapsed = time.perf_counter() - t0
        assert bytes(out) == big
    finally:
        await client.close()
    return "BENCH " + json.dumps(
        {
            "p50_us": round(ns[len(ns) // 2] / 1000, 1),
            "p99_us": round(ns[int(len(ns) * 0.99)] / 1000, 1),
            "mib_per_s": round(iters * 16 / elapsed),
        }
    )


async def cancel_all(manager: ucxrpc.Manager) -> dict[str, Any]:
    """Diagnostics: ask ucxx to cancel every request in flight on the worker (what
    ``ucp_request_cancel`` can do: receives not yet matched) and see which complete."""
    engine: Any = manager._engine
    before = [op for op in engine._ops if op.req is not None]
    n = manager._worker.cancel_inflight_requests(0, 1)
    for _ in range(100):
        manager._worker.progress()
        await asyncio.sleep(0.005)
    done = [op for op in before if op.req is not None and op.req.completed]
    errors = []
    for op in done:
        try:
            op.req.check_error()
            errors.append("ok")
        except Exception as exc:
            errors.append(type(exc).__name__)
    return {
        "before": len(before),
        "cancel_inflight_requests": n,
        "completed": len(done),
        "statuses": errors,
        "still_pending": sum(1 for op in before if op not in done),
    }


async def caller() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with ucxrpc.Manager() as manager:
        await manager.start()
        say("READY", os.getpid())
        while line := (await reader.readline()).decode().split():
            cmd, args = line[0], line[1:]
            try:
                if cmd == "probe":
                    say(await probe(manager, int(args[0])))
                elif cmd == "victim":
                    say(await victim(manager, int(args[0]), int(args[1])))
                elif cmd == "bench":
                    say(await bench(manager, int(args[0])))
                elif cmd == "state":
                    say("STATE", json.dumps(engine_state(manager)))
                elif cmd == "cancel":
                    say("CANCELLED", json.dumps(await cancel_all(manager)))
                elif cmd == "quit":
                    break
                else:
                    say("ERROR unknown command", cmd)
            except Exception as exc:
                say("ERROR", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300])


def main() -> None:
    role = sys.argv[1]
    faulthandler.enable()  # a crash of the survivor shows where it was
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID`: Python stacks to stderr
    # A survivor must not be saved by a generous core limit; keep dumps out of the way.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if role == "serve":
        ucxrpc.run(serve(int(sys.argv[2]) if len(sys.argv) > 2 else 0))
    elif role == "flood":
        ucxrpc.run(flood(int(sys.argv[2]), int(sys.argv[3])))
    elif role == "caller":
        ucxrpc.run(caller())
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
