"""Unary echo between two processes: ucxrpc (each progress mode) against raw ucxx.

Every configuration runs as a server process and a client process on 127.0.0.1, both
started here with ``subprocess`` (never fork after UCX is up) and stopped by pid. Phases:

* latency: 64 B echo, warm-up then N sequential calls, p50/p99 of the round trip;
* throughput: 64 callers in one client process for a fixed time (64 in flight);
* bandwidth: 16 MiB echo round trips (MiB/s counted one way, as the peer harness does),
  once with no copy forced by the types (raw ucxx receives into numpy arrays, ucxrpc
  echoes a ``memoryview``) and, for ucxrpc, once as ``bytes`` (a copy on each side);
* idle CPU: user+sys CPU of the server and client over 1 s with the connection open.

The raw ucxx baseline uses ucxx's asyncio API in blocking (busy-polling) mode on uvloop,
over endpoints made from exchanged worker addresses (the transport ucxrpc uses), once
with buffers of known size and once receiving through ``tag_probe`` (sizes unknown).

Usage::

    python benchmarks/echo.py [--quick] [--modes blocking,polling,efficient]
                              [--tls tcp] [--out bench-results/echo.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
SMALL = 64
BIG = 16 * 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(sorted_ns: list[int], q: float) -> float:
    k = max(0, min(len(sorted_ns) - 1, round(q / 100 * len(sorted_ns) + 0.5) - 1))
    return sorted_ns[k] / 1000


class Meter:
    def __init__(self, server_pid: int) -> None:
        self.pids = {"client": os.getpid(), "server": server_pid}

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.c0 = {k: cpu_seconds(p) for k, p in self.pids.items()}

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        return {
            f"{k}_cpu_pct": round(100 * (cpu_seconds(p) - self.c0[k]) / wall, 1)
            for k, p in self.pids.items()
        }


async def run_phases(
    one_call: Any,
    many: Any,
    big_call: Any,
    args: argparse.Namespace,
    server_pid: int,
    big_bytes_call: Any = None,
    big_typed_call: Any = None,
) -> dict[str, Any]:
    """Drive the phases with callables that hide the implementation.

    ``big_call`` echoes 16 MiB without a copy forced by the types (raw ucxx buffers,
    ucxrpc ``memoryview``); ``big_bytes_call``, if given, echoes it as ``bytes``.
    """
    res: dict[str, Any] = {}
    meter = Meter(server_pid)
    small = os.urandom(SMALL)
    for _ in range(args.warmup):
        await one_call(small)
    ns = [0] * args.iters
    pc = time.perf_counter_ns
    meter.start()
    for i in range(args.iters):
        t = pc()
        reply = await one_call(small)
        ns[i] = pc() - t
    res["latency_cpu"] = meter.stop()
    assert bytes(reply) == small, "echo mismatch"
    ns.sort()
    res["p50_us"] = round(percentile(ns, 50), 2)
    res["p99_us"] = round(percentile(ns, 99), 2)

    # Throughput: 64 callers for thr_seconds.
    meter.start()
    count = await many(small, 64, args.thr_seconds)
    res["calls_per_s"] = round(count / (time.perf_counter() - meter.t0))
    res["throughput_cpu"] = meter.stop()

    big = os.urandom(BIG)
    calls = {"mib_per_s": big_call}
    if big_bytes_call is not None:
        calls["mib_per_s_bytes"] = big_bytes_call
    if big_typed_call is not None:
        calls["mib_per_s_typed"] = big_typed_call
    for key, call in calls.items():
        for _ in range(2):
            await call(big)
        t0 = time.perf_counter()
        for _ in range(args.bw_iters):
            out = await call(big)
        elapsed = time.perf_counter() - t0
        assert bytes(out) == big, "big echo mismatch"
        res[key] = round(args.bw_iters * BIG / (1 << 20) / elapsed)

    meter.start()
    await asyncio.sleep(1.0)
    idle = meter.stop()
    res["idle_cpu_client_pct"] = idle["client_cpu_pct"]
    res["idle_cpu_server_pct"] = idle["server_cpu_pct"]
    return res


# -- ucxrpc ---------------------------------------------------------------------------------


def _view_api(ucxrpc: Any) -> Any:
    """A service echoing a ``memoryview`` declared on both sides (a typed stub's
    reply is what the interface says: no copy into ``bytes`` on arrival)."""

    class ViewApi(ucxrpc.Service, name="bench"):  # type: ignore[misc,name-defined]
        @ucxrpc.rpc
        async def view(self, data: memoryview) -> memoryview:
            return data

    return ViewApi


def ucxrpc_server(args: argparse.Namespace) -> None:
    import ucxrpc

    server = ucxrpc.Server()
    try:
        server.add_service(_view_api(ucxrpc)())
    except Exception as exc:  # a release without services: no typed column
        print(f"no typed service: {exc}", file=sys.stderr)

    @server.rpc
    async def echo(data: bytes) -> bytes:
        return data

    @server.rpc
    async def echo_view(data: memoryview) -> memoryview:
        return data

    @server.rpc
    async def stop() -> None:
        asyncio.get_running_loop().call_soon(stopping.set)

    stopping = asyncio.Event()

    async def main() -> None:
        async with ucxrpc.Manager(progress_mode=args.mode) as manager:
            await server.start(manager, HOST, 0)
            print(f"READY {server.port}", flush=True)
            await stopping.wait()
            await server.stop(1.0)

    ucxrpc.run(main())


def ucxrpc_client(args: argparse.Namespace) -> dict[str, Any]:
    import ucxrpc

    async def main() -> dict[str, Any]:
        async with ucxrpc.Manager(progress_mode=args.mode) as manager:
            client = await manager.connect(HOST, args.port)

            async def one(data: bytes) -> Any:
                return await client.call("echo", data)

            async def many(data: bytes, width: int, seconds: float) -> int:
                end = time.perf_counter() + seconds
                done = 0

                async def worker() -> None:
                    nonlocal done
                    while time.perf_counter() < end:
                        await client.call("echo", data)
                        done += 1

                await asyncio.gather(*(worker() for _ in range(width)))
                return done

            async def view(data: bytes) -> Any:
                return await client.call("echo_view", memoryview(data))

            typed: Any = None
            try:
                stub = client.stub(_view_api(ucxrpc))

                async def typed(data: bytes) -> Any:
                    return await stub.view(memoryview(data))

                await typed(b"x")
            except Exception:  # a release without typed stubs
                typed = None

            res = await run_phases(one, many, view, args, args.server_pid, one, typed)
            res["engine_drives"] = manager.engine.drives
            await client.call("stop")
            await client.close()
            return res

    return ucxrpc.run(main())


# -- raw ucxx (worker-address endpoints, like ucxrpc's data path) ------------------------------

BOOT = 0xB0075EED00000000


def _ucxx() -> Any:
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    import ucxx

    ucxx.init(progress_mode="blocking")
    return ucxx


async def probe_recv(ep: Any, tag: int) -> Any:
    """Receive a message of unknown size: poll the probe, then receive by its handle."""
    import numpy as np

    while True:
        p = ep.tag_probe(tag, force_tag=True, remove=True)
        if p.matched:
            break
        await asyncio.sleep(0)
    buf = np.empty(p.length, dtype=np.uint8)
    await ep.recv_with_handle(buf, p)
    return buf


def raw_server(args: argparse.Namespace) -> None:
    import numpy as np
    import uvloop

    async def main() -> None:
        ucxx = _ucxx()
        print(f"READY {ucxx.get_worker_address().tobytes().hex()}", flush=True)
        hdr = np.zeros(2, dtype=np.int64)
        await ucxx.recv(hdr, tag=BOOT)
        addr = np.empty(int(hdr[0]), dtype=np.uint8)
        await ucxx.recv(addr, tag=BOOT + 1)
        ep = await ucxx.create_endpoint_from_worker_address(
            ucxx.get_ucx_address_from_buffer(addr), endpoint_error_handling=False
        )
        base = int(hdr[1])
        ctrl = np.zeros(3, dtype=np.int64)  # op, size, count

        while True:
            await ep.recv(ctrl, tag=base, force_tag=True)
            op, size, count = (int(x) for x in ctrl)
            if op == 0:
                break
            if op == 1:  # fixed-size ping-pong
                buf = np.empty(size, dtype=np.uint8)
                for _ in range(count):
                    await ep.recv(buf, tag=base + 2, force_tag=True)
                    await ep.send(buf, tag=base + 3, force_tag=True)
            elif op == 2:  # probe-sized ping-pong
                for _ in range(count):
                    b = await probe_recv(ep, base + 2)
                    await ep.send(b, tag=base + 3, force_tag=True)
            elif op == 3:  # `count` slots, each ping-ponging until a 0xFF payload

                async def slot(i: int, size: int = size) -> None:
                    b = np.empty(size, dtype=np.uint8)
                    while True:
                        await ep.recv(b, tag=base + 16 + 2 * i, force_tag=True)
                        await ep.send(b, tag=base + 17 + 2 * i, force_tag=True)
                        if b[0] == 0xFF:
                            return

                await asyncio.gather(*(slot(i) for i in range(count)))
            await ep.send(ctrl, tag=base + 1, force_tag=True)
        await ep.close()

    uvloop.run(main())


def raw_client(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import uvloop

    async def main() -> dict[str, Any]:
        ucxx = _ucxx()
        ep = await ucxx.create_endpoint_from_worker_address(
            ucxx.get_ucx_address_from_buffer(bytes.fromhex(args.port)),
            endpoint_error_handling=False,
        )
        mine = ucxx.get_worker_address().tobytes()
        base = secrets.randbits(40) << 16
        await ep.send(np.array([len(mine), base], dtype=np.int64), tag=BOOT, force_tag=True)
        await ep.send(np.frombuffer(mine, dtype=np.uint8), tag=BOOT + 1, force_tag=True)
        ctrl = np.zeros(3, dtype=np.int64)

        async def begin(op: int, size: int, count: int) -> None:
            ctrl[:] = (op, size, count)
            await ep.send(ctrl, tag=base, force_tag=True)

        async def end() -> None:
            await ep.recv(ctrl, tag=base + 1, force_tag=True)

        results: dict[str, Any] = {}
        for label, op in (("fixed", 1), ("probe", 2)):
            # Every phase below is one server-side session of known length.
            session: dict[str, Any] = {"left": 0}

            async def one(data: bytes, op: int = op, session: dict[str, Any] = session) -> Any:
                if session["left"] == 0:
                    if session.get("open"):
                        await end()
                    session["left"] = session["n"]
                    await begin(op, len(data), session["n"])
                    session["open"] = True
                session["left"] -= 1
                await ep.send(np.frombuffer(data, dtype=np.uint8), tag=base + 2, force_tag=True)
                if op == 2:
                    return await probe_recv(ep, base + 3)
                out = np.empty(len(data), dtype=np.uint8)
                await ep.recv(out, tag=base + 3, force_tag=True)
                return out

            async def many(
                data: bytes, width: int, seconds: float, session: dict[str, Any] = session
            ) -> int:
                if session.get("open"):
                    await end()
                    session["open"] = False
                    session["left"] = 0
                await begin(3, len(data), width)
                stop_at = time.perf_counter() + seconds
                done = 0

                async def slot(i: int) -> None:
                    nonlocal done
                    s = np.frombuffer(data, dtype=np.uint8).copy()
                    s[0] = 1
                    r = np.empty(len(data), dtype=np.uint8)
                    while True:
                        last = time.perf_counter() >= stop_at
                        if last:
                            s[0] = 0xFF
                        await ep.send(s, tag=base + 16 + 2 * i, force_tag=True)
                        await ep.recv(r, tag=base + 17 + 2 * i, force_tag=True)
                        if last:
                            return
                        done += 1

                await asyncio.gather(*(slot(i) for i in range(width)))
                await end()
                return done

            # latency phase: warm-up + iters in one session; big phase: its own session
            session["n"] = args.warmup + args.iters

            async def big(data: bytes, one: Any = one, session: dict[str, Any] = session) -> Any:
                if session.get("mode") != "big":
                    if session.get("open") and session["left"] == 0:
                        await end()
                        session["open"] = False
                    session["mode"] = "big"
                    session["n"] = 2 + args.bw_iters
                    session["left"] = 0
                return await one(data)

            res = await run_phases(one, many, big, args, args.server_pid)
            if session.get("open"):
                await end()
            results[label] = res
        await begin(0, 0, 0)
        await ep.close()
        return results

    return uvloop.run(main())


# -- orchestration ---------------------------------------------------------------------------


def spawn(role: str, impl: str, mode: str, extra: list[str], env: dict[str, str]) -> Any:
    cmd = [sys.executable, __file__, "--role", role, "--impl", impl, "--mode", mode, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def run_pair(
    impl: str,
    mode: str,
    args: argparse.Namespace,
    source: str = "",
    extra_env: dict[str, str] | None = None,
) -> Any:
    env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n", UCX_NET_DEVICES="lo", **(extra_env or {}))
    if source:  # import ucxrpc from another checkout (a before/after comparison)
        env["PYTHONPATH"] = source
    if args.tls:
        env["UCX_TLS"] = args.tls
    server = spawn("server", impl, mode, [], env)
    try:
        assert server.stdout is not None
        line = server.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError(f"{impl} server did not start")
        extra = [
            "--port",
            line[1],
            "--server-pid",
            str(server.pid),
            "--iters",
            str(args.iters),
            "--warmup",
            str(args.warmup),
            "--thr-seconds",
            str(args.thr_seconds),
            "--bw-iters",
            str(args.bw_iters),
        ]
        client = spawn("client", impl, mode, extra, env)
        out, _ = client.communicate(timeout=args.time_budget)
        if client.returncode != 0:
            raise RuntimeError(f"{impl}/{mode} client failed ({client.returncode})")
        server.wait(timeout=10)
        return json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in (server, locals().get("client")):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["parent", "server", "client"], default="parent")
    ap.add_argument("--impl", choices=["ucxrpc", "raw"], default="ucxrpc")
    ap.add_argument("--mode", default="blocking")
    ap.add_argument("--modes", default="blocking,polling,efficient")
    ap.add_argument("--port", default="0")
    ap.add_argument("--server-pid", type=int, default=0)
    ap.add_argument("--iters", type=int, default=10000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--thr-seconds", type=float, default=3.0)
    ap.add_argument("--bw-iters", type=int, default=20)
    ap.add_argument("--tls", default="", help="force UCX_TLS (e.g. tcp) for every process")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    ap.add_argument("--time-budget", type=float, default=300.0)
    ap.add_argument("--out", default="bench-results/echo.json")
    ap.add_argument(
        "--baseline",
        default="",
        help="also run ucxrpc (blocking) imported from this checkout, e.g. a git worktree "
        "of the previous release, for a before/after comparison in one run",
    )
    args = ap.parse_args()
    if args.quick:
        args.iters, args.warmup, args.thr_seconds, args.bw_iters = 2000, 200, 1.0, 5
    if args.role == "server":
        (ucxrpc_server if args.impl == "ucxrpc" else raw_server)(args)
        return
    if args.role == "client":
        result = (ucxrpc_client if args.impl == "ucxrpc" else raw_client)(args)
        print(json.dumps(result), flush=True)
        return

    rows: dict[str, dict[str, Any]] = {}
    raw = run_pair("raw", "blocking", args)
    rows["raw ucxx (sizes known)"] = raw["fixed"]
    rows["raw ucxx (tag probe)"] = raw["probe"]
    if args.baseline:
        rows["ucxrpc blocking (baseline)"] = run_pair("ucxrpc", "blocking", args, args.baseline)
    for mode in args.modes.split(","):
        rows[f"ucxrpc {mode}"] = run_pair("ucxrpc", mode, args)
    if not args.tls:
        # Small frames over UCX's TCP rather than the frame rings.
        rows["ucxrpc blocking, frame rings off"] = run_pair(
            "ucxrpc", "blocking", args, extra_env={"UCXRPC_SHARED_FRAMES": "false"}
        )
        # Shared parts as memory files only (where the kernel forbids memory reads).
        rows["ucxrpc blocking, shared files only"] = run_pair(
            "ucxrpc", "blocking", args, extra_env={"UCXRPC_SHARED_READS": "false"}
        )
        # Everything over UCX (what the default was before shared parts).
        rows["ucxrpc blocking, shared parts off"] = run_pair(
            "ucxrpc", "blocking", args, extra_env={"UCXRPC_SHARED_MEMORY": "false"}
        )
        # The shared-memory opt-in (endpoints without peer error handling; see
        # docs/survival.md for its risk).
        rows["ucxrpc blocking, shared memory opt-in"] = run_pair(
            "ucxrpc", "blocking", args, extra_env={"UCXRPC_PEER_ERROR_HANDLING": "false"}
        )
    ref = rows["raw ucxx (tag probe)"]
    print(
        f"\nunary echo, two processes on {HOST}"
        f"{' UCX_TLS=' + args.tls if args.tls else ''}; ratios vs raw ucxx (tag probe)\n"
    )
    head = (
        "| config | p50 us | p99 us | p50 ratio | calls/s @64 | 16 MiB MiB/s "
        "| 16 MiB as bytes MiB/s | 16 MiB typed view MiB/s | idle CPU srv/cli % |"
    )
    print(head)
    print("|" + "---|" * 9)
    for name, r in rows.items():
        ratio = r["p50_us"] / ref["p50_us"]
        as_bytes = f"{r['mib_per_s_bytes']:,}" if "mib_per_s_bytes" in r else "-"
        typed = f"{r['mib_per_s_typed']:,}" if "mib_per_s_typed" in r else "-"
        print(
            f"| {name} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {ratio:.2f}x "
            f"| {r['calls_per_s']:,} | {r['mib_per_s']:,} | {as_bytes} | {typed} "
            f"| {r['idle_cpu_server_pct']:.0f} / {r['idle_cpu_client_pct']:.0f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "iters": args.iters,
        "warmup": args.warmup,
        "thr_seconds": args.thr_seconds,
        "bw_iters": args.bw_iters,
        "tls": args.tls or "default",
        "baseline": args.baseline,
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
