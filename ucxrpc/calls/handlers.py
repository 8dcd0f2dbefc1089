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
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    ConfigDict,
    PydanticSchemaGenerationError,
    PydanticUndefinedAnnotation,
    PydanticUserError,
    TypeAdapter,
    ValidationError,
)

from ..errors import InvalidArgument, RpcError
from ..protocol import Priority
from .values import Convert, converter_for

__all__ = [
    "SCOPE_ATTR",
    "Handler",
    "HandlerKind",
    "Param",
    "Priority",
    "Scope",
    "adapter_for",
    "defining_scope",
    "describe_validation_error",
    "make_handler",
    "make_param",
    "resolve_hints",
    "scope_of",
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


def adapter_for(
    annotation: Any, namespace: Mapping[str, Any] | None = None
) -> TypeAdapter[Any] | None:
    """A pydantic validator for ``annotation`` (None for ``Any`` or no annotation).

    Types pydantic has no schema for (numpy arrays, user classes) are checked with
    ``isinstance``.

    Args:
        annotation: The resolved type.
        namespace: Local names of the function that defined the types (see
            :class:`Scope`): string annotations inside local dataclasses, TypedDicts
            and models are looked up there too.

    Raises:
        NameError: With ``namespace``, a field of a type names something that cannot
            be found.
        TypeError: pydantic cannot validate the type.
    """
    if annotation in (inspect.Parameter.empty, Any):
        return None
    try:
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(annotation)
        except PydanticSchemaGenerationError:
            adapter = TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True))
        if namespace is not None and not adapter.pydantic_complete:
            # A local type's fields name other local types: pydantic only looked in the
            # types' modules and in this function's frame.
            try:
                adapter.rebuild(_types_namespace=namespace)
            except PydanticUndefinedAnnotation as exc:
                raise NameError(exc.message, name=exc.name) from None
        return adapter
    except PydanticUserError as exc:  # e.g. typing.TypedDict before Python 3.12
        raise TypeError(f"cannot validate {annotation!r}: {exc.message}") from None


def value_validator(
    annotation: Any,
    label: str,
    error: Callable[[str], RpcError] = InvalidArgument,
    namespace: Mapping[str, Any] | None = None,
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
        namespace: Local names the types' own annotations may use (see
            :func:`adapter_for`).

    Returns:
        The validator, or None when nothing is ever converted or checked.
    """
    convert = converter_for(annotation, namespace=namespace)
    adapter = adapter_for(annotation, namespace)
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


#: The attribute that holds the :class:`Scope` of a function or class defined in a function.
SCOPE_ATTR = "__ucxrpc_scope__"
#: How far up the stack :func:`defining_scope` looks for the defining frame.
_MAX_FRAMES = 64


class Scope:
    """The local names visible where a function or class was defined inside a function.

    ``typing.get_type_hints`` only knows a function's module globals, so under
    ``from __future__ import annotations`` (every annotation a string) a type defined in
    the same function as the handler cannot be found. As pydantic does for local models,
    the frame of the defining function is captured when the decorator or the class
    statement runs, and its locals are read when the annotations are resolved: types
    defined later in that function, before the first use, are found too.

    :meth:`freeze` replaces the frame with a copy of its names once they have served,
    so that the frame (and, through it, its callers) is not kept alive.
    """

    __slots__ = ("_frame", "_names")

    def __init__(self, frame: types.FrameType) -> None:
        self._frame: types.FrameType | None = frame
        self._names: dict[str, Any] = {}

    def names(self) -> dict[str, Any]:
        """The defining function's local names, as they are now (or when frozen)."""
        frame = self._frame
        return self._names if frame is None else dict(frame.f_locals)

    def freeze(self) -> None:
        """Keep the names as they are now and let the frame go."""
        if self._frame is not None:
            self._names = dict(self._frame.f_locals)
            self._frame = None


def _defines(outer: types.CodeType, code: types.CodeType, depth: int = 3) -> bool:
    """Whether running ``outer`` creates ``code``'s function, directly or in a class body."""
    for const in outer.co_consts:
        if const is code:
            return True
        if (
            depth > 1
            and isinstance(const, types.CodeType)
            and not const.co_flags & inspect.CO_OPTIMIZED  # a class body, not a function
            and _defines(const, code, depth - 1)
        ):
            return True
    return False


