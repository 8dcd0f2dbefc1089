"""The codec on bytes: round trips, tags, and a clear ProtocolError for every bad frame."""

from __future__ import annotations

import struct
import subprocess
import sys

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucxrpc import codec
from ucxrpc.codec import Flags, Kind
from ucxrpc.errors import ProtocolError, ResourceExhausted

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


def roundtrip(encoded: codec.Encoded, **kw: object) -> tuple[codec.Header, object]:
    header, payload = codec.decode_header(encoded.frame, **kw)  # type: ignore[arg-type]
    parts = [bytearray(bytes(memoryview(p).cast("B"))) for p in encoded.parts]
    assert list(header.parts) == [len(p) for p in parts]
    return header, codec.decode_payload(header, payload, parts)


@given(
    kind=st.sampled_from(list(Kind)),
    call_id=st.integers(0, codec.MAX_CALL_ID),
    method=st.text(max_size=30),
    priority=st.none() | st.integers(0, 255),
    timeout=st.none() | st.floats(0, 1e6),
    payload=values,
)
@settings(max_examples=300, deadline=None)
def test_roundtrip(
    kind: Kind,
    call_id: int,
    method: str,
    priority: int | None,
    timeout: float | None,
    payload: object,
) -> None:
    enc = codec.encode(kind, call_id, payload, method=method, priority=priority, timeout=timeout)
    header, out = roundtrip(enc)
    assert (header.kind, header.call_id, header.method) == (kind, call_id, method)
    assert (header.priority, header.timeout) == (priority, timeout)
    assert out == payload


@given(blobs=st.lists(st.binary(min_size=1024, max_size=4096), min_size=1, max_size=4))
@settings(max_examples=50, deadline=None)
def test_large_buffers_travel_as_parts(blobs: list[bytes]) -> None:
    payload = [[*blobs, "small"], {"k": blobs[0]}]
    enc = codec.encode(Kind.REQUEST, 1, payload, oob_threshold=1024)
    assert len(enc.parts) == len(blobs) + 1
    assert all(p is b for p, b in zip(enc.parts, [*blobs, blobs[0]], strict=True))  # no copy
    assert len(enc.frame) < 200  # the bytes are not in the frame
    _, out = roundtrip(enc)
    assert out == payload


def test_buffer_protocol_objects_travel_as_bytes() -> None:
    arr = memoryview(bytearray(range(256)) * 100).cast("B")
    import array

    values = array.array("i", range(10_000))
    enc = codec.encode(Kind.REPLY, 3, [arr, values], oob_threshold=1024)
    assert len(enc.parts) == 2
    _, out = roundtrip(enc)
    assert out == [bytes(arr), values.tobytes()]


def test_payload_moves_out_of_band_when_larger_than_the_slot() -> None:
    enc = codec.encode(Kind.REPLY, 9, "x" * 10_000, inline_limit=4096)
    assert len(enc.frame) <= 4096
    header, out = roundtrip(enc)
    assert header.flags & Flags.PAYLOAD_OOB
    assert out == "x" * 10_000


def test_small_payload_stays_inline() -> None:
    enc = codec.encode(Kind.REPLY, 9, "x" * 100, inline_limit=4096)
    assert enc.parts == []


def test_size_limit_on_encode() -> None:
    with pytest.raises(ResourceExhausted, match="exceeds the limit"):
        codec.encode(Kind.REQUEST, 1, [[b"x" * 5000], {}], max_size=4096)


def test_unserializable_payload_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="cannot serialize 'object'"):
        codec.encode(Kind.REQUEST, 1, [[object()], {}])


