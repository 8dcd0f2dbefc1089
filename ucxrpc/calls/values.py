"""Python values to and from what the codec carries, and received values into declared types.

The codec knows msgpack's types, bytes-like buffers and :class:`~ucxrpc.codec.ArrayData`.
This module teaches it the rest of what handlers take and return: pydantic models,
dataclasses, enums, dates, UUIDs, numpy arrays and scalars. The receiving side gets
plain values back (dicts, strings, arrays) and pydantic validates them into the
declared types, so a ``datetime`` sent as ISO text arrives as a ``datetime``.

**Types follow the declaration, never the size.** The codec hands binary values over as
whatever buffer they were received into: ``bytes`` when they travelled inside the frame
(below ``Config.oob_threshold``), a ``bytearray`` or a ``memoryview`` when they travelled
as a separate data part. :func:`converter_for` turns that into the declared type before
pydantic sees the value:

========================= =====================================================
declared                  received as
========================= =====================================================
``bytes``                 ``bytes`` (a copy of a data part: bytes are immutable)
``bytearray``             ``bytearray`` (the received buffer itself when it is one)
``memoryview``            ``memoryview`` on the received buffer (never a copy)
:data:`Buffer`            a writable, flat (``"B"``, 1-D) ``memoryview``: the received
                          buffer itself when it travelled out of band, a private
                          copy of the (small) value otherwise
``numpy.ndarray``         an array on the received buffer (never a copy)
``Any`` / no annotation   :func:`plain`: every bytes-like value is ``bytes``; arrays
                          stay arrays
========================= =====================================================

The same holds inside ``list[...]``, ``tuple[...]``, ``dict[..., ...]``, unions,
pydantic models, dataclasses and ``TypedDict`` fields.

Arrays travel as ``[dtype, shape, data]``: ``dtype`` is numpy's type string (``"<f8"``,
``"<M8[ns]"``) for simple types and a JSON description (names, formats, offsets,
itemsize; base and shape for sub-arrays) for structured ones. It is parsed back with
:func:`np.dtype` on checked lists and strings: never evaluated, never unpickled.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import datetime as _dt
import decimal
import enum
import functools
import inspect
import json
import math
import pathlib
import re
import types
import typing
import uuid
import warnings
from collections.abc import Callable
from typing import Annotated, Any, TypeAlias

import numpy as np
import typing_extensions
from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler, RootModel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema
from typing_extensions import is_typeddict

from ..io import copier
from ..wire.codec import ArrayData

__all__ = [
    "Buffer",
    "BufferSpec",
    "Convert",
    "as_buffer",
    "as_bytearray",
    "as_bytes",
    "as_memoryview",
    "converter_for",
    "dtype_from_wire",
    "dtype_to_wire",
    "from_array",
    "plain",
    "to_wire",
]

_AS_TEXT = (uuid.UUID, decimal.Decimal, pathlib.PurePath)

#: Converts one received value (it may change lists and dicts in place).
Convert: TypeAlias = Callable[[Any], Any]


# -- sending ------------------------------------------------------------------------------------


def to_wire(obj: Any) -> Any:
    """Convert one value msgpack does not know (the codec's ``default`` hook).

    Containers come back shallow: values inside them go through this hook again.

    Raises:
        TypeError: The value has no wire form (arrays of Python objects among them).
    """
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="python")
    if isinstance(obj, np.ndarray):
        text = dtype_to_wire(obj.dtype)
        return ArrayData(text, obj.shape, _array_bytes(obj))
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


def _array_bytes(array: np.ndarray[Any, Any]) -> Any:
    """The array's elements in C order as a flat byte array (a view when already contiguous).

    A ``uint8`` view rather than the array itself: the buffer protocol cannot export
    datetime, timedelta or many structured dtypes, but any array's memory is bytes.
    """
    if array.nbytes == 0:
        return b""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


# -- dtypes -------------------------------------------------------------------------------------

#: Kinds whose elements are plain memory: no object pointers, no StringDType arenas.
_PLAIN_KINDS = frozenset("biufcmMSUV")
#: numpy's own type strings for simple dtypes: ``<f8``, ``|b1``, ``<M8[ns]``, ``<m8[25s]``.
_SIMPLE_DTYPE = re.compile(r"[<>|=]?[biufcmMSUV][0-9]{0,10}(?:\[[0-9]{0,10}[a-zA-Z]{1,3}\])?")
_OBJECT_DTYPE = re.compile(r"[<>|=]?O[0-9]{0,2}")
_MAX_DTYPE_TEXT = 256 * 1024
_MAX_DTYPE_DEPTH = 32
_MAX_DTYPE_FIELDS = 4096
_MAX_DIMS = 64  # numpy's own limit (NPY_MAXDIMS in numpy 2)
_STRUCT_KEYS = frozenset({"names", "formats", "offsets", "itemsize"})


def dtype_to_wire(dtype: np.dtype[Any]) -> str:
    """The wire text of ``dtype``: numpy's type string, or JSON for structured dtypes.

    Raises:
        TypeError: The dtype holds Python objects (or other pointers), or numpy
            cannot describe it by a type string.
    """
    if dtype.fields is None and dtype.subdtype is None:
        return _simple_to_wire(dtype)
    return json.dumps(_dtype_spec(dtype, 0), separators=(",", ":"))


def _simple_to_wire(dtype: np.dtype[Any]) -> str:
    if dtype.hasobject:
        raise TypeError("numpy arrays of Python objects cannot be serialized")
    text = dtype.str
    if dtype.kind not in _PLAIN_KINDS or _SIMPLE_DTYPE.fullmatch(text) is None:
        raise TypeError(f"numpy arrays of dtype {dtype!r} cannot be serialized")
    return text


def _dtype_spec(dtype: np.dtype[Any], depth: int) -> Any:
    if depth > _MAX_DTYPE_DEPTH:
        raise TypeError("numpy dtype nested too deeply to be serialized")
    if dtype.fields is not None:
        names = list(dtype.names or ())
        fields = [dtype.fields[name] for name in names]
        spec: dict[str, Any] = {
            "names": names,
            "formats": [_dtype_spec(f[0], depth + 1) for f in fields],
            "offsets": [f[1] for f in fields],
            "itemsize": dtype.itemsize,
        }
        titles = [f[2] if len(f) > 2 else None for f in fields]
        if any(t is not None for t in titles):
            if not all(t is None or isinstance(t, str) for t in titles):
                raise TypeError("numpy field titles must be strings to be serialized")
            spec["titles"] = titles
        if dtype.isalignedstruct:
            spec["aligned"] = True
        return spec
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return {"base": _dtype_spec(base, depth + 1), "shape": list(shape)}
    return _simple_to_wire(dtype)


def dtype_from_wire(text: str) -> np.dtype[Any]:
    """The dtype described by ``text`` (from :func:`dtype_to_wire`).

    Only numpy type strings of plain-memory kinds and the JSON form are accepted; the
    result never holds Python objects.

    Raises:
        ValueError: Malformed, unknown, too large, or an object dtype.
        TypeError: ``text`` is not a string.
    """
    if type(text) is not str:
        raise TypeError(f"a dtype must be given as text, not {type(text).__qualname__}")
    return _parse_dtype(text)


@functools.lru_cache(maxsize=512)  # arrays of one dtype are sent again and again
def _parse_dtype(text: str) -> np.dtype[Any]:
    if len(text) > _MAX_DTYPE_TEXT:
        raise ValueError(f"dtype description of {len(text)} characters is too long")
    if text[:1] in ("{", "["):
        try:
            spec = json.loads(text)
        except (ValueError, RecursionError):
            raise ValueError("malformed dtype description") from None
        dtype = _dtype_from_spec(spec, 0, [0])
    else:
        dtype = _simple_from_wire(text)
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    return dtype


def _numpy_dtype(spec: Any, **kwargs: Any) -> np.dtype[Any]:
    # numpy warns about deprecated aliases; a peer's choice must never turn into a
    # warning (or, under -W error, into an unexpected exception type).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            dtype: np.dtype[Any] = np.dtype(spec, **kwargs)
        except (TypeError, ValueError, OverflowError, Warning) as exc:
            raise ValueError(f"bad dtype: {exc}") from None
    return dtype


def _simple_from_wire(text: str) -> np.dtype[Any]:
    if _OBJECT_DTYPE.fullmatch(text) is not None:
        raise ValueError("object arrays are not accepted")
    if _SIMPLE_DTYPE.fullmatch(text) is None:
        raise ValueError(f"unsupported dtype {text[:40]!r}")
    dtype = _numpy_dtype(text)
    if dtype.kind not in _PLAIN_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"unsupported dtype {text!r}")
    return dtype


def _is_int_list(value: Any) -> bool:
    return type(value) is list and all(type(n) is int and n >= 0 for n in value)


def _dtype_from_spec(spec: Any, depth: int, count: list[int]) -> np.dtype[Any]:
    if depth > _MAX_DTYPE_DEPTH:
        raise ValueError("dtype description nested too deeply")
    count[0] += 1
    if count[0] > _MAX_DTYPE_FIELDS:
        raise ValueError("dtype description has too many fields")
    if type(spec) is str:
        return _simple_from_wire(spec)
    if type(spec) is not dict:
        raise ValueError("malformed dtype description")
    if spec.keys() == {"base", "shape"}:
        shape = spec["shape"]
        if not _is_int_list(shape) or len(shape) > _MAX_DIMS:
            raise ValueError("malformed sub-array shape in dtype description")
        base = _dtype_from_spec(spec["base"], depth + 1, count)
        return _numpy_dtype((base, tuple(shape)))
    if not _STRUCT_KEYS <= spec.keys() <= _STRUCT_KEYS | {"titles", "aligned"}:
        raise ValueError("malformed dtype description")
    names, formats, offsets = spec["names"], spec["formats"], spec["offsets"]
    itemsize, titles = spec["itemsize"], spec.get("titles")
    aligned = spec.get("aligned", False)
    n = len(names) if type(names) is list else -1
    if (
        n < 0
        or not all(type(name) is str for name in names)
        or len(set(names)) != n
        or type(formats) is not list
        or len(formats) != n
        or not _is_int_list(offsets)
        or len(offsets) != n
        or type(itemsize) is not int
        or itemsize < 0
        or type(aligned) is not bool
        or not (
            titles is None
            or (
                type(titles) is list
                and len(titles) == n
                and all(t is None or type(t) is str for t in titles)
            )
        )
    ):
        raise ValueError("malformed structured dtype description")
    fields: dict[str, Any] = {
        "names": names,
        "formats": [_dtype_from_spec(f, depth + 1, count) for f in formats],
        "offsets": offsets,
        "itemsize": itemsize,
    }
    if titles is not None:
        fields["titles"] = titles
    return _numpy_dtype(fields, align=aligned)


def from_array(data: ArrayData) -> np.ndarray[Any, Any]:
    """Rebuild a numpy array on the received buffer, without a copy (the codec's array hook).

    Arrays received out of band are writable; small inline ones are read-only views
    of the frame. Zero-size arrays (and zero-size dtypes) are fresh empty arrays.

    Raises:
        ValueError: An unknown or object dtype, a bad shape, or a data size that does
            not match the dtype and shape.
        TypeError: The fields have the wrong types.
    """
    dtype = dtype_from_wire(data.dtype)
    shape = data.shape
    if (
        type(shape) is not tuple
        or len(shape) > _MAX_DIMS
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise ValueError("malformed array shape")
    try:
        view = memoryview(data.data)
    except TypeError:
        raise TypeError("array data must be bytes-like") from None
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if view.nbytes != expected:
        raise ValueError(
            f"array of {shape} {dtype} needs {expected} bytes, {view.nbytes} were received"
        )
    if dtype.subdtype is not None:
        # A sub-array dtype is only ever a field type for numpy arrays; a bare one is
        # the same as its base with the sub-array's dimensions appended.
        dtype, sub = dtype.subdtype
        shape = (*shape, *sub)
        count = math.prod(shape)
        if len(shape) > _MAX_DIMS:
            raise ValueError("malformed array shape")
    if expected == 0:
        try:
            return np.empty(shape, dtype=dtype)
        except (ValueError, MemoryError, OverflowError) as exc:  # numpy's size limits
            raise ValueError(f"bad array shape: {exc}") from None
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    return np.frombuffer(view, dtype=dtype, count=count).reshape(shape)


# -- receiving: bytes-like values into their declared types -------------------------------------


def as_bytes(value: Any) -> Any:
    """``bytes`` for a ``bytearray`` or ``memoryview``; anything else unchanged."""
    if type(value) is bytes:
        return value
    if isinstance(value, (bytearray, memoryview)):
        return copier.to_bytes(value)
    return value


def as_bytearray(value: Any) -> Any:
    """``bytearray`` for bytes-like values (the value itself when it is one)."""
    if isinstance(value, bytearray):
        return value
    if isinstance(value, (bytes, memoryview)):
        # A copy: a bytearray cannot wrap memory it does not own.
        return bytearray(value)
    return value


def as_memoryview(value: Any) -> Any:
    """A ``memoryview`` on a ``bytes`` or ``bytearray`` value (no copy)."""
    if isinstance(value, (bytes, bytearray)):
        return memoryview(value)
    return value


def as_buffer(value: Any) -> memoryview:
    """The value as a writable, flat (``"B"``, 1-D, contiguous) ``memoryview``.

    Writable received buffers (out-of-band ``bytearray`` and ``memoryview`` parts,
    writable numpy arrays) are wrapped without a copy; read-only ones (``bytes``,
    inline arrays) are copied into a private ``bytearray``.

    Raises:
        PydanticCustomError: The value is not bytes-like (pydantic reports it as a
            validation error with its field path).
    """
    if type(value) is bytearray:
        return memoryview(value)
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise PydanticCustomError("buffer_type", "Input should be a bytes-like object")
        value = _array_bytes(value) if value.nbytes else bytearray()
    if type(value) is memoryview:
        view = value  # the received part itself (``memoryview(view)`` would be a new object)
    else:
        try:
            view = memoryview(value)
        except TypeError:
            raise PydanticCustomError(
                "buffer_type", "Input should be a bytes-like object"
            ) from None
    if view.readonly or not view.c_contiguous:
        return memoryview(bytearray(view.tobytes()))
    if view.ndim != 1 or view.format != "B":
        return view.cast("B") if view.nbytes else memoryview(bytearray())
    return view


class BufferSpec:
    """The pydantic schema of :data:`Buffer` (the metadata in its ``Annotated``).

    Validation is :func:`as_buffer`; the JSON Schema is a binary string; in JSON mode a
    buffer serializes as ``bytes`` would.
    """

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(
            as_buffer,
            serialization=core_schema.plain_serializer_function_ser_schema(
                bytes, return_schema=core_schema.bytes_schema(), when_used="json"
            ),
        )

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "format": "binary"}

    def __repr__(self) -> str:
        return "BufferSpec()"


#: A received binary value without a copy: annotate a parameter, result, stream item or
#: model field with it. The value is a writable, flat (format ``"B"``, 1-D) ``memoryview``:
#: the received buffer itself when the value travelled out of band (at least
#: ``Config.oob_threshold`` bytes), a private copy of the small value otherwise. Any
#: bytes-like value (or a numpy array, as its raw bytes) is accepted. Type checkers see
#: ``memoryview``.
Buffer: TypeAlias = Annotated[memoryview, BufferSpec()]


#: Types :func:`plain` must look at: buffers to convert, containers to enter.
_SCAN = frozenset({bytearray, memoryview, list, dict})
_BUFFERS = frozenset({bytearray, memoryview})


def plain(value: Any) -> Any:
    """The rule for values without a declared type: every bytes-like value is ``bytes``.

    ``bytearray`` and ``memoryview`` values become ``bytes``, also inside lists and
    dicts (changed in place: these are freshly decoded values); numpy arrays stay
    arrays. Scalars and strings are returned at once, without a scan; a container of
    scalars costs one pass in C (``isdisjoint``), not a Python loop.
    """
    t = type(value)
    if t is bytearray or t is memoryview:
        return copier.to_bytes(value)
    if t is list:
        if _SCAN.isdisjoint(map(type, value)):
            return value  # the common case (a list of scalars): no stack, no loop
    elif t is not dict or _SCAN.isdisjoint(map(type, value.values())):
        return value
    # Iterative: decoded values may nest up to msgpack's depth, deeper than recursion.
    stack: list[Any] = [value]
    seen = {id(value)}
    while stack:
        node = stack.pop()
        if type(node) is list:
            if _SCAN.isdisjoint(map(type, node)):
                continue
            items: Any = enumerate(node)
        else:
            if _SCAN.isdisjoint(map(type, node.values())):
                continue
            items = node.items()
        for key, item in items:
            ti = type(item)
            if ti is bytearray or ti is memoryview:
                node[key] = copier.to_bytes(item)
            elif (ti is list or ti is dict) and id(item) not in seen:
                seen.add(id(item))
                stack.append(item)
    return value


_SEQUENCE_ORIGINS = frozenset(
    {
        list,
        set,
        frozenset,
        collections.deque,
        collections.abc.Sequence,
        collections.abc.MutableSequence,
        collections.abc.Set,
        collections.abc.MutableSet,
        collections.abc.Collection,
        collections.abc.Iterable,
    }
)
_MAPPING_ORIGINS = frozenset(
    {
        dict,
        collections.OrderedDict,
        collections.defaultdict,
        collections.Counter,
        collections.abc.Mapping,
        collections.abc.MutableMapping,
    }
)
_STREAM_ORIGINS = frozenset(
    {collections.abc.AsyncIterator, collections.abc.AsyncIterable, collections.abc.AsyncGenerator}
)
_UNION_ORIGINS = (typing.Union, types.UnionType)
_QUALIFIERS = frozenset(
    {
        typing.Required,
        typing.NotRequired,
        typing_extensions.Required,
        typing_extensions.NotRequired,
        typing_extensions.ReadOnly,
    }
)


class _Forward:
    """Stands for a converter still being built (a model that contains itself)."""

    __slots__ = ("target", "used")

    def __init__(self) -> None:
        self.target: Convert | None = None
        self.used = False

    def __call__(self, value: Any) -> Any:
        target = self.target
        return value if target is None else target(value)


def _each(inner: Convert) -> Convert:
    if inner is as_bytes or inner is plain:
        return _each_buffer(inner)

    def convert(value: Any) -> Any:
        if type(value) is list:
            for i, item in enumerate(value):
                new = inner(item)
                if new is not item:
                    value[i] = new
        return value

    return convert


def _each_buffer(inner: Convert) -> Convert:
    # ``list[bytes]`` (or ``list[Any]``): most lists hold no buffer at all; one pass in C
    # finds out, and only then the Python loop runs.
    look_for = _BUFFERS if inner is as_bytes else _SCAN

    def convert(value: Any) -> Any:
        if type(value) is list and not look_for.isdisjoint(map(type, value)):
            for i, item in enumerate(value):
                value[i] = inner(item)
        return value

    return convert


def _positional(inners: list[Convert | None]) -> Convert:
    def convert(value: Any) -> Any:
        if type(value) is list:
            for i, inner in zip(range(len(value)), inners, strict=False):
                if inner is not None:
                    value[i] = inner(value[i])
        return value

    return convert


def _values(inner: Convert) -> Convert:
    def convert(value: Any) -> Any:
        if type(value) is dict:
            for key, item in value.items():
                new = inner(item)
                if new is not item:
                    value[key] = new  # replacing a value while iterating is allowed
        return value

    return convert


def _fields(by_key: dict[str, Convert]) -> Convert:
    def convert(value: Any) -> Any:
        if type(value) is dict:
            for key, inner in by_key.items():  # the declared fields: usually few
                if key in value:
                    value[key] = inner(value[key])
        return value

    return convert


def _is_buffer_spec(metadata: Any) -> bool:
    return any(isinstance(m, BufferSpec) for m in metadata)


class _Builder:
    """Builds the converter of one annotation.

    With ``inline`` set it builds the converter for values that carried no data part:
    such values hold ``bytes`` only, so only ``bytearray`` and ``memoryview``
    declarations have work to do.
    """

    def __init__(
        self,
        inline: bool,
        recursive: frozenset[type] = frozenset(),
        namespace: collections.abc.Mapping[str, Any] | None = None,
    ) -> None:
        self.inline = inline
        #: Local names of the function that defined the types (string annotations of
        #: local dataclasses, TypedDicts and models name them).
        self.namespace = namespace
        self.plain: Convert | None = None if inline else plain
        self.to_bytes: Convert | None = None if inline else as_bytes
        #: Self-containing classes known to need a converter: inside themselves they
        #: get a forward reference to it. Others are first assumed to need none.
        self.recursive = recursive
        self.building: dict[type, _Forward] = {}
        self.built: dict[type, Convert | None] = {}
        #: Classes that turned out to need a converter although they were assumed to
        #: need none inside themselves: the next pass builds them with a forward.
        self.wrong_guesses: set[type] = set()

    def build(self, ann: Any) -> Convert | None:
        if ann is Any or ann is object or ann is inspect.Parameter.empty:
            return self.plain
        if ann is bytes:
            return self.to_bytes
        if ann is bytearray:
            return as_bytearray
        if ann is memoryview:
            return as_memoryview
        if ann is None or ann is type(None):
            return None
        if isinstance(ann, (str, typing.ForwardRef)):
            return self.plain  # unresolved: the default rule keeps bytes bytes
        if isinstance(ann, typing.TypeVar):
            bound = ann.__bound__
            return self.plain if bound is None else self.build(bound)
        supertype = getattr(ann, "__supertype__", None)  # typing.NewType
        if supertype is not None:
            return self.build(supertype)
        alias_type: Any = getattr(typing, "TypeAliasType", ())
        if isinstance(alias_type, type) and isinstance(ann, alias_type):  # ``type X = ...``
            return self.build(getattr(ann, "__value__", Any))
        origin = typing.get_origin(ann)
        if origin is not None:
            return self._generic(ann, origin, typing.get_args(ann))
        if ann in (list, set, frozenset, dict, tuple):
            return self.plain  # items of any type
        if isinstance(ann, type):
            return self._class(ann)
        return None

    def _generic(self, ann: Any, origin: Any, args: tuple[Any, ...]) -> Convert | None:
        if origin is Annotated:
            if _is_buffer_spec(ann.__metadata__):
                return None  # pydantic calls as_buffer itself (BufferSpec)
            return self.build(args[0])
        if origin in _UNION_ORIGINS:
            return self._union(args)
        if origin in _QUALIFIERS:  # TypedDict's Required[...] and friends
            return self.build(args[0])
        if origin is typing.Literal or origin in _STREAM_ORIGINS or origin is type:
            return None
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                inner = self.build(args[0])
                return None if inner is None else _each(inner)
            inners = [self.build(a) for a in args if a != ()]
            return None if all(i is None for i in inners) else _positional(inners)
        if origin in _SEQUENCE_ORIGINS:
            inner = self.build(args[0]) if args else self.plain
            return None if inner is None else _each(inner)
        if origin in _MAPPING_ORIGINS:
            inner = self.build(args[1]) if len(args) == 2 else self.plain
            return None if inner is None else _values(inner)
        if isinstance(origin, type) and issubclass(origin, np.ndarray):
            return None
        if isinstance(ann, type):  # parametrized pydantic models are classes
            return self._class(ann)
        return None

    def _class(self, cls: type) -> Convert | None:
        if issubclass(cls, (np.ndarray, np.generic, str, int, float, enum.Enum)):
            return None
        if issubclass(cls, (bytes, bytearray, memoryview)):
            return None  # subclasses: pydantic decides
        if cls in self.built:
            return self.built[cls]
        forward = self.building.get(cls)
        if forward is not None:  # a class that contains itself
            forward.used = True
            return forward if cls in self.recursive else None
        forward = self.building[cls] = _Forward()
        try:
            result = self._class_fields(cls)
        finally:
            del self.building[cls]
        forward.target = result
        self.built[cls] = result
        if result is not None and forward.used and cls not in self.recursive:
            self.wrong_guesses.add(cls)
        return result

    def _class_fields(self, cls: type) -> Convert | None:
        if issubclass(cls, BaseModel):
            if not cls.__pydantic_complete__:
                # Forward references (a model named before it is defined): resolve them
                # now, as pydantic itself would on first validation.
                cls.model_rebuild(raise_errors=False, _types_namespace=self.namespace)
            fields = cls.model_fields
            if issubclass(cls, RootModel):
                root = fields["root"]
                return None if _is_buffer_spec(root.metadata) else self.build(root.annotation)
            by_key: dict[str, Convert] = {}
            for name, info in fields.items():
                if _is_buffer_spec(info.metadata):
                    continue
                inner = self.build(info.annotation)
                if inner is None:
                    continue
                by_key[name] = inner
                for alias in (info.alias, info.validation_alias):
                    if isinstance(alias, str):
                        by_key[alias] = inner
            return _fields(by_key) if by_key else None
        named_tuple = issubclass(cls, tuple) and hasattr(cls, "_fields")
        record = dataclasses.is_dataclass(cls) or is_typeddict(cls)
        if not (named_tuple or record):
            return None  # another class: pydantic checks instances
        hints = self._hints(cls)
        if hints is None:
            return self.plain
        if named_tuple:
            names: list[str] = list(getattr(cls, "_fields", ()))
            inners = [self.build(hints.get(name, Any)) for name in names]
            return None if all(i is None for i in inners) else _positional(inners)
        if dataclasses.is_dataclass(cls):
            names = [f.name for f in dataclasses.fields(cls)]
        else:
            names = list(hints)
        by_key = {}
        for name in names:
            inner = self.build(hints.get(name, Any))
            if inner is not None:
                by_key[name] = inner
        return _fields(by_key) if by_key else None

    def _hints(self, cls: type) -> dict[str, Any] | None:
        try:
            return typing.get_type_hints(cls, include_extras=True)
        except Exception:  # unresolvable: pydantic will say so; fall back to the default
            if self.namespace is None:
                return None
        try:
            # A class defined in a function: its own names, then the function's.
            local = {**self.namespace, **vars(cls)}
            return typing.get_type_hints(cls, localns=local, include_extras=True)
        except Exception:
            return None

    def _union(self, args: tuple[Any, ...]) -> Convert | None:
        members = [a for a in args if a is not type(None)]
        built = [(a, self.build(a)) for a in members]
        if all(c is None for _, c in built):
            return None
        # A bytes-like value takes the first bytes-like member's type; bytes by default.
        buffer_conv: Convert | None = self.to_bytes
        for a, c in built:
            if _buffer_target(a):
                buffer_conv = c
                break
        else:
            if any(a is Any or a is object for a in members):
                buffer_conv = self.plain
        seq = [c for a, c in built if _container_kind(a) == "seq"]
        maps = [c for a, c in built if _container_kind(a) == "map"]
        # Exactly one member that can take a list (a dict) decides; otherwise the
        # default rule (bytes) keeps the result well defined.
        seq_conv = seq[0] if len(seq) == 1 else self.plain
        map_conv = maps[0] if len(maps) == 1 else self.plain

        def convert(value: Any) -> Any:
            t = type(value)
            if t is bytes or t is bytearray or t is memoryview:
                return value if buffer_conv is None else buffer_conv(value)
            if t is list:
                return value if seq_conv is None else seq_conv(value)
            if t is dict:
                return value if map_conv is None else map_conv(value)
            return value

        return convert


def _buffer_target(ann: Any) -> bool:
    if ann in (bytes, bytearray, memoryview):
        return True
    return typing.get_origin(ann) is Annotated and _is_buffer_spec(ann.__metadata__)


def _container_kind(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is Annotated:
        return _container_kind(typing.get_args(ann)[0])
    if origin is tuple or origin in _SEQUENCE_ORIGINS or ann in (list, tuple, set, frozenset):
        return "seq"
    if origin in _MAPPING_ORIGINS or ann is dict:
        return "map"
    cls = origin if isinstance(origin, type) else ann
    if isinstance(cls, type):
        if issubclass(cls, tuple) and hasattr(cls, "_fields"):
            return "seq"
        if issubclass(cls, BaseModel):
            return "seq" if issubclass(cls, RootModel) else "map"
        if dataclasses.is_dataclass(cls) or is_typeddict(cls):
            return "map"
    if ann is Any or ann is object:
        return "any"
    return ""


_CACHE: dict[tuple[Any, bool], Convert | None] = {}


def converter_for(
    annotation: Any,
    *,
    inline: bool = False,
    namespace: collections.abc.Mapping[str, Any] | None = None,
) -> Convert | None:
    """The function that brings a received value into ``annotation``'s binary types.

    It runs before pydantic validation and only changes binary values (see the module
    docstring for the rules); the rest is pydantic's work. Built once per annotation
    (at registration, or when a stub is made).

    Args:
        annotation: The declared type (``Any`` or ``inspect.Parameter.empty`` for none).
        inline: Build the variant for values that carried no data part: they hold no
            ``bytearray`` or ``memoryview``, so only declarations that need one from
            ``bytes`` have work to do.
        namespace: Local names of the function that defined the types, where string
            annotations of local dataclasses, TypedDicts and models are looked up
            (after the types' modules). Converters built with one are not cached: the
            same class may resolve differently once more names are defined.

    Returns:
        The converter, or None when values of this type never need one (``int``,
        ``str``, models without binary fields, ...): the hot path pays nothing.
    """
    if namespace is not None:
        return _build(annotation, inline, namespace)
    key = (annotation, inline)
    try:
        return _CACHE[key]
    except KeyError:
        cacheable = True
    except TypeError:  # an unhashable annotation (odd Annotated metadata): no cache
        cacheable = False
    result = _build(annotation, inline)
    if cacheable:
        _CACHE[key] = result
    return result


def _build(
    annotation: Any,
    inline: bool,
    namespace: collections.abc.Mapping[str, Any] | None = None,
) -> Convert | None:
    recursive: frozenset[type] = frozenset()
    while True:
        builder = _Builder(inline, recursive, namespace)
        result = builder.build(annotation)
        # A class inside itself is first assumed to need no converter, so that a
        # self-containing model without binary fields costs nothing. Where the guess
        # was wrong, build again with a forward reference. Each pass adds classes.
        if not builder.wrong_guesses:
            return result
        recursive |= builder.wrong_guesses
