"""One client alone: the latency of sequential pings, then calls/s with 64 callers.

The server (``tests/helpers/load_server.py``) runs in a process of its own, started
with subprocess on 127.0.0.1 (port 0) and stopped by its pid; this process is the
client. A quick check, for comparing two builds in turns on a shared machine (run it
with ``PYTHONPATH`` set to the other build's checkout for the other side).

Usage::

    python benchmarks/lone_client.py [--pings 4000] [--seconds 2] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import ucxrpc

SERVER = Path(__file__).resolve().parent.parent / "tests" / "helpers" / "load_server.py"


async def one_round(pings: int, seconds: float) -> tuple[float, float, float]:
    """p50 and p99 of ``pings`` sequential pings (µs), then calls/s with 64 callers."""
    server = await asyncio.create_subprocess_exec(
        sys.executable, str(SERVER), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        port = int((await server.stdout.readline()).split()[1])
        async with ucxrpc.Manager() as manager:
            client = await manager.connect("127.0.0.1", port)
            for _ in range(500):  # warm-up: connection, rings, caches
                await client.call("ping")
            lat = []
            for _ in range(pings):
                t = time.perf_counter()
                await client.call("ping")
                lat.append((time.perf_counter() - t) * 1e6)
            lat.sort()
            done = 0
            end = time.perf_counter() + seconds

            async def caller() -> None:
                nonlocal done
                while time.perf_counter() < end:
                    await client.call("ping")
                    done += 1

            await asyncio.gather(*(caller() for _ in range(64)))
            await client.close()
        return lat[len(lat) // 2], lat[int(len(lat) * 0.99)], done / seconds
    finally:
        server.kill()
        await asyncio.wait_for(server.wait(), 10)


async def main(pings: int, seconds: float, rounds: int) -> None:
    rows = [await one_round(pings, seconds) for _ in range(rounds)]
    for p50, p99, rate in rows:
        print(f"p50 {p50:.0f} µs  p99 {p99:.0f} µs  64 callers {rate:,.0f} calls/s")
    if rounds > 1:
        print(f"median p50 {statistics.median(r[0] for r in rows):.0f} µs")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pings", type=int, default=4000)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=1)
    ns = ap.parse_args()
    ucxrpc.run(main(ns.pings, ns.seconds, ns.rounds))
