"""``ucxrpc serve MODULE:ATTR``: serve a :class:`~ucxrpc.Server` object until a signal."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import signal
import sys
import traceback
import warnings
from typing import TYPE_CHECKING, Any

from . import InsecureWarning, Manager, Server
from ._cli_common import CliError, format_address, load_config

if TYPE_CHECKING:
    from .metrics import Metrics, MetricsEndpoint

__all__ = ["import_server", "serve"]


_FRAMEWORK = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(importlib.__file__)) + os.sep,
)


def _users(te: traceback.TracebackException) -> None:
    """Drop the framework's frames (importlib, ucxrpc) from ``te``."""
    frames = [
        f
        for f in te.stack
        if not f.filename.startswith("<frozen ")
        and not os.path.abspath(f.filename).startswith(_FRAMEWORK)
    ]
    te.stack = traceback.StackSummary.from_list(frames)


def user_error(what: str, exc: BaseException) -> CliError:
    """Print the user's frames of ``exc`` on stderr; the error to raise after them.

    A module that fails at import shows where in the user's code, not fifty lines of
    importlib and ucxrpc.
    """
    te = traceback.TracebackException.from_exception(exc)
    _users(te)
    if te.stack:  # no user frame left (a C extension): the one line says it all
        frames = "".join(te.stack.format())
        sys.stderr.write(f"Traceback (most recent call last):\n{frames}")
        sys.stderr.flush()
    return CliError(f"{what}: {type(exc).__name__}: {exc}")


def _import_target(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"expected MODULE:ATTR (like app:server), got {target!r}")
    # Like uvicorn: modules in the current directory are importable.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the user's module raised: their frames, then one line
        raise user_error(f"cannot import {module_name!r}", exc) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


async def import_server(target: str) -> Server:
    """Import ``MODULE:ATTR``: a :class:`~ucxrpc.Server`, or a factory returning one.

    The factory takes no arguments and may be async.

    Raises:
        CliError: The module or attribute is missing or is not a server.
    """
    obj = _import_target(target)
    if not isinstance(obj, Server) and callable(obj):
        try:
            inspect.signature(obj).bind()
        except TypeError:
            raise CliError(f"{target} must be a Server or take no arguments") from None
        except ValueError:
            pass  # no signature to check (builtins): just call it
        try:
            obj = obj()
            if inspect.isawaitable(obj):
                obj = await obj
        except Exception as exc:
            raise user_error(f"{target}() failed", exc) from None
        if not isinstance(obj, Server):
            raise CliError(f"{target}() returned a {type(obj).__name__}, not a ucxrpc.Server")
    if not isinstance(obj, Server):
        raise CliError(f"{target} is a {type(obj).__name__}, not a ucxrpc.Server")
    return obj


async def serve(
    target: str,
    *,
    host: str,
    port: int,
    metrics_port: int | None,
    mode: str,
    grace: float,
) -> None:
    """Serve ``target`` until SIGINT or SIGTERM, then drain calls for up to ``grace`` s.

    Prints ``serving TARGET on HOST:PORT`` once listening (and the metrics address).
    The metrics port is bound first: when it cannot be, nothing is served.
    """
    config = load_config()
    try:
        manager = Manager(config, progress_mode=mode)
    except ValueError:
        raise CliError(f"unknown progress mode {mode!r} (blocking, polling or efficient)") from None
    server = await import_server(target)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with manager:
            endpoint = None
            if metrics_port is not None:
                endpoint = await _serve_metrics(_metrics_for(server), host, metrics_port)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", InsecureWarning)
                    await server.start(manager, host, port)
                for warning in caught:
                    print(f"warning: {warning.message}", file=sys.stderr, flush=True)
                print(f"serving {target} on {format_address(host, server.port)}", flush=True)
                if endpoint is not None:
                    where = format_address(host, endpoint.port)
                    print(f"metrics on http://{where}/metrics", flush=True)
                await _until_stopped(server, stop)
                # A second signal while draining stops waiting for the calls in flight.
                drain = asyncio.ensure_future(server.stop(grace=grace))
                for sig in signals:
                    loop.add_signal_handler(sig, drain.cancel)
                try:
                    await drain
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
            finally:
                if endpoint is not None:
                    await endpoint.close()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _until_stopped(server: Server, stop: asyncio.Event) -> None:
    """Wait for a signal, or for the server to be stopped by one of its own handlers."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(server.serve_forever())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _serve_metrics(metrics: Metrics, host: str, port: int) -> MetricsEndpoint:
    from .metrics import start_metrics_http

    try:
        endpoint = await start_metrics_http(metrics, host, port)
    except ImportError as exc:
        raise CliError(f"--metrics-port: {exc}") from None
    except OSError as exc:
        where = format_address(host, port)
        raise CliError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
    return endpoint


def _metrics_for(server: Server) -> Metrics:
    from .metrics import enable_metrics

    return enable_metrics(server)
