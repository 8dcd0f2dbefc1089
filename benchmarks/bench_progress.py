"""What ``ucxrpc bench``'s progress bar costs: calls/s with the bar drawn and without.

One server (``ucxrpc serve tests.helpers.cli_app:server``, port 0) and, in turns, the
installed ``ucxrpc bench`` against it: on a pseudo-terminal (the bar is drawn, as a
user sees it) and with its output piped (no bar), ``--rounds`` times each, alternating
so the shared machine's noise falls on both alike.

Usage::

    python benchmarks/bench_progress.py [--rounds 3] [--duration 4]
                                        [--json bench-results/bench_progress.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers.cli_run import UCXRPC, Procs, Terminal, ucxrpc


def _on_a_terminal(address: str, duration: float, out: Path) -> dict[str, Any]:
    term = Terminal(
        UCXRPC, "bench", address, "--duration", str(duration), "--json", str(out),
        env={"TERM": "xterm-256color", "COLUMNS": "100"},
    )  # fmt: skip
    try:
        # wait() keeps reading: a full terminal would block the bar's writes.
        if term.wait(timeout=duration + 60) != 0:
            raise RuntimeError(f"ucxrpc bench failed on the terminal: {term.output[-300:]!r}")
    finally:
        term.close()
    if "calling" not in term.output:
        raise RuntimeError(f"no progress bar was drawn: {term.output[-300:]!r}")
    return dict(json.loads(out.read_text()))


def _piped(address: str, duration: float, out: Path) -> dict[str, Any]:
    done = ucxrpc("bench", address, "--duration", str(duration), "--json", str(out))
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return dict(json.loads(out.read_text()))


def run(rounds: int = 3, duration: float = 4.0) -> dict[str, Any]:
    """Measure both ways ``rounds`` times; returns the calls/s of every run and medians."""
    rates: dict[str, list[float]] = {"bar": [], "no bar": []}
    procs = Procs()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _, address = procs.serve()
            for i in range(rounds):
                for way in ("bar", "no bar") if i % 2 == 0 else ("no bar", "bar"):
                    out = Path(tmp) / f"{way}-{i}.json"
                    measure = _on_a_terminal if way == "bar" else _piped
                    rates[way].append(measure(address, duration, out)["calls_per_s"])
        finally:
            procs.stop()
    medians = {way: statistics.median(r) for way, r in rates.items()}
    return {
        "rounds": rounds,
        "duration_s": duration,
        "calls_per_s": rates,
        "median": medians,
        "bar_vs_no_bar": round(medians["bar"] / medians["no bar"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--json", type=Path, default=Path("bench-results/bench_progress.json"))
    ns = ap.parse_args()
    result = run(ns.rounds, ns.duration)
    print("| ucxrpc bench | calls/s (each run) | median |")
    print("|---|---|---|")
    for way, rates in result["calls_per_s"].items():
        runs = ", ".join(f"{r:,.0f}" for r in rates)
        print(f"| {way} | {runs} | {result['median'][way]:,.0f} |")
    print(f"\nwith the bar: {result['bar_vs_no_bar']:.1%} of the calls/s without it")
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(result, indent=1))
    print(f"written to {ns.json}")


if __name__ == "__main__":
    main()
