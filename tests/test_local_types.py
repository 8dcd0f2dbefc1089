"""Types defined inside a function (how tests are written), over real UCX.

Under ``from __future__ import annotations`` every annotation is a string, and the
module globals alone do not hold a test's local models. Their annotations are resolved
with the names of the function that defined them, captured when ``@server.rpc``,
``@ucxrpc.rpc`` or the ``class`` statement ran, and read again on first use: types
defined later in the same function, before the first call, are found too. A name that
exists nowhere is named in the error.

Each test defines everything it uses inside its own body: nothing here may come from the
module globals (the globals below are decoys with the same names and other fields).
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import types
from abc import abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel
from typing_extensions import TypedDict  # pydantic needs it for TypedDict before 3.12

import ucxrpc
from ucxrpc.calls.handlers import Scope
from ucxrpc.service import rpc_methods

pytestmark = pytest.mark.timeout(60)


class Req(BaseModel):
    """A decoy: a handler that resolved ``Req`` here would reject the tests' requests."""

    unrelated: int


class Rep(BaseModel):
    """A decoy, as :class:`Req`."""

    unrelated: int


async def serve(manager: ucxrpc.Manager, server: ucxrpc.Server) -> ucxrpc.Client:
    await server.start(manager, "127.0.0.1", 0)
    return await manager.connect("127.0.0.1", server.port)


async def test_rpc_functions_take_and_return_local_models(manager: ucxrpc.Manager) -> None:
    class Inner(BaseModel):
        tag: str

    class Req(BaseModel):  # shadows the module's decoy, as Python scoping says
        text: str
        times: int
        inner: Inner

    class Rep(BaseModel):
        text: str

    seen: list[Any] = []
    server = ucxrpc.Server()

    @server.rpc
    async def shout(req: Req) -> Rep:
        seen.append(req)
        return Rep(text=(req.text.upper() + req.inner.tag) * req.times)

    client = await serve(manager, server)
    try:
        got = await client.call("shout", Req(text="ab", times=2, inner=Inner(tag="!")))
        assert got == {"text": "AB!AB!"}
        assert type(seen[0]) is Req and type(seen[0].inner) is Inner
        # Validation used the local model: its field path is in the error.
        with pytest.raises(ucxrpc.InvalidArgument, match=r"req\.times: Input should be"):
            await client.call("shout", {"text": "a", "times": "many", "inner": {"tag": ""}})
        with pytest.raises(ucxrpc.InvalidArgument, match=r"req\.inner\.tag: Field required"):
            await client.call("shout", {"text": "a", "times": 1, "inner": {}})
    finally:
        await client.close()
        await server.stop()


async def test_local_dataclasses_and_typeddicts(manager: ucxrpc.Manager) -> None:
    class Color(enum.Enum):
        RED = "red"
        BLUE = "blue"

    @dataclasses.dataclass
    class Point:
        x: float
        y: float
        color: Color
        blob: bytes

    class Pair(TypedDict):
        left: int
        where: Point

    seen: list[Any] = []
    server = ucxrpc.Server()

    @server.rpc
    async def mirror(p: Point, pair: Pair) -> Pair:
        seen.append((p, pair))
        return Pair(left=pair["left"] + 1, where=Point(p.y, p.x, p.color, p.blob[::-1]))

    client = await serve(manager, server)
    try:
        big = bytes(range(256)) * 256  # 64 KiB: travels as a separate data part
        got = await client.call(
            "mirror",
            Point(1.5, -2.0, Color.BLUE, big),
            Pair(left=1, where=Point(0, 0, Color.RED, b"")),
        )
        p, pair = seen[0]
        assert type(p) is Point and p.color is Color.BLUE
        # bytes stays bytes though it arrived out of band: the dataclass's fields resolved
        assert type(p.blob) is bytes and p.blob == big
        assert type(pair["where"]) is Point and pair["where"].color is Color.RED
        assert got["left"] == 2 and got["where"]["x"] == -2.0
        with pytest.raises(ucxrpc.InvalidArgument, match=r"pair\.where\.color: Input should be"):
            await client.call(
                "mirror",
                Point(0, 0, Color.RED, b""),
                {"left": 1, "where": {"x": 0, "y": 0, "color": "green", "blob": b""}},
            )
    finally:
        await client.close()
        await server.stop()


