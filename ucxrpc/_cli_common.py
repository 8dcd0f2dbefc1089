"""What the ``ucxrpc`` subcommands share: addresses, errors, JSON output, running."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console

from . import RpcError

__all__ = [
    "CliError",
    "console",
    "default_callers",
    "err_console",
    "fail",
    "format_address",
    "jsonable",
    "load_config",
    "one_line",
    "parse_address",
    "parse_json_arg",
    "run_command",
]

T = TypeVar("T")

console = Console(highlight=False)
#: Progress bars and notes go to stderr, so stdout holds only results.
err_console = Console(stderr=True, highlight=False)


class CliError(Exception):
    """A user mistake: printed as one line on stderr, exit status 1."""


def one_line(text: str) -> str:
    """``text`` on one line (validation messages span several)."""
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    # Plain write: rich would wrap long messages and read brackets as markup.
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def default_callers() -> int:
    """Concurrent callers by default: 4 per core this process may run on, 4 to 64.

    More callers than that queue behind each other on a small machine and lower the
    rate (16 gave fewer calls/s than 8 on 2 cores).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return min(64, max(4, 4 * cores))


def parse_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``[IPv6]:PORT``) into host and port.

    Raises:
        CliError: ``text`` is not a host and a port between 1 and 65535.
    """
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise CliError(f"expected HOST:PORT (like 127.0.0.1:5000), got {text!r}")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts in brackets so that the port stays unambiguous."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_json_arg(text: str, what: str) -> Any:
    """Parse ``text`` as JSON, naming ``what`` in the error.

    Raises:
        CliError: ``text`` is not valid JSON.
    """
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(f"{what} is not valid JSON: {exc}") from None


def jsonable(value: Any) -> Any:
    """``value`` in a form :func:`json.dumps` accepts.

    Bytes print as text when they are UTF-8 and as ``{"base64": ...}`` otherwise;
    arrays as nested lists; models and dataclasses as objects.
    """
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(raw).decode()}
    if hasattr(value, "model_dump"):
        return jsonable(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return jsonable(value.tolist())
    return repr(value)


def load_config(*, connect_timeout: float | None = None) -> Any:
    """The effective :class:`~ucxrpc.Config` (from ``UCXRPC_*``).

    Args:
        connect_timeout: Overrides ``connect_timeout`` (``--connect-timeout``).

    Raises:
        CliError: An environment variable holds an invalid value.
    """
    from pydantic import ValidationError

    from . import Config

    try:
        config = Config()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise CliError(f"invalid configuration: UCXRPC_{field.upper()}: {first['msg']}") from None
    if connect_timeout is not None:
        # Each handshake read waits config.connect_timeout too: both must say the same.
        config = config.model_copy(update={"connect_timeout": connect_timeout})
    return config


def run_command(main: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; user mistakes and call errors become one line.

    Args:
        main: The command's coroutine.

    Returns:
        What ``main`` returned.
    """
    from . import run

    try:
        return run(main)
    except (CliError, RpcError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
