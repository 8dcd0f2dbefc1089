"""Python values to wire form and back (no UCX needed: pure conversions)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import pathlib
import uuid

import numpy as np
import pytest

from ucxrpc.calls.values import from_array, to_wire
from ucxrpc.wire import codec


class Mode(enum.IntEnum):
    FAST = 1


@dataclasses.dataclass
class Inner:
    n: int


@dataclasses.dataclass
class Outer:
    inner: Inner
    when: dt.date


def decode(value: object) -> object:
    enc = codec.encode(codec.Kind.REPLY, 1, value, default=to_wire)
    header, payload = codec.decode_header(enc.frame)
    parts = [bytearray(bytes(memoryview(p).cast("B"))) for p in enc.parts]
    return codec.decode_payload(header, payload, parts, array_hook=from_array)


def test_standard_values_become_plain_data() -> None:
    stamp = dt.datetime(2026, 11, 21, 12, 30, tzinfo=dt.UTC)
    ident = uuid.UUID(int=7)
    out = decode(
        {
            "stamp": stamp,
            "id": ident,
            "price": decimal.Decimal("1.10"),
            "path": pathlib.PurePosixPath("/a/b"),
            "mode": Mode.FAST,
            "tags": {"x"},
            "span": dt.timedelta(seconds=1.5),
            "outer": Outer(Inner(3), dt.date(2026, 1, 1)),
            "scalar": np.float32(2.5),
        }
    )
    assert out == {
        "stamp": stamp.isoformat(),
        "id": str(ident),
        "price": "1.10",
        "path": "/a/b",
        "mode": 1,
        "tags": ["x"],
        "span": 1.5,
        "outer": {"inner": {"n": 3}, "when": "2026-01-01"},
        "scalar": 2.5,
    }


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.zeros((0, 5), dtype=np.float32),
        np.arange(100_000, dtype=np.float64),  # out of band
        np.array([True, False]),
        np.arange(20).reshape(4, 5)[:, ::2],  # not contiguous
        np.arange(6, dtype=">i4"),  # big endian stays big endian
    ],
)
def test_arrays_round_trip(array: np.ndarray) -> None:
    out = decode(array)
    assert isinstance(out, np.ndarray)
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_values_without_a_wire_form_are_refused() -> None:
    with pytest.raises(TypeError, match="arrays of Python objects"):
        to_wire(np.array([object()]))
    with pytest.raises(TypeError, match="cannot serialize 'object'"):
        to_wire(object())
    with pytest.raises(ValueError, match="object arrays"):
        from_array(codec.ArrayData("|O", (1,), b"\0" * 8))
