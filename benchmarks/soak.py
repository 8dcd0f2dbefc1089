"""Soak: a million calls on one connection leave the server holding what it held before.

Two processes started with subprocess (fork+exec: this process never initialises UCX)
on 127.0.0.1 with port 0: the server (``tests/helpers/load_server.py``) and one client
(``tests/helpers/load_client.py soak``) that makes ``--calls`` calls, ``--concurrency``
at a time, over one connection. Each call is drawn (seeded) from a mix
(``load_client.SOAK_MIX``): mostly echoes of 64 B to 1 MiB whose reply must be the same
bytes; calls whose timeout is shorter than the handler's sleep, calls of a method whose
own (server-side) 5 ms timeout fires with no client timeout, a plain function past its
deadline in the thread pool (each must fail with ``DeadlineExceeded``, never with a
``RemoteError`` wrapping ``TimeoutError``); calls whose task is cancelled mid-call
(``CancelledError``; the handler, 0.5 s asleep, must be cancelled) and handlers that
raise (``RemoteError`` naming ``ValueError``).

The calls run in ``--segments`` segments; after each, once the server holds no call
(calls abandoned by a deadline or a cancel may still be ending there), the client
records the server's ``stats()`` (memory, tasks, calls, posted receives, frames and
parts waiting, ...) and its own. The first segment is the warm-up: "before" is the
state after it, "after" the state at the end; RSS growth must stay under 20 MB and the
tables must be back where they were.

Usage::

    python benchmarks/soak.py [--calls 1000000] [--concurrency 32] [--segments 10]
                              [--seed 1] [--json bench-results/soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "helpers"))

from load_common import Children

#: Server state that must be the same after the soak as before it.
FLAT = (
    "tasks",
    "fds",
    "connections",
    "inflight",
    "streams_credit",
    "input_streams",
    "notes",
    "posted_receives",
    "ucx_requests",
    "awaited_parts",
    "announced_bytes",
    "waiting_frames",
    "pending_sends",
    "shared_held",
)
CLIENT_FLAT = ("tasks", "pending", "posted_receives", "ucx_requests", "awaited_parts")
RSS_LIMIT = 20 * 1000 * 1000
#: Threads the server may have: the main one, the plain handlers' pool (which starts a
#: worker when calls overlap, up to ThreadPoolExecutor's default of cpu_count + 4, at
#: most 32), and the large-copy helper: bounded, not flat.
THREADS_MAX = 2 + min(32, (os.cpu_count() or 1) + 4)


def run(
    calls: int = 1_000_000,
    concurrency: int = 32,
    segments: int = 10,
    seed: int = 1,
    timeout: float = 3600.0,
    logdir: Path | None = None,
) -> dict[str, Any]:
    """Run the soak once; returns the outcomes, the snapshots and the verdicts.

    Raises:
        RuntimeError: A process failed, or the soak outlasted ``timeout`` seconds.
    """
    with Children(logdir) as kids:
        server = kids.start("load_server.py")
        port = server.expect("READY", 60)
        out = kids.logdir / "soak.json"
        client = kids.start(
            "load_client.py",
            "soak",
            port,
            str(calls),
            str(concurrency),
            str(seed),
            str(segments),
            str(out),
        )
        client.expect("READY", 60)
        end = time.monotonic() + timeout
        while True:  # SNAPSHOT lines until DONE, each bounded
            word, rest = client.expect_any(("SNAPSHOT", "DONE"), max(end - time.monotonic(), 1.0))
            if word == "DONE":
                break
            done, secs, rss = rest.split()
            print(f"  {int(done):,} calls, {secs} s, server RSS {rss} MiB", flush=True)
        result = json.loads(out.read_text())
    return verdict(result)


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Add what held: outcomes as expected, RSS growth, flat tables."""
    snaps = result["snapshots"]
    first, before, after = snaps[0], snaps[1] if len(snaps) > 2 else snaps[0], snaps[-1]
    unexpected: dict[str, dict[str, int]] = {}
    for kind, outcomes in result["outcomes"].items():
        allowed = set(result["expected"][kind].split("|"))
        bad = {name: n for name, n in outcomes.items() if name not in allowed}
        if bad:
            unexpected[kind] = bad
    growth = after["server"]["rss"] - before["server"]["rss"]
    changed = {
        k: (before["server"][k], after["server"][k])
        for k in FLAT
        if before["server"][k] != after["server"][k]
    }
    if after["server"]["threads"] > THREADS_MAX:
        changed["threads"] = (before["server"]["threads"], after["server"]["threads"])
    client_changed = {
        k: (before["client"][k], after["client"][k])
        for k in CLIENT_FLAT
        if before["client"][k] != after["client"][k]
    }
    events = after["server"]["events"]
    result.update(
        unexpected=unexpected,
        rss_growth=growth,
        rss_growth_from_start=after["server"]["rss"] - first["server"]["rss"],
        rss_ok=growth < RSS_LIMIT,
        changed=changed,
        client_changed=client_changed,
        handlers_unfinished={
            k: events.get(f"{k}_started", 0)
            - events.get(f"{k}_finished", 0)
            - events.get(f"{k}_cancelled", 0)
            for k in ("nap", "capped")
        },
        calls_per_s=round(result["calls"] / result["seconds"]) if result["seconds"] else 0,
    )
    return result


