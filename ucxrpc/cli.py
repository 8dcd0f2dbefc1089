"""The ``ucxrpc`` command."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["app", "main"]

app = typer.Typer(
    name="ucxrpc",
    help="asyncio RPC over UCX tag messaging.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _root() -> None:
    """asyncio RPC over UCX tag messaging."""


@app.command()
def demo(
    pings: Annotated[int, typer.Option(min=1, max=100_000, help="sequential pings")] = 1000,
    progress_mode: Annotated[
        str, typer.Option(help="blocking (balanced), polling (latency) or efficient")
    ] = "blocking",
) -> None:
    """Serve the ping/echo service and call it from a client, in one process on loopback."""
    from .demo import run_demo, summarize
    from .errors import RpcError
    from .manager import run

    try:
        report = run(run_demo(pings=pings, progress_mode=progress_mode))
    except (RpcError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    table = Table(title="ping/echo service on 127.0.0.1")
    table.add_column("call")
    table.add_column("reply")
    for call, reply in report.replies:
        table.add_row(call, reply)
    console.print(table)
    s = summarize(report.rtt_us)
    console.print(
        f"round trip over {len(report.rtt_us)} pings: min {s['min']:.1f} us, "
        f"p50 {s['p50']:.1f} us, p99 {s['p99']:.1f} us"
    )
    console.print(
        f"burst: {report.burst_ok}/{report.burst_size} concurrent calls answered correctly "
        f"in {report.burst_ms:.1f} ms"
    )
    console.print(f"call with a 0.1 s timeout to a 2 s handler: {report.timeout_outcome}")


def main() -> None:
    """Entry point of the ``ucxrpc`` command."""
    app()


if __name__ == "__main__":
    main()