def frame(
    version: int = 1, kind: int = 1, flags: int = 0, header: object = None, payload: bytes = b"\xc0"
) -> bytes:
    hdr = msgpack.packb([1, "m", None, None, [], None] if header is None else header)
    return struct.pack("!BBHII", version, kind, flags, len(hdr), len(payload)) + hdr + payload


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated frame: 0 bytes"),
        (b"\x01\x01", "truncated frame: 2 bytes"),
        (frame(version=2), "unsupported protocol version 2"),
        (frame(version=0), "unsupported protocol version 0"),
        (frame(kind=0), "unknown frame kind 0"),
        (frame(kind=99), "unknown frame kind 99"),
        (frame(flags=0x80), "unknown frame flags"),
        (frame()[:-1], "truncated frame"),
        (frame() + b"junk", "stray bytes"),
        (frame(header=[1, 2]), "expected an array of 6 fields"),
        (frame(header=[1, 5, None, None, [], None]), "wrong type"),
        (frame(header=[-1, "m", None, None, [], None]), "wrong type"),
        (frame(header=[1, "m", 300, None, [], None]), "wrong type"),
        (frame(header=[1, "m", None, None, [-5], None]), "bad part sizes"),
        (frame(flags=1, payload=b""), "out-of-band payload without its part"),
        (struct.pack("!BBHII", 1, 1, 0, 10**6, 0), "oversized header"),
        (struct.pack("!BBHII", 1, 1, 0, 3, 0) + b"\xc1\xc1\xc1", "malformed frame header"),
    ],
)
def test_bad_frames_are_protocol_errors(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        codec.decode_header(data)


def test_oversized_announcement_is_rejected() -> None:
    data = frame(header=[1, "m", None, None, [10**9], None])
    with pytest.raises(ProtocolError, match="oversized message"):
        codec.decode_header(data, max_size=1 << 20)


def test_malformed_payload_and_missing_part() -> None:
    header, payload = codec.decode_header(frame(payload=b"\xc1"))
    with pytest.raises(ProtocolError, match="malformed payload"):
        codec.decode_payload(header, payload)
    bad_ext = msgpack.packb(msgpack.ExtType(1, b"\x05"))
    header, payload = codec.decode_header(frame(payload=bad_ext))
    with pytest.raises(ProtocolError, match="bad extension value"):
        codec.decode_payload(header, payload)
    with pytest.raises(ProtocolError, match="announced 0 parts, 1 given"):
        codec.decode_payload(header, payload, [b"x"])


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_fuzz_garbage_never_escapes_as_another_error(data: bytes) -> None:
    try:
        header, payload = codec.decode_header(data)
        codec.decode_payload(header, payload, [bytearray(n) for n in header.parts])
    except ProtocolError:
        pass


def test_slot_receive_ignores_the_rest_of_the_slot() -> None:
    enc = codec.encode(Kind.REPLY, 7, "hi")
    slot = bytearray(4096)
    slot[: len(enc.frame)] = enc.frame
    assert codec.frame_size(slot) == len(enc.frame)
    header, payload = codec.decode_header(slot, exact=False)
    assert codec.decode_payload(header, payload) == "hi"


def test_tag_layout() -> None:
    conn, call = codec.MAX_CONN_ID, codec.MAX_CALL_ID
    assert codec.split_tag(codec.frame_tag(conn, call)) == (False, conn, call, 0)
    assert codec.split_tag(codec.data_tag(5, 6, 255)) == (True, 5, 6, 255)
    assert codec.frame_tag(1, 0) != codec.frame_tag(2, 0)
    # Frames match the frame probe, data parts never do.
    assert codec.frame_tag(conn, call) & codec.FRAME_PROBE_MASK == codec.FRAME_PROBE_TAG
    assert codec.data_tag(1, 1, 1) & codec.FRAME_PROBE_MASK != codec.FRAME_PROBE_TAG
    # Distinct (conn, call, part) give distinct tags over the whole range of each field.
    tags = {codec.data_tag(c, k, p) for c in (1, conn) for k in (0, call) for p in (1, 255)}
    assert len(tags) == 8


def test_control_messages() -> None:
    msg = {"v": 1, "addr": b"\x00" * 10}
    data = codec.encode_control(msg)
    assert codec.control_length(data[:4]) == len(data) - 4
    assert codec.decode_control(data[4:]) == msg
    with pytest.raises(ProtocolError, match="oversized control message"):
        codec.control_length(struct.pack("!I", 1 << 30))
    with pytest.raises(ProtocolError, match="expected a map"):
        codec.decode_control(msgpack.packb([1]))


def test_codec_import_loads_neither_ucxx_nor_asyncio() -> None:
    code = (
        "import sys, ucxrpc.codec, ucxrpc.errors; "
        "bad = [m for m in ('ucxx', 'asyncio', 'pydantic') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@given(
    metadata=st.dictionaries(st.text(max_size=10), st.text(max_size=20) | st.binary(max_size=20))
)
@settings(max_examples=100, deadline=None)
def test_metadata_roundtrip(metadata: dict[str, str | bytes]) -> None:
    header, _ = roundtrip(codec.encode(Kind.REPLY, 1, None, metadata=metadata))
    assert (header.metadata or {}) == metadata


@pytest.mark.parametrize("metadata", [{"k": 1}, {1: "v"}, {"k": ["v"]}, {"k": None}])
def test_bad_metadata_is_a_protocol_error(metadata: dict[object, object]) -> None:
    frame = codec.encode(Kind.REQUEST, 1, [[], {}], metadata=metadata).frame  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="malformed frame header"):
        codec.decode_header(frame)