async def test_local_service_on_server_and_in_the_stub(manager: ucxrpc.Manager) -> None:
    class Req(BaseModel):
        text: str

    class Rep(BaseModel):
        text: str
        length: int

    @dataclasses.dataclass
    class Item:
        n: int
        data: bytes

    class Api(ucxrpc.Service, name="local.v1"):
        @ucxrpc.rpc
        @abstractmethod
        async def shout(self, req: Req) -> Rep: ...

        @ucxrpc.rpc
        @abstractmethod
        def count(self, n: int) -> AsyncIterator[Item]: ...

    seen: list[Any] = []

    class Impl(Api):
        async def shout(self, req: Req) -> Rep:
            seen.append(req)
            return Rep(text=req.text.upper(), length=len(req.text))

        async def count(self, n: int) -> AsyncIterator[Item]:
            for i in range(n):
                yield Item(i, bytes([i]) * 3)

    server = ucxrpc.Server()
    server.add_service(Impl())
    client = await serve(manager, server)
    try:
        stub = client.stub(Api)
        reply = await stub.shout(Req(text="abc"))
        assert type(reply) is Rep and reply == Rep(text="ABC", length=3)  # validated on arrival
        assert type(seen[0]) is Req
        items = [item async for item in stub.count(3)]
        assert items == [Item(0, b"\0\0\0"), Item(1, b"\1\1\1"), Item(2, b"\2\2\2")]
        assert all(type(item) is Item for item in items)
        with pytest.raises(ucxrpc.InvalidArgument, match=r"req\.text: Field required"):
            await client.call("local.v1.shout", {"txt": "a"})
    finally:
        await client.close()
        await server.stop()


async def test_types_defined_after_the_handler_before_the_first_call(
    manager: ucxrpc.Manager,
) -> None:
    server = ucxrpc.Server()
    seen: list[Any] = []

    @server.rpc
    async def late(req: Later, pair: LaterPair) -> LaterReply:
        seen.append((req, pair))
        return LaterReply(total=req.n + pair["k"], part=req.part)

    class Api(ucxrpc.Service, name="late.v1"):
        @ucxrpc.rpc
        @abstractmethod
        async def echo(self, req: Later) -> Later: ...

    class Impl(Api):
        async def echo(self, req: Later) -> Later:
            return req

    # Everything the handler and the service name is defined only now, after them.
    @dataclasses.dataclass
    class Part:
        label: str

    class Later(BaseModel):
        n: int
        part: Part  # a field naming a local type defined before it

    class LaterPair(TypedDict):
        k: int

    class LaterReply(BaseModel):
        total: int
        part: Part

    server.add_service(Impl())
    client = await serve(manager, server)
    try:
        got = await client.call("late", Later(n=2, part=Part("p")), LaterPair(k=40))
        assert got == {"total": 42, "part": {"label": "p"}}
        req, pair = seen[0]
        assert type(req) is Later and type(req.part) is Part and pair == {"k": 40}
        echoed = await client.stub(Api).echo(Later(n=7, part=Part("q")))
        assert type(echoed) is Later and echoed.part == Part("q")
    finally:
        await client.close()
        await server.stop()


async def test_a_name_defined_nowhere_is_named(manager: ucxrpc.Manager) -> None:
    server = ucxrpc.Server()

    @server.rpc
    async def broken(req: Nowhere) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    @server.rpc
    async def fine(n: int) -> int:
        return n + 1

    class Api(ucxrpc.Service, name="broken.v1"):
        @ucxrpc.rpc
        @abstractmethod
        async def get(self) -> Elsewhere: ...  # type: ignore[name-defined]  # noqa: F821

    class Impl(Api):
        async def get(self) -> Any:
            return None

    pattern = r"cannot resolve the annotations of .*broken: name 'Nowhere' is not defined"
    with pytest.raises(TypeError, match=pattern):
        _ = server.handlers["broken"].params
    service_pattern = r"annotations of .*Api\.get: name 'Elsewhere' is not defined"
    with pytest.raises(TypeError, match=service_pattern):
        server.add_service(Impl())
    client = await serve(manager, server)
    try:
        with pytest.raises(TypeError, match=service_pattern):
            client.stub(Api)
        # The caller learns why, and the other methods of the server keep working.
        with pytest.raises(ucxrpc.RemoteError, match=pattern) as info:
            await client.call("broken", 1)
        assert info.value.remote_type == "TypeError"
        assert await client.call("fine", 1) == 2
        with pytest.raises(ucxrpc.RemoteError, match=pattern):
            await client.call("broken", 1)  # looked up again, still nowhere
    finally:
        await client.close()
        await server.stop()


def test_the_defining_frame_is_let_go_once_resolved() -> None:
    def define() -> tuple[ucxrpc.Server, type[ucxrpc.Service]]:
        server = ucxrpc.Server()

        @server.rpc
        async def handler(value: Value) -> None: ...

        class Api(ucxrpc.Service, name="frames.v1"):
            @ucxrpc.rpc
            @abstractmethod
            async def get(self, value: Value) -> Value: ...

        class Value(BaseModel):
            x: int

        return server, Api

    def frames_alive() -> int:
        gc.collect()
        return sum(
            1
            for o in gc.get_objects()
            if isinstance(o, types.FrameType) and o.f_code is define.__code__
        )

    server, api = define()
    # Pending: the scopes hold the (finished) frame, so its names are still there.
    assert isinstance(vars(api).get("__ucxrpc_scope__"), Scope)
    assert frames_alive() >= 1
    assert server.handlers["handler"].params[0].annotation.__name__ == "Value"
    assert rpc_methods(api)[0].result_type.__name__ == "Value"
    assert frames_alive() == 0  # resolved: copies of the names stay, the frame is gone
