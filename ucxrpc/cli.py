"""The ``ucxrpc`` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from . import __version__
from ._cli_common import CliError, console, default_callers, fail, jsonable, run_command

__all__ = ["app", "main"]

_CONNECT_TIMEOUT_HELP = "seconds to wait for the connection (default: UCXRPC_CONNECT_TIMEOUT, 10)"


def _blank_flag_types(command: Any, ctx: Any) -> None:
    # typer prints a type next to every option, <bool> next to flags and --help too:
    # an empty metavar leaves the column blank for flags.
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and getattr(param, "metavar", "") is None:
            param.metavar = ""


class _Group(TyperGroup):
    """The command group: help without types next to flags."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _blank_flag_types(command, ctx)
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _blank_flag_types(self, ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(
    name="ucxrpc",
    cls=_Group,
    help="asyncio RPC over UCX tag messaging.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        print(f"ucxrpc {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_print_version,
            is_eager=True,
            help="print the version and exit",
        ),
    ] = False,
) -> None:
    """asyncio RPC over UCX tag messaging."""


@app.command()
def demo(
    pings: Annotated[int, typer.Option(min=1, max=100_000, help="sequential pings")] = 1000,
    progress_mode: Annotated[
        str, typer.Option(help="blocking (balanced), polling (latency) or efficient")
    ] = "blocking",
) -> None:
    """Serve the ping/echo service and call it from a client, in one process on loopback."""
    from . import RpcError, run
    from .demo import run_demo, summarize

    try:
        report = run(run_demo(pings=pings, progress_mode=progress_mode))
    except (RpcError, ValueError) as exc:
        fail(str(exc))
    table = Table(title="ping/echo service on 127.0.0.1")
    table.add_column("call")
    table.add_column("reply")
    for call, reply in report.replies:
        table.add_row(call, reply)
    console.print(table)
    s = summarize(report.rtt_us)
    # Short lines, each a sentence of its own: nothing wraps in 80 columns.
    console.print(
        f"round trip over {len(report.rtt_us)} pings: min {s['min']:.1f} µs, "
        f"p50 {s['p50']:.1f} µs, p99 {s['p99']:.1f} µs"
    )
    console.print(
        f"burst: {report.burst_ok}/{report.burst_size} concurrent calls answered "
        f"in {report.burst_ms:.1f} ms"
    )
    console.print("call with a 0.1 s timeout to a 2 s handler:")
    console.print(f"  {report.timeout_outcome}", markup=False)


@app.command()
def serve(
    target: Annotated[str, typer.Argument(metavar="MODULE:ATTR", help="a Server, or a factory")],
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="0 picks a free port")] = 0,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="serve Prometheus metrics over HTTP on this port"),
    ] = None,
    mode: Annotated[
        str, typer.Option(help="progress mode: blocking, polling or efficient")
    ] = "blocking",
    grace: Annotated[
        float, typer.Option(min=0, help="seconds to let calls in flight finish on shutdown")
    ] = 5.0,
) -> None:
    """Serve a ucxrpc.Server object (like uvicorn) until SIGINT or SIGTERM."""
    from ._cli_serve import serve as run_server

    run_command(
        run_server(target, host=host, port=port, metrics_port=metrics_port, mode=mode, grace=grace)
    )


@app.command()
def call(
    address: Annotated[str, typer.Argument(metavar="HOST:PORT")],
    method: Annotated[str, typer.Argument(metavar="METHOD", help="the method name")],
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ARG",
            help="positional arguments: JSON if they parse as JSON, else strings",
        ),
    ] = None,
    json_args: Annotated[
        str | None,
        typer.Option(
            "--json", help="keyword arguments as a JSON object (or positional ones as an array)"
        ),
    ] = None,
    timeout: Annotated[float | None, typer.Option(min=0, help="deadline in seconds")] = None,
    priority: Annotated[str | None, typer.Option(help="high, normal, low or an integer")] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE, repeatable")
    ] = None,
    connect_timeout: Annotated[
        float | None, typer.Option(min=0.1, help=_CONNECT_TIMEOUT_HELP)
    ] = None,
) -> None:
    """Call a method and print its result as JSON (a stream: one item per line)."""
    from ._cli_call import call as run_call

    run_command(
        run_call(
            address,
            method,
            args or [],
            json_text=json_args,
            timeout=timeout,
            priority=priority,
            metadata=metadata or [],
            connect_timeout=connect_timeout,
        )
    )


@app.command("list")
def list_(
    address: Annotated[str, typer.Argument(metavar="HOST:PORT")],
    schemas: Annotated[bool, typer.Option(help="also print each method's JSON Schemas")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the server's description as JSON")
    ] = False,
    timeout: Annotated[float, typer.Option(min=0, help="seconds to wait for the answer")] = 10.0,
    wide: Annotated[
        bool, typer.Option("--wide", help="one column per attribute, however wide")
    ] = False,
    connect_timeout: Annotated[
        float | None, typer.Option(min=0.1, help=_CONNECT_TIMEOUT_HELP)
    ] = None,
) -> None:
    """List the methods a server serves, with their parameters and result types."""
    from ._cli_call import list_methods

    run_command(
        list_methods(
            address,
            schemas=schemas,
            as_json=as_json,
            timeout=timeout,
            wide=wide,
            connect_timeout=connect_timeout,
        )
    )


