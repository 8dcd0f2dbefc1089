"""ucxrpc against its peers in one run: raw ucxx, msgpack-RPC over TCP and gRPC.

Every system runs as a server process and a client process on 127.0.0.1, started here
with ``subprocess`` (never fork after UCX is up) and stopped by pid. For each one, the
client measures the same phases of an echo service:

* **latency**: p50/p99 of sequential 64 B round trips (after a warm-up);
* **calls/s** with 1, 64 and 1,024 calls in flight (64 B, a fixed time each);
* **bandwidth** of 4 KiB, 1 MiB, 16 MiB and 256 MiB echoes (MiB/s counted one way;
  256 MiB: ``--huge-rounds`` (3) timed round trips after an untimed one; with
  ``--quick`` one round trip, timed; ``--no-huge`` leaves it out);
* **idle CPU** of the connected client and of the server over one second;
* **streaming** (systems with streams: ucxrpc, gRPC): items/s of a server stream and
  of a client stream of 64 B items;
* **connections** (ucxrpc, msgpack-RPC, gRPC): ``--conns`` (1,000) connections opened
  to the one server from the client process: connect time p50 (and connections/s),
  server memory per connection (RSS growth over the open), and the 64 B p50 on the
  first connection while the others stay open.

Systems:

* ``ucxrpc``: the library with its defaults (on one host: frame rings for small frames,
  large parts read out of the sender's memory), called through a typed stub that
  declares ``memoryview`` both ways; ``max_message_size`` is raised to 512 MiB for the
  256 MiB echo (its default, 256 MiB, is below a 256 MiB value plus its frame);
* ``ucxrpc-tcp``: ``UCX_TLS=tcp`` and ``shared_memory=False``, what two hosts get;
* ``msgpack-rpc``: msgpack-RPC over a uvloop TCP connection (an asyncio ``Protocol``,
  one future per call; written here, about 60 lines);
* ``grpc``: gRPC's asyncio API (on asyncio's own loop: under load on uvloop, grpc.aio
  cancels calls), unary calls of raw bytes (no protobuf), one channel, message limits
  raised to 1 GiB; each of its ``--conns`` channels has its own subchannel pool (its
  own TCP connection: channels to one target share one by default);
* ``raw-ucxx``: ucxx's asyncio API in blocking mode on uvloop, over endpoints made from
  exchanged worker addresses (the transport ucxrpc uses; the bootstrap of
  ``benchmarks/echo.py``), shared memory; each caller has a pair of tags, and replies
  and requests of unknown size are found with one masked ``tag_probe`` on the worker
  and received by its handle (as ucxrpc's engine does; with one caller in flight, no
  task sits between probe and receive, as in echo.py's peer). Its ``(sizes known)``
  row is the same peer receiving into buffers of the known size, without a probe.
  Before each phase the client tells the server what comes (size, callers, round
  trips, or until a marked last message). ``raw-ucxx-tcp``: the same, ``UCX_TLS=tcp``.
  Raw ucxx has no streams (tagged messages only) and no connection phase: an endpoint
  made from a worker address has no handshake to time and no server state until used.
  Its idle CPU is what ucxx's blocking progress mode costs with nothing to do.

Prints a table of values and ratios (ucxrpc's value over the peer's, so above 1 means
ucxrpc is better; for latency, memory and CPU the peer's over ucxrpc's; raw-ucxx-tcp
rows against ucxrpc-tcp, the others against ucxrpc), notes on every "-", writes JSON
and, with matplotlib, a PNG. Bounded: a time budget per system (``--time-budget``) and
for the run (``--total-budget``, 570 s), every load loop bounded in time or count.

Usage::

    python benchmarks/compare.py [--quick] [--systems ucxrpc,msgpack-rpc,grpc]
                                 [--no-huge] [--out bench-results/compare.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
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
Phase = Callable[[int, int, int], AbstractAsyncContextManager[Call]]


def _echo_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_echo", HERE / "echo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the phases (any system, through one call) ----------------------------------------------


@asynccontextmanager
async def _same_call(call: Call) -> AsyncIterator[Call]:
    yield call


def note(label: str) -> None:
    """Tell the parent (its progress bar) which phase the client is in."""
    print(f"PHASE {label}", flush=True)


async def measure(
    call: Call | None,
    args: argparse.Namespace,
    server_pid: int,
    phase: Phase | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Every phase through ``call`` (one echo round trip).

    ``phase(size, width, count)``, if given, opens each phase and gives the call to use
    in it: a peer without calls of its own (raw ucxx) tells its server what comes
    (``width`` callers of ``size`` bytes, ``count`` round trips each, or 0: until the
    phase closes). Without it every phase uses ``call``.
    """
    echo = _echo_module()
    meter = echo.Meter(server_pid)

    def same(size: int, width: int, count: int) -> AbstractAsyncContextManager[Call]:
        assert call is not None
        return _same_call(call)

    opened: Phase = phase or same
    prefix = f"{label}: " if label else ""
    res: dict[str, Any] = {}
    # A first byte of 0xFF ends a raw ucxx phase: never in a counted payload.
    small = b"\x01" + os.urandom(SMALL - 1)
    note(f"{prefix}latency")
    async with opened(SMALL, 1, args.warmup + args.iters) as one:
        for _ in range(args.warmup):
            await one(small)
        ns = [0] * args.iters
        pc = time.perf_counter_ns
        for i in range(args.iters):
            t = pc()
            out = await one(small)
            ns[i] = pc() - t
    assert bytes(out) == small, "echo mismatch"
    ns.sort()
    res["p50_us"] = round(echo.percentile(ns, 50), 1)
    res["p99_us"] = round(echo.percentile(ns, 99), 1)

    for width in WIDTHS:
        note(f"{prefix}calls/s @{width}")
        done = failed = 0
        async with opened(SMALL, width, 0) as each:

            async def caller(stop: float, each: Call = each) -> None:
                nonlocal done, failed
                while time.perf_counter() < stop:
                    try:
                        await each(small)
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

    for size in bandwidth_sizes(args):
        note(f"{prefix}{_size_label(size)} echo")
        data = os.urandom(size)
        rounds = args.huge_rounds if size == HUGE else max(3, min(200, args.bw_bytes // size))
        warm = 1 if rounds > 1 else 0  # one timed round (--quick) includes the first use
        async with opened(size, 1, rounds + warm) as big:
            for _ in range(warm):
                await big(data)
            t0 = time.perf_counter()
            for _ in range(rounds):
                out = await big(data)
            elapsed = time.perf_counter() - t0
        assert len(out) == size and bytes(out[:64]) == data[:64], "big echo mismatch"
        assert bytes(out[-64:]) == data[-64:], "big echo mismatch"
        mib_per_s = rounds * size / (1 << 20) / elapsed
        res[f"mib_per_s_{size}"] = round(mib_per_s) if mib_per_s >= 100 else round(mib_per_s, 1)
        del data, out

    note(f"{prefix}idle CPU")
    meter.start()
    await asyncio.sleep(1.0)
    idle = meter.stop()
    res["idle_cpu_client_pct"] = idle["client_cpu_pct"]
    res["idle_cpu_server_pct"] = idle["server_cpu_pct"]
    return res


def bandwidth_sizes(args: argparse.Namespace) -> tuple[int, ...]:
    return SIZES if args.no_huge else (*SIZES, HUGE)


def _size_label(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


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


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


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
    fds_before = _fds(server_pid)
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
        fds_after = _fds(server_pid)
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
        # Each connection is a socket on the server (a check that they are real).
        "server_fds_added": fds_after - fds_before,
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

            async def connect() -> Any:
                # A channel of its own subchannel pool: its own TCP connection (channels
                # of the same target and options share one by default).
                options = [*_GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
                conn = grpc.aio.insecure_channel(f"{HOST}:{args.port}", options=options)
                await conn.channel_ready()
                return conn

            async def close(conn: Any) -> None:
                await conn.close()

            res.update(await measure_conns(connect, close, stub, args, args.server_pid))
            return res

    return asyncio.run(main())


# -- raw ucxx (worker-address endpoints, like ucxrpc's data path) ------------------------------
#
# Tags: the client picks ``base`` (low 16 bits zero). ``base`` carries a phase's control
# message (op, size, width, count) to the server, ``base + 1`` its end back. Caller slot
# ``i`` sends on ``base | REQ | 2i`` and gets its reply on that tag ``| 1``; probe-sized
# receives match any slot with one masked probe on the worker (as ucxrpc's engine does).

RAW_REQ = 0x8000
RAW_SLOTS = 1 << 14
RAW_MASK = ((1 << 64) - 1) ^ ((RAW_SLOTS - 1) << 1)
RAW_QUIT, RAW_KNOWN, RAW_PROBE = 0, 1, 2
RAW_END = 0xFF  # first byte of the message that ends a slot of a timed phase


def _raw_worker(ucxx: Any) -> Any:
    # The masked probe is on the worker: ucxx's asyncio API only probes one exact tag.
    return ucxx.core._get_ctx().worker


async def _raw_probe(worker: Any, tag: Any, mask: Any) -> Any:
    """The next message matching ``tag`` under ``mask``, polled between loop turns."""
    while True:
        probe = worker.tag_probe(tag, mask, remove=True)
        if probe.matched:
            return probe
        await asyncio.sleep(0)


def raw_server() -> None:
    import numpy as np
    import uvloop

    echo = _echo_module()

    async def main() -> None:
        ucxx = echo._ucxx()
        from ucxx.types import Tag, TagMask

        worker = _raw_worker(ucxx)
        print(f"READY {ucxx.get_worker_address().tobytes().hex()}", flush=True)
        hdr = np.zeros(2, dtype=np.int64)
        await ucxx.recv(hdr, tag=echo.BOOT)
        addr = np.empty(int(hdr[0]), dtype=np.uint8)
        await ucxx.recv(addr, tag=echo.BOOT + 1)
        ep = await ucxx.create_endpoint_from_worker_address(
            ucxx.get_ucx_address_from_buffer(addr), endpoint_error_handling=False
        )
        base = int(hdr[1])
        requests, mask = Tag(base | RAW_REQ), TagMask(RAW_MASK)
        ctrl = np.zeros(4, dtype=np.int64)

        async def known(slot: int, size: int, count: int) -> None:
            tag = base | RAW_REQ | slot << 1
            buf = np.empty(size, dtype=np.uint8)
            n = 0
            while True:
                await ep.recv(buf, tag=tag, force_tag=True)
                await ep.send(buf, tag=tag | 1, force_tag=True)
                n += 1
                if n == count or (not count and buf[0] == RAW_END):
                    return

        async def probed(width: int, count: int) -> None:
            ended = 0
            served = [0] * width
            replies: set[asyncio.Task[None]] = set()

            async def reply(buf: Any, probe: Any, tag: int) -> None:
                await ep.recv_with_handle(buf, probe)
                await ep.send(buf, tag=tag | 1, force_tag=True)
                nonlocal ended
                slot = (tag >> 1) & (RAW_SLOTS - 1)
                served[slot] += 1
                if served[slot] == count or (not count and buf[0] == RAW_END):
                    ended += 1

            while ended < width:
                probe = worker.tag_probe(requests, mask, remove=True)
                if not probe.matched:
                    await asyncio.sleep(0)
                    continue
                buf = np.empty(probe.length, dtype=np.uint8)
                if width == 1:  # one caller: no task between probe and reply
                    await reply(buf, probe, probe.sender_tag.value)
                    continue
                task = asyncio.ensure_future(reply(buf, probe, probe.sender_tag.value))
                replies.add(task)
                task.add_done_callback(replies.discard)
            await asyncio.gather(*replies)

        while True:
            await ep.recv(ctrl, tag=base, force_tag=True)
            op, size, width, count = (int(x) for x in ctrl)
            if op == RAW_QUIT:
                break
            if op == RAW_KNOWN:
                await asyncio.gather(*(known(i, size, count) for i in range(width)))
            else:
                await probed(width, count)
            await ep.send(ctrl, tag=base + 1, force_tag=True)
        await ep.close()

    uvloop.run(main())


def raw_client(args: argparse.Namespace) -> dict[str, Any]:
    """Both raw ucxx rows in one pair: probe-sized receives, then receives of known size."""
    import secrets

    import numpy as np
    import uvloop

    echo = _echo_module()

    async def main() -> dict[str, Any]:
        ucxx = echo._ucxx()
        from ucxx.types import Tag, TagMask

        worker = _raw_worker(ucxx)
        ep = await ucxx.create_endpoint_from_worker_address(
            ucxx.get_ucx_address_from_buffer(bytes.fromhex(args.address)),
            endpoint_error_handling=False,
        )
        mine = ucxx.get_worker_address().tobytes()
        base = secrets.randbits(40) << 16
        await ep.send(np.array([len(mine), base], dtype=np.int64), tag=echo.BOOT, force_tag=True)
        await ep.send(np.frombuffer(mine, dtype=np.uint8), tag=echo.BOOT + 1, force_tag=True)
        replies, mask = Tag(base | RAW_REQ | 1), TagMask(RAW_MASK)
        ctrl = np.zeros(4, dtype=np.int64)

        def session(op: int) -> Phase:
            @asynccontextmanager
            async def phase(size: int, width: int, count: int) -> AsyncIterator[Call]:
                assert width <= RAW_SLOTS
                ctrl[:] = (op, size, width, count)
                await ep.send(ctrl, tag=base, force_tag=True)
                free = list(range(width))
                waiting: dict[int, asyncio.Future[tuple[Any, Any]]] = {}
                loop = asyncio.get_running_loop()

                async def call_known(data: bytes) -> Any:
                    slot = free.pop()
                    try:
                        tag = base | RAW_REQ | slot << 1
                        await ep.send(np.frombuffer(data, dtype=np.uint8), tag=tag, force_tag=True)
                        out = np.empty(len(data), dtype=np.uint8)
                        await ep.recv(out, tag=tag | 1, force_tag=True)
                        return out
                    finally:
                        free.append(slot)

                async def call_probed(data: bytes) -> Any:
                    slot = free.pop()
                    try:
                        if dispatcher is not None:
                            waiting[slot] = fut = loop.create_future()
                        tag = base | RAW_REQ | slot << 1
                        await ep.send(np.frombuffer(data, dtype=np.uint8), tag=tag, force_tag=True)
                        if dispatcher is None:  # one caller: it probes for its reply itself
                            probe = await _raw_probe(worker, replies, mask)
                            buf = np.empty(probe.length, dtype=np.uint8)
                        else:
                            buf, probe = await fut
                        await ep.recv_with_handle(buf, probe)
                        return buf
                    finally:
                        free.append(slot)

                async def dispatch() -> None:
                    # One masked probe for every slot's reply: its size is learnt here.
                    while True:
                        probe = worker.tag_probe(replies, mask, remove=True)
                        if not probe.matched:
                            await asyncio.sleep(0)
                            continue
                        slot = (probe.sender_tag.value >> 1) & (RAW_SLOTS - 1)
                        buf = np.empty(probe.length, dtype=np.uint8)
                        waiting.pop(slot).set_result((buf, probe))

                dispatcher = None
                if op == RAW_PROBE and width > 1:
                    dispatcher = asyncio.ensure_future(dispatch())
                try:
                    yield call_probed if op == RAW_PROBE else call_known
                    if not count:  # a timed phase: each slot ends with a marked message
                        stop = bytes([RAW_END]) * size
                        call = call_probed if op == RAW_PROBE else call_known
                        await asyncio.gather(*(call(stop) for _ in range(width)))
                    await ep.recv(ctrl, tag=base + 1, force_tag=True)
                finally:
                    if dispatcher is not None:
                        dispatcher.cancel()

            return phase

        rows = {}
        for label, op in (("probe", RAW_PROBE), ("known", RAW_KNOWN)):
            phase = session(op)
            rows[label] = await measure(None, args, args.server_pid, phase, label)
        ctrl[:] = (RAW_QUIT, 0, 0, 0)
        await ep.send(ctrl, tag=base, force_tag=True)
        await ep.close()
        return rows

    return uvloop.run(main())


# -- orchestration ----------------------------------------------------------------------------

ROLES: dict[str, tuple[Callable[[], None], Callable[[argparse.Namespace], dict[str, Any]]]] = {
    "ucxrpc": (ucxrpc_server, ucxrpc_client),
    "ucxrpc-tcp": (ucxrpc_server, ucxrpc_client),
    "msgpack-rpc": (msgpack_server, msgpack_client),
    "grpc": (grpc_server, grpc_client),
    "raw-ucxx": (raw_server, raw_client),
    "raw-ucxx-tcp": (raw_server, raw_client),
}
ENV: dict[str, dict[str, str]] = {
    "ucxrpc-tcp": {"UCX_TLS": "tcp", "UCXRPC_SHARED_MEMORY": "false"},
    "raw-ucxx-tcp": {"UCX_TLS": "tcp"},
}
# Why a row has "-" where it has: printed under the tables.
NOT_MEASURED = {
    "streams": "msgpack-RPC has no streams; raw ucxx has none (tagged messages only)",
    "connections": "raw ucxx: an endpoint made from a worker address has no handshake "
    "(nothing to time) and no server-side state per peer until used",
}


def run_system(
    name: str, args: argparse.Namespace, budget: float, on_phase: Callable[[str], None]
) -> dict[str, Any]:
    """One system's server and client, each in its own process; the client's result."""
    env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n", UCX_NET_DEVICES="lo", **ENV.get(name, {}))
    if not args.no_huge:  # a 256 MiB value plus its frame is over the default limit
        env["UCXRPC_MAX_MESSAGE_SIZE"] = str(2 * HUGE)
    base = [sys.executable, __file__, "--system", name]
    server = subprocess.Popen(
        [*base, "--role", "server"], stdout=subprocess.PIPE, text=True, env=env
    )
    client = None
    timer = threading.Timer(budget, server.kill)  # a wedged server must not hang the run
    timer.start()
    try:
        assert server.stdout is not None
        line = server.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError(f"{name} server did not start")
        extra = ["--address", line[1], "--server-pid", str(server.pid), *_phase_args(args)]
        client = subprocess.Popen(
            [*base, "--role", "client", *extra], stdout=subprocess.PIPE, text=True, env=env
        )
        timer.cancel()
        timer = threading.Timer(budget, client.kill)
        timer.start()
        assert client.stdout is not None
        last = ""
        for out in client.stdout:  # ends when the client exits (or is killed at the budget)
            if out.startswith("PHASE "):
                on_phase(out[6:].strip())
            elif out.strip():
                last = out
        client.wait()
        if not timer.is_alive():
            raise RuntimeError(f"{name} did not finish within its {budget:.0f} s")
        if client.returncode != 0:
            raise RuntimeError(f"{name} client failed ({client.returncode})")
        result: dict[str, Any] = json.loads(last)
        return result
    finally:
        timer.cancel()
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()


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
        "--huge-rounds",
        str(args.huge_rounds),
        "--items",
        str(args.items),
        "--conns",
        str(args.conns),
        *(["--no-huge"] if args.no_huge else []),
    ]


COLUMNS = [
    ("p50_us", "p50 µs", True),
    ("p99_us", "p99 µs", True),
    *[(f"calls_per_s_{w}", f"calls/s @{w}", False) for w in WIDTHS],
    *[(f"mib_per_s_{size}", f"{_size_label(size)} MiB/s", False) for size in (*SIZES, HUGE)],
    ("idle_cpu_server_pct", "idle CPU srv %", True),
    ("idle_cpu_client_pct", "idle CPU cli %", True),
]
EXTRA_COLUMNS = [
    ("server_stream_items_per_s", "server stream items/s", False),
    ("client_stream_items_per_s", "client stream items/s", False),
    ("connect_ms_p50", "connect ms p50", True),
    ("conns_per_s", "connections/s", False),
    ("kib_per_conn", "server KiB/conn", True),
    ("p50_us_conns_open", "p50 µs, conns open", True),
]


def reference(name: str) -> str:
    """The ucxrpc row a row is compared with: raw ucxx over TCP against ucxrpc over TCP
    (the same transport), every other row against ucxrpc with its defaults."""
    return "ucxrpc-tcp" if name.startswith("raw-ucxx-tcp") else "ucxrpc"


def ratio(ours: float, theirs: float, lower_is_better: bool) -> str:
    if not ours or not theirs:
        return ""
    value = theirs / ours if lower_is_better else ours / theirs
    return f" ({value:.2f}x)"


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    for columns in (COLUMNS, EXTRA_COLUMNS):
        _print_table(rows, columns)
    print(
        "\nratios: ucxrpc against the peer (above 1: ucxrpc is better); raw-ucxx-tcp rows "
        "against ucxrpc-tcp, the others against ucxrpc"
    )


def _print_table(rows: dict[str, dict[str, Any]], columns: list[tuple[str, str, bool]]) -> None:
    print("\n| system | " + " | ".join(label for _, label, _ in columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for name, row in rows.items():
        ref = rows.get(reference(name), {})
        cells = []
        for key, _, lower in columns:
            if key not in row:
                cells.append("-")
                continue
            value = row[key]
            shown = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
            mine = name == reference(name)
            cells.append(shown + ("" if mine else ratio(ref.get(key, 0), value, lower)))
        print(f"| {name} | " + " | ".join(cells) + " |")


def footnotes(rows: dict[str, dict[str, Any]], skipped: dict[str, str]) -> list[str]:
    """Why a cell is "-", and calls that failed (counted, not in calls/s)."""
    notes = []
    for name, row in rows.items():
        for width in WIDTHS:
            if row.get(f"failed_{width}"):
                notes.append(
                    f"{name}: {row[f'failed_{width}']:,} calls failed with {width} in flight"
                )
        fds = row.get("server_fds_added")
        if fds is not None and fds < row["conns"]:
            notes.append(f"{name}: {row['conns']:,} connections but {fds:,} server sockets")
    if any("server_stream_items_per_s" not in row for row in rows.values()):
        notes.append(f"no streams: {NOT_MEASURED['streams']}")
    if any(name.startswith("raw-ucxx") for name in rows):
        notes.append(f"no connections: {NOT_MEASURED['connections']}")
    notes += [f"skipped {name}: {why}" for name, why in skipped.items()]
    return notes


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
        (f"mib_per_s_{HUGE}", "256 MiB echo MiB/s"),
    ]
    panels = [(key, title) for key, title in panels if any(key in row for row in rows.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    try:
        for ax, (key, title) in zip(axes[0], panels, strict=True):
            names = [n for n in rows if key in rows[n]]
            colors = ["#cc6677" if n.startswith("ucxrpc") else "#4477aa" for n in names]
            ax.bar(names, [rows[n][key] for n in names], color=colors)
            ax.set_title(title)
            if key == "p50_us":
                ax.set_yscale("log")
            ax.tick_params(axis="x", rotation=55, labelsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    print(f"plot {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["parent", "server", "client"], default="parent")
    ap.add_argument("--system", default="")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--address", default="", help=argparse.SUPPRESS)  # the server's READY
    ap.add_argument("--server-pid", type=int, default=0)
    ap.add_argument("--iters", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=2.0, help="per calls/s phase")
    ap.add_argument("--bw-bytes", type=int, default=256 << 20, help="bytes per bandwidth phase")
    ap.add_argument("--huge-rounds", type=int, default=3, help="timed 256 MiB round trips")
    ap.add_argument("--no-huge", action="store_true", help="leave out the 256 MiB echo")
    ap.add_argument("--huge", action="store_true", help=argparse.SUPPRESS)  # now the default
    ap.add_argument("--time-budget", type=float, default=240.0, help="seconds per system")
    ap.add_argument("--total-budget", type=float, default=570.0, help="seconds for the run")
    ap.add_argument("--quick", action="store_true", help="a smoke run (seconds, not minutes)")
    ap.add_argument("--items", type=int, default=20000, help="items per stream phase")
    ap.add_argument("--conns", type=int, default=1000, help="connections held open")
    ap.add_argument("--out", default="bench-results/compare.json")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.warmup, args.seconds, args.bw_bytes = 500, 50, 0.3, 32 << 20
        args.items, args.conns, args.huge_rounds = 2000, 50, 1
    if args.role == "server":
        ROLES[args.system][0]()
        return
    if args.role == "client":
        args.port = int(args.address) if args.address.isdigit() else 0
        print(json.dumps(ROLES[args.system][1](args)), flush=True)
        return

    from rich.progress import Progress, TimeElapsedColumn

    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ROLES))
    if unknown:
        ap.error(f"unknown systems: {', '.join(unknown)} (known: {', '.join(SYSTEMS)})")
    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    durations: dict[str, float] = {}
    started = time.monotonic()
    with Progress(*Progress.get_default_columns(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("systems", total=len(names))
        for name in names:
            left = args.total_budget - (time.monotonic() - started)

            def on_phase(label: str, name: str = name) -> None:
                bar.update(task, description=f"{name}: {label}")

            on_phase("starting")
            try:
                if left < 10:
                    raise RuntimeError(f"over the run's budget of {args.total_budget:.0f} s")
                if name == "grpc" and importlib.util.find_spec("grpc") is None:
                    raise RuntimeError("grpcio is not installed (pip install grpcio)")
                t0 = time.monotonic()
                result = run_system(name, args, min(args.time_budget, left), on_phase)
                durations[name] = round(time.monotonic() - t0, 1)
                if name.startswith("raw-ucxx"):
                    rows[name] = result["probe"]
                    rows[f"{name} (sizes known)"] = result["known"]
                else:
                    rows[name] = result
            except Exception as exc:  # one system failing must not lose the others
                skipped[name] = str(exc)
            bar.advance(task)
    took = time.monotonic() - started
    print_table(rows)
    for line in footnotes(rows, skipped):
        print(line)
    each = ", ".join(f"{name} {sec:.0f} s" for name, sec in durations.items())
    print(f"\n{len(rows)} rows in {took:.0f} s ({each})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "iters": args.iters,
        "warmup": args.warmup,
        "seconds": args.seconds,
        "bw_bytes": args.bw_bytes,
        "huge_rounds": 0 if args.no_huge else args.huge_rounds,
        "items": args.items,
        "conns": args.conns,
        "quick": args.quick,
        "seconds_taken": round(took, 1),
        "seconds_per_system": durations,
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    result = {"meta": meta, "results": rows, "skipped": skipped, "notes": footnotes(rows, skipped)}
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
