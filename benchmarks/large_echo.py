"""Where the time of a large echo goes: the round trip, and each side's read of the
peer's memory and copy into ``bytes``, timed in place.

    python benchmarks/large_echo.py [--size-mib 16] [--iters 100] [--json out.json]

Runs a server process and a client (this process) on 127.0.0.1; echoes a ``memoryview``
through a typed stub (no copy the types ask for) and then ``bytes`` (a copy on each
side). Works on older checkouts too (``PYTHONPATH=<checkout>``): where there is no
``ucxrpc.io.copier`` it times ``codec.to_bytes``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import ucxrpc
from ucxrpc.io import shared

HOST = "127.0.0.1"
TIMES: dict[str, list[float]] = {}


def _timed(name: str, fn: Any) -> Any:
    def wrapper(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            TIMES.setdefault(name, []).append(time.perf_counter() - start)

    return wrapper


def _instrument() -> None:
    shared.Peer.read = _timed("read", shared.Peer.read)  # type: ignore[method-assign]
    try:
        from ucxrpc.io import copier as module
    except ImportError:  # a checkout from before the two-core copy
        from ucxrpc.wire import codec as module  # type: ignore[no-redef]
    module.to_bytes = _timed("to_bytes", module.to_bytes)  # type: ignore[assignment]


class Echo(ucxrpc.Service, name="large"):
    @ucxrpc.rpc
    async def view(self, data: memoryview) -> memoryview:
        return data

    @ucxrpc.rpc
    async def echo(self, data: bytes) -> bytes:
        return data

    @ucxrpc.rpc
    async def times(self) -> dict[str, list[float]]:
        out = {k: list(v) for k, v in TIMES.items()}
        TIMES.clear()
        return out


def _median_ms(values: list[float]) -> float:
    values = sorted(values)
    return round(values[len(values) // 2] * 1e3, 3) if values else 0.0


def serve() -> None:
    async def main() -> None:
        server = ucxrpc.Server()
        server.add_service(Echo())
        stopping = asyncio.Event()

        @server.rpc
        async def stop() -> None:
            asyncio.get_running_loop().call_soon(stopping.set)

        async with ucxrpc.Manager() as manager:
            await server.start(manager, HOST, 0)
            print(f"READY {server.port}", flush=True)
            await stopping.wait()
            await server.stop(1.0)

    ucxrpc.run(main())


def client(port: int, size: int, iters: int) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        results: dict[str, Any] = {}
        async with ucxrpc.Manager() as manager:
            conn = await manager.connect(HOST, port)
            stub = conn.stub(Echo)
            payloads: dict[str, Any] = {
                "view": memoryview(bytearray(os.urandom(size))),
                "bytes": os.urandom(size),
            }
            for name, call in (("view", stub.view), ("bytes", stub.echo)):
                data = payloads[name]
                for _ in range(max(iters // 10, 2)):
                    await call(data)
                TIMES.clear()
                await stub.times()
                trips = []
                for _ in range(iters):
                    start = time.perf_counter()
                    reply = await call(data)
                    trips.append(time.perf_counter() - start)
                    del reply
                server_times = await stub.times()
                rtt = _median_ms(trips)
                results[name] = {
                    "round_trip_ms": rtt,
                    "mib_per_s": round(size / (1 << 20) / (rtt / 1e3)),
                    **{f"client_{k}_ms": _median_ms(v) for k, v in TIMES.items()},
                    **{f"server_{k}_ms": _median_ms(v) for k, v in server_times.items()},
                }
            await conn.call("stop")
            await conn.close()
        return results

    return ucxrpc.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["client", "server"], default="client")
    parser.add_argument("--size-mib", type=int, default=16)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    _instrument()
    if args.role == "server":
        serve()
        return
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", "server"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[1])
        results = client(port, args.size_mib << 20, args.iters)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    for name, row in results.items():
        print(name, " ".join(f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
