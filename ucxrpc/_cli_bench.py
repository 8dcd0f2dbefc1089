"""``ucxrpc bench``: calls/s and latency percentiles against a running server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import Client, RpcError, ServerDescription
from ._cli_call import build_arguments, connect, type_name
from ._cli_common import CliError, console, err_console

__all__ = [
    "BenchResult",
    "Latencies",
    "bench",
    "check_outputs",
    "pick_method",
    "print_result",
    "run_compare",
    "write_json",
    "write_plot",
]

#: Latencies kept for percentiles; beyond this a uniform sample is kept (bounded memory).
SAMPLE_CAP = 1_000_000
DESCRIBE = "ucxrpc.describe"
#: The method called without --method (and without --size).
DEFAULT_METHOD = "ping"
#: Seconds between progress bar updates: drawing it often costs calls.
PROGRESS_EVERY = 0.2


class Latencies:
    """Latency samples in microseconds: exact up to :data:`SAMPLE_CAP`, then a uniform
    reservoir sample (the count and the maximum stay exact)."""

    def __init__(self, cap: int = SAMPLE_CAP) -> None:
        self.cap = cap
        self.samples: list[float] = []
        self.count = 0
        self.max = 0.0
        self.errors = 0
        self.first_error: str | None = None
        self._rng = random.Random(0)

    def error(self, exc: BaseException) -> None:
        """Count a failed call (only the first message is kept)."""
        self.errors += 1
        if self.first_error is None:
            self.first_error = str(exc)

    def add(self, us: float) -> None:
        """Record one latency."""
        self.count += 1
        self.max = max(self.max, us)
        if len(self.samples) < self.cap:
            self.samples.append(us)
        else:
            j = self._rng.randrange(self.count)
            if j < self.cap:
                self.samples[j] = us

    def summary(self) -> dict[str, float]:
        """min, mean, p50, p90, p99 and max (0 when there are no samples)."""
        s = sorted(self.samples)
        if not s:
            return dict.fromkeys(("min", "mean", "p50", "p90", "p99", "max"), 0.0)

        def pct(p: float) -> float:
            return s[min(len(s) - 1, int(len(s) * p))]

        return {
            "min": s[0],
            "mean": sum(s) / len(s),
            "p50": pct(0.50),
            "p90": pct(0.90),
            "p99": pct(0.99),
            "max": self.max,
        }


@dataclass
class BenchResult:
    """What ``ucxrpc bench`` measured (written by ``--json``)."""

    address: str
    method: str
    size: int | None
    concurrency: int
    duration_s: float
    calls: int
    errors: int
    calls_per_s: float
    latency_us: dict[str, float]
    first_error: str | None = None
    mib_per_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _takes_one_bytes(info: Any) -> bool:
    props: dict[str, Any] = info.params.get("properties", {})
    required = info.params.get("required", [])
    if len(props) < 1 or len(required) > 1:
        return False
    first = next(iter(props.values()))
    return type_name(first) == "bytes" and (not required or required[0] == next(iter(props)))


def pick_method(description: ServerDescription, method: str | None, size: int | None) -> str:
    """The method to call: ``method`` if given (checked), else the default.

    Without ``method``: with ``size``, a method taking one bytes argument (``echo`` or
    ``blob`` first); else the method named ``ping``. Nothing else is guessed: a
    method picked by its shape may fail or do harm (a user's ``boom``).

    Raises:
        CliError: The method does not exist or streams, or there is no default; the
            message names the method, or the methods there are.
    """
    unary = [m.name for m in description.methods if m.kind == "unary" and m.name != DESCRIBE]
    there = ", ".join(unary) or "none"
    if method is not None:
        info = description.get(method)
        if info is None:
            raise CliError(f"the server has no method {method!r} (its unary methods: {there})")
        if info.kind != "unary":
            raise CliError(f"{method!r} is a streaming method; bench calls unary methods")
        return method
    if size is not None:
        fits = [m for m in description.methods if m.kind == "unary" and _takes_one_bytes(m)]
        fits.sort(key=lambda m: (m.name not in ("echo", "blob"), m.name))
        if not fits:
            raise CliError(
                f"no method takes one bytes argument for --size; name one with --method "
                f"(the server has: {there})"
            )
        return fits[0].name
    info = description.get(DEFAULT_METHOD)
    if info is None or info.kind != "unary" or info.params.get("required"):
        raise CliError(
            f"the server has no method {DEFAULT_METHOD!r} to call without arguments: "
            f"name one with --method (and its arguments with --args); it has: {there}"
        )
    return DEFAULT_METHOD


async def _caller(
    client: Client,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    end: float,
    timeout: float,
    lat: Latencies,
) -> None:
    pc = time.perf_counter_ns
    loop = asyncio.get_running_loop()
    while loop.time() < end:
        t = pc()
        try:
            await client.call(method, *args, timeout=timeout, **kwargs)
        except RpcError as exc:
            lat.error(exc)
            if client.closed:
                return
            continue
        lat.add((pc() - t) / 1000)


async def bench(
    address: str,
    *,
    method: str | None,
    size: int | None,
    concurrency: int,
    duration: float,
    timeout: float,
    args_json: str | None = None,
    connect_timeout: float | None = None,
) -> BenchResult:
    """Call a method from ``concurrency`` callers for ``duration`` seconds.

    Args:
        address: ``HOST:PORT``.
        method: The method (None: the default, see :func:`pick_method`).
        size: Send one random bytes argument of this many bytes.
        concurrency: Concurrent callers.
        duration: Seconds to call for.
        timeout: The deadline of each call.
        args_json: The arguments, as ``ucxrpc call --json`` takes them.
        connect_timeout: Seconds to wait for the connection.

    Raises:
        CliError: No method fits, the first call failed, or every call failed (the
            message names the method).
    """
    if size is not None and args_json is not None:
        raise CliError("give --size (one bytes argument of that size) or --args, not both")
    args: tuple[Any, ...] = () if size is None else (os.urandom(size),)
    kwargs: dict[str, Any] = {}
    if args_json is not None:
        positional, kwargs = build_arguments([], args_json, "--args")
        args = tuple(positional)
    async with connect(address, connect_timeout=connect_timeout) as client:
        description = await client.describe(timeout=timeout)
        name = pick_method(description, method, size)
        # One call first: a method that cannot be called fails here, with its error.
        try:
            await client.call(name, *args, timeout=timeout, **kwargs)
        except RpcError as exc:
            raise CliError(f"bench {name}: the first call failed: {exc}") from None
        err_console.print(
            f"bench {name} on {address}: {concurrency} callers for {duration:g} s",
            markup=False,
        )
        lat = Latencies()
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + duration
        tasks = [
            asyncio.ensure_future(_caller(client, name, args, kwargs, end, timeout, lat))
            for _ in range(concurrency)
        ]
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[calls]} calls"),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
            disable=not err_console.is_terminal,
            # Drawn from here, PROGRESS_EVERY apart: a refresh thread drawing 10 times a
            # second took the GIL from the callers (a quarter of the calls/s).
            auto_refresh=False,
        )
        with progress:
            bar = progress.add_task("calling", total=duration, calls=0)
            try:
                while not all(t.done() for t in tasks):
                    await asyncio.wait(tasks, timeout=PROGRESS_EVERY)
                    now = min(loop.time() - start, duration)
                    progress.update(bar, completed=now, calls=lat.count, refresh=True)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = loop.time() - start
    if lat.count == 0:
        raise CliError(f"bench {name}: every call failed: {lat.first_error or 'none finished'}")
    rate = lat.count / elapsed
    return BenchResult(
        address=address,
        method=name,
        size=size,
        concurrency=concurrency,
        duration_s=round(elapsed, 3),
        calls=lat.count,
        errors=lat.errors,
        calls_per_s=round(rate, 1),
        latency_us={k: round(v, 1) for k, v in lat.summary().items()},
        first_error=lat.first_error,
        mib_per_s=None if size is None else round(2 * size * rate / (1 << 20), 1),
        extra={"samples": lat.samples},
    )


def print_result(result: BenchResult) -> None:
    """Print the numbers as a table."""
    console.print(Text(f"{result.method} on {result.address}", style="bold"))
    table = Table()
    table.add_column("calls", justify="right")
    table.add_column("calls/s", justify="right")
    for key in ("p50", "p90", "p99", "max"):
        table.add_column(f"{key} µs", justify="right")
    if result.mib_per_s is not None:
        table.add_column("MiB/s", justify="right")
    row = [f"{result.calls}", f"{result.calls_per_s:,.0f}"]
    row += [f"{result.latency_us[k]:,.1f}" for k in ("p50", "p90", "p99", "max")]
    if result.mib_per_s is not None:
        row.append(f"{result.mib_per_s:,.1f}")
    table.add_row(*row)
    console.print(table)
    if result.errors:
        console.print(
            f"errors: {result.errors} calls to {result.method} failed (first: "
            f"{result.first_error})",
            markup=False,
        )


def check_outputs(json_file: Path | None, plot: Path | None) -> None:
    """Check that the output files can be written.

    Raises:
        CliError: A directory is missing, or ``plot`` is given without matplotlib.
    """
    for path in (json_file, plot):
        if path is not None and not path.parent.is_dir():
            raise CliError(f"cannot write {path}: no directory {path.parent}")
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise CliError("--plot needs matplotlib (pip install 'ucxrpc[plot]')")


def write_json(result: BenchResult, path: Path) -> None:
    """Write the numbers (not the samples) to ``path``."""
    data = asdict(result)
    data.pop("extra")
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_plot(result: BenchResult, path: Path) -> None:
    """Write a latency histogram to ``path`` (PNG), with the p50 and p99 marked.

    Raises:
        CliError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise CliError("--plot needs matplotlib (pip install 'ucxrpc[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples: list[float] = result.extra["samples"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        # Log-spaced bins on a log axis: one outlier (a GC pause, a page fault) no
        # longer squeezes every other call into one bar.
        low = max(min(samples, default=1.0), 0.01)
        high = max(max(samples, default=1.0), low * 1.01)
        bins = [low * (high / low) ** (i / 99) for i in range(100)]
        ax.hist(samples, bins=bins, color="#4c72b0")
        ax.set_xscale("log")
        for key, style in (("p50", "--"), ("p99", ":")):
            value = result.latency_us[key]
            ax.axvline(value, color="#c44e52", linestyle=style, label=f"{key} {value:,.1f} µs")
        ax.set_xlabel("latency (µs, log scale)")
        ax.set_ylabel("calls")
        ax.set_title(
            f"{result.method}: {result.calls:,} calls, {result.calls_per_s:,.0f} calls/s, "
            f"{result.concurrency} callers"
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def compare_script() -> Path | None:
    """The comparison benchmark of the source tree ucxrpc runs from (``benchmarks/
    compare.py`` beside the package, or in the current directory), if there is one."""
    package = Path(__file__).resolve().parent
    for root in (package.parent, Path.cwd()):
        script = root / "benchmarks" / "compare.py"
        if script.is_file():
            return script
    return None


def run_compare(*, quick: bool = False, out: Path | None = None) -> int:
    """Run the comparison benchmark (its table, JSON and plot) and return its exit status.

    Raises:
        CliError: There is no source tree with the benchmark (an installed wheel).
    """
    script = compare_script()
    if script is None:
        raise CliError(
            "the comparison benchmark comes with the source tree (benchmarks/compare.py): "
            "run this from a clone of ucxrpc"
        )
    argv = [sys.executable, str(script)]
    if quick:
        argv.append("--quick")
    if out is not None:
        argv += ["--out", str(out)]
    return subprocess.call(argv)