def table(r: dict[str, Any]) -> str:
    """The soak as Markdown tables."""
    snaps = r["snapshots"]
    before, after = (snaps[1] if len(snaps) > 2 else snaps[0]), snaps[-1]
    lines = [
        f"{r['calls']:,} calls on one connection, {r['concurrency']} at a time: "
        f"{r['seconds']:.1f} s ({r['calls_per_s']:,} calls/s)",
        "",
        "| kind | expected | outcomes |",
        "|---|---|---|",
    ]
    for kind, outcomes in r["outcomes"].items():
        shown = ", ".join(f"{name} {n:,}" for name, n in sorted(outcomes.items()))
        lines.append(f"| {kind} | {r['expected'][kind]} | {shown} |")
    lines += [
        "",
        f"| server state | start | after {before['calls']:,} calls (before) | "
        f"after {after['calls']:,} calls |",
        "|---|---|---|---|",
    ]
    first = snaps[0]
    for key in ("rss", *FLAT, "threads", "gc_objects", "dropped"):
        vals = [s["server"].get(key, "-") for s in (first, before, after)]
        if key == "rss":
            vals = [f"{v / (1 << 20):.1f} MiB" for v in vals]
        lines.append(f"| {key} | " + " | ".join(str(v) for v in vals) + " |")
    lines += ["", "| client state | start | before | after |", "|---|---|---|---|"]
    for key in ("rss", *CLIENT_FLAT, "dropped"):
        vals = [s["client"][key] for s in (first, before, after)]
        if key == "rss":
            vals = [f"{v / (1 << 20):.1f} MiB" for v in vals]
        lines.append(f"| {key} | " + " | ".join(str(v) for v in vals) + " |")
    lines += [
        "",
        "| calls | seconds | server RSS MiB | tasks | gc objects |",
        "|---|---|---|---|---|",
    ]
    for s in snaps:
        srv = s["server"]
        lines.append(
            f"| {s['calls']:,} | {s['seconds']} | {srv['rss'] / (1 << 20):.1f} | {srv['tasks']} "
            f"| {srv.get('gc_objects', '-')} |"
        )
    lines += [
        "",
        f"server RSS growth after the warm-up: {r['rss_growth'] / 1e6:.1f} MB "
        f"(limit {RSS_LIMIT / 1e6:.0f} MB; from the start "
        f"{r['rss_growth_from_start'] / 1e6:.1f} MB)",
        f"server tables changed: {r['changed'] or 'none'}; client: {r['client_changed'] or 'none'}",
        f"unexpected outcomes: {r['unexpected'] or 'none'}; wrong: {r['wrong_count']}",
        f"handlers neither finished nor cancelled: {r['handlers_unfinished']}",
        f"server events: {after['server']['events']}",
    ]
    lines += r["wrong"][:10]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--segments", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path("bench-results/soak.json"))
    ns = ap.parse_args()
    t0 = time.monotonic()
    r = run(ns.calls, ns.concurrency, ns.segments, ns.seed)
    r["wall_s"] = round(time.monotonic() - t0, 1)
    print(table(r))
    print(f"wall time {r['wall_s']} s")
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(r, indent=1))
    print(f"\nwritten to {ns.json}")
    ok = not r["unexpected"] and not r["wrong_count"] and r["rss_ok"] and not r["changed"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
