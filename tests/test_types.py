"""Types follow the declaration, never the size (SPEC §4), over real UCX.

Binary values travel inline below ``Config.oob_threshold`` (16 KiB) and as separate data
parts from there on (received into a ``bytearray``, or into numpy memory from 256 KiB).
Whatever the path, a ``bytes`` declaration gets ``bytes``, ``bytearray`` a
``bytearray``, ``memoryview`` and ``Buffer`` a ``memoryview``, ``numpy.ndarray`` an
array; no declaration gets ``bytes``. numpy arrays keep every dtype numpy can describe.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

import ucxrpc
from ucxrpc.calls.handlers import make_handler, value_validator
from ucxrpc.calls.values import (
    as_buffer,
    as_bytearray,
    as_memoryview,
    dtype_from_wire,
    dtype_to_wire,
    from_array,
    plain,
    to_wire,
)
from ucxrpc.service import Buffer
from ucxrpc.wire import codec

pytestmark = pytest.mark.timeout(120)

OOB = codec.DEFAULT_OOB_THRESHOLD  # 16 KiB: from here on a value is a separate data part
SIZES = [
    0,
    1,
    8191,
    8192,
    8193,
    OOB - 1,
    OOB,
    OOB + 1,
    256 * 1024 - 1,
    256 * 1024,  # from here the engine receives parts into numpy memory (memoryview)
    256 * 1024 + 1,
    4 * 1024 * 1024,
]


def payload(size: int) -> bytes:
    """Distinct, non-palindromic bytes, so that a wrong reversal cannot pass."""
    return random.Random(size).randbytes(size)


def names(value: Any) -> Any:
    """The type names inside ``value`` (what the handler saw), for the client to check."""
    if isinstance(value, list):
        return [names(v) for v in value]
    if isinstance(value, dict):
        return {k: names(v) for k, v in value.items()}
    return type(value).__name__


class Blob(BaseModel):
    name: str
    data: bytes
    chunks: list[bytes] = []
    extra: bytes | None = None
    inner: Blob | None = None


class Raw(BaseModel):
    """A model whose fields ask for buffers: only a Buffer field needs no extra config."""

    data: Buffer
    maybe: Buffer | None = None


class TypesApi(ucxrpc.Service, name="types.v1"):
    @ucxrpc.rpc
    @abstractmethod
    async def rev(self, data: bytes) -> bytes: ...

    @ucxrpc.rpc
    @abstractmethod
    async def rev_many(self, items: list[bytes], by_key: dict[str, bytes]) -> list[bytes]: ...

    @ucxrpc.rpc
    @abstractmethod
    async def maybe(self, data: bytes | None) -> bytes | None: ...

    @ucxrpc.rpc
    @abstractmethod
    async def blob(self, b: Blob) -> Blob: ...

    @ucxrpc.rpc
    @abstractmethod
    async def raw(self, r: Raw) -> Raw: ...

    @ucxrpc.rpc
    @abstractmethod
    async def to_bytearray(self, data: bytearray) -> bytearray: ...

    @ucxrpc.rpc
    @abstractmethod
    async def to_memoryview(self, data: memoryview) -> memoryview: ...

    @ucxrpc.rpc
    @abstractmethod
    async def to_buffer(self, data: Buffer) -> Buffer: ...

    @ucxrpc.rpc
    @abstractmethod
    async def to_array(self, a: np.ndarray) -> np.ndarray: ...

    @ucxrpc.rpc
    @abstractmethod
    async def seen(self) -> list[Any]: ...

    @ucxrpc.rpc
    @abstractmethod
    def chunks(self, data: bytes, n: int) -> AsyncIterator[bytes]: ...

    @ucxrpc.rpc
    @abstractmethod
    async def untyped(self, value): ...  # type: ignore[no-untyped-def]


class TypesImpl(TypesApi):
    """Records what each handler received (type names, writability) for the client."""

    def __init__(self) -> None:
        self.log: list[Any] = []

    async def rev(self, data: bytes) -> bytes:
        self.log.append(type(data).__name__)
        return data[::-1]

    async def rev_many(self, items: list[bytes], by_key: dict[str, bytes]) -> list[bytes]:
        self.log.append([names(items), names(by_key)])
        return [x[::-1] for x in items] + [by_key[k][::-1] for k in sorted(by_key)]

    async def maybe(self, data: bytes | None) -> bytes | None:
        self.log.append(type(data).__name__)
        return data

    async def blob(self, b: Blob) -> Blob:
        self.log.append(names(b.model_dump()))
        return b

    async def raw(self, r: Raw) -> Raw:
        self.log.append([type(r.data).__name__, r.data.readonly, type(r.maybe).__name__])
        return r

    async def to_bytearray(self, data: bytearray) -> bytearray:
        self.log.append(type(data).__name__)
        return data

    async def to_memoryview(self, data: memoryview) -> memoryview:
        self.log.append([type(data).__name__, data.readonly])
        return data

    async def to_buffer(self, data: Buffer) -> Buffer:
        ok = data.readonly is False and data.format == "B" and data.ndim == 1
        self.log.append([type(data).__name__, ok])
        data[:1] = b"!"[: len(data)]  # writable whatever the size
        return data

    async def to_array(self, a: np.ndarray) -> np.ndarray:
        self.log.append([type(a).__name__, a.dtype.str, list(a.shape)])
        return a

    async def seen(self) -> list[Any]:
        log, self.log = self.log, []
        return log

    async def chunks(self, data: bytes, n: int) -> AsyncIterator[bytes]:
        self.log.append(type(data).__name__)
        for _ in range(n):
            yield data

    async def untyped(self, value):  # type: ignore[no-untyped-def]
        self.log.append(names(value))
        return value


@pytest.fixture
async def typed(manager: ucxrpc.Manager) -> AsyncIterator[tuple[ucxrpc.Client, TypesApi]]:
    server = ucxrpc.Server()
    server.add_service(TypesImpl())
    await server.start(manager, "127.0.0.1", 0)
    async with await manager.connect("127.0.0.1", server.port) as client:
        yield client, client.stub(TypesApi, timeout=60.0)
    await server.stop(grace=1.0)


# -- bytes -----------------------------------------------------------------------------------


async def test_bytes_parameters_and_results_are_bytes_at_every_size(
    typed: tuple[ucxrpc.Client, TypesApi],
) -> None:
    _, stub = typed
    for size in SIZES:
        data = payload(size)
        out = await stub.rev(data)
        assert type(out) is bytes, (size, type(out))
        assert out == data[::-1], size
        assert await stub.seen() == ["bytes"], size
        # Sent from a bytearray or a memoryview, received as bytes all the same.
        assert await stub.rev(bytearray(data)) == data[::-1]
        assert await stub.rev(memoryview(data)) == data[::-1]
        assert await stub.seen() == ["bytes", "bytes"], size


async def test_bytes_inside_lists_dicts_and_optionals(
    typed: tuple[ucxrpc.Client, TypesApi],
) -> None:
    _, stub = typed
    for size in SIZES:
        data = payload(size)
        out = await stub.rev_many([data, b"ab", data], {"a": data, "b": b""})
        assert [type(x) for x in out] == [bytes] * 5, size
        assert out == [data[::-1], b"ba", data[::-1], data[::-1], b""], size
        maybe = await stub.maybe(data)
        assert type(maybe) is bytes and maybe == data, size
        assert await stub.seen() == [
            [["bytes"] * 3, {"a": "bytes", "b": "bytes"}],
            "bytes",
        ], size
    assert await stub.maybe(None) is None


async def test_pydantic_bytes_fields_are_bytes(typed: tuple[ucxrpc.Client, TypesApi]) -> None:
    _, stub = typed
    for size in SIZES:
        data = payload(size)
        blob = Blob(
            name="x",
            data=data,
            chunks=[data, b"c"],
            extra=data,
            inner=Blob(name="y", data=data),
        )
        out = await stub.blob(blob)
        assert out == blob, size
        assert type(out.data) is bytes and type(out.extra) is bytes, size
        assert [type(c) for c in out.chunks] == [bytes, bytes], size
        assert out.inner is not None and type(out.inner.data) is bytes, size
        (got,) = await stub.seen()
        assert got["data"] == got["extra"] == "bytes", size
        assert got["chunks"] == ["bytes", "bytes"], size
        assert got["inner"]["data"] == "bytes", size


async def test_a_wrong_type_for_bytes_is_named(typed: tuple[ucxrpc.Client, TypesApi]) -> None:
    client, _ = typed
    with pytest.raises(ucxrpc.InvalidArgument, match="data: Input should be a valid bytes"):
        await client.call("types.v1.rev", 5)
    with pytest.raises(ucxrpc.InvalidArgument, match=r"items\.1: Input should be a valid bytes"):
        await client.call("types.v1.rev_many", [b"a", 7], {})


# -- zero-copy declarations --------------------------------------------------------------------


async def test_bytearray_memoryview_buffer_and_array_declarations(
    typed: tuple[ucxrpc.Client, TypesApi],
) -> None:
    _, stub = typed
    for size in SIZES:
        data = payload(size)
        out_ba = await stub.to_bytearray(data)
        assert type(out_ba) is bytearray and out_ba == data, size
        out_mv = await stub.to_memoryview(data)
        assert type(out_mv) is memoryview and out_mv == data, size
        out_buf = await stub.to_buffer(data)
        assert type(out_buf) is memoryview and not out_buf.readonly, size
        assert bytes(out_buf) == b"!"[:size] + data[1:], size
        array = np.frombuffer(data, dtype=np.uint8)
        out_arr = await stub.to_array(array)
        assert isinstance(out_arr, np.ndarray) and out_arr.dtype == np.uint8, size
        assert out_arr.tobytes() == data, size
        ba, (mv, mv_readonly), (buf, buf_ok), arr = await stub.seen()
        assert (ba, mv, buf, buf_ok) == ("bytearray", "memoryview", "memoryview", True), size
        if size >= OOB:
            # Out of band: the received buffer itself (a copy of bytes would be read-only).
            assert mv_readonly is False, size
        assert arr == ["ndarray", "|u1", [size]], size


async def test_buffer_fields_in_models(typed: tuple[ucxrpc.Client, TypesApi]) -> None:
    _, stub = typed
    for size in SIZES:
        data = payload(size)
        out = await stub.raw(Raw(data=memoryview(data), maybe=memoryview(data)))
        assert type(out.data) is memoryview and not out.data.readonly, size
        assert out.data == data and out.maybe == data, size
        assert await stub.seen() == [["memoryview", False, "memoryview"]], size


# -- no declaration --------------------------------------------------------------------------


async def test_untyped_parameters_get_bytes(typed: tuple[ucxrpc.Client, TypesApi]) -> None:
    _, stub = typed
    for size in SIZES:
        data = payload(size)
        array = np.arange(size // 8 + 1, dtype=np.float64)
        out = await stub.untyped([data, {"k": bytearray(data), "a": array}, 3, "s"])
        assert (await stub.seen())[0] == [
            "bytes",
            {"k": "bytes", "a": "ndarray"},
            "int",
            "str",
        ], size
        # A stub method without a result annotation: the same rule on the client.
        assert type(out[0]) is bytes and out[0] == data, size
        assert type(out[1]["k"]) is bytes, size
        np.testing.assert_array_equal(out[1]["a"], array)


async def test_client_call_without_a_stub_gets_bytes(
    typed: tuple[ucxrpc.Client, TypesApi],
) -> None:
    client, _ = typed
    for size in SIZES:
        data = payload(size)
        out = await client.call("types.v1.untyped", [data, {"k": data}])
        assert names(out) == ["bytes", {"k": "bytes"}], size
        items = [x async for x in client.stream("types.v1.chunks", data, 2)]
        assert [type(x) for x in items] == [bytes, bytes], size


async def test_stream_items_follow_the_declaration(
    typed: tuple[ucxrpc.Client, TypesApi],
) -> None:
    _, stub = typed
    for size in SIZES:
        data = payload(size)
        items = [x async for x in stub.chunks(data, 3)]
        assert [type(x) for x in items] == [bytes] * 3, size
        assert items == [data] * 3, size
        assert await stub.seen() == ["bytes"], size


async def test_items_streamed_into_a_call_follow_the_declaration(
    manager: ucxrpc.Manager,
) -> None:
    server = ucxrpc.Server()

    @server.rpc
    async def kinds(chunks: AsyncIterator[bytes]) -> list[str]:
        return [f"{type(c).__name__}:{c[::-1] == payload(len(c))[::-1]}" async for c in chunks]

    @server.rpc
    async def untyped_kinds(chunks: AsyncIterator[Any]) -> list[str]:
        return [type(c).__name__ async for c in chunks]

    async def source() -> AsyncIterator[bytes]:
        for size in SIZES:
            yield payload(size)

    await server.start(manager, "127.0.0.1", 0)
    async with await manager.connect("127.0.0.1", server.port) as client:
        assert await client.call("kinds", source(), timeout=60) == ["bytes:True"] * len(SIZES)
        assert await client.call("untyped_kinds", source(), timeout=60) == ["bytes"] * len(SIZES)
    await server.stop(grace=1.0)


# -- numpy dtypes ------------------------------------------------------------------------------

DTYPES = [
    np.dtype([("a", "<i4"), ("b", "<f8")]),
    np.dtype([("a", "<i4"), ("b", "<f8")], align=True),
    np.dtype({"names": ["a", "b"], "formats": ["u1", "<i4"], "offsets": [0, 4], "itemsize": 12}),
    np.dtype([("pos", ">f4", (3,)), ("tag", "S4"), ("sub", [("t", "M8[ms]"), ("d", "<m8[s]")])]),
    np.dtype("M8[ns]"),
    np.dtype("M8[D]"),
    np.dtype("m8[s]"),
    np.dtype(">i4"),
    np.dtype(">f8"),
    np.dtype("<U7"),
    np.dtype("S5"),
    np.dtype("V3"),
    np.dtype("?"),
    np.dtype("c16"),
    np.dtype("f2"),
]


def sample(dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """An array of ``dtype`` and ``shape`` with varied bytes (NaT and NaN included)."""
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.frombuffer(random.Random(n).randbytes(n), dtype=np.uint8)
    return raw.view(dtype).reshape(shape) if n else np.zeros(shape, dtype=dtype)


def same(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    """Same dtype, shape and bytes (bytes: NaN and NaT compare unequal to themselves)."""
    return bool(
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    )


def arrays_of(dtype: np.dtype[Any]) -> list[np.ndarray[Any, Any]]:
    big = (256 * 1024) // max(dtype.itemsize, 1) + 3  # out of band, into numpy memory
    mid = OOB // max(dtype.itemsize, 1) + 1  # out of band, into a bytearray
    return [
        sample(dtype, (5,)),
        sample(dtype, (2, 3)),
        sample(dtype, (0,)),
        sample(dtype, (3, 0, 2)),
        sample(dtype, (mid,)),
        sample(dtype, (big,)),
        sample(dtype, (4, 6))[::2, 1::2],  # not contiguous: sent as a contiguous copy
        sample(dtype, (12,))[::-3],
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
async def test_numpy_dtypes_round_trip(
    typed: tuple[ucxrpc.Client, TypesApi], dtype: np.dtype[Any]
) -> None:
    client, stub = typed
    for array in arrays_of(dtype):
        out = await stub.to_array(array)
        assert isinstance(out, np.ndarray)
        assert same(out, array), (array.dtype, array.shape, out.dtype, out.shape)
        raw = await client.call("types.v1.untyped", [array, {"a": array}])
        assert same(raw[0], array) and same(raw[1]["a"], array)
    seen = await stub.seen()
    assert all(entry[0] == "ndarray" for entry in seen[::2])


async def test_zero_itemsize_and_scalar_shapes(typed: tuple[ucxrpc.Client, TypesApi]) -> None:
    _, stub = typed
    for array in [np.zeros((4,), dtype=np.dtype([])), np.array(2.5)]:
        out = await stub.to_array(array)
        assert same(out, array), (array.dtype, array.shape)


# -- the pieces, without UCX ---------------------------------------------------------------------


def roundtrip(value: Any) -> Any:
    enc = codec.encode(codec.Kind.REPLY, 1, value, default=to_wire)
    header, payload_view = codec.decode_header(enc.frame)
    parts = [bytearray(bytes(memoryview(p).cast("B"))) for p in enc.parts]
    return codec.decode_payload(header, payload_view, parts, array_hook=from_array)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_text_round_trips(dtype: np.dtype[Any]) -> None:
    text = dtype_to_wire(dtype)
    assert isinstance(text, str)
    back = dtype_from_wire(text)
    assert back == dtype and back.isalignedstruct == dtype.isalignedstruct
    for array in arrays_of(dtype):
        assert same(roundtrip(array), array)


@pytest.mark.parametrize(
    "text",
    [
        "|O",
        "O",
        "T",
        "a5",
        "i4,f8",
        "",
        "<f8 ",
        "[1, 2]",
        '{"names": 1}',
        '{"base": "|O8", "shape": [2]}',
        '{"names": ["a"], "formats": ["|O"], "offsets": [0], "itemsize": 8}',
        '{"names": ["a", "a"], "formats": ["<i4", "<i4"], "offsets": [0, 4], "itemsize": 8}',
        '{"names": ["a"], "formats": ["<i4"], "offsets": [-1], "itemsize": 8}',
        '{"names": ["a"], "formats": ["<i4"], "offsets": [8], "itemsize": 4}',
        '{"names": ["a"], "formats": ["<i4"], "offsets": [0], "itemsize": 4, "x": 1}',
        '{"base": "<i4", "shape": [-1]}',
        "[" * 100_000,
        "{" + " " * 300_000 + "}",
    ],
)
def test_malformed_dtypes_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        dtype_from_wire(text)
    with pytest.raises((ValueError, TypeError)):
        from_array(codec.ArrayData(text, (1,), b"\0" * 8))


def test_malformed_arrays_are_rejected() -> None:
    with pytest.raises(ValueError, match="needs 16 bytes, 8 were received"):
        from_array(codec.ArrayData("<f8", (2,), b"\0" * 8))
    with pytest.raises(ValueError, match="needs"):
        from_array(codec.ArrayData("<f8", (10**10, 10**10), b""))
    with pytest.raises(ValueError, match="shape"):
        from_array(codec.ArrayData("<f8", (1,) * 65, b"\0" * 8))
    with pytest.raises(TypeError):
        from_array(codec.ArrayData(5, (1,), b"\0" * 8))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Python objects"):
        to_wire(np.array([object()]))
    with pytest.raises(TypeError, match="Python objects"):
        to_wire(np.array([("a", 1)], dtype=[("s", object), ("n", int)]))
    with pytest.raises(TypeError):
        to_wire(np.array(["x"], dtype=np.dtypes.StringDType()))


def test_received_buffers_are_not_copied() -> None:
    received = bytearray(b"abc")
    assert as_bytearray(received) is received
    assert as_memoryview(received).obj is received
    assert as_buffer(received).obj is received
    numpy_memory = np.empty(5, dtype=np.uint8).data.cast("B")  # how large parts arrive
    assert as_buffer(numpy_memory) is numpy_memory
    assert as_memoryview(numpy_memory) is numpy_memory
    array = np.arange(4)
    check = value_validator(np.ndarray, "a")
    assert check is not None and check(array) is array
    frozen = as_buffer(b"xyz")  # a read-only inline value: a private writable copy
    assert not frozen.readonly and frozen == b"xyz"
    assert as_buffer(np.arange(3, dtype=np.int16)).nbytes == 6


def test_plain_makes_bytes_and_keeps_arrays() -> None:
    array = np.zeros(3)
    value = [memoryview(b"a"), {"b": bytearray(b"b"), "c": [memoryview(b"c")]}, array, 1]
    out = plain(value)
    assert out is value  # in place: the value was just decoded
    assert names(out) == ["bytes", {"b": "bytes", "c": ["bytes"]}, "ndarray", "int"]
    assert out[2] is array
    assert plain(7) == 7 and plain("s") == "s" and plain(bytearray(b"x")) == b"x"
    deep: list[Any] = []
    node = deep
    for _ in range(5000):  # deeper than recursion allows
        node.append([])
        node = node[0]
    node.append(bytearray(b"z"))
    plain(deep)
    assert type(node[0]) is bytes


def test_scalar_parameters_pay_no_conversion() -> None:
    async def handler(a: int, b: str, c: float, d: Blob, e: bytes, f, g: list[int]) -> None:  # type: ignore[no-untyped-def]
        pass

    params = {p.name: p for p in make_handler(handler, name="h").params}
    for name in ("a", "b", "c", "g"):
        assert params[name].convert is None and params[name].convert_inline is None, name
    # Without data parts every binary value is already bytes: nothing to do either.
    for name in ("d", "e", "f"):
        assert params[name].convert is not None and params[name].convert_inline is None, name


def test_bind_converts_by_declaration() -> None:
    async def handler(data: bytes, buf: Buffer, ba: bytearray, rest) -> None:  # type: ignore[no-untyped-def]
        pass

    h = make_handler(handler, name="h")
    mv = memoryview(bytearray(b"abc"))
    args, _ = h.bind([mv, mv, b"x", [mv]], {})
    assert type(args[0]) is bytes and args[1] is mv and type(args[2]) is bytearray
    assert args[3] == [b"abc"] and type(args[3][0]) is bytes
    args, _ = h.bind([b"a", b"b", b"c", [b"d"]], {}, oob=False)
    assert type(args[0]) is bytes and not args[1].readonly and type(args[2]) is bytearray


class Node(BaseModel):
    data: bytes
    kids: list[Node] = []


class Tree(BaseModel):
    """Contains itself but nothing binary: its values pay no conversion."""

    name: str
    kids: list[Tree] = []


class Ping(BaseModel):
    pong: Pong | None = None


class Pong(BaseModel):
    ping: Ping | None = None
    blob: bytes = b""


def test_self_containing_models() -> None:
    check = value_validator(Node, "n")
    assert check is not None
    leaf = memoryview(bytearray(b"leaf"))
    node = check({"data": b"a", "kids": [{"data": leaf, "kids": [{"data": leaf}]}]})
    assert type(node.kids[0].data) is bytes and type(node.kids[0].kids[0].data) is bytes
    assert node.kids[0].kids[0].data == b"leaf"

    async def handler(t: Tree, n: Node, p: Ping) -> None:
        pass

    params = {p.name: p for p in make_handler(handler, name="h").params}
    assert params["t"].convert is None and params["t"].convert_inline is None
    assert params["n"].convert is not None and params["n"].convert_inline is None
    ping = params["p"].validate({"pong": {"ping": {"pong": {"blob": leaf}}}})
    assert type(ping.pong.ping.pong.blob) is bytes
