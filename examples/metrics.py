"""Metrics: calls, errors, latency and bytes per method, and a Prometheus endpoint.

Run it (server and client in one process)::

    python examples/metrics.py

The server is measured with ``enable_metrics`` and serves the Prometheus text on
``GET /metrics``; the example prints the snapshot as a table, then scrapes the endpoint
with a plain HTTP request and prints the first lines of what a Prometheus server would
read. ``ucxrpc serve --metrics-port`` does the same for a served application.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ucxrpc
from ucxrpc.metrics import enable_metrics, start_metrics_http

server = ucxrpc.Server()


@server.rpc
async def echo(text: str) -> str:
    return text


@server.rpc
async def refuse() -> None:
    raise ucxrpc.RpcError(ucxrpc.StatusCode.PERMISSION_DENIED, "not for you")


def print_table(snapshot: dict[str, Any]) -> None:
    print(f"{'method':<8} {'calls':>5}  {'errors':<20} {'p50':>9} {'p99':>9}")
    for method, m in snapshot["server"].items():
        errors = ", ".join(f"{code}={n}" for code, n in m["errors"].items()) or "-"
        p50, p99 = m["p50_seconds"] * 1e3, m["p99_seconds"] * 1e3
        print(f"{method:<8} {m['calls']:>5}  {errors:<20} {p50:>6.3f} ms {p99:>6.3f} ms")
    t = snapshot["totals"]
    print(
        f"totals: {t['calls']} calls, {t['errors']} errors, {t['bytes_received']} bytes in, "
        f"{t['bytes_sent']} bytes out, {t['connections']} connection(s)"
    )


async def scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    """GET ``path`` with a bare HTTP/1.1 request; the status line and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    async with asyncio.timeout(10):
        response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.decode().partition("\r\n\r\n")
    return head.split("\r\n")[0], body


async def main() -> None:
    metrics = enable_metrics(server)
    async with ucxrpc.Manager() as manager:
        await server.start(manager, "127.0.0.1", 0)
        endpoint = await start_metrics_http(metrics, "127.0.0.1", 0)
        async with await manager.connect("127.0.0.1", server.port) as client:
            for i in range(50):
                await client.call("echo", "x" * i)
            for _ in range(5):
                try:
                    await client.call("refuse")
                except ucxrpc.RpcError:
                    pass
            print_table(metrics.snapshot())

            status, body = await scrape(endpoint.port)
            lines = body.splitlines()
            print(f"GET /metrics -> {status}, {len(lines)} lines; the first ones:")
            for line in lines[:6]:
                print("  " + line)
            print(f"GET /other -> {(await scrape(endpoint.port, '/other'))[0]}")
        await endpoint.close()
        await server.stop(grace=1.0)


if __name__ == "__main__":
    ucxrpc.run(main())
