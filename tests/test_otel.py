"""OpenTelemetry tracing over real UCX: spans on both sides, joined through the metadata."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import ucxrpc
from ucxrpc.otel import STATUS_CODE_ATTRIBUTE, OpenTelemetryInterceptor

ROOT = Path(__file__).parent.parent


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> OpenTelemetryInterceptor:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OpenTelemetryInterceptor(tracer_provider=provider)


def spans(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is kind]


def only(exporter: InMemorySpanExporter, kind: SpanKind) -> ReadableSpan:
    [span] = spans(exporter, kind)
    return span


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


class Numbers(ucxrpc.Service, name="num.v1"):
    @ucxrpc.rpc
    async def double(self, n: int) -> int:
        return 2 * n

    @ucxrpc.rpc
    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @ucxrpc.rpc
    async def broken(self, after: int) -> AsyncIterator[int]:
        for i in range(after):
            yield i
        raise ValueError("the source ran dry")

    @ucxrpc.rpc
    async def fail(self) -> int:
        raise ValueError("no such number")


async def started(
    manager: ucxrpc.Manager, tracing: OpenTelemetryInterceptor
) -> tuple[ucxrpc.Server, ucxrpc.Client]:
    server = ucxrpc.Server(interceptors=[tracing])
    server.add_service(Numbers())
    await server.start(manager)
    client = await manager.connect("127.0.0.1", server.port, interceptors=[tracing])
    return server, client


async def until_spans(exporter: InMemorySpanExporter, count: int) -> None:
    """Wait until ``count`` spans have ended (bounded): a span ends with its call, on
    its own side, which need not be before the other side hears of the end."""
    async with asyncio.timeout(10):
        while len(exporter.get_finished_spans()) < count:  # noqa: ASYNC110 - SDK state
            await asyncio.sleep(0.001)


async def test_unary_call_is_a_client_span_and_its_server_child(
    manager: ucxrpc.Manager, tracing: OpenTelemetryInterceptor, exporter: InMemorySpanExporter
) -> None:
    server, client = await started(manager, tracing)
    async with client:
        assert await client.call("num.v1.double", 21) == 42
        await until_spans(exporter, 2)
    await server.stop()
    client_span, server_span = only(exporter, SpanKind.CLIENT), only(exporter, SpanKind.SERVER)
    assert client_span.name == server_span.name == "num.v1.double"
    # The server's span is the client's child, in the same trace: the context travelled.
    assert ids(server_span)[0] == ids(client_span)[0]
    assert parent_id(server_span) == ids(client_span)[1]
    assert client_span.parent is None
    for span in (client_span, server_span):
        attrs = span.attributes or {}
        assert attrs["rpc.system"] == "ucxrpc"
        assert (attrs["rpc.service"], attrs["rpc.method"]) == ("num.v1", "double")
        assert attrs["rpc.ucxrpc.kind"] == "unary"
        assert attrs[STATUS_CODE_ATTRIBUTE] == 0
        assert attrs["net.peer.name"] == "127.0.0.1"
        assert span.status.status_code is StatusCode.UNSET
    assert (client_span.attributes or {})["net.peer.port"] == server.port
    assert (server_span.attributes or {})["net.peer.port"] != server.port  # the client's
    # The client span holds the server's.
    assert client_span.start_time is not None and server_span.start_time is not None
    assert client_span.start_time <= server_span.start_time


async def test_failed_call_has_error_status_and_an_exception_event(
    manager: ucxrpc.Manager, tracing: OpenTelemetryInterceptor, exporter: InMemorySpanExporter
) -> None:
    server, client = await started(manager, tracing)
    async with client:
        with pytest.raises(ucxrpc.RemoteError):
            await client.call("num.v1.fail")
        with pytest.raises(ucxrpc.InvalidArgument):
            await client.call("num.v1.double", "not a number")
        await until_spans(exporter, 4)
        with pytest.raises(ucxrpc.MethodNotFound):
            await client.call("num.v1.missing")
    await server.stop()
    by_name = {(s.name, s.kind): s for s in exporter.get_finished_spans()}
    for kind in (SpanKind.CLIENT, SpanKind.SERVER):
        failed = by_name["num.v1.fail", kind]
        assert failed.status.status_code is StatusCode.ERROR
        assert (failed.attributes or {})[STATUS_CODE_ATTRIBUTE] == 2  # UNKNOWN
        assert "no such number" in (failed.status.description or "")
        assert [e.name for e in failed.events] == ["exception"]
        invalid = by_name["num.v1.double", kind]
        assert invalid.status.status_code is StatusCode.ERROR
        assert (invalid.attributes or {})[STATUS_CODE_ATTRIBUTE] == 3  # INVALID_ARGUMENT
    # An unknown method never reaches the server's interceptors: only the client traces it.
    missing = by_name["num.v1.missing", SpanKind.CLIENT]
    assert (missing.attributes or {})[STATUS_CODE_ATTRIBUTE] == 12  # UNIMPLEMENTED
    assert ("num.v1.missing", SpanKind.SERVER) not in by_name


async def test_stream_span_lasts_until_the_stream_ends(
    manager: ucxrpc.Manager, tracing: OpenTelemetryInterceptor, exporter: InMemorySpanExporter
) -> None:
    server, client = await started(manager, tracing)
    async with client:
        stream = client.stream("num.v1.count", 5)
        assert await anext(stream) == 0
        assert spans(exporter, SpanKind.CLIENT) == []  # open: not ended at the first item
        assert [n async for n in stream] == [1, 2, 3, 4]
        await until_spans(exporter, 2)
    await server.stop()
    client_span, server_span = only(exporter, SpanKind.CLIENT), only(exporter, SpanKind.SERVER)
    assert parent_id(server_span) == ids(client_span)[1]
    for span in (client_span, server_span):
        assert (span.attributes or {})["rpc.ucxrpc.kind"] == "stream"
        assert (span.attributes or {})[STATUS_CODE_ATTRIBUTE] == 0
        assert span.status.status_code is StatusCode.UNSET
    assert client_span.end_time is not None and server_span.end_time is not None
    assert client_span.end_time >= server_span.end_time  # the client saw the end last


async def test_stream_that_fails_or_is_closed_early(
    manager: ucxrpc.Manager, tracing: OpenTelemetryInterceptor, exporter: InMemorySpanExporter
) -> None:
    server, client = await started(manager, tracing)
    async with client:
        got = []
        with pytest.raises(ucxrpc.RemoteError, match="ran dry"):
            async for n in client.stream("num.v1.broken", 2):
                got.append(n)
        assert got == [0, 1]
        await until_spans(exporter, 2)
        failed = {s.kind: s for s in exporter.get_finished_spans()}
        for span in failed.values():
            assert span.status.status_code is StatusCode.ERROR
            assert (span.attributes or {})[STATUS_CODE_ATTRIBUTE] == 2
        exporter.clear()

        async with client.stream("num.v1.count", 1000) as stream:
            assert await anext(stream) == 0
        await until_spans(exporter, 2)
    await server.stop()
    closed = only(exporter, SpanKind.CLIENT)
    assert (closed.attributes or {})[STATUS_CODE_ATTRIBUTE] == 1  # CANCELLED
    assert closed.status.status_code is StatusCode.ERROR
    assert (only(exporter, SpanKind.SERVER).attributes or {})[STATUS_CODE_ATTRIBUTE] == 1


async def test_nested_call_across_two_servers_is_one_trace(
    manager: ucxrpc.Manager, tracing: OpenTelemetryInterceptor, exporter: InMemorySpanExporter
) -> None:
    back = ucxrpc.Server(interceptors=[tracing])

    @back.rpc
    async def lookup(key: str) -> str:
        return key.upper()

    await back.start(manager)
    back_client = await manager.connect("127.0.0.1", back.port, interceptors=[tracing])
    front = ucxrpc.Server(interceptors=[tracing])

    @front.rpc
    async def resolve(key: str) -> str:
        # A call made by the handler: its span is the handler's child.
        return "front:" + await back_client.call("lookup", key)

    await front.start(manager)
    async with await manager.connect("127.0.0.1", front.port, interceptors=[tracing]) as client:
        assert await client.call("resolve", "k") == "front:K"
        await until_spans(exporter, 4)
        # A second, separate call is a trace of its own.
        await client.call("resolve", "j")
        await until_spans(exporter, 8)
    await back_client.close()
    await front.stop()
    await back.stop()

    first = exporter.get_finished_spans()[:4]
    trace_ids = {ids(s)[0] for s in first}
    assert len(trace_ids) == 1
    by = {(s.name, s.kind): s for s in first}
    root = by["resolve", SpanKind.CLIENT]
    front_span = by["resolve", SpanKind.SERVER]
    hop = by["lookup", SpanKind.CLIENT]
    back_span = by["lookup", SpanKind.SERVER]
    assert root.parent is None
    assert parent_id(front_span) == ids(root)[1]
    assert parent_id(hop) == ids(front_span)[1]
    assert parent_id(back_span) == ids(hop)[1]
    assert (hop.attributes or {})["net.peer.port"] == back.port
    second = exporter.get_finished_spans()[4:]
    assert len({ids(s)[0] for s in second}) == 1
    assert {ids(s)[0] for s in second}.isdisjoint(trace_ids)


async def test_server_alone_starts_a_trace_and_ignores_bad_headers(
    manager: ucxrpc.Manager, tracing: OpenTelemetryInterceptor, exporter: InMemorySpanExporter
) -> None:
    server = ucxrpc.Server(interceptors=[tracing])
    server.add_service(Numbers())
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:  # no tracing
        await client.call("num.v1.double", 1)
        await client.call("num.v1.double", 2, metadata={"traceparent": "garbage"})
        sent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        await client.call("num.v1.double", 3, metadata={"traceparent": sent.encode()})
        await until_spans(exporter, 3)
    await server.stop()
    plain, garbage, given = spans(exporter, SpanKind.SERVER)
    assert plain.parent is None and garbage.parent is None
    assert ids(given)[0] == 0x0AF7651916CD43DD8448EB211C80319C
    assert parent_id(given) == 0xB7AD6B7169203331


def test_without_opentelemetry_the_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import ucxrpc.otel\n"  # importing the module needs nothing
        "try:\n"
        "    ucxrpc.otel.OpenTelemetryInterceptor()\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "pip install 'ucxrpc[otel]'" in out.stdout


def test_tracing_example() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tracing.py")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[0] == "resolve('k') -> 'front:K'"
    assert lines[1] == "1 trace, 4 spans:"
    assert lines[2:] == [
        "  CLIENT resolve",
        "    SERVER resolve",
        "      CLIENT lookup",
        "        SERVER lookup",
    ]
