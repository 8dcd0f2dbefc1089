"""Python values to and from what the codec carries.

The codec knows msgpack's types, bytes-like buffers and :class:`~ucxrpc.codec.ArrayData`.
This module teaches it the rest of what handlers take and return: pydantic models,
dataclasses, enums, dates, UUIDs, numpy arrays and scalars. The receiving side gets
plain values back (dicts, strings, arrays) and pydantic validates them into the
declared types, so a ``datetime`` sent as ISO text arrives as a ``datetime``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import enum
import pathlib
import uuid
from typing import Any

import numpy as np
from pydantic import BaseModel

from .codec import ArrayData

__all__ = ["from_array", "to_wire"]

_AS_TEXT = (uuid.UUID, decimal.Decimal, pathlib.PurePath)


def to_wire(obj: Any) -> Any:
    """Convert one value msgpack does not know (the codec's ``default`` hook).

    Containers come back shallow: values inside them go through this hook again.

    Raises:
        TypeError: The value has no wire form.
    """
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="python")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("numpy arrays of Python objects cannot be serialized")
        return ArrayData(obj.dtype.str, obj.shape, np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (_dt.datetime, _dt.date, _dt.time)):
        return obj.isoformat()
    if isinstance(obj, _dt.timedelta):
        return obj.total_seconds()
    if isinstance(obj, _AS_TEXT):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise TypeError(f"cannot serialize {type(obj).__qualname__!r}")


def from_array(data: ArrayData) -> np.ndarray[Any, Any]:
    """Rebuild a numpy array on the received buffer, without a copy.

    Arrays received out of band are writable; small inline ones are read-only views
    of the frame.
    """
    dtype = np.dtype(data.dtype)
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    return np.frombuffer(data.data, dtype=dtype).reshape(data.shape)
