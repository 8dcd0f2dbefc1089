"""The handler table's entries: a function plus what is needed to call it safely.

Arguments are validated from the function's annotations with pydantic; the error
names the argument and the field path (``req.times: Input should be a valid integer``).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import InvalidArgument

__all__ = ["Handler", "Priority", "make_handler", "to_wire"]


class Priority(enum.IntEnum):
    """Call priority: when a limit is reached, higher priorities start first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2


_FAST_TYPES = (str, int, float, bool)
_BYTES_LIKE = (bytes, bytearray, memoryview)


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
            raise InvalidArgument(_describe(self.name, exc)) from None


def _describe(name: str, exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    path = ".".join(str(p) for p in (name, *err["loc"]))
    more = exc.error_count() - 1
    return f"{path}: {err['msg']}" + (f" (and {more} more errors)" if more > 0 else "")


@dataclass(frozen=True, slots=True)
class Handler:
    """A registered method: the function and how to call it.

    Attributes:
        name: The method name callers use.
        func: The function (async or plain; plain ones run in a thread).
        is_async: True for coroutine functions.
        priority: The default priority of calls to this method.
        timeout: A server-side cap on the call's duration (seconds), or None.
        params: The parameters, in order.
        simple: True when every parameter is positional-or-keyword (fast binding).
    """

    name: str
    func: Callable[..., Any]
    is_async: bool
    priority: int
    timeout: float | None
    params: tuple[Param, ...]
    signature: inspect.Signature
    simple: bool
    return_annotation: Any

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
    skip_first: bool = False,
) -> Handler:
    """Build a :class:`Handler` from a function and its annotations."""
    if not callable(func):
        raise TypeError(f"{func!r} is not callable")
    sig = inspect.signature(func)
    try:
        hints = typing.get_type_hints(func)
    except Exception:
        hints = {}
    params = list(sig.parameters.values())
    if skip_first and params:
        params = params[1:]
        sig = sig.replace(parameters=params)
    built = []
    for p in params:
        ann = hints.get(p.name, p.annotation)
        adapter = None if ann in (inspect.Parameter.empty, Any) else TypeAdapter(ann)
        built.append(Param(p.name, p.kind, ann, adapter))
    simple = all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    return Handler(
        name=name,
        func=func,
        is_async=inspect.iscoroutinefunction(func),
        priority=int(priority),
        timeout=timeout,
        params=tuple(built),
        signature=sig,
        simple=simple,
        return_annotation=hints.get("return", sig.return_annotation),
    )


def to_wire(value: Any) -> Any:
    """Turn a handler's result into something msgpack can carry."""
    t = type(value)
    if t in _FAST_TYPES or value is None or t in _BYTES_LIKE:
        return value
    if isinstance(value, BaseModel):
        return value.model_dump(mode="python")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value
