"""Metrics over real UCX: snapshots, Prometheus text and the /metrics endpoint."""

from __future__ import annotations

import asyncio
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

import ucxrpc
from ucxrpc.errors import StatusCode
from ucxrpc.interceptors import MethodMetrics
from ucxrpc.metrics import Metrics, enable_metrics, estimate_quantile, start_metrics_http


def make_server() -> ucxrpc.Server:
    server = ucxrpc.Server()

    @server.rpc
    async def echo(text: str) -> str:
        return text

    @server.rpc
    async def refuse() -> None:
        raise ucxrpc.RpcError(StatusCode.PERMISSION_DENIED, "no")

    return server


async def traffic(manager: ucxrpc.Manager) -> tuple[ucxrpc.Server, ucxrpc.Client, Metrics, Metrics]:
    """A server and a client, both measured, after 10 echoes and 3 refusals."""
    server = make_server()
    server_metrics = enable_metrics(server)
    await server.start(manager, "127.0.0.1", 0)
    client = await manager.connect("127.0.0.1", server.port)
    client_metrics = enable_metrics(client)
    for i in range(10):
        assert await client.call("echo", "x" * 100 * i) == "x" * 100 * i
    for _ in range(3):
        with pytest.raises(ucxrpc.RpcError):
            await client.call("refuse")
    with pytest.raises(ucxrpc.InvalidArgument):
        await client.call("echo", 5)
    return server, client, server_metrics, client_metrics


async def test_snapshot_counts_calls_errors_and_bytes(manager: ucxrpc.Manager) -> None:
    server, client, server_metrics, client_metrics = await traffic(manager)
    snap = server_metrics.snapshot()
    assert snap["client"] == {}
    echo = snap["server"]["echo"]
    assert echo["calls"] == 11 and echo["errors"] == {"INVALID_ARGUMENT": 1}
    assert snap["server"]["refuse"]["errors"] == {"PERMISSION_DENIED": 3}
    assert 0 < echo["p50_seconds"] <= echo["p90_seconds"] <= echo["p99_seconds"] < 1.0
    assert 0 < echo["mean_seconds"] < 1.0
    totals = snap["totals"]
    assert totals["calls"] == 14 and totals["errors"] == 4
    assert totals["bytes_sent"] > 0 and totals["bytes_received"] > 4500  # the echoed text
    assert totals["connections"] == 1
    assert totals["uptime_seconds"] > 0

    client_snap = client_metrics.snapshot()
    assert client_snap["server"] == {}
    assert client_snap["client"]["echo"]["calls"] == 11
    # What one side sent, the other received.
    assert client_snap["totals"]["bytes_sent"] == totals["bytes_received"]
    assert client_snap["totals"]["bytes_received"] == totals["bytes_sent"]
    assert client_snap["totals"]["connections"] == 1

    await client.close()
    await server.stop()
    assert server_metrics.snapshot()["totals"]["connections"] == 0
    assert client_metrics.snapshot()["totals"]["connections"] == 0
    # Counters outlive the connections they counted.
    assert server_metrics.snapshot()["totals"]["bytes_sent"] == totals["bytes_sent"]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_prometheus_text(manager: ucxrpc.Manager) -> None:
    server, client, server_metrics, _ = await traffic(manager)
    text = server_metrics.prometheus()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families == {
        "ucxrpc_calls": "counter",
        "ucxrpc_errors": "counter",
        "ucxrpc_call_duration_seconds": "histogram",
        "ucxrpc_sent_bytes": "counter",
        "ucxrpc_received_bytes": "counter",
        "ucxrpc_connections": "gauge",
        "ucxrpc_uptime_seconds": "gauge",
    }
    got = samples(text)
    echo = (("method", "echo"), ("side", "server"))
    assert got["ucxrpc_calls_total", echo] == 11
    assert got["ucxrpc_errors_total", (("code", "INVALID_ARGUMENT"), *echo)] == 1
    refuse = (("code", "PERMISSION_DENIED"), ("method", "refuse"), ("side", "server"))
    assert got["ucxrpc_errors_total", refuse] == 3
    assert got["ucxrpc_call_duration_seconds_count", echo] == 11
    assert got["ucxrpc_call_duration_seconds_bucket", (("le", "+Inf"), *echo)] == 11
    assert got["ucxrpc_call_duration_seconds_bucket", (("le", "10.0"), *echo)] == 11
    assert 0 < got["ucxrpc_call_duration_seconds_sum", echo] < 11
    assert got["ucxrpc_sent_bytes_total", (("side", "server"),)] == server.bytes_sent > 0
    assert got["ucxrpc_received_bytes_total", (("side", "server"),)] == server.bytes_received
    assert got["ucxrpc_connections", (("side", "server"),)] == 1
    assert ("ucxrpc_sent_bytes_total", (("side", "client"),)) not in got  # not bound
    await client.close()
    await server.stop()


