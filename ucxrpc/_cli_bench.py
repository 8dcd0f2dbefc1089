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
from ._cli_call import connect, type_name
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
    """The method to call: ``method`` if given (checked), else a fitting one.

    With ``size``, the method must take one bytes argument (``echo``/``blob``-like);
    without, it is called with no arguments (``ping``-like, else ``ucxrpc.describe``).

    Raises:
        CliError: The method does not exist, streams, or none fits.
    """
    if method is not None:
        info = description.get(method)
        if info is None:
            raise CliError(f"the server has no method {method!r}")
        if info.kind != "unary":
            raise CliError(f"{method!r} is a streaming method; bench calls unary methods")
        return method
    unary = [m for m in description.methods if m.kind == "unary" and m.name != DESCRIBE]
    if size is not None:
        fits = [m for m in unary if _takes_one_bytes(m)]
        fits.sort(key=lambda m: ("echo" not in m.name and "blob" not in m.name, m.name))
        if not fits:
            raise CliError("no method takes one bytes argument; name one with --method")
        return fits[0].name
    no_args = [m for m in unary if not m.params.get("required")]
    no_args.sort(key=lambda m: ("ping" not in m.name, m.name))
    return no_args[0].name if no_args else DESCRIBE


async def _caller(
    client: Client,
    method: str,
    args: tuple[Any, ...],
    end: float,
    timeout: float,
    lat: Latencies,
) -> None:
    pc = time.perf_counter_ns
    loop = asyncio.get_running_loop()
    while loop.time() < end:
        t = pc()
        try:
            await client.call(method, *args, timeout=timeout)
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
) -> BenchResult:
    """Call a method from ``concurrency`` callers for ``duration`` seconds.

    Raises:
        CliError: No method fits, or every call failed.
    """
    async with connect(address) as client:
        description = await client.describe(timeout=timeout)
        name = pick_method(description, method, size)
        args: tuple[Any, ...] = () if size is None else (os.urandom(size),)
        # One call first: a method that cannot be called fails here, with its error.
        await client.call(name, *args, timeout=timeout)
        err_console.print(
            f"bench {name} on {address}: {concurrency} callers for {duration:g} s",
            markup=False,
        )
        lat = Latencies()
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + duration
        tasks = [
            asyncio.ensure_future(_caller(client, name, args, end, timeout, lat))
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
        )
        with progress:
            bar = progress.add_task("calling", total=duration, calls=0)
            try:
                while not all(t.done() for t in tasks):
                    await asyncio.wait(tasks, timeout=0.1)
                    now = min(loop.time() - start, duration)
                    progress.update(bar, completed=now, calls=lat.count)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = loop.time() - start
    if lat.count == 0:
        raise CliError(f"every call failed: {lat.first_error or 'no call finished'}")
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
        console.print(f"errors: {result.errors} (first: {result.first_error})", markup=False)


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
        ax.hist(samples, bins=100, color="#4c72b0")
        for key, style in (("p50", "--"), ("p99", ":")):
            value = result.latency_us[key]
            ax.axvline(value, color="#c44e52", linestyle=style, label=f"{key} {value:,.1f} µs")
        ax.set_xlabel("latency (µs)")
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