@app.command()
def health(
    address: Annotated[str, typer.Argument(metavar="HOST:PORT")],
    service: Annotated[
        str, typer.Argument(metavar="[SERVICE]", help='a service name (default "": the server)')
    ] = "",
    watch: Annotated[
        bool, typer.Option("--watch", help="print each change, until the server drains")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0, help="seconds for the connection and the (first) status")
    ] = 5.0,
) -> None:
    """Print the health status of a server or service; exit 0 only when SERVING (probes)."""
    from ._cli_health import health as run_health

    raise typer.Exit(run_command(run_health(address, service, watch=watch, timeout=timeout)))


@app.command()
def bench(
    address: Annotated[
        str | None,
        typer.Argument(metavar="HOST:PORT", help="the server (not with --compare)"),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="method to call (default: ping; with --size, an echo of one bytes argument)"
        ),
    ] = None,
    args_json: Annotated[
        str | None,
        typer.Option(
            "--args",
            metavar="JSON",
            help="the method's arguments: a JSON array (positional) or object (keywords), "
            "as `ucxrpc call --json` takes them",
        ),
    ] = None,
    size: Annotated[
        int | None, typer.Option(min=0, help="send one bytes argument of this many bytes")
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(min=1, max=10_000, help="concurrent callers (default: 4 per core, 4 to 64)"),
    ] = default_callers(),
    duration: Annotated[float, typer.Option(min=0.1, max=3600, help="seconds to run")] = 5.0,
    timeout: Annotated[float, typer.Option(min=0, help="deadline of each call (s)")] = 10.0,
    json_file: Annotated[
        Path | None,
        typer.Option("--json", metavar="FILE", help="write the numbers to this file"),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="write a latency histogram (PNG) to this file")
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="instead, run the comparison benchmark (ucxrpc, raw ucxx, msgpack-RPC, "
            "gRPC side by side, two processes each) of the source tree",
        ),
    ] = False,
    quick: Annotated[bool, typer.Option(help="with --compare: a smoke run of seconds")] = False,
    connect_timeout: Annotated[
        float | None, typer.Option(min=0.1, help=_CONNECT_TIMEOUT_HELP)
    ] = None,
) -> None:
    """Measure calls/s and latency percentiles of a method on a running server."""
    from ._cli_bench import bench as run_bench
    from ._cli_bench import check_outputs, print_result, run_compare, write_json, write_plot

    if compare:
        if address is not None:
            fail("--compare starts its own servers: give no HOST:PORT")
        try:
            raise typer.Exit(run_compare(quick=quick, out=json_file))
        except CliError as exc:
            fail(str(exc))
    if address is None:
        fail("give the server's HOST:PORT (or --compare to compare ucxrpc with its peers)")

    try:
        check_outputs(json_file, plot)  # before the run, not after it
    except CliError as exc:
        fail(str(exc))
    result = run_command(
        run_bench(
            address,
            method=method,
            size=size,
            concurrency=concurrency,
            duration=duration,
            timeout=timeout,
            args_json=args_json,
            connect_timeout=connect_timeout,
        )
    )
    print_result(result)
    try:
        if json_file is not None:
            write_json(result, json_file)
        if plot is not None:
            write_plot(result, plot)
            console.print(
                f"latency histogram: {plot} (log-spaced bins on a log latency axis)",
                markup=False,
                soft_wrap=True,
            )
    except CliError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {exc.filename}: {exc.strerror or exc}")


@app.command()
def shell(
    address: Annotated[str, typer.Argument(metavar="HOST:PORT")],
    connect_timeout: Annotated[
        float | None, typer.Option(min=0.1, help=_CONNECT_TIMEOUT_HELP)
    ] = None,
) -> None:
    """Interactive: call, stream, list on an RPC server; send, receive on a messaging peer."""
    from . import RpcError
    from ._cli_shell import run_shell

    try:
        raise typer.Exit(run_shell(address, connect_timeout=connect_timeout))
    except (CliError, RpcError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def info(
    as_json: Annotated[bool, typer.Option("--json", help="print machine-readable JSON")] = False,
) -> None:
    """Versions, UCX transports and devices, and the effective configuration."""
    from ._cli_info import collect, print_info

    try:
        data = collect()
    except CliError as exc:
        fail(str(exc))
    if as_json:
        console.print_json(data=jsonable(data))
    else:
        print_info(data)


def main() -> None:
    """Entry point of the ``ucxrpc`` command.

    Usage mistakes (a missing argument, ``--timeout abc``) print one line, like every
    other user mistake, instead of a usage box.
    """
    try:
        code = app(standalone_mode=False)
    except Exception as exc:
        # typer's (vendored) click usage errors: duck-typed, to stay off private modules.
        message = getattr(exc, "format_message", None)
        exit_code = getattr(exc, "exit_code", None)
        if message is None or not isinstance(exit_code, int):
            raise
        text = message()
        if text:
            ctx = getattr(exc, "ctx", None)
            where = getattr(ctx, "command_path", None) or "ucxrpc"
            print(f"error: {text} (see '{where} --help')", file=sys.stderr)
        raise SystemExit(exit_code) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
