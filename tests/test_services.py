"""Service classes, typed stubs and the values they carry, over real UCX."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import uuid
from abc import abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel
from typing_extensions import TypedDict  # pydantic needs it for TypedDict before 3.12

import ucxrpc
from ucxrpc.service import rpc_methods


class EchoRequest(BaseModel):
    text: str
    times: int = 1


class EchoReply(BaseModel):
    text: str


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Pair(TypedDict):
    left: int
    right: str


class Event(BaseModel):
    when: dt.datetime
    id: uuid.UUID
    color: Color
    tags: frozenset[str]
    where: Point
    blob: bytes


class EchoApi(ucxrpc.Service, name="echo.v1"):
    """The interface: nothing here runs on the server."""

    @ucxrpc.rpc
    async def shout(self, req: EchoRequest) -> EchoReply: ...

    @ucxrpc.rpc(name="count_up", priority=ucxrpc.Priority.HIGH, timeout=5.0, idempotent=True)
    def count(self, n: int) -> AsyncIterator[EchoReply]: ...

    @ucxrpc.rpc
    async def mirror(self, p: Point, pair: Pair) -> tuple[Point, Pair]: ...

    @ucxrpc.rpc
    async def event(self, e: Event) -> Event: ...

    @ucxrpc.rpc
    async def scale(self, a: np.ndarray, k: float) -> np.ndarray: ...

    @ucxrpc.rpc
    async def slow(self, seconds: float) -> str: ...


class EchoImpl(EchoApi):
    async def shout(self, req: EchoRequest) -> EchoReply:
        return EchoReply(text=req.text.upper() * req.times)

    async def count(self, n: int) -> AsyncIterator[EchoReply]:
        for i in range(n):
            yield EchoReply(text=str(i))

    async def mirror(self, p: Point, pair: Pair) -> tuple[Point, Pair]:
        assert isinstance(p, Point)
        return Point(p.y, p.x), Pair(left=pair["left"] + 1, right=pair["right"] * 2)

    async def event(self, e: Event) -> Event:
        assert isinstance(e.when, dt.datetime) and isinstance(e.where, Point)
        return e

    async def scale(self, a: np.ndarray, k: float) -> np.ndarray:
        return a * k

    async def slow(self, seconds: float) -> str:
        import asyncio

        await asyncio.sleep(seconds)
        return "done"


class LyingImpl(EchoApi):
    """Returns what its interface does not promise (only the client can notice)."""

    async def shout(self, req: EchoRequest) -> Any:
        return {"txt": req.text}

    async def count(self, n: int) -> AsyncIterator[Any]:
        yield {"text": "0"}
        yield 42


@pytest.fixture
async def stub_pair(manager: ucxrpc.Manager) -> AsyncIterator[tuple[ucxrpc.Client, EchoApi]]:
    server = ucxrpc.Server()
    server.add_service(EchoImpl())
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        yield client, client.stub(EchoApi)
    await server.stop()


def test_add_service_registers_wire_names_and_nothing_else() -> None:
    fresh = ucxrpc.Server()
    # Defining classes registered nothing: only the built-in methods are there.
    assert set(fresh.handlers) == {"ucxrpc.describe", "ucxrpc.health.check", "ucxrpc.health.watch"}
    server = ucxrpc.Server()
    handlers = server.add_service(EchoImpl())
    names = {h.name for h in handlers}
    assert names == {
        "echo.v1.shout",
        "echo.v1.count_up",
        "echo.v1.mirror",
        "echo.v1.event",
        "echo.v1.scale",
        "echo.v1.slow",
    }
    count = server.handlers["echo.v1.count_up"]
    assert (count.kind, count.priority, count.timeout, count.idempotent) == (
        "stream",
        ucxrpc.Priority.HIGH,
        5.0,
        True,
    )
    assert server.handlers["echo.v1.shout"].func.__self__.__class__ is EchoImpl  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"already registered: echo\.v1\.shout"):
        server.add_service(EchoImpl())
    assert EchoImpl.__service_name__ == "echo.v1"


def test_bad_services_are_refused_clearly() -> None:
    server = ucxrpc.Server()
    with pytest.raises(TypeError, match="needs a Service instance"):
        server.add_service(EchoImpl)  # type: ignore[arg-type]

    class NotStreaming(EchoImpl):
        async def count(self, n: int) -> Any:  # type: ignore[override]
            return []

    with pytest.raises(TypeError, match="count must be an async generator"):
        server.add_service(NotStreaming())

    class AsyncStreamDecl(ucxrpc.Service, name="bad"):
        @ucxrpc.rpc
        async def items(self) -> AsyncIterator[int]: ...

    with pytest.raises(TypeError, match="declare it with 'def', not 'async def'"):
        rpc_methods(AsyncStreamDecl)

    class Empty(ucxrpc.Service):
        pass

    with pytest.raises(TypeError, match=r"declares no @ucxrpc\.rpc methods"):
        server.add_service(Empty())
    assert Empty.__service_name__ == "Empty"


def test_an_incomplete_implementation_cannot_be_instantiated() -> None:
    class Api(ucxrpc.Service, name="abstract.v1"):
        @ucxrpc.rpc
        @abstractmethod
        async def one(self) -> int: ...

        @ucxrpc.rpc
        @abstractmethod
        async def two(self) -> int: ...

    class Partial(Api):
        async def one(self) -> int:
            return 1

    with pytest.raises(TypeError, match=r"abstract method.*two"):
        Partial()  # type: ignore[abstract]


def test_unresolvable_annotations_are_named() -> None:
    async def handler(value: Local) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    # Registration waits: the name could still be defined before the first call.
    registered = ucxrpc.Server().add_handler(handler)
    with pytest.raises(TypeError, match=r"cannot resolve the annotations of .*handler.*Local"):
        _ = registered.params


async def test_stub_calls_validate_into_declared_types(
    stub_pair: tuple[ucxrpc.Client, EchoApi],
) -> None:
    _, stub = stub_pair
    reply = await stub.shout(EchoRequest(text="ab", times=3))
    assert isinstance(reply, EchoReply) and reply.text == "ABABAB"
    p, pair = await stub.mirror(Point(1.5, -2.0), Pair(left=1, right="x"))
    assert isinstance(p, Point) and p == Point(-2.0, 1.5)
    assert pair == {"left": 2, "right": "xx"}
    items = [r async for r in stub.count(3)]
    assert items == [EchoReply(text="0"), EchoReply(text="1"), EchoReply(text="2")]


async def test_rich_values_cross_the_wire(stub_pair: tuple[ucxrpc.Client, EchoApi]) -> None:
    _, stub = stub_pair
    event = Event(
        when=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        id=uuid.uuid4(),
        color=Color.BLUE,
        tags=frozenset({"a", "b"}),
        where=Point(1, 2),
        blob=b"\x00\x01" * 20_000,  # large enough to travel as a separate part
    )
    assert await stub.event(event) == event


async def test_numpy_arrays_keep_dtype_and_shape(
    stub_pair: tuple[ucxrpc.Client, EchoApi],
) -> None:
    client, stub = stub_pair
    big = np.arange(512 * 256, dtype=np.float32).reshape(512, 256)  # 512 KiB: out of band
    out = await stub.scale(big, 2.0)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32 and out.shape == (512, 256)
    np.testing.assert_array_equal(out, big * 2)
    small = np.array([[1, 2], [3, 4]], dtype=np.int16)
    out = await stub.scale(small, 3)
    assert out.dtype == (small * 3.0).dtype and out.tolist() == [[3, 6], [9, 12]]
    strided = big[::2, ::3]  # not contiguous: sent as a contiguous copy
    np.testing.assert_array_equal(await stub.scale(strided, 1.0), strided)
    with pytest.raises(ucxrpc.InvalidArgument, match="cannot serialize"):
        await client.call("echo.v1.scale", np.array([object()]), 1.0)


async def test_validation_errors_name_the_argument_and_field(
    stub_pair: tuple[ucxrpc.Client, EchoApi],
) -> None:
    client, _ = stub_pair
    with pytest.raises(ucxrpc.InvalidArgument) as info:
        await client.call("echo.v1.shout", {"text": "x", "times": "many"})
    assert str(info.value).startswith(
        "[INVALID_ARGUMENT] req.times: Input should be a valid integer"
    )
    with pytest.raises(ucxrpc.InvalidArgument, match=r"p\.y: Field required"):
        await client.call("echo.v1.mirror", {"x": 1}, {"left": 1, "right": "r"})
    with pytest.raises(ucxrpc.InvalidArgument, match=r"pair\.left: Input should be"):
        await client.call("echo.v1.mirror", {"x": 1, "y": 2}, {"left": "l", "right": "r"})
    with pytest.raises(ucxrpc.InvalidArgument, match="a: Input should be an instance of ndarray"):
        await client.call("echo.v1.scale", [1, 2], 1.0)


async def test_replies_not_matching_the_declared_type(manager: ucxrpc.Manager) -> None:
    server = ucxrpc.Server()
    server.add_service(LyingImpl())
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        stub = client.stub(EchoApi)
        with pytest.raises(
            ucxrpc.InvalidReply, match=r"^\[INTERNAL\] result\.text: Field required"
        ):
            await stub.shout(EchoRequest(text="a"))
        got = []
        with pytest.raises(ucxrpc.InvalidReply, match="item: Input should be a valid dictionary"):
            async for item in stub.count(2):
                got.append(item)
        assert got == [EchoReply(text="0")]
        assert isinstance(ucxrpc.InvalidReply("x"), ucxrpc.ProtocolError)
        assert client.pending == 0
    await server.stop()


async def test_stub_options_apply_to_every_call(stub_pair: tuple[ucxrpc.Client, EchoApi]) -> None:
    client, _ = stub_pair
    hurried = client.stub(EchoApi, timeout=0.05)
    with pytest.raises(ucxrpc.DeadlineExceeded):
        await hurried.slow(5.0)
    assert await client.stub(EchoApi, timeout=5.0).slow(0.0) == "done"
    with pytest.raises(TypeError, match="needs a Service subclass"):
        client.stub(int)  # type: ignore[type-var]
    assert "echo.v1" in repr(hurried)


def test_typing_typeddict_before_312_is_named() -> None:
    import sys
    import typing

    class Plain(typing.TypedDict):
        a: int

    async def handler(value: Plain) -> None: ...

    handler.__annotations__ = {"value": Plain, "return": None}
    if sys.version_info >= (3, 12):
        ucxrpc.Server().add_handler(handler)
    else:
        with pytest.raises(TypeError, match=r"cannot validate .*typing_extensions\.TypedDict"):
            ucxrpc.Server().add_handler(handler)