def test_arrays_travel_as_dtype_shape_and_a_part() -> None:
    data = bytes(range(256)) * 256  # 64 KiB: out of band
    array = codec.ArrayData("<u2", (128, 256), data)
    enc = codec.encode(Kind.REPLY, 1, {"a": array, "small": codec.ArrayData("|u1", [2], b"ab")})
    assert len(enc.parts) == 1 and bytes(enc.parts[0]) == data
    header, out = roundtrip(enc)
    assert isinstance(out, dict)
    big, small = out["a"], out["small"]
    assert isinstance(big, codec.ArrayData) and isinstance(small, codec.ArrayData)
    assert (big.dtype, big.shape, bytes(big.data)) == ("<u2", (128, 256), data)
    assert (small.dtype, small.shape, bytes(small.data)) == ("|u1", (2,), b"ab")
    assert repr(array) == "ArrayData('<u2', (128, 256), <65536 bytes>)"
    hooked = codec.decode_payload(
        header,
        codec.decode_header(enc.frame)[1],
        [bytearray(data)],
        array_hook=lambda a: (a.dtype, a.shape),
    )
    assert hooked["a"] == ("<u2", (128, 256))


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb(["<u2", [2]]),  # two fields
        msgpack.packb([1, [2], b"ab"]),  # dtype not a string
        msgpack.packb(["<u2", [-1], b"ab"]),  # negative dimension
        msgpack.packb(["<u2", [2], "ab"]),  # data not bytes
        b"\xc1",  # not msgpack
    ],
)
def test_malformed_arrays_are_protocol_errors(body: bytes) -> None:
    payload = msgpack.packb(msgpack.ExtType(codec.EXT_ARRAY, body))
    header = codec.Header(Kind.REPLY, 1)
    with pytest.raises(ProtocolError):
        codec.decode_payload(header, payload)


def test_array_hook_errors_become_protocol_errors() -> None:
    enc = codec.encode(Kind.REPLY, 1, codec.ArrayData("<f8", [3], b"12345"))
    header, payload = codec.decode_header(enc.frame)

    def strict(a: codec.ArrayData) -> object:
        raise ValueError("buffer size must be a multiple of element size")

    with pytest.raises(ProtocolError, match="malformed array value: buffer size"):
        codec.decode_payload(header, payload, array_hook=strict)


def test_the_default_hook_converts_unknown_values_and_their_large_buffers() -> None:
    class Box:
        def __init__(self, blob: bytes) -> None:
            self.blob = blob

    def default(obj: object) -> object:
        if isinstance(obj, Box):
            return {"blob": obj.blob}
        raise TypeError(f"cannot serialize {type(obj).__qualname__!r}")

    blob = b"z" * 40_000
    enc = codec.encode(Kind.REPLY, 1, [Box(blob), Box(b"tiny")], default=default)
    assert len(enc.parts) == 1  # the large field left msgpack even inside a converted value
    _, out = roundtrip(enc)
    assert out == [{"blob": blob}, {"blob": b"tiny"}]
    with pytest.raises(TypeError, match="cannot serialize 'object'"):
        codec.encode(Kind.REPLY, 1, object(), default=default)