def defining_scope(func: Any) -> Scope | None:
    """The :class:`Scope` of the running function that defined ``func``, if any.

    The frame is found by its code (the one whose constants hold ``func``'s code, or a
    class body's that does), not by its place on the stack: a function registered away
    from where it was defined gets no scope rather than the wrong one. Call it while
    the defining function runs: from a decorator, or from ``__init_subclass__`` with one
    of the class's functions.

    Returns:
        None for functions defined at module level (the globals suffice), or when the
        defining frame is no longer running.
    """
    target = _function(func)
    if target is None or "<locals>" not in target.__qualname__:
        return None
    code = target.__code__
    frame: types.FrameType | None = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        if frame.f_code.co_flags & inspect.CO_OPTIMIZED and _defines(frame.f_code, code):
            return Scope(frame)
        frame = frame.f_back
    return None


def _function(obj: Any) -> types.FunctionType | None:
    """The plain function behind a bound method, staticmethod or decorator wrapper."""
    obj = getattr(obj, "__func__", obj)
    try:
        obj = inspect.unwrap(obj)
    except ValueError:  # a __wrapped__ cycle
        return None
    return obj if isinstance(obj, types.FunctionType) else None


def scope_of(func: Any) -> Scope | None:
    """The :class:`Scope` recorded for ``func`` or for the class that defines it.

    :func:`ucxrpc.rpc` records one on functions, :class:`ucxrpc.Service` on the classes
    defined inside a function; a bound method's is found on the class along the MRO
    whose body defined it.
    """
    scope = getattr(func, SCOPE_ATTR, None)
    if isinstance(scope, Scope):
        return scope
    owner = getattr(func, "__self__", None)
    target = getattr(func, "__func__", None)
    if owner is None or target is None:
        return None
    cls = owner if isinstance(owner, type) else type(owner)
    for klass in cls.__mro__:
        if any(getattr(v, "__func__", v) is target for v in vars(klass).values()):
            scope = vars(klass).get(SCOPE_ATTR)
            return scope if isinstance(scope, Scope) else None
    return None


def resolve_hints(
    func: Callable[..., Any], namespace: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The resolved annotations of ``func``, ``Annotated`` metadata kept.

    The metadata matters: :data:`~ucxrpc.calls.values.Buffer` and pydantic constraints
    (``Annotated[int, Field(gt=0)]``) live there.

    Args:
        func: The function.
        namespace: Local names of the function that defined ``func`` (see
            :class:`Scope`); they come before the module globals, as in Python.

    Raises:
        TypeError: An annotation names something that can be found neither in
            ``namespace`` nor in the module globals, so arguments could not be
            validated. The message names it.
    """
    try:
        return _hints(func, namespace)
    except NameError as exc:
        raise _unresolved(func, exc) from None


def _hints(func: Callable[..., Any], namespace: Mapping[str, Any] | None) -> dict[str, Any]:
    # Locals before globals, as Python itself looks names up.
    return typing.get_type_hints(func, localns=namespace, include_extras=True)


def _unresolved(func: Any, exc: NameError) -> TypeError:
    name = getattr(func, "__qualname__", repr(func))
    hint = "define the types it uses at module level"
    if "<locals>" in name:
        hint += ", or in the function that defines it, before its first use"
    return TypeError(f"cannot resolve the annotations of {name}: {exc} ({hint})")


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


def make_param(
    name: str,
    kind: inspect._ParameterKind,
    annotation: Any,
    namespace: Mapping[str, Any] | None = None,
) -> Param:
    """A :class:`Param` with its validator and converters precomputed (at registration).

    For ``*args`` and ``**kwargs`` the annotation is that of each value, and each is
    validated on its own. ``namespace``: see :func:`adapter_for`.
    """
    # Converters first: they complete local pydantic models with ``namespace``, so
    # that pydantic's own later uses of those models find them complete.
    convert = converter_for(annotation, namespace=namespace)
    convert_inline = converter_for(annotation, inline=True, namespace=namespace)
    adapter = adapter_for(annotation, namespace)
    return Param(name, kind, annotation, adapter, convert, convert_inline)


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

    ``params``, ``return_annotation``, ``input_param`` and ``input_item`` come from the
    annotations. When one named a type not defined yet at registration, they are
    computed on first access (the first call, or reflection); an annotation that still
    cannot be resolved then raises :class:`TypeError` naming it.
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
    _pending: Callable[[], _Typed] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    if not TYPE_CHECKING:  # to type checkers, every attribute is declared above

        def __getattr__(self, attr: str) -> Any:
            # Only reached for an unset slot: the annotation-dependent fields of a
            # handler registered before its types were defined (see make_handler).
            # Once set, they are read as plain slots again: calls pay nothing.
            pending = object.__getattribute__(self, "_pending")
            if pending is None or attr not in _TYPED_FIELDS:
                raise AttributeError(attr)
            try:
                typed = pending()
            except _NotYetDefined as exc:  # still not defined: say which name, every time
                raise TypeError(str(exc)) from None
            self._fill(typed)
            return object.__getattribute__(self, attr)

    def _fill(self, typed: _Typed) -> None:
        for attr, value in zip(_TYPED_FIELDS, typed, strict=True):
            object.__setattr__(self, attr, value)
        object.__setattr__(self, "_pending", None)

    def _defer(self, resolve: Callable[[], _Typed]) -> None:
        object.__setattr__(self, "_pending", resolve)
        for attr in _TYPED_FIELDS:
            object.__delattr__(self, attr)

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


#: What :func:`make_handler` takes from the annotations: params, return annotation,
#: input parameter, input item.
_Typed = tuple[tuple[Param, ...], Any, str | None, Param | None]
_TYPED_FIELDS = ("params", "return_annotation", "input_param", "input_item")


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

    Call it while the function that defines ``func`` runs (from a decorator, as
    :meth:`Server.rpc` does) when ``func`` is defined inside a function: its local
    types are found there (see :class:`Scope`). A name that is not defined yet is
    looked up again on the handler's first use.

    Args:
        func: What to call (a bound method drops ``self`` from the signature).
        name: The method name.
        priority: Default priority.
        timeout: Server-side cap on a call's duration.
        idempotent: Whether retries are safe.
        hints_from: Take the annotations from this function instead (a service
            interface, when the implementation does not repeat them).

    Raises:
        TypeError: ``func`` is not callable, or takes two streams of items.
    """
    if not callable(func):
        raise TypeError(f"{func!r} is not callable")
    sig = inspect.signature(func)
    scope = scope_of(func) or defining_scope(func)
    hints_scope = (scope_of(hints_from) or defining_scope(hints_from)) if hints_from else None
    params = list(sig.parameters.values())
    doc = inspect.getdoc(func) or (inspect.getdoc(hints_from) if hints_from else None) or ""

    def typed() -> _Typed:
        result = _typed(func, name, sig, scope, hints_from, hints_scope)
        for used in (scope, hints_scope):
            if used is not None:
                used.freeze()  # resolved: the defining frame may go
        return result

    handler = Handler(
        name=name,
        func=func,
        is_async=inspect.iscoroutinefunction(func),
        is_stream=inspect.isasyncgenfunction(func),
        priority=int(priority),
        timeout=timeout,
        idempotent=idempotent,
        params=(),
        signature=sig,
        simple=all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params),
        return_annotation=sig.return_annotation,
        doc=doc.split("\n\n", 1)[0],
    )
    try:
        handler._fill(typed())
    except _NotYetDefined:
        handler._defer(typed)  # perhaps defined later: look again on first use
    return handler


