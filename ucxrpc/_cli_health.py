"""``ucxrpc health``: a server's health status, for people and orchestrators' probes.

It prints the status (``SERVING``, ``NOT_SERVING``, ``UNKNOWN``) on one line and exits
0 only for ``SERVING``; anything else, an unknown service or a server that cannot be
reached in time, exits 1 (an error is one line on stderr), like ``grpc_health_probe``.
"""

from __future__ import annotations

import asyncio
import sys

from . import HealthApi, HealthStatus, Manager, RpcError, StatusCode
from ._cli_common import CliError, load_config, parse_address

__all__ = ["exit_code", "health"]


def exit_code(status: HealthStatus | None) -> int:
    """0 for ``SERVING``, 1 for anything else (None: no status was received)."""
    return 0 if status is HealthStatus.SERVING else 1


def _show(status: HealthStatus) -> None:
    # Plain and flushed: a probe or a pipe reads each status as it comes.
    sys.stdout.write(f"{status.value}\n")
    sys.stdout.flush()


def _late(address: str, timeout: float) -> CliError:
    return CliError(f"no answer from {address} within {timeout:g} s")


async def health(address: str, service: str = "", *, watch: bool, timeout: float) -> int:
    """Ask ``address`` for the status of ``service`` and print it.

    Args:
        address: ``HOST:PORT`` of the server.
        service: The service name ("" for the whole server).
        watch: Print each change until the server ends the watch (it does when it
            drains); the exit code follows the last status.
        timeout: Seconds for the connection and the (first) status together.

    Returns:
        The exit code: 0 when the (last) status is ``SERVING``, else 1.

    Raises:
        CliError: The address is malformed, the service is unknown (check only), or no
            answer came within ``timeout``.
        RpcError: The server cannot be reached or the call failed.
    """
    host, port = parse_address(address)
    async with Manager(load_config()) as manager:
        # One budget for the connection and the (first) status, like a probe's timeout.
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                client = await manager.connect(host, port)
        except TimeoutError:
            raise _late(address, timeout) from None
        async with client:
            stub = client.stub(HealthApi)
            try:
                async with asyncio.timeout_at(deadline):
                    if not watch:
                        status = await stub.check(service)
                    else:
                        # Closing the client ends the watch on the server.
                        stream = stub.watch(service)
                        status = await anext(stream)
            except TimeoutError:
                raise _late(address, timeout) from None
            except RpcError as exc:
                if exc.code is StatusCode.NOT_FOUND:
                    raise CliError(f"{address} knows no service {service!r}") from None
                raise
            _show(status)
            if watch:
                async for status in stream:
                    _show(status)
            return exit_code(status)
