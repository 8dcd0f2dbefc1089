"""ucxrpc against its peers in one run: raw ucxx, msgpack-RPC over TCP and gRPC.

Every system runs as a server process and a client process on 127.0.0.1, started here
with ``subprocess`` (never fork after UCX is up) and stopped by pid. For each one, the
client measures the same phases of an echo service:

* **latency**: p50/p99 of sequential 64 B round trips (after a warm-up);
* **calls/s** with 1, 64 and 1,024 calls in flight (64 B, a fixed time each);
* **bandwidth** of 4 KiB, 1 MiB and 16 MiB echoes (MiB/s counted one way);
* **idle CPU** of the connected client and server over one second;
* **streaming** (systems with streams: ucxrpc, gRPC): items/s of a server stream and
  of a client stream of 64 B items;
* **connections** (ucxrpc, msgpack-RPC): ``--conns`` (1,000) connections opened to
  the one server from the client process: connect time p50 (and connections/s),
  server memory per connection (RSS growth over the open), and the 64 B p50 on the
  first connection while the others stay open.

Systems:

* ``ucxrpc``: the library with its defaults (on one host: frame rings for small frames,
  large parts read out of the sender's memory), called through a typed stub that
  declares ``memoryview`` both ways;
* ``ucxrpc-tcp``: ``UCX_TLS=tcp`` and ``shared_memory=False``, what two hosts get;
* ``msgpack-rpc``: msgpack-RPC over a uvloop TCP connection (an asyncio ``Protocol``,
  one future per call; written here, about 60 lines);
* ``grpc``: gRPC's asyncio API (on asyncio's own loop: under load on uvloop, grpc.aio
  cancels calls), unary calls of raw bytes (no protobuf), one channel;
* ``raw-ucxx``: ucxx's asyncio API on worker-address endpoints (shared memory),
  receiving through ``tag_probe``: the raw peer of ``benchmarks/echo.py``, which
  measures latency, calls/s with 64 in flight and 16 MiB only; ``raw-ucxx-tcp`` the
  same with ``UCX_TLS=tcp``. Each also gives a ``(sizes known)`` row: the same peer
  receiving into buffers of the known size, without a probe.

``--huge`` adds a 256 MiB echo to the bandwidth phase.

Prints a table of values and ratios (ucxrpc's value over the peer's, so above 1 means
ucxrpc is better; for latency the peer's over ucxrpc's), writes JSON and, with
matplotlib, a PNG. Bounded: a time budget per system, every load loop bounded in time.

Usage::

    python benchmarks/compare.py [--quick] [--systems ucxrpc,msgpack-rpc,grpc]
                                 [--out bench-results/compare.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
SMALL = 64
WIDTHS = (1, 64, 1024)
SIZES = (4 << 10, 1 << 20, 16 << 20)
SYSTEMS = ("ucxrpc", "ucxrpc-tcp", "msgpack-rpc", "grpc", "raw-ucxx", "raw-ucxx-tcp")
HUGE = 256 << 20
HERE = Path(__file__).resolve().parent

Call = Callable[[bytes], Awaitable[Any]]


def _echo_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_echo", HERE / "echo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the phases (any system, through one call) ----------------------------------------------


async def measure(call: Call, args: argparse.Namespace, server_pid: int) -> dict[str, Any]:
    """Every phase through ``call`` (one echo round trip)."""
    echo = _echo_module()
    meter = echo.Meter(server_pid)
    res: dict[str, Any] = {}
    small = os.urandom(SMALL)
    for _ in range(args.warmup):
        await call(small)
    ns = [0] * args.iters
    pc = time.perf_counter_ns
    for i in range(args.iters):
        t = pc()
        out = await call(small)
        ns[i] = pc() - t
    assert bytes(out) == small, "echo mismatch"
    ns.sort()
    res["p50_us"] = round(echo.percentile(ns, 50), 1)
    res["p99_us"] = round(echo.percentile(ns, 99), 1)

    for width in WIDTHS:
        done = failed = 0

        async def caller(stop: float) -> None:
            nonlocal done, failed
            while time.perf_counter() < stop:
                try:
                    await call(small)
                except Exception:  # counted and reported (gRPC cancels some at 1,024)
                    failed += 1
                else:
                    done += 1

        t0 = time.perf_counter()
        end = t0 + args.seconds
        await asyncio.gather(*(caller(end) for _ in range(width)))
        res[f"calls_per_s_{width}"] = round(done / (time.perf_counter() - t0))
        if failed:
            res[f"failed_{width}"] = failed

    for size in (*SIZES, HUGE) if args.huge else SIZES:
        data = os.urandom(size)
        rounds = max(3, min(200, (args.bw_bytes // size)))
        await call(data)
        t0 = time.perf_counter()
        for _ in range(rounds):
            out = await call(data)
        elapsed = time.perf_counter() - t0
        assert len(out) == size and bytes(out[:64]) == data[:64], "big echo mismatch"
        res[f"mib_per_s_{size}"] = round(rounds * size / (1 << 20) / elapsed)

    meter.start()
    await asyncio.sleep(1.0)
    idle = meter.stop()
    res["idle_cpu_client_pct"] = idle["client_cpu_pct"]
    res["idle_cpu_server_pct"] = idle["server_cpu_pct"]
    return res


async def measure_streams(
    server_stream: Callable[[int], Awaitable[int]],
    client_stream: Callable[[int], Awaitable[int]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Items/s of a server stream and of a client stream of ``args.items`` 64 B items."""
    res: dict[str, Any] = {}
    for key, run in (("server_stream", server_stream), ("client_stream", client_stream)):
        await run(100)  # warm
        t0 = time.perf_counter()
        got = await run(args.items)
        assert got == args.items, f"{key}: {got} of {args.items} items"
        res[f"{key}_items_per_s"] = round(args.items / (time.perf_counter() - t0))
    return res


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def measure_conns(
    connect: Callable[[], Awaitable[Any]],
    close: Callable[[Any], Awaitable[None]],
    call: Call,
    args: argparse.Namespace,
    server_pid: int,
) -> dict[str, Any]:
    """``args.conns`` connections to the server, held open: connect time, server
    memory per connection, and a call's p50 on the measuring connection meanwhile."""
    echo = _echo_module()
    before = _rss_kib(server_pid)
    conns: list[Any] = []
    took = []
    t0 = time.perf_counter()
    try:
        for _ in range(args.conns):
            t = time.perf_counter()
            conns.append(await connect())
            took.append(time.perf_counter() - t)
        opened = time.perf_counter() - t0
        after = _rss_kib(server_pid)
        small = os.urandom(SMALL)
        ns = []
        for _ in range(min(args.iters, 2000)):
            t1 = time.perf_counter_ns()
            await call(small)
            ns.append(time.perf_counter_ns() - t1)
    finally:
        for conn in conns:
            await close(conn)
    took.sort()
    ns.sort()
    return {
        "conns": len(conns),
        "connect_ms_p50": round(1000 * took[len(took) // 2], 2),
        "conns_per_s": round(len(conns) / opened),
        "kib_per_conn": round((after - before) / max(1, len(conns)), 1),
        "p50_us_conns_open": round(echo.percentile(ns, 50), 1),
    }


# -- ucxrpc ---------------------------------------------------------------------------------


def _echo_api() -> Any:
    """The echo as a typed service: ``memoryview`` declared on both sides, so the reply
    is not copied into ``bytes`` on arrival (an un-annotated result would be)."""
    import ucxrpc

    class EchoApi(ucxrpc.Service, name="bench"):
        @ucxrpc.rpc
        async def echo(self, data: memoryview) -> memoryview:
            return data

    return EchoApi


def ucxrpc_server() -> None:
    import ucxrpc

    server = ucxrpc.Server()
    server.add_service(_echo_api()())

    @server.rpc
    async def items(n: int) -> AsyncIterator[bytes]:
        item = bytes(SMALL)
        for _ in range(n):
            yield item

    @server.rpc
    async def drain(source: AsyncIterator[bytes]) -> int:
        n = 0
        async for _ in source:
            n += 1
        return n

    async def main() -> None:
        async with ucxrpc.Manager() as manager:
            await server.start(manager, HOST, 0)
            print(f"READY {server.port}", flush=True)
            await server.serve_forever()

    ucxrpc.run(main())


def ucxrpc_client(args: argparse.Namespace) -> dict[str, Any]:
    import ucxrpc

    async def main() -> dict[str, Any]:
        async with ucxrpc.Manager() as manager:
            client = await manager.connect(HOST, args.port)

            stub = client.stub(_echo_api())

            async def call(data: bytes) -> Any:
                return await stub.echo(memoryview(data))

            res = await measure(call, args, args.server_pid)

            async def server_stream(n: int) -> int:
                return sum([1 async for _ in client.stream("items", n)])

            async def client_stream(n: int) -> int:
                async def source() -> AsyncIterator[bytes]:
                    item = bytes(SMALL)
                    for _ in range(n):
                        yield item

                count: int = await client.call("drain", source())
                return count

            res.update(await measure_streams(server_stream, client_stream, args))

            async def connect() -> Any:
                return await manager.connect(HOST, args.port)

            async def close(conn: Any) -> None:
                await conn.close()

            res.update(await measure_conns(connect, close, call, args, args.server_pid))
            await client.close()
            return res

    return ucxrpc.run(main())


# -- msgpack-RPC over TCP -----------------------------------------------------------------------


class _MsgpackRpc(asyncio.Protocol):
    """msgpack-RPC framing: request ``[0, id, method, params]``, reply ``[1, id, err, result]``."""

    def __init__(self, serve: bool) -> None:
        import msgpack

        self.unpacker = msgpack.Unpacker(max_buffer_size=1 << 30)
        self.packb = msgpack.packb
        self.serve = serve
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        for msg in self.unpacker:
            if self.serve:
                _, msgid, _method, params = msg
                self.transport.write(self.packb([1, msgid, None, params[0]]))
            else:
                fut = self.pending.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg[3])


def msgpack_server() -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _MsgpackRpc(True), HOST, 0)
        print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    uvloop.run(main())


