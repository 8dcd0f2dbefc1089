"""Fairness: how long a ping waits while another client floods the server.

Three processes started with subprocess (fork+exec: this process never initialises
UCX) on 127.0.0.1 with port 0: the server (``tests/helpers/load_server.py``), a ping
client and a flood client (``tests/helpers/load_client.py ping`` / ``flood``). In one
run the ping client measures ``--pings`` pings, one at a time and ``--gap-ms`` apart,
at each priority of ``--priorities``, first with the server idle, then while the flood
client sends bursts of ``--burst`` concurrent 64 B calls (its ``max_inflight``, 1024 by
default, bounds how many are in flight at once), then idle again.

The goal: a ping's p99 under load below 2 ms and within 5x of its idle p99.

Per phase it also reports each process's share of a core and how long it waited,
runnable, for one (``/proc/<pid>/schedstat``: run time and run-queue wait of its main
thread, where the library's work runs), and how busy the machine's cores were and how
much of their time the hypervisor took (``/proc/stat``), to tell a slow program from a
busy machine.

Usage::

    python benchmarks/fairness.py [--pings 2000] [--burst 5000] [--gap-ms 1]
                                  [--priorities 1,2] [--concurrency 1024]
                                  [--json bench-results/fairness.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "helpers"))

from load_common import PRIORITY_NAMES, Children, latency_row

GOAL_P99_US = 2000.0
GOAL_RATIO = 5.0


def _schedstat(pid: int) -> tuple[int, int]:
    """Nanoseconds the process's main thread ran, and waited runnable, so far."""
    try:
        ran, waited, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return 0, 0
    return int(ran), int(waited)


def _cpu_ticks() -> tuple[int, int, int]:
    """The machine's busy, idle and stolen clock ticks so far, summed over its cores."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0, 0
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, idle + iowait, steal


def run(
    pings: int = 2000,
    burst: int = 5000,
    gap_ms: float = 1.0,
    priorities: tuple[int, ...] = (1, 2),
    concurrency: int | None = 1024,
    timeout: float = 600.0,
    logdir: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the three phases once; returns a row per (phase, priority) and the flood's rate.

    Raises:
        RuntimeError: A process failed, or a phase outlasted ``timeout`` seconds.
    """
    rows: list[dict[str, Any]] = []
    with Children(logdir) as kids:
        limit = "none" if concurrency is None else str(concurrency)
        server = kids.start("load_server.py", "--concurrency", limit, env=env)
        port = server.expect("READY", 60)
        pinger = kids.start("load_client.py", "ping", port, env=env)
        flooder = kids.start("load_client.py", "flood", port, str(burst), env=env)
        pinger.expect("READY", 60)
        flooder.expect("READY", 60)

        procs = {"server": server.pid, "ping": pinger.pid, "flood": flooder.pid}
        sched: dict[str, dict[str, tuple[float, float]]] = {}
        machine: dict[str, tuple[float, float]] = {}

        def phase(name: str) -> None:
            before = {k: _schedstat(pid) for k, pid in procs.items()}
            ticks = _cpu_ticks()
            t0 = time.perf_counter()
            for prio in priorities:
                pinger.send(f"run {name} {pings} {prio} {gap_ms}")
                result = json.loads(pinger.expect("RESULT", timeout))
                row = latency_row(name, result["lat_us"])
                row.update(
                    phase=name,
                    priority=PRIORITY_NAMES[prio],
                    errors=result["errors"],
                    seconds=round(result["end"] - result["start"], 2),
                )
                rows.append(row)
            secs = time.perf_counter() - t0
            after = {k: _schedstat(pid) for k, pid in procs.items()}
            busy, idle, steal = (b - a for a, b in zip(ticks, _cpu_ticks(), strict=True))
            total = busy + idle + steal
            machine[name] = (
                (round(100 * busy / total, 1), round(100 * steal / total, 1)) if total else (0, 0)
            )
            sched[name] = {
                k: (
                    round((after[k][0] - before[k][0]) / 1e7 / secs, 1),
                    round((after[k][1] - before[k][1]) / 1e7 / secs, 1),
                )
                for k in procs
            }

        phase("idle")
        flooder.send("go")
        flooder.expect("FLOODING", timeout)
        phase("flood")
        flooder.send("stop")
        flood = json.loads(flooder.expect("STOPPED", timeout))
        phase("idle-after")
        pinger.send("quit")
        flooder.send("quit")
    idle = {r["priority"]: r for r in rows if r["phase"] == "idle"}
    for r in rows:
        base = idle[r["priority"]]["p99_us"]
        r["p99_vs_idle"] = round(r["p99_us"] / base, 2) if base else 0.0
        r["goal_met"] = r["p99_us"] < GOAL_P99_US and r["p99_vs_idle"] <= GOAL_RATIO
    return {
        "pings": pings,
        "burst": burst,
        "gap_ms": gap_ms,
        "server_concurrency": concurrency,
        "rows": rows,
        "flood": flood,
        "sched": sched,
        "machine": machine,
    }


