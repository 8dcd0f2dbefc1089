"""The handler table's entries: a function plus what is needed to call it safely.

Arguments are validated from the function's annotations with pydantic; the error
names the argument and the field path (``req.times: Input should be a valid integer``).
"""

from __future__ import annotations

import collections.abc
import enum
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import (
    ConfigDict,
    PydanticSchemaGenerationError,
    PydanticUserError,
    TypeAdapter,
    ValidationError,
)

from .errors import InvalidArgument

__all__ = [
    "Handler",
    "Param",
    "Priority",
    "adapter_for",
    "describe_validation_error",
    "make_handler",
    "resolve_hints",
    "stream_item_type",
]


class Priority(enum.IntEnum):
    """Call priority: when a limit is reached, higher priorities start first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2


_BYTES_LIKE = (bytes, bytearray, memoryview)
_STREAM_ORIGINS = (
    collections.abc.AsyncIterator,
    collections.abc.AsyncIterable,
    collections.abc.AsyncGenerator,
)


def adapter_for(annotation: Any) -> TypeAdapter[Any] | None:
    """A pydantic validator for ``annotation`` (None for ``Any`` or no annotation).

    Types pydantic has no schema for (numpy arrays, user classes) are checked with
    ``isinstance``.
    """
    if annotation in (inspect.Parameter.empty, Any):
        return None
    try:
        try:
            return TypeAdapter(annotation)
        except PydanticSchemaGenerationError:
            return TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True))
    except PydanticUserError as exc:  # e.g. typing.TypedDict before Python 3.12
        raise TypeError(f"cannot validate {annotation!r}: {exc.message}") from None


def describe_validation_error(name: str, exc: ValidationError) -> str:
    """``req.times: Input should be a valid integer`` from a pydantic error."""
    err = exc.errors(include_url=False)[0]
    path = ".".join(str(p) for p in (name, *err["loc"]))
    more = exc.error_count() - 1
    return f"{path}: {err['msg']}" + (f" (and {more} more errors)" if more > 0 else "")


def stream_item_type(annotation: Any) -> Any | None:
    """The item type if ``annotation`` is an async iterator type, else None."""
    if typing.get_origin(annotation) in _STREAM_ORIGINS:
        args = typing.get_args(annotation)
        return args[0] if args else Any
    if annotation in _STREAM_ORIGINS:
        return Any
    return None


def resolve_hints(func: Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotations of ``func``.

    Raises:
        TypeError: An annotation names something that cannot be found (a type
            defined inside a function, for example), so arguments could not be
            validated.
    """
    try:
        return typing.get_type_hints(func)
    except NameError as exc:
        name = getattr(func, "__qualname__", repr(func))
        raise TypeError(
            f"cannot resolve the annotations of {name}: {exc} "
            "(define the types it uses at module level)"
        ) from None


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of a handler."""

    name: str
    kind: inspect._ParameterKind
    annotation: Any
    adapter: TypeAdapter[Any] | None

    def validate(self, value: Any) -> Any:
        ann = self.annotation
        if self.adapter is None or type(value) is ann:
            return value
        if ann is bytes and isinstance(value, _BYTES_LIKE):
            return value  # large binary values arrive as bytearray, without a copy
        try:
            return self.adapter.validate_python(value)
        except ValidationError as exc:
            raise InvalidArgument(describe_validation_error(self.name, exc)) from None


@dataclass(frozen=True, slots=True)
class Handler:
    """A registered method: the function and how to call it.

    Attributes:
        name: The method name callers use.
        func: The function (async, async generator, or plain: plain ones run in a
            thread).
        is_async: True for coroutine functions.
        is_stream: True for async generator functions (server streaming).
        priority: The default priority of calls to this method.
        timeout: A server-side cap on the call's duration (seconds), or None.
        idempotent: The method may safely be retried.
        params: The parameters, in order.
        signature: The signature callers see.
        simple: True when every parameter is positional-or-keyword (fast binding).
        return_annotation: The declared result (for streams, the iterator type).
        doc: The first paragraph of the docstring.
    """

    name: str
    func: Callable[..., Any]
    is_async: bool
    is_stream: bool
    priority: int
    timeout: float | None
    idempotent: bool
    params: tuple[Param, ...]
    signature: inspect.Signature
    simple: bool
    return_annotation: Any
    doc: str

    @property
    def kind(self) -> str:
        """``"stream"`` for streaming methods, else ``"unary"``."""
        return "stream" if self.is_stream else "unary"

    def bind(self, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """Check and convert the call's arguments.

        Raises:
            InvalidArgument: Wrong arity, unknown keyword or a value failing validation.
        """
        params = self.params
        if self.simple and not kwargs and len(args) == len(params):
            return [p.validate(v) for p, v in zip(params, args, strict=True)], {}
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArgument(f"bad arguments for {self.name!r}: {exc}") from None
        by_name = {p.name: p for p in params}
        out_args: list[Any] = []
        out_kwargs: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            p = by_name[name]
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                out_args.extend(p.validate(v) for v in value)
            elif p.kind is inspect.Parameter.VAR_KEYWORD:
                out_kwargs.update({k: p.validate(v) for k, v in value.items()})
            elif p.kind is inspect.Parameter.KEYWORD_ONLY:
                out_kwargs[name] = p.validate(value)
            else:
                out_args.append(p.validate(value))
        return out_args, out_kwargs


def make_handler(
    func: Callable[..., Any],
    *,
    name: str,
    priority: int = Priority.NORMAL,
    timeout: float | None = None,
    idempotent: bool = False,
    hints_from: Callable[..., Any] | None = None,
) -> Handler:
    """Build a :class:`Handler` from a function and its annotations.

    Args:
        func: What to call (a bound method drops ``self`` from the signature).
        name: The method name.
        priority: Default priority.
        timeout: Server-side cap on a call's duration.
        idempotent: Whether retries are safe.
        hints_from: Take the annotations from this function instead (a service
            interface, when the implementation does not repeat them).
    """
    if not callable(func):
        raise TypeError(f"{func!r} is not callable")
    sig = inspect.signature(func)
    hints = resolve_hints(func)
    if hints_from is not None and not hints:
        hints = resolve_hints(hints_from)
    params = list(sig.parameters.values())
    built = []
    for p in params:
        ann = hints.get(p.name, p.annotation)
        built.append(Param(p.name, p.kind, ann, adapter_for(ann)))
    simple = all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    doc = inspect.getdoc(func) or (inspect.getdoc(hints_from) if hints_from else None) or ""
    return Handler(
        name=name,
        func=func,
        is_async=inspect.iscoroutinefunction(func),
        is_stream=inspect.isasyncgenfunction(func),
        priority=int(priority),
        timeout=timeout,
        idempotent=idempotent,
        params=tuple(built),
        signature=sig,
        simple=simple,
        return_annotation=hints.get("return", sig.return_annotation),
        doc=doc.split("\n\n", 1)[0],
    )