def msgpack_client(args: argparse.Namespace) -> dict[str, Any]:
    import socket

    import uvloop

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_connection(lambda: _MsgpackRpc(False), HOST, args.port)
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ids = iter(range(1, 1 << 62))

        async def call(data: bytes) -> Any:
            msgid = next(ids)
            fut = loop.create_future()
            proto.pending[msgid] = fut
            transport.write(proto.packb([0, msgid, "echo", [data]]))
            return await fut

        res = await measure(call, args, args.server_pid)

        async def connect() -> Any:
            conn, _ = await loop.create_connection(lambda: _MsgpackRpc(False), HOST, args.port)
            return conn

        async def close(conn: Any) -> None:
            conn.close()

        res.update(await measure_conns(connect, close, call, args, args.server_pid))
        transport.close()
        return res

    return uvloop.run(main())


# -- gRPC ---------------------------------------------------------------------------------------

_GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.max_receive_message_length", 1 << 30),
]


def grpc_server() -> None:
    import grpc

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def items(request: bytes, context: Any) -> AsyncIterator[bytes]:
        item = bytes(SMALL)
        for _ in range(int(request)):
            yield item

    async def drain(requests: AsyncIterator[bytes], context: Any) -> bytes:
        n = 0
        async for _ in requests:
            n += 1
        return str(n).encode()

    async def main() -> None:
        server = grpc.aio.server(options=_GRPC_OPTIONS)
        handler = grpc.method_handlers_generic_handler(
            "bench",
            {
                "echo": grpc.unary_unary_rpc_method_handler(echo),
                "items": grpc.unary_stream_rpc_method_handler(items),
                "drain": grpc.stream_unary_rpc_method_handler(drain),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port(f"{HOST}:0")
        await server.start()
        print(f"READY {port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())  # grpc.aio cancels calls under load on uvloop


def grpc_client(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    async def main() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(f"{HOST}:{args.port}", options=_GRPC_OPTIONS) as ch:
            stub = ch.unary_unary("/bench/echo")
            res = await measure(stub, args, args.server_pid)
            items, drain = ch.unary_stream("/bench/items"), ch.stream_unary("/bench/drain")

            async def server_stream(n: int) -> int:
                return sum([1 async for _ in items(str(n).encode())])

            async def client_stream(n: int) -> int:
                async def source() -> AsyncIterator[bytes]:
                    item = bytes(SMALL)
                    for _ in range(n):
                        yield item

                return int(await drain(source()))

            res.update(await measure_streams(server_stream, client_stream, args))
            return res

    return asyncio.run(main())


# -- orchestration ----------------------------------------------------------------------------

ROLES: dict[str, tuple[Callable[[], None], Callable[[argparse.Namespace], dict[str, Any]]]] = {
    "ucxrpc": (ucxrpc_server, ucxrpc_client),
    "ucxrpc-tcp": (ucxrpc_server, ucxrpc_client),
    "msgpack-rpc": (msgpack_server, msgpack_client),
    "grpc": (grpc_server, grpc_client),
}
ENV: dict[str, dict[str, str]] = {
    "ucxrpc-tcp": {"UCX_TLS": "tcp", "UCXRPC_SHARED_MEMORY": "false"},
}


def run_system(name: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n", UCX_NET_DEVICES="lo", **ENV.get(name, {}))
    if args.huge:  # a 256 MiB value plus its frame is over the default limit
        env["UCXRPC_MAX_MESSAGE_SIZE"] = str(2 * HUGE)
    base = [sys.executable, __file__, "--system", name]
    server = subprocess.Popen(
        [*base, "--role", "server"], stdout=subprocess.PIPE, text=True, env=env
    )
    client = None
    try:
        assert server.stdout is not None
        line = server.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError(f"{name} server did not start")
        extra = ["--port", line[1], "--server-pid", str(server.pid), *_phase_args(args)]
        client = subprocess.Popen(
            [*base, "--role", "client", *extra], stdout=subprocess.PIPE, text=True, env=env
        )
        out, _ = client.communicate(timeout=args.time_budget)
        if client.returncode != 0:
            raise RuntimeError(f"{name} client failed ({client.returncode})")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if server.stdout is not None:
            server.stdout.close()


def _phase_args(args: argparse.Namespace) -> list[str]:
    return [
        "--iters",
        str(args.iters),
        "--warmup",
        str(args.warmup),
        "--seconds",
        str(args.seconds),
        "--bw-bytes",
        str(args.bw_bytes),
        "--items",
        str(args.items),
        "--conns",
        str(args.conns),
        *(["--huge"] if args.huge else []),
    ]


def raw_ucxx(
    args: argparse.Namespace, tls: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw ucxx peer of benchmarks/echo.py: probe-sized receives, and receives of
    known size (one run of the pair measures both)."""
    echo = _echo_module()
    ns = argparse.Namespace(
        iters=args.iters,
        warmup=args.warmup,
        thr_seconds=args.seconds,
        bw_iters=max(3, args.bw_bytes // SIZES[-1]),
        time_budget=args.time_budget,
        tls=tls,
    )
    pair = echo.run_pair("raw", "blocking", ns)
    rows = []
    for label in ("probe", "fixed"):
        got = pair[label]
        rows.append(
            {
                "p50_us": got["p50_us"],
                "p99_us": got["p99_us"],
                "calls_per_s_64": got["calls_per_s"],
                f"mib_per_s_{SIZES[-1]}": got["mib_per_s"],
                "idle_cpu_client_pct": got["idle_cpu_client_pct"],
                "idle_cpu_server_pct": got["idle_cpu_server_pct"],
            }
        )
    return rows[0], rows[1]


COLUMNS = [
    ("p50_us", "p50 µs", True),
    ("p99_us", "p99 µs", True),
    *[(f"calls_per_s_{w}", f"calls/s @{w}", False) for w in WIDTHS],
    *[
        (f"mib_per_s_{size}", f"{label} MiB/s", False)
        for size, label in zip((*SIZES, HUGE), ("4 KiB", "1 MiB", "16 MiB", "256 MiB"), strict=True)
    ],
    ("idle_cpu_server_pct", "idle CPU srv %", True),
]
EXTRA_COLUMNS = [
    ("server_stream_items_per_s", "server stream items/s", False),
    ("client_stream_items_per_s", "client stream items/s", False),
    ("connect_ms_p50", "connect ms p50", True),
    ("conns_per_s", "connections/s", False),
    ("kib_per_conn", "server KiB/conn", True),
    ("p50_us_conns_open", "p50 µs, conns open", True),
]


def ratio(ours: float, theirs: float, lower_is_better: bool) -> str:
    if not ours or not theirs:
        return ""
    value = theirs / ours if lower_is_better else ours / theirs
    return f" ({value:.2f}x)"


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    for columns in (COLUMNS, EXTRA_COLUMNS):
        _print_table(rows, columns)
    print("\nratios: ucxrpc against the peer (above 1: ucxrpc is better)")


def _print_table(rows: dict[str, dict[str, Any]], columns: list[tuple[str, str, bool]]) -> None:
    ref = rows.get("ucxrpc", {})
    shown_rows = {n: r for n, r in rows.items() if any(k in r for k, _, _ in columns)}
    print("\n| system | " + " | ".join(label for _, label, _ in columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for name, row in shown_rows.items():
        cells = []
        for key, _, lower in columns:
            if key not in row:
                cells.append("-")
                continue
            value = row[key]
            shown = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
            cells.append(shown + ("" if name == "ucxrpc" else ratio(ref.get(key, 0), value, lower)))
        print(f"| {name} | " + " | ".join(cells) + " |")


def plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    panels = [
        ("p50_us", "p50 µs (log)"),
        ("calls_per_s_64", "calls/s, 64 in flight"),
        (f"mib_per_s_{SIZES[-1]}", "16 MiB echo MiB/s"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels, strict=True):
        names = [n for n in rows if key in rows[n]]
        ax.bar(names, [rows[n][key] for n in names], color="#4477aa")
        ax.set_title(title)
        if key == "p50_us":
            ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["parent", "server", "client"], default="parent")
    ap.add_argument("--system", default="")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--server-pid", type=int, default=0)
    ap.add_argument("--iters", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=2.0, help="per calls/s phase")
    ap.add_argument("--bw-bytes", type=int, default=256 << 20, help="bytes per bandwidth phase")
    ap.add_argument("--time-budget", type=float, default=240.0, help="seconds per system")
    ap.add_argument("--quick", action="store_true", help="a smoke run (seconds, not minutes)")
    ap.add_argument("--huge", action="store_true", help="also a 256 MiB echo")
    ap.add_argument("--items", type=int, default=20000, help="items per stream phase")
    ap.add_argument("--conns", type=int, default=1000, help="connections held open")
    ap.add_argument("--out", default="bench-results/compare.json")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.warmup, args.seconds, args.bw_bytes = 500, 50, 0.3, 32 << 20
        args.items, args.conns = 2000, 50
    if args.role == "server":
        ROLES[args.system][0]()
        return
    if args.role == "client":
        print(json.dumps(ROLES[args.system][1](args)), flush=True)
        return

    from rich.progress import Progress

    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    with Progress(transient=True) as progress:
        task = progress.add_task("systems", total=len(names))
        for name in names:
            progress.update(task, description=f"measuring {name}")
            try:
                if name == "grpc" and importlib.util.find_spec("grpc") is None:
                    raise RuntimeError("grpcio is not installed (pip install grpcio)")
                if name.startswith("raw-ucxx"):
                    probed, known = raw_ucxx(args, "tcp" if name.endswith("-tcp") else None)
                    rows[name] = probed
                    rows[f"{name} (sizes known)"] = known
                else:
                    rows[name] = run_system(name, args)
            except Exception as exc:  # one system failing must not lose the others
                skipped[name] = str(exc)
            progress.advance(task)
    print_table(rows)
    for name, row in rows.items():
        for width in WIDTHS:
            if row.get(f"failed_{width}"):
                print(f"{name}: {row[f'failed_{width}']:,} calls failed with {width} in flight")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "iters": args.iters,
        "warmup": args.warmup,
        "seconds": args.seconds,
        "bw_bytes": args.bw_bytes,
        "items": args.items,
        "conns": args.conns,
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.write_text(json.dumps({"meta": meta, "results": rows, "skipped": skipped}, indent=2))
    print(f"written {out}")
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
