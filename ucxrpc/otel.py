"""OpenTelemetry tracing: one span per call on each side, joined across processes.

Install the extra (``pip install 'ucxrpc[otel]'``) and put the same interceptor on
clients and servers::

    from ucxrpc.otel import OpenTelemetryInterceptor

    tracing = OpenTelemetryInterceptor()
    server = ucxrpc.Server(interceptors=[tracing])
    client = await manager.connect(host, port, interceptors=[tracing])

A client call is a span of kind ``CLIENT``; the call on the server a span of kind
``SERVER``, whose parent is the client's span: the trace context travels in the call
metadata (W3C ``traceparent``, through :mod:`opentelemetry.propagate`). While a
handler runs its span is the current one, so a call the handler makes to another
server joins the same trace as a child. Spans carry the semantic conventions of RPC
spans: ``rpc.system`` (``"ucxrpc"``), ``rpc.service`` and ``rpc.method`` (the method
name split at its last dot: ``echo.v1.shout`` is service ``echo.v1``, method
``shout``), the status code (``rpc.ucxrpc.status_code``, gRPC's numbers) and the peer
(``net.peer.name``/``net.peer.port`` and ``network.peer.address``/``.port``). A call
that fails has span status ERROR and an exception event.

A stream's client span lasts until the stream ends (its last item, its error, or the
client closing it: CANCELLED); its server span covers the whole generator.

OpenTelemetry is imported when an interceptor is made, so importing this module
costs nothing and fails nowhere; making one without the extra raises an
:class:`ImportError` that names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from . import __version__
from .calls.context import CallContext, Metadata
from .calls.interceptors import Proceed, status_of
from .errors import Cancelled

if TYPE_CHECKING:
    from opentelemetry.propagators.textmap import Getter, TextMapPropagator
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = ["RPC_SYSTEM", "STATUS_CODE_ATTRIBUTE", "OpenTelemetryInterceptor"]

#: The ``rpc.system`` attribute of every span.
RPC_SYSTEM = "ucxrpc"
#: The attribute holding the call's status code (as ``rpc.grpc.status_code`` for gRPC).
STATUS_CODE_ATTRIBUTE = "rpc.ucxrpc.status_code"

_MISSING = (
    "ucxrpc.otel needs OpenTelemetry: install the extra with pip install 'ucxrpc[otel]' "
    "(opentelemetry-api, plus an SDK such as opentelemetry-sdk to export spans)"
)


def _require_otel() -> None:
    try:
        import opentelemetry.propagate
        import opentelemetry.trace  # noqa: F401
    except ImportError as exc:
        raise ImportError(_MISSING) from exc


class _MetadataGetter:
    """Reads a propagation header from call metadata (values may be str or bytes)."""

    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        return [value.decode("latin-1") if isinstance(value, bytes) else value]

    def keys(self, carrier: Metadata) -> list[str]:
        return list(carrier)


def _split_peer(peer: str) -> tuple[str, int | None]:
    host, sep, port = peer.rpartition(":")
    if not sep or not port.isdigit():
        return peer, None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _attributes(ctx: CallContext) -> dict[str, Any]:
    service, _, method = ctx.method.rpartition(".")
    attrs: dict[str, Any] = {
        "rpc.system": RPC_SYSTEM,
        "rpc.method": method,
        "rpc.ucxrpc.kind": ctx.kind,
    }
    if service:
        attrs["rpc.service"] = service
    if ctx.peer:
        host, port = _split_peer(ctx.peer)
        attrs["net.peer.name"] = attrs["network.peer.address"] = host
        if port is not None:
            attrs["net.peer.port"] = attrs["network.peer.port"] = port
    return attrs


def _finish(span: Span, error: BaseException | None) -> None:
    """Record how the call ended on ``span`` and end it."""
    from opentelemetry.trace import Status, StatusCode

    status = status_of(error)
    span.set_attribute(STATUS_CODE_ATTRIBUTE, int(status))
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, f"{status.name}: {error}"))
        span.record_exception(error)
    span.end()


class _StreamSpan:
    """Ends a client stream's span when the stream ends, whichever way it does."""

    def __init__(self, call: Any, span: Span) -> None:
        self.span = span
        self.ended = False
        self.reading = False
        self.next = call.next
        self.abandon = call.abandon
        # Instance attributes shadow StreamCall's methods for this one call: the stream
        # object reads through them, and so sees every end.
        call.next = self.read
        call.abandon = self.close

    def end(self, error: BaseException | None) -> None:
        if not self.ended:
            self.ended = True
            _finish(self.span, error)

    async def read(self) -> Any:
        self.reading = True
        try:
            return await self.next()
        except StopAsyncIteration:
            self.end(None)
            raise
        except BaseException as exc:
            self.end(exc)
            raise
        finally:
            self.reading = False

    def close(self) -> None:
        self.abandon()
        if not self.reading:  # else read() ends the span with the real error
            self.end(Cancelled("the client closed the stream before its end"))


class OpenTelemetryInterceptor:
    """Traces calls with OpenTelemetry; one object serves clients and servers.

    Args:
        tracer_provider: Where spans go (default: the global provider,
            :func:`opentelemetry.trace.set_tracer_provider`).
        propagator: How the trace context travels in the metadata (default: the
            global one, W3C trace context and baggage unless configured otherwise).

    Raises:
        ImportError: OpenTelemetry is not installed (the ``ucxrpc[otel]`` extra).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        _require_otel()
        from opentelemetry import trace

        self.tracer: Tracer = trace.get_tracer(
            "ucxrpc", __version__, tracer_provider=tracer_provider
        )
        self._propagator = propagator
        # Duck-typed: subclassing Getter would import OpenTelemetry with this module.
        self._getter = cast("Getter[Metadata]", _MetadataGetter())

    def _inject(self, span: Span, metadata: Metadata) -> None:
        from opentelemetry import propagate, trace

        carrier: dict[str, str] = {}
        context = trace.set_span_in_context(span)
        if self._propagator is not None:
            self._propagator.inject(carrier, context=context)
        else:
            propagate.inject(carrier, context=context)
        metadata.update(carrier)

    def _extract(self, metadata: Metadata) -> Any:
        from opentelemetry import propagate

        if self._propagator is not None:
            return self._propagator.extract(metadata, getter=self._getter)
        return propagate.extract(metadata, getter=self._getter)

    async def __call__(self, ctx: CallContext, proceed: Proceed) -> Any:
        if ctx.side == "client":
            return await self._client(ctx, proceed)
        return await self._server(ctx, proceed)

    async def _client(self, ctx: CallContext, proceed: Proceed) -> Any:
        from opentelemetry import trace

        span = self.tracer.start_span(
            ctx.method, kind=trace.SpanKind.CLIENT, attributes=_attributes(ctx)
        )
        self._inject(span, ctx.metadata)
        try:
            # Current while the rest of the chain runs: inner interceptors see it.
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                result = await proceed()
        except BaseException as exc:
            _finish(span, exc)
            raise
        if ctx.kind == "stream" or ctx.kind == "bidi":
            _StreamSpan(result, span)  # proceed() only opened it
        else:
            _finish(span, None)
        return result

    async def _server(self, ctx: CallContext, proceed: Proceed) -> Any:
        from opentelemetry import trace

        span = self.tracer.start_span(
            ctx.method,
            context=self._extract(ctx.metadata),
            kind=trace.SpanKind.SERVER,
            attributes=_attributes(ctx),
        )
        try:
            # Current while the handler runs: the calls it makes are its children.
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                result = await proceed()
        except BaseException as exc:
            _finish(span, exc)
            raise
        _finish(span, None)
        return result