def table(summary: dict[str, Any]) -> str:
    """The run as a Markdown table."""
    s = summary
    f = s["flood"]
    lines = [
        f"{s['pings']:,} pings per row, {s['gap_ms']} ms apart; flood: bursts of "
        f"{s['burst']:,} concurrent 64 B calls, {f['rate']:,.0f} calls/s "
        f"({f['calls']:,} calls, {sum(f['errors'].values())} errors); server "
        f"concurrency {s['server_concurrency']}",
        "",
        "| phase | ping priority | p50 µs | p99 µs | max µs | p99 / idle p99 | goal met | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        lines.append(
            f"| {r['phase']} | {r['priority']} | {r['p50_us']:,.0f} | {r['p99_us']:,.0f} | "
            f"{r['max_us']:,.0f} | {r['p99_vs_idle']:.1f}x | {'yes' if r['goal_met'] else 'no'} | "
            f"{sum(r['errors'].values())} |"
        )
    lines.append(
        f"\ngoal: p99 under flood < {GOAL_P99_US / 1e3:.0f} ms and <= {GOAL_RATIO:.0f}x idle p99"
    )
    if s.get("sched"):
        lines += [
            "",
            "| phase | server: % of a core / % waiting for one | ping client | flood client "
            "| machine: % of its cores busy / stolen |",
            "|---|---|---|---|---|",
        ]
        machine = s.get("machine", {})
        for phase, procs in s["sched"].items():
            cells = " | ".join(f"{run:.0f} / {wait:.0f}" for run, wait in procs.values())
            busy, steal = machine.get(phase, (0, 0))
            lines.append(f"| {phase} | {cells} | {busy:.0f} / {steal:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pings", type=int, default=2000, help="pings per phase and priority")
    ap.add_argument("--burst", type=int, default=5000, help="calls per flood burst")
    ap.add_argument("--gap-ms", type=float, default=1.0, help="pause between pings")
    ap.add_argument("--priorities", default="1,2", help="ping priorities (0 LOW, 1, 2 HIGH)")
    ap.add_argument("--concurrency", default="1024", help="server max_concurrency or 'none'")
    ap.add_argument("--mode", default=None, help="every process's progress_mode")
    ap.add_argument("--json", type=Path, default=Path("bench-results/fairness.json"))
    ns = ap.parse_args()
    limit = None if ns.concurrency == "none" else int(ns.concurrency)
    prios = tuple(int(p) for p in ns.priorities.split(","))
    env = None if ns.mode is None else {"UCXRPC_PROGRESS_MODE": ns.mode}
    t0 = time.monotonic()
    summary = run(ns.pings, ns.burst, ns.gap_ms, prios, limit, env=env)
    summary["mode"] = ns.mode or "default"
    summary["seconds"] = round(time.monotonic() - t0, 1)
    print(table(summary))
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(summary, indent=1))
    print(f"\nwritten to {ns.json}")


if __name__ == "__main__":
    main()
