"""Server streaming between two processes, against sequential unary calls in the same run.

The server process is started with ``subprocess`` and stopped by pid. For each stream
window (``Config.stream_window``) the client measures:

* items/s of a stream of small integers (100,000 items by default);
* MiB/s of a stream of 64 KiB items (each a frame plus an out-of-band part);

and, as the yardstick, sequential unary calls/s returning one small integer each, so
the ratio shows what streaming saves over asking item by item.

Usage::

    python benchmarks/stream.py [--quick] [--windows 8,64,512] [--out bench-results/stream.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
CHUNK = 64 * 1024


def serve() -> None:
    import ucxrpc

    server = ucxrpc.Server()

    @server.rpc
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @server.rpc
    async def chunks(n: int, size: int) -> AsyncIterator[bytes]:
        block = b"\x5a" * size
        for _ in range(n):
            yield block

    @server.rpc
    async def one(i: int) -> int:
        return i

    async def main() -> None:
        async with ucxrpc.Manager() as manager:
            await server.start(manager, HOST, 0)
            print(f"READY {server.port}", flush=True)
            await server.serve_forever()

    ucxrpc.run(main())


async def measure(port: int, window: int, items: int, chunks: int) -> dict[str, Any]:
    import ucxrpc

    async with ucxrpc.Manager(stream_window=window) as manager:
        client = await manager.connect(HOST, port)
        async for _ in client.stream("count", 1000):  # warm-up
            pass
        t0 = time.perf_counter()
        got = 0
        async for _ in client.stream("count", items):
            got += 1
        small = got / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        size = 0
        async for block in client.stream("chunks", chunks, CHUNK):
            size += len(block)
        mib = size / (1 << 20) / (time.perf_counter() - t0)
        n = items // 10
        t0 = time.perf_counter()
        for i in range(n):
            await client.call("one", i)
        unary = n / (time.perf_counter() - t0)
        await client.close()
    return {
        "window": window,
        "stream_items_per_s": round(small),
        "unary_calls_per_s": round(unary),
        "stream_vs_unary": round(small / unary, 2),
        "stream_64k_mib_s": round(mib),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--role", choices=["parent", "server"], default="parent")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--windows", default="8,64,512")
    parser.add_argument("--out", default="bench-results/stream.json")
    args, _ = parser.parse_known_args()  # ./dev bench passes the echo benchmark's options too
    if args.role == "server":
        serve()
        return
    import ucxrpc

    items, chunks = (20_000, 500) if args.quick else (100_000, 3_000)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", "server"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if not line or line[0] != "READY":
            raise SystemExit(f"server did not start: {line!r}")
        port = int(line[1])
        rows = [ucxrpc.run(measure(port, int(w), items, chunks)) for w in args.windows.split(",")]
    finally:
        proc.kill()
        proc.wait(timeout=10)
    print("\nserver streaming, two processes on 127.0.0.1\n")
    print("| window | stream items/s | unary calls/s | ratio | 64 KiB items MiB/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['window']} | {r['stream_items_per_s']:,} | {r['unary_calls_per_s']:,} "
            f"| {r['stream_vs_unary']}x | {r['stream_64k_mib_s']:,} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"items": items, "chunks": chunks, "rows": rows}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
