"""Tracing with OpenTelemetry: a call that crosses two servers is one trace.

Run it (needs the ``otel`` extra: ``pip install 'ucxrpc[otel]'``)::

    python examples/tracing.py

A client calls ``resolve`` on the front server, whose handler calls ``lookup`` on the
back server. The same :class:`~ucxrpc.otel.OpenTelemetryInterceptor` is on every
client and server: each call is a CLIENT span and a SERVER span, and the trace context
travels in the call metadata (``traceparent``), so the four spans form one tree. The
spans are kept in memory here and printed as that tree; in production, give the
:class:`TracerProvider` an exporter (OTLP, Jaeger, ...) instead.
"""

from __future__ import annotations

# --8<-- [start:imports]
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ucxrpc
from ucxrpc.otel import OpenTelemetryInterceptor

# --8<-- [end:imports]


def print_tree(spans: tuple[ReadableSpan, ...]) -> None:
    """Each span under its parent, indented, in the order the spans started."""
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        parent = None if span.parent is None else span.parent.span_id
        children.setdefault(parent, []).append(span)

    def show(parent: int | None, depth: int) -> None:
        for span in children.get(parent, []):
            print(f"{'  ' * (depth + 1)}{span.kind.name} {span.name}")
            assert span.context is not None
            show(span.context.span_id, depth + 1)

    show(None, 0)


async def main() -> None:
    # --8<-- [start:setup]
    exporter = InMemorySpanExporter()  # in production: an exporter such as OTLP's
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = OpenTelemetryInterceptor(tracer_provider=provider)

    back = ucxrpc.Server(interceptors=[tracing])
    # --8<-- [end:setup]

    @back.rpc
    async def lookup(key: str) -> str:
        return key.upper()

    front = ucxrpc.Server(interceptors=[tracing])

    async with ucxrpc.Manager() as manager:
        await back.start(manager)
        # --8<-- [start:client]
        to_back = await manager.connect("127.0.0.1", back.port, interceptors=[tracing])
        # --8<-- [end:client]

        @front.rpc
        async def resolve(key: str) -> str:
            # Made while the handler's span is current: it becomes that span's child.
            found: str = await to_back.call("lookup", key)
            return "front:" + found

        await front.start(manager)
        async with await manager.connect("127.0.0.1", front.port, interceptors=[tracing]) as client:
            print(f"resolve('k') -> {await client.call('resolve', 'k')!r}")
        await to_back.close()
        await front.stop()
        await back.stop()

    spans = exporter.get_finished_spans()
    traces = {s.context.trace_id for s in spans if s.context is not None}
    print(f"{len(traces)} trace, {len(spans)} spans:")
    print_tree(spans)
    provider.shutdown()


if __name__ == "__main__":
    ucxrpc.run(main())
