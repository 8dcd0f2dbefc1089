"""Load: many client processes against one server process, none of their calls lost,
duplicated or answered wrongly.

One server (``tests/helpers/load_server.py``, concurrency limit ``--concurrency``) and
``--clients`` client processes (``tests/helpers/load_client.py load``), each started with
subprocess (fork+exec: this process never initialises UCX) on 127.0.0.1 with port 0.
Once every client has connected, they all start at once; each makes ``--calls`` calls of
``echo(cid, seq, data)``, ``--inflight`` at a time, with a priority (HIGH, NORMAL, LOW)
and a size (64 B to 1 MiB, mostly small; ``load_common.SIZES`` / ``WEIGHTS``) drawn per
call from a seeded plan, and a payload derived from its id ``(cid, seq)``. The server
checks each payload against its id and counts every id; each client checks that every
reply is its own id and bytes. At the end a fresh client fetches the server's count
(``tally``): no id may be missing, seen twice, or unexpected.

Reported: calls/s over the whole run (first start to last end), p50/p99 latency of a
call overall, per priority and per size, and every failure.

Usage::

    python benchmarks/load.py [--clients 50] [--calls 10000] [--inflight 4]
                              [--concurrency 64] [--seed 1] [--json bench-results/load.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "helpers"))

from load_common import PRIORITY_NAMES, SIZES, Children, latency_row


def run(
    clients: int = 50,
    calls: int = 10_000,
    inflight: int = 4,
    concurrency: int | None = 64,
    seed: int = 1,
    timeout: float = 900.0,
    logdir: Path | None = None,
    client_mode: str | None = None,
) -> dict[str, Any]:
    """Run the load once; returns the figures and every failure (see the module doc).

    Raises:
        RuntimeError: A process failed to start, failed, or the run outlasted ``timeout``
            seconds (a hang).
    """
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(deadline - time.monotonic(), 1.0)

    with Children(logdir) as kids:
        limit = "none" if concurrency is None else str(concurrency)
        server = kids.start("load_server.py", "--concurrency", limit)
        port = server.expect("READY", 60)
        env = None if client_mode is None else {"UCXRPC_PROGRESS_MODE": client_mode}
        outs = [kids.logdir / f"client-{cid}.json" for cid in range(clients)]
        procs = [
            kids.start(
                "load_client.py",
                "load",
                port,
                str(cid),
                str(calls),
                str(inflight),
                str(seed),
                str(outs[cid]),
                env=env,
            )
            for cid in range(clients)
        ]
        t_start = time.monotonic()
        for proc in procs:
            proc.expect("READY", left())
        startup = time.monotonic() - t_start
        for proc in procs:
            proc.send("GO")
        for proc in procs:
            proc.expect("DONE", left())
        results = [json.loads(out.read_text()) for out in outs]
        counted = json.loads(
            kids.start("load_client.py", "tally", port, str(clients), str(calls)).expect(
                "TALLY", left()
            )
        )
    return summarize(
        results, client_mode, counted, clients, calls, inflight, concurrency, seed, startup
    )


def summarize(
    results: list[dict[str, Any]],
    client_mode: str | None,
    counted: dict[str, Any],
    clients: int,
    calls: int,
    inflight: int,
    concurrency: int | None,
    seed: int,
    startup: float,
) -> dict[str, Any]:
    """The run's figures from every client's results and the server's tally."""
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    by_prio: dict[int, list[float]] = {p: [] for p in PRIORITY_NAMES}
    by_size: dict[int, list[float]] = {s: [] for s in SIZES}
    for r in results:
        for p, values in r["lat_us"].items():
            by_prio[int(p)].extend(values)
        for size, values in r["lat_by_size_us"].items():
            by_size[int(size)].extend(values)
    everything = [x for v in by_prio.values() for x in v]
    errors: dict[str, int] = {}
    for r in results:
        for name, n in r["errors"].items():
            errors[name] = errors.get(name, 0) + n
    ok = sum(r["ok"] for r in results)
    seconds = end - start
    return {
        "clients": clients,
        "calls_per_client": calls,
        "inflight_per_client": inflight,
        "server_concurrency": concurrency,
        "client_mode": client_mode or "default",
        "seed": seed,
        "startup_s": round(startup, 1),
        "seconds": round(seconds, 2),
        "calls": clients * calls,
        "ok": ok,
        "wrong": sum(r["wrong"] for r in results),
        "errors": errors,
        "examples": [e for r in results for e in r["examples"]][:20],
        "calls_per_s": round(ok / seconds) if seconds > 0 else 0,
        "latency": [latency_row("all", everything)]
        + [latency_row(PRIORITY_NAMES[p], by_prio[p]) for p in sorted(by_prio, reverse=True)],
        "latency_by_size": [latency_row(f"{s} B", by_size[s]) for s in SIZES],
        "tally": counted["tally"],
        "server_after": counted["stats"],
    }


def table(summary: dict[str, Any]) -> str:
    """The run as Markdown tables."""
    s = summary
    t = s["tally"]
    lines = [
        f"{s['clients']} clients x {s['calls_per_client']:,} calls ({s['inflight_per_client']} "
        f"in flight each; server concurrency {s['server_concurrency']}; client progress "
        f"mode {s['client_mode']}); "
        f"{s['seconds']} s after a {s['startup_s']} s start-up",
        "",
        "| calls | ok | wrong replies | errors | missing | duplicated | unexpected | bad bytes "
        "| calls/s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {s['calls']:,} | {s['ok']:,} | {s['wrong']} | {sum(s['errors'].values())} | "
        f"{t['missing']} | {t['duplicated']} | {t['unexpected']} | {t['bad']} | "
        f"{s['calls_per_s']:,} |",
        "",
        "| calls of | count | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for row in s["latency"] + s["latency_by_size"]:
        lines.append(
            f"| {row['label']} | {row['calls']:,} | {row['p50_us'] / 1e3:.2f} | "
            f"{row['p99_us'] / 1e3:.2f} | {row['max_us'] / 1e3:.2f} |"
        )
    if s["errors"] or s["examples"] or t["examples"]:
        lines += ["", f"errors: {s['errors']}", *s["examples"], *t["examples"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--calls", type=int, default=10_000, help="calls per client")
    ap.add_argument("--inflight", type=int, default=4, help="calls in flight per client")
    ap.add_argument("--concurrency", default="64", help="the server's max_concurrency (or 'none')")
    ap.add_argument(
        "--client-mode",
        default=None,
        help="the clients' progress_mode (default: the library's, or UCXRPC_PROGRESS_MODE)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800.0, help="bound on the whole run (s)")
    ap.add_argument("--json", type=Path, default=Path("bench-results/load.json"))
    ns = ap.parse_args()
    limit = None if ns.concurrency == "none" else int(ns.concurrency)
    summary = run(
        ns.clients, ns.calls, ns.inflight, limit, ns.seed, ns.timeout, client_mode=ns.client_mode
    )
    print(table(summary))
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(summary, indent=1))
    print(f"\nwritten to {ns.json}")
    t = summary["tally"]
    failed = summary["wrong"] or summary["errors"] or t["missing"] or t["duplicated"]
    sys.exit(1 if failed or t["unexpected"] or t["bad"] else 0)


if __name__ == "__main__":
    main()