class _NotYetDefined(TypeError):
    """An annotation names something not (yet) defined."""


def _typed(
    func: Callable[..., Any],
    name: str,
    sig: inspect.Signature,
    scope: Scope | None,
    hints_from: Callable[..., Any] | None,
    hints_scope: Scope | None,
) -> _Typed:
    """What a handler takes from the annotations (see :data:`_Typed`).

    Raises:
        _NotYetDefined: An annotation, or a field of a type it names, names something
            that cannot be found.
    """
    namespace = scope.names() if scope is not None else None
    source = func
    try:
        hints = _hints(func, namespace)
        if hints_from is not None and not hints:
            source = hints_from
            namespace = hints_scope.names() if hints_scope is not None else None
            hints = _hints(hints_from, namespace)
    except NameError as exc:
        raise _NotYetDefined(str(_unresolved(source, exc))) from None
    built: list[Param] = []
    input_param: str | None = None
    input_item: Param | None = None
    try:
        for p in sig.parameters.values():
            ann = hints.get(p.name, p.annotation)
            item = stream_item_type(ann)
            if item is None or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                built.append(make_param(p.name, p.kind, ann, namespace))
                continue
            if input_param is not None:
                raise TypeError(
                    f"{name!r} takes two streams of items ({input_param!r} and {p.name!r}): "
                    "a method takes at most one AsyncIterator parameter"
                )
            # The caller sends a placeholder for it and the items follow the request: the
            # parameter itself is not validated, each item is.
            input_param = p.name
            input_item = make_param(p.name, p.POSITIONAL_OR_KEYWORD, item, namespace)
            built.append(Param(p.name, p.kind, ann, None))
    except NameError as exc:  # a field of a local type (see adapter_for)
        raise _NotYetDefined(str(_unresolved(source, exc))) from None
    return tuple(built), hints.get("return", sig.return_annotation), input_param, input_item
