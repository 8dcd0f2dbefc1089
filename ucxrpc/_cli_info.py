"""``ucxrpc info``: versions, the UCX transports and devices, and the effective config."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

from rich.table import Table
from rich.text import Text

from . import Config, __version__, ucx_info
from ._cli_common import console, load_config

__all__ = ["collect", "print_info"]

# Lines of ucp_context_print_info like "#      resource 2  :  md 1  dev 2  flags -- tcp/lo".


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _config(config: Config) -> dict[str, dict[str, Any]]:
    env = {k.upper() for k in os.environ}
    out: dict[str, dict[str, Any]] = {}
    for name, info in type(config).model_fields.items():
        value = getattr(config, name)
        if name == "auth_token":
            value = None if value is None else "***"
        var = f"UCXRPC_{name.upper()}"
        out[name] = {
            "value": value,
            "source": var if var in env else "default",
            "description": info.description or "",
        }
    return out


def collect() -> dict[str, Any]:
    """Everything ``ucxrpc info`` shows, as plain data.

    Raises:
        CliError: A ``UCXRPC_*`` variable holds an invalid value.
    """
    config = load_config()
    return {
        "ucxrpc": __version__,
        "python": platform.python_version(),
        "ucxx": _distribution_version("ucxx-cu12", "ucxx-cu13", "ucxx"),
        "ucx": ucx_info(config),
        "config": _config(config),
    }


def print_info(info: dict[str, Any]) -> None:
    """Print :func:`collect`'s data as tables."""
    ucx = info["ucx"]
    head = Table(show_header=False)
    head.add_column(style="bold")
    head.add_column()
    head.add_row("ucxrpc", info["ucxrpc"])
    head.add_row("python", info["python"])
    head.add_row("ucxx", info["ucxx"] or "unknown")
    head.add_row("UCX", ucx["version"])
    if "error" in ucx:
        head.add_row("UCX context", Text(f"cannot be created: {ucx['error']}", style="red"))
    for key, value in ucx.get("options", {}).items():
        head.add_row(f"UCX_{key}", Text(value))
    console.print(head)
    if ucx.get("transports"):
        console.print(Text("UCX transports and devices", style="bold"))
        tls = Table()
        tls.add_column("transport", style="bold")
        tls.add_column("devices")
        for tl, devices in ucx["transports"].items():
            tls.add_row(Text(tl), Text(", ".join(devices)))
        console.print(tls)
    console.print(Text("effective configuration (UCXRPC_* variables)", style="bold"))
    cfg = Table()
    cfg.add_column("field", style="bold", no_wrap=True)
    cfg.add_column("value")
    cfg.add_column("source")
    cfg.add_column("description")
    for name, row in info["config"].items():
        value = row["value"]
        shown = "-" if value is None else str(value)
        cfg.add_row(name, Text(shown), row["source"], Text(row["description"]))
    console.print(cfg)
