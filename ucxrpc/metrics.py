"""Metrics of a server or a client, as plain data and in Prometheus' text format.

:class:`Metrics` is an interceptor: per method and side it counts calls, errors by
status and a latency histogram. Bound to servers and clients, it also reads their byte
counters and open connections. :func:`enable_metrics` does both in one step, and
:func:`start_metrics_http` serves the Prometheus text on ``GET /metrics``::

    metrics = enable_metrics(server)
    endpoint = await start_metrics_http(metrics, "127.0.0.1", 9464)
    ...
    print(metrics.snapshot()["server"]["echo"]["p99_seconds"])
    await endpoint.close()

Prometheus output needs the ``prometheus-client`` package (``pip install
'ucxrpc[metrics]'``); everything else works without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .calls.context import CallContext
from .calls.interceptors import DEFAULT_BUCKETS, MethodMetrics, TimedInterceptor
from .errors import StatusCode

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from .calls.client import Client
    from .calls.server import Server

__all__ = [
    "PROMETHEUS_CONTENT_TYPE",
    "Metrics",
    "MetricsEndpoint",
    "Side",
    "enable_metrics",
    "estimate_quantile",
    "start_metrics_http",
]

log = logging.getLogger("ucxrpc.metrics")

#: Which end of a call was measured.
Side = Literal["server", "client"]
#: The content type of the Prometheus text exposition format that :meth:`Metrics.prometheus`
#: produces.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SIDES: tuple[Side, ...] = ("server", "client")
_QUANTILES = (("p50_seconds", 0.5), ("p90_seconds", 0.9), ("p99_seconds", 0.99))


def _prometheus_client() -> Any:
    try:
        import prometheus_client.core
        import prometheus_client.exposition
        import prometheus_client.utils
    except ImportError as exc:
        raise ImportError(
            "Prometheus output needs the prometheus-client package: pip install 'ucxrpc[metrics]'"
        ) from exc
    return prometheus_client


def estimate_quantile(metrics: MethodMetrics, q: float) -> float:
    """Estimate the ``q`` quantile (0..1) of a latency histogram, in seconds.

    The same estimate as :meth:`MethodMetrics.quantile` (Prometheus'
    ``histogram_quantile``: linear interpolation within the quantile's bucket).
    """
    return metrics.quantile(q)


class Metrics(TimedInterceptor):
    """Calls, errors, latency, bytes and connections of servers and clients.

    Install it as an interceptor (server or client side, or both: every method is
    recorded per side) and :meth:`bind` the servers and clients whose byte counters
    and connections it should report; :func:`enable_metrics` does both.

    Args:
        buckets: Latency histogram bucket upper bounds in seconds, increasing.

    Raises:
        ValueError: The buckets are not strictly increasing.
    """

    def __init__(self, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError("buckets must be strictly increasing")
        self.buckets = bounds
        self._methods: dict[tuple[Side, str], MethodMetrics] = {}
        self._servers: list[Server] = []
        self._clients: list[Client] = []
        # Calls are recorded on the event loop, but snapshots may be taken elsewhere.
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._registry: CollectorRegistry | None = None

    # -- recording --------------------------------------------------------------------------------

    def finished(self, ctx: CallContext, seconds: float, status: StatusCode) -> None:
        """Record the finished call under its method and side (see :meth:`record`)."""
        self.record(ctx.method, seconds, status, side=ctx.side)

    def record(
        self, method: str, seconds: float, status: StatusCode, *, side: Side = "server"
    ) -> None:
        """Add one finished call of ``method`` on ``side``."""
        with self._lock:
            entry = self._methods.get((side, method))
            if entry is None:
                entry = self._methods[side, method] = MethodMetrics(self.buckets)
            entry.record(seconds, status)

    def bind(self, target: Server | Client) -> None:
        """Report the byte counters and connections of ``target`` too.

        Raises:
            TypeError: ``target`` is neither a :class:`~ucxrpc.Server` nor a
                :class:`~ucxrpc.Client`.
        """
        from .calls.client import Client
        from .calls.server import Server

        if isinstance(target, Server):
            if target not in self._servers:
                self._servers.append(target)
        elif isinstance(target, Client):
            if target not in self._clients:
                self._clients.append(target)
        else:
            raise TypeError(f"can only bind a Server or a Client, not {target!r}")

    def reset(self) -> None:
        """Forget the calls recorded so far (byte counters belong to their targets)."""
        with self._lock:
            self._methods.clear()

    # -- reading ----------------------------------------------------------------------------------

    def get(self, method: str, side: Side = "server") -> MethodMetrics | None:
        """What was recorded for ``method`` on ``side`` (None if it was never called)."""
        return self._methods.get((side, method))

    @property
    def uptime(self) -> float:
        """Seconds since these metrics were created."""
        return time.monotonic() - self._started

    def _io(self) -> dict[Side, tuple[int, int, int]]:
        """Bytes sent, bytes received and open connections of the bound targets, by side."""
        out: dict[Side, tuple[int, int, int]] = {}
        if self._servers:
            out["server"] = (
                sum(s.bytes_sent for s in self._servers),
                sum(s.bytes_received for s in self._servers),
                sum(s.connections for s in self._servers),
            )
        if self._clients:
            out["client"] = (
                sum(c.bytes_sent for c in self._clients),
                sum(c.bytes_received for c in self._clients),
                sum(not c.closed for c in self._clients),
            )
        return out

    def _entries(self) -> list[tuple[Side, str, MethodMetrics]]:
        with self._lock:
            return [
                (
                    side,
                    method,
                    MethodMetrics(
                        m.buckets, m.calls, dict(m.errors), m.total_seconds, list(m.counts)
                    ),
                )
                for (side, method), m in sorted(self._methods.items())
            ]

    def snapshot(self) -> dict[str, Any]:
        """Everything recorded, as plain data.

        Returns:
            ``{"server": {method: stats}, "client": {method: stats}, "totals": totals}``
            where ``stats`` holds ``calls``, ``errors`` (count by status name),
            ``mean_seconds`` and ``p50_seconds``, ``p90_seconds``, ``p99_seconds``
            (estimated from the histogram), and ``totals`` holds ``calls``, ``errors``,
            ``bytes_sent``, ``bytes_received``, ``connections`` (of the bound servers
            and clients) and ``uptime_seconds``.
        """
        out: dict[str, Any] = {side: {} for side in _SIDES}
        calls = errors = 0
        for side, method, m in self._entries():
            stats: dict[str, Any] = {
                "calls": m.calls,
                "errors": dict(sorted(m.errors.items())),
                "mean_seconds": m.total_seconds / m.calls if m.calls else 0.0,
            }
            for key, q in _QUANTILES:
                stats[key] = estimate_quantile(m, q)
            out[side][method] = stats
            calls += m.calls
            errors += sum(m.errors.values())
        io = self._io().values()
        out["totals"] = {
            "calls": calls,
            "errors": errors,
            "bytes_sent": sum(sent for sent, _, _ in io),
            "bytes_received": sum(received for _, received, _ in io),
            "connections": sum(conns for _, _, conns in io),
            "uptime_seconds": self.uptime,
        }
        return out

    # -- Prometheus -------------------------------------------------------------------------------

    @property
    def registry(self) -> CollectorRegistry:
        """A private ``prometheus_client`` registry holding these metrics alone.

        Raises:
            ImportError: ``prometheus-client`` is not installed.
        """
        if self._registry is None:
            self._registry = _make_registry(self)
        return self._registry

    def prometheus(self) -> str:
        """The metrics in Prometheus' text exposition format (version 0.0.4).

        Families: ``ucxrpc_calls_total`` and ``ucxrpc_errors_total`` (counters),
        ``ucxrpc_call_duration_seconds`` (histogram), all labelled ``method`` and
        ``side`` (errors also ``code``); ``ucxrpc_sent_bytes_total``,
        ``ucxrpc_received_bytes_total`` (counters) and ``ucxrpc_connections`` (gauge),
        labelled ``side``, for the bound servers and clients; ``ucxrpc_uptime_seconds``.

        Raises:
            ImportError: ``prometheus-client`` is not installed.
        """
        exposition = _prometheus_client().exposition
        text: bytes = exposition.generate_latest(self.registry)
        return text.decode()

    def _families(self) -> Iterator[Any]:
        """The metric families of one scrape (``prometheus_client`` objects)."""
        prometheus_client = _prometheus_client()
        core = prometheus_client.core
        go_float = prometheus_client.utils.floatToGoString
        labels = ["method", "side"]
        calls = core.CounterMetricFamily("ucxrpc_calls", "Calls finished.", labels=labels)
        errors = core.CounterMetricFamily(
            "ucxrpc_errors", "Calls failed, by status code.", labels=[*labels, "code"]
        )
        duration = core.HistogramMetricFamily(
            "ucxrpc_call_duration_seconds", "Call duration in seconds.", labels=labels
        )
        for side, method, m in self._entries():
            calls.add_metric([method, side], m.calls)
            for code, count in sorted(m.errors.items()):
                errors.add_metric([method, side, code], count)
            cumulative, buckets = 0, []
            for bound, count in zip((*m.buckets, float("inf")), m.counts, strict=True):
                cumulative += count
                buckets.append((go_float(bound), cumulative))
            duration.add_metric([method, side], buckets, m.total_seconds)
        yield from (calls, errors, duration)
        io = self._io()
        sent = core.CounterMetricFamily(
            "ucxrpc_sent_bytes", "Bytes sent over UCX.", labels=["side"]
        )
        received = core.CounterMetricFamily(
            "ucxrpc_received_bytes", "Bytes received over UCX.", labels=["side"]
        )
        conns = core.GaugeMetricFamily("ucxrpc_connections", "Open connections.", labels=["side"])
        for side, (n_sent, n_received, n_conns) in io.items():
            sent.add_metric([side], n_sent)
            received.add_metric([side], n_received)
            conns.add_metric([side], n_conns)
        yield from (sent, received, conns)
        yield core.GaugeMetricFamily(
            "ucxrpc_uptime_seconds", "Seconds since the metrics were created.", value=self.uptime
        )


def _make_registry(metrics: Metrics) -> CollectorRegistry:
    _prometheus_client()
    from prometheus_client.registry import Collector, CollectorRegistry

    class _Collector(Collector):
        def collect(self) -> Iterator[Any]:
            return metrics._families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return registry


def enable_metrics(target: Server | Client, metrics: Metrics | None = None) -> Metrics:
    """Measure a server's or a client's calls and traffic.

    Installs the metrics as the innermost interceptor of ``target`` and binds its byte
    counters and connections.

    Args:
        target: The :class:`~ucxrpc.Server` or :class:`~ucxrpc.Client`.
        metrics: Metrics to add to (to gather several targets in one); default: new ones.

    Returns:
        The :class:`Metrics`.
    """
    metrics = Metrics() if metrics is None else metrics
    metrics.bind(target)
    target.add_interceptor(metrics)
    return metrics


# -- the HTTP endpoint ----------------------------------------------------------------------------

#: Seconds a scraper may take to send its request.
_REQUEST_TIMEOUT = 10.0
_MAX_HEADERS = 100
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


class MetricsEndpoint:
    """A running ``/metrics`` HTTP endpoint; made by :func:`start_metrics_http`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.host = ""
        self.port = 0

    @property
    def url(self) -> str:
        """The address to scrape, like ``http://127.0.0.1:9464/metrics``."""
        return f"http://{self.host}:{self.port}/metrics"

    async def _start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)
        self.host = host
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                request = await reader.readline()
                for _ in range(_MAX_HEADERS):
                    if (await reader.readline()).strip() == b"":
                        break
            status, body = self._respond(request)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {PROMETHEUS_CONTENT_TYPE if status == 200 else 'text/plain'}\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Allow: GET, HEAD\r\n" if status == 405 else "")
                + "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1"))
            if not request.startswith(b"HEAD "):
                writer.write(body)
            await writer.drain()
        except (TimeoutError, OSError, ValueError):
            pass  # a slow, vanished or oversized request: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    def _respond(self, request: bytes) -> tuple[int, bytes]:
        parts = request.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, b"bad request\n"
        method, target = parts[0], parts[1]
        if target.split("?", 1)[0] != "/metrics":
            return 404, b"not found\n"
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n"
        try:
            return 200, self.metrics.prometheus().encode()
        except Exception:
            log.exception("rendering the metrics failed")
            return 500, b"rendering the metrics failed\n"

    async def close(self) -> None:
        """Stop listening and end the requests being answered."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        await server.wait_closed()

    async def __aenter__(self) -> MetricsEndpoint:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_metrics_http(
    metrics: Metrics, host: str = "127.0.0.1", port: int = 0
) -> MetricsEndpoint:
    """Serve ``metrics`` in Prometheus' text format on ``GET http://host:port/metrics``.

    A minimal HTTP/1.1 server on the running event loop: one request per connection,
    404 for other paths.

    Args:
        metrics: What to serve.
        host: The interface to listen on.
        port: The TCP port; 0 picks a free one (see :attr:`MetricsEndpoint.port`).

    Returns:
        The running endpoint; ``await endpoint.close()`` stops it.

    Raises:
        ImportError: ``prometheus-client`` is not installed.
        OSError: The address cannot be listened on.
    """
    _prometheus_client()  # fail now rather than on every scrape
    endpoint = MetricsEndpoint(metrics)
    await endpoint._start(host, port)
    return endpoint
