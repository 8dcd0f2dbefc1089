"""The handler table's entries: a function plus what is needed to call it safely.

Arguments are validated from the function's annotations with pydantic; the error
names the argument and the field path (``req.times: Input should be a valid integer``).
Before pydantic, binary values are brought into their declared types
(:func:`~ucxrpc.calls.values.converter_for`): what a handler gets depends on its annotation,
never on how large the value was or how it travelled.
"""

from __future__ import annotations

import collections.abc
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    PydanticSchemaGenerationError,
    PydanticUserError,
    TypeAdapter,
    ValidationError,
)

from ..errors import InvalidArgument, RpcError
from ..protocol import Priority
from .values import Convert, converter_for

__all__ = [
    "Handler",
    "HandlerKind",
    "Param",
    "Priority",
    "adapter_for",
    "describe_validation_error",
    "make_handler",
    "make_param",
    "resolve_hints",
    "stream_item_type",
    "value_validator",
]


#: A handler's call kind (a subset of :data:`ucxrpc.context.CallKind`).
HandlerKind = Literal["unary", "stream", "client_stream", "bidi"]


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


def value_validator(
    annotation: Any, label: str, error: Callable[[str], RpcError] = InvalidArgument
) -> Callable[[Any], Any] | None:
    """A function bringing one received value into ``annotation``.

    Binary values are converted first (:func:`~ucxrpc.calls.values.converter_for`), then
    pydantic validates. Use it for every value that arrives on its own: results and
    stream items on the client, stream items on the server.

    Args:
        annotation: The declared type (``Any`` or ``inspect.Parameter.empty``: the
            un-annotated rule, bytes-like values become ``bytes``).
        label: The first element of the error's field path (``"result"``).
        error: Makes the exception raised when validation fails, from its message.

    Returns:
        The validator, or None when nothing is ever converted or checked.
    """
    convert = converter_for(annotation)
    adapter = adapter_for(annotation)
    if adapter is None:
        return convert

    def validate(value: Any) -> Any:
        if convert is not None:
            value = convert(value)
        if type(value) is annotation:
            return value
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            raise error(describe_validation_error(label, exc)) from None

    return validate


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
    """The resolved annotations of ``func``, ``Annotated`` metadata kept.

    The metadata matters: :data:`~ucxrpc.calls.values.Buffer` and pydantic constraints
    (``Annotated[int, Field(gt=0)]``) live there.

    Raises:
        TypeError: An annotation names something that cannot be found (a type
            defined inside a function, for example), so arguments could not be
            validated.
    """
    try:
        return typing.get_type_hints(func, include_extras=True)
    except NameError as exc:
        name = getattr(func, "__qualname__", repr(func))
        raise TypeError(
            f"cannot resolve the annotations of {name}: {exc} "
            "(define the types it uses at module level)"
        ) from None


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of a handler.

    Attributes:
        name: The parameter's name.
        kind: Positional, keyword-only, ``*args`` or ``**kwargs``.
        annotation: The declared type (``inspect.Parameter.empty`` when there is none).
        adapter: The pydantic validator (None: nothing to check).
        convert: Brings binary values into the declared types (None: never needed).
        convert_inline: The same for requests that carried no data part (their binary
            values are all ``bytes``): None for most types, so those pay nothing.
    """

    name: str
    kind: inspect._ParameterKind
    annotation: Any
    adapter: TypeAdapter[Any] | None
    convert: Convert | None = None
    convert_inline: Convert | None = None

    def validate(self, value: Any, oob: bool = True) -> Any:
        """Convert and check one argument.

        Args:
            value: The decoded argument.
            oob: Whether the request carried data parts (bytearray or memoryview
                values may be present); False lets most types skip conversion.

        Raises:
            InvalidArgument: The value does not fit the declared type.
        """
        convert = self.convert if oob else self.convert_inline
        if convert is not None:
            value = convert(value)
        ann = self.annotation
        if self.adapter is None or type(value) is ann:
            return value
        try:
            return self.adapter.validate_python(value)
        except ValidationError as exc:
            raise InvalidArgument(describe_validation_error(self.name, exc)) from None


def make_param(name: str, kind: inspect._ParameterKind, annotation: Any) -> Param:
    """A :class:`Param` with its validator and converters precomputed (at registration).

    For ``*args`` and ``**kwargs`` the annotation is that of each value, and each is
    validated on its own.
    """
    return Param(
        name,
        kind,
        annotation,
        adapter_for(annotation),
        converter_for(annotation),
        converter_for(annotation, inline=True),
    )


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
        input_param: The parameter annotated ``AsyncIterator[T]`` (the caller streams
            items into the call), or None.
        input_item: How each streamed item is validated into ``T`` (a :class:`Param`
            named after ``input_param``, so errors read ``chunks.n: ...``), or None.
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
    input_param: str | None = None
    input_item: Param | None = None

    @property
    def kind(self) -> HandlerKind:
        """The call kind, as in gRPC: ``"unary"``, ``"stream"`` (server streaming),
        ``"client_stream"`` (an ``AsyncIterator`` parameter) or ``"bidi"`` (both)."""
        if self.input_param is None:
            return "stream" if self.is_stream else "unary"
        return "bidi" if self.is_stream else "client_stream"

    def bind(
        self, args: list[Any], kwargs: dict[str, Any], oob: bool = True
    ) -> tuple[list[Any], dict[str, Any]]:
        """Check and convert the call's arguments.

        Args:
            args: The decoded positional arguments.
            kwargs: The decoded keyword arguments.
            oob: Whether the request carried data parts. Pass ``bool(parts)``: without
                parts every binary value is ``bytes`` already, and the conversion of
                ``bytes``, ``Any`` and un-annotated parameters is skipped. True is
                always correct.

        Raises:
            InvalidArgument: Wrong arity, unknown keyword or a value failing validation.
        """
        params = self.params
        if self.simple and not kwargs and len(args) == len(params):
            return [p.validate(v, oob) for p, v in zip(params, args, strict=True)], {}
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
                out_args.extend(p.validate(v, oob) for v in value)
            elif p.kind is inspect.Parameter.VAR_KEYWORD:
                out_kwargs.update({k: p.validate(v, oob) for k, v in value.items()})
            elif p.kind is inspect.Parameter.KEYWORD_ONLY:
                out_kwargs[name] = p.validate(value, oob)
            else:
                out_args.append(p.validate(value, oob))
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
    input_param: str | None = None
    input_item: Param | None = None
    for p in params:
        ann = hints.get(p.name, p.annotation)
        item = stream_item_type(ann)
        if item is None or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            built.append(make_param(p.name, p.kind, ann))
            continue
        if input_param is not None:
            raise TypeError(
                f"{name!r} takes two streams of items ({input_param!r} and {p.name!r}): "
                "a method takes at most one AsyncIterator parameter"
            )
        # The caller sends a placeholder for it and the items follow the request: the
        # parameter itself is not validated, each item is.
        input_param, input_item = p.name, make_param(p.name, p.POSITIONAL_OR_KEYWORD, item)
        built.append(Param(p.name, p.kind, ann, None))
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
        input_param=input_param,
        input_item=input_item,
    )