async def http_get(port: int, target: str, method: str = "GET") -> tuple[str, dict[str, str], str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(10):
        raw = await reader.read()  # the endpoint closes after one response
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.decode().partition("\r\n\r\n")
    status, *lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, headers, body


async def test_http_endpoint(manager: ucxrpc.Manager) -> None:
    server, client, server_metrics, _ = await traffic(manager)
    async with await start_metrics_http(server_metrics) as endpoint:
        assert endpoint.port > 0
        assert endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics"
        status, headers, body = await http_get(endpoint.port, "/metrics")
        assert status == "HTTP/1.1 200 OK"
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert int(headers["Content-Length"]) == len(body.encode())

        # The same text as prometheus() gives, but for the uptime, which moves.
        def stable(text: str) -> list[str]:
            return [line for line in text.splitlines() if "uptime" not in line]

        assert stable(body) == stable(server_metrics.prometheus())
        assert 'ucxrpc_calls_total{method="echo",side="server"} 11.0' in body

        status, _, body = await http_get(endpoint.port, "/metrics?name=x")
        assert status == "HTTP/1.1 200 OK" and "ucxrpc_calls_total" in body
        status, _, body = await http_get(endpoint.port, "/")
        assert status == "HTTP/1.1 404 Not Found"
        status, _, _ = await http_get(endpoint.port, "/metricsx")
        assert status == "HTTP/1.1 404 Not Found"
        status, headers, _ = await http_get(endpoint.port, "/metrics", method="POST")
        assert status == "HTTP/1.1 405 Method Not Allowed" and headers["Allow"] == "GET, HEAD"
        status, headers, body = await http_get(endpoint.port, "/metrics", method="HEAD")
        assert status == "HTTP/1.1 200 OK" and body == "" and int(headers["Content-Length"]) > 0
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", endpoint.port)  # closed
    await client.close()
    await server.stop()


def test_one_metrics_for_both_sides_and_errors() -> None:
    metrics = Metrics(buckets=[0.001, 0.01, 0.1])
    metrics.record("get", 0.005, StatusCode.OK, side="client")
    metrics.record("get", 0.05, StatusCode.UNAVAILABLE, side="server")
    snap = metrics.snapshot()
    assert snap["client"]["get"]["errors"] == {}
    assert snap["server"]["get"]["errors"] == {"UNAVAILABLE": 1}
    assert snap["totals"] == {
        "calls": 2,
        "errors": 1,
        "bytes_sent": 0,
        "bytes_received": 0,
        "connections": 0,
        "uptime_seconds": snap["totals"]["uptime_seconds"],
    }
    metrics.reset()
    assert metrics.snapshot()["server"] == {}
    with pytest.raises(ValueError, match="increasing"):
        Metrics(buckets=[0.1, 0.01])
    with pytest.raises(TypeError, match="Server or a Client"):
        metrics.bind(object())  # type: ignore[arg-type]


def test_quantiles_interpolate_within_buckets() -> None:
    m = MethodMetrics((0.1, 0.2, 0.4))
    for seconds in [0.05] * 50 + [0.15] * 40 + [0.3] * 9 + [9.0]:
        m.record(seconds, StatusCode.OK)
    assert estimate_quantile(m, 0.5) == pytest.approx(0.1)  # the end of the first bucket
    assert estimate_quantile(m, 0.25) == pytest.approx(0.05)  # halfway through it
    assert estimate_quantile(m, 0.7) == pytest.approx(0.15)
    assert estimate_quantile(m, 0.99) == pytest.approx(0.4)
    assert estimate_quantile(m, 1.0) == 0.4  # the unbounded bucket: the last finite bound
    assert estimate_quantile(MethodMetrics((1.0,)), 0.5) == 0.0
    with pytest.raises(ValueError):
        estimate_quantile(m, 2)


async def test_without_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "prometheus_client" or name.startswith("prometheus_client."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    metrics = Metrics()
    metrics.record("x", 0.001, StatusCode.OK)
    assert metrics.snapshot()["server"]["x"]["calls"] == 1  # needs nothing extra
    with pytest.raises(ImportError, match=r"pip install 'ucxrpc\[metrics\]'"):
        metrics.prometheus()
    with pytest.raises(ImportError, match="prometheus-client"):
        await start_metrics_http(metrics)
