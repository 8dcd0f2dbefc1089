"""Where a small call's time goes: py-spy flame graphs of both sides of a 64 B echo loop.

Starts an echo server and a client calling it back to back, two processes on
127.0.0.1, and records each with ``py-spy record`` (sampling, native frames off) for
``--seconds``. Writes ``server.svg`` and ``client.svg`` (flame graphs) and
``profile.json`` (calls/s, and the share of samples under the functions that matter)
into ``--out``::

    python benchmarks/profile_calls.py --out bench-results/profile
    python benchmarks/profile_calls.py --out docs/img --seconds 8

py-spy reads the other processes' memory (ptrace): run as root or where
``kernel.yama.ptrace_scope`` is 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def serve() -> None:
    import ucxrpc

    server = ucxrpc.Server()

    @server.rpc
    async def echo(data: bytes) -> bytes:
        return data

    async def main() -> None:
        async with ucxrpc.Manager() as manager:
            await server.start(manager, HOST, 0)
            print(f"READY {server.port}", flush=True)
            await server.serve_forever()

    ucxrpc.run(main())


def call(port: int, seconds: float) -> None:
    import ucxrpc

    async def main() -> None:
        async with ucxrpc.Manager() as manager:
            client = await manager.connect(HOST, port)
            data = os.urandom(64)
            for _ in range(500):
                await client.call("echo", data)
            print("WARM", flush=True)
            n, end = 0, time.perf_counter() + seconds
            while time.perf_counter() < end:
                await client.call("echo", data)
                n += 1
            print(f"CALLS {n / seconds:.0f}", flush=True)
            await client.close()

    ucxrpc.run(main())


def _record(pid: int, seconds: float, svg: Path, raw: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    # --nonblocking: read the process without stopping it (two recorders at once).
    argv = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "500"]
    argv.append("--nonblocking")
    subprocess.Popen([*argv, "--format", "raw", "--output", str(raw)], stderr=subprocess.DEVNULL)
    return subprocess.Popen([*argv, "--output", str(svg)], stderr=subprocess.DEVNULL)


# Where the samples of one call fall: a sample counts under the bucket of its innermost
# frame that has one.
BUCKETS = [
    ("ucxx send/receive calls", ("tag_send", "tag_recv", "tag_probe", "_Request")),
    ("engine (progress, probes, completions)", ("engine.py",)),
    ("protocol layer (inbound, outbound)", ("protocol/",)),
    ("wire codec (encode, decode)", ("codec.py",)),
    ("link (frames in and out)", ("link.py",)),
    ("server (dispatch, run the call, reply)", ("server.py", "handlers.py", "context.py")),
    ("client (call, wait for the reply)", ("client.py", "stream.py")),
    ("asyncio / uvloop (tasks, futures, loop)", ("asyncio", "uvloop", "events.py")),
]


def _bucket(frames: list[str]) -> str:
    """The bucket of the innermost frame (leaf first) that falls in one."""
    for frame in frames:
        for name, keys in BUCKETS:
            if any(k in frame for k in keys):
                return name
    return "other"


def shares(raw: Path) -> dict[str, float]:
    """The share of samples per bucket of a py-spy ``raw`` (collapsed stacks) file."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")[::-1]
        total += int(n)
        if frames[0].startswith(("Runner.run", "run_forever", "run_until_complete")):
            counts["idle: waiting in the event loop"] += int(n)  # uvloop's C loop, no Python
            continue
        counts[_bucket(frames)] += int(n)
    return {k: round(100 * v / total, 1) for k, v in counts.most_common()} if total else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["parent", "server", "client"], default="parent")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--out", default="bench-results/profile")
    args = ap.parse_args()
    if args.role == "server":
        serve()
        return
    if args.role == "client":
        call(args.port, args.seconds + 2)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, __file__]
    server = subprocess.Popen([*me, "--role", "server"], stdout=subprocess.PIPE, text=True)
    client = None
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        client = subprocess.Popen(
            [*me, "--role", "client", "--port", str(port), "--seconds", str(args.seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "WARM"
        spies = [
            _record(server.pid, args.seconds, out / "server.svg", out / "server.txt"),
            _record(client.pid, args.seconds, out / "client.svg", out / "client.txt"),
        ]
        line = client.stdout.readline().split()
        calls = float(line[1]) if line and line[0] == "CALLS" else 0.0
        client.wait(timeout=30)
        for spy in spies:
            spy.wait(timeout=60)
        time.sleep(0.5)  # the raw-format recorders finish with the same duration
        result: dict[str, Any] = {"calls_per_s_while_profiled": calls}
        for side in ("server", "client"):
            raw = out / f"{side}.txt"
            result[side] = shares(raw) if raw.exists() else {}
        (out / "profile.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        print(f"flame graphs: {out / 'server.svg'}, {out / 'client.svg'}")
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


if __name__ == "__main__":
    main()
