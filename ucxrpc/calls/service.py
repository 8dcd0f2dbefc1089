"""Service classes: a typed interface, its implementation, and the client's stub.

An interface is a :class:`Service` subclass whose methods carry :func:`rpc`::

    class EchoApi(ucxrpc.Service, name="echo.v1"):
        @ucxrpc.rpc
        @abstractmethod
        async def shout(self, req: EchoRequest) -> EchoReply: ...

        @ucxrpc.rpc
        @abstractmethod
        def count(self, n: int) -> AsyncIterator[int]: ...   # server streaming

A subclass implements it and :meth:`Server.add_service` registers an instance under
``"echo.v1.shout"`` and ``"echo.v1.count"``. ``client.stub(EchoApi)`` returns an object
that type checkers see as ``EchoApi``: ``await stub.shout(req)`` is an ``EchoReply``,
validated on arrival, and ``async for n in stub.count(3)`` iterates the stream.

Streaming methods are declared with a plain ``def`` returning ``AsyncIterator[T]`` in
the interface (what calling them returns) and implemented as async generators.
Nothing is registered at import time: a class only defines the contract.

Interfaces, implementations and their types may be defined inside a function (a test):
their annotations are resolved with that function's names, when the service is first
used (``add_service`` or ``stub``), so types defined later in the function are found.

Binary values follow the declaration on both sides, whatever their size: ``bytes`` is
``bytes``, ``bytearray``, ``memoryview``, :data:`Buffer` (the zero-copy type, also
exported here) and ``numpy.ndarray`` arrive without a copy when they travelled out of
band, and an un-annotated result has ``bytes`` for every binary value (see
:mod:`ucxrpc.calls.values`).
"""

from __future__ import annotations

import inspect
from abc import ABC
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

from ..errors import InvalidReply
from .handlers import (
    SCOPE_ATTR,
    Priority,
    Scope,
    defining_scope,
    resolve_hints,
    scope_of,
    stream_item_type,
    value_validator,
)
from .values import Buffer

if TYPE_CHECKING:
    from .client import Client
    from .context import Metadata

__all__ = ["Buffer", "MethodDecl", "RpcOptions", "Service", "rpc", "rpc_methods"]

F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", bound="Service")

_MARK = "__ucxrpc__"


@dataclass(frozen=True, slots=True)
class RpcOptions:
    """What :func:`rpc` records on a function.

    Attributes:
        name: The method name (default: the function's name).
        priority: Default priority of calls.
        timeout: Longest time a call may run on the server (seconds).
        idempotent: Calls may safely be retried.
    """

    name: str | None = None
    priority: int = Priority.NORMAL
    timeout: float | None = None
    idempotent: bool = False


@overload
def rpc(func: F, /) -> F: ...


@overload
def rpc(
    func: None = None,
    /,
    *,
    name: str | None = None,
    priority: int = Priority.NORMAL,
    timeout: float | None = None,
    idempotent: bool = False,
) -> Callable[[F], F]: ...


def rpc(
    func: F | None = None,
    /,
    *,
    name: str | None = None,
    priority: int = Priority.NORMAL,
    timeout: float | None = None,
    idempotent: bool = False,
) -> F | Callable[[F], F]:
    """Mark a function or a :class:`Service` method as a remote method.

    Marking registers nothing: pass the service instance to
    :meth:`Server.add_service` (or the function to :meth:`Server.add_handler`).

    Args:
        func: The function (used as ``@rpc`` without arguments).
        name: The method name (default: the function's name).
        priority: Default priority of calls to the method.
        timeout: Longest time a call may run on the server (seconds).
        idempotent: Calls may safely be retried.
    """
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive")
    options = RpcOptions(name, int(priority), timeout, idempotent)

    def mark(f: F) -> F:
        setattr(f, _MARK, options)
        scope = defining_scope(f)  # a function defined in a function: its local types
        if scope is not None:
            setattr(f, SCOPE_ATTR, scope)
        return f

    return mark(func) if func is not None else mark


def rpc_options(func: Any) -> RpcOptions | None:
    """The options :func:`rpc` recorded on ``func``, if any."""
    options = getattr(func, _MARK, None)
    return options if isinstance(options, RpcOptions) else None


@dataclass(frozen=True, slots=True)
class MethodDecl:
    """One remote method of a service interface.

    Attributes:
        attr: The Python attribute name.
        wire_name: The full method name (``"echo.v1.shout"``).
        options: What :func:`rpc` recorded.
        func: The declaring (interface) function.
        item_type: For streaming methods, the item type; None for unary ones.
        result_type: For unary methods, the declared result type.
        namespace: The local names the annotations were resolved with (an interface
            defined inside a function), or None.
    """

    attr: str
    wire_name: str
    options: RpcOptions
    func: Callable[..., Any]
    item_type: Any
    result_type: Any
    namespace: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def is_stream(self) -> bool:
        """True for server-streaming methods."""
        return self.item_type is not None


class Service(ABC):  # noqa: B024 - abstract so interfaces may use @abstractmethod
    """Base class of service interfaces and their implementations.

    Give the service its name as a class keyword, ``class EchoApi(Service,
    name="echo.v1")``; implementations inherit it. Without one, the class name is used.

    Interface methods may be marked ``@abc.abstractmethod`` (under ``@rpc``): type
    checkers then accept their empty bodies, and an implementation that misses one
    cannot be instantiated.
    """

    __service_name__: ClassVar[str] = ""

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            if not name or name != name.strip():
                raise ValueError(f"bad service name {name!r}")
            cls.__service_name__ = name
        elif not cls.__service_name__:
            cls.__service_name__ = cls.__name__
        scope = _class_scope(cls)
        if scope is not None:
            type.__setattr__(cls, SCOPE_ATTR, scope)


def _class_scope(cls: type) -> Scope | None:
    """The scope of the function running the ``class`` statement, if there is one.

    It is found through one of the functions the class body defined (the class itself
    has no code of its own to look for).
    """
    if "<locals>" not in cls.__qualname__:
        return None
    prefix = cls.__qualname__ + "."
    for value in vars(cls).values():
        func = getattr(value, "__func__", value)
        if getattr(func, "__qualname__", "").startswith(prefix):
            scope = defining_scope(func)
            if scope is not None:
                return scope
    return None


def _collect(cls: type[Service]) -> tuple[MethodDecl, ...]:
    """The remote methods of ``cls``: every :func:`rpc` function along its MRO."""
    found: dict[str, MethodDecl] = {}
    scopes: list[Scope] = []
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            options = rpc_options(value)
            if options is None or attr in found:
                continue
            scope = scope_of(value) or vars(klass).get(SCOPE_ATTR)
            namespace = None
            if isinstance(scope, Scope):
                scopes.append(scope)
                namespace = scope.names()
            hints = resolve_hints(value, namespace)
            declared = hints.get("return", Any)
            item_type = stream_item_type(declared)
            if item_type is not None and inspect.iscoroutinefunction(value):
                raise TypeError(
                    f"{cls.__qualname__}.{attr} returns an async iterator: declare it with "
                    "'def', not 'async def', so that calling it returns the iterator"
                )
            wire = f"{cls.__service_name__}.{options.name or attr}"
            found[attr] = MethodDecl(attr, wire, options, value, item_type, declared, namespace)
    own = vars(cls).get(SCOPE_ATTR)
    for scope in (*scopes, own):
        if isinstance(scope, Scope):
            scope.freeze()  # resolved: the defining frame may go
    return tuple(found.values())


def rpc_methods(service: type[Service]) -> tuple[MethodDecl, ...]:
    """The remote methods a service class declares.

    Annotations are resolved on first use (not at class creation), so models may be
    defined after the interface that names them, at module level or in the function
    that defines the interface.
    """
    cached: tuple[MethodDecl, ...] | None = service.__dict__.get("_ucxrpc_methods")
    if cached is None:
        cached = _collect(service)
        type.__setattr__(service, "_ucxrpc_methods", cached)
    return cached


def result_validator(
    label: str, annotation: Any, namespace: Mapping[str, Any] | None = None
) -> Callable[[Any], Any] | None:
    """A function validating received values into ``annotation``.

    Binary values follow the declaration (a ``bytes`` result is ``bytes`` whatever its
    size; ``Any`` or no annotation: bytes-like values become ``bytes``). Raises
    :class:`InvalidReply` naming the field path; None when nothing is converted or
    checked. ``namespace``: local names the types' own annotations may use.
    """
    if annotation is None or annotation is type(None):
        return None
    return value_validator(annotation, label, InvalidReply, namespace)


class _Stub:
    """The runtime object behind ``client.stub(Interface)``."""

    def __init__(
        self,
        client: Client,
        service: type[Service],
        timeout: float | None,
        priority: int | None,
        metadata: Metadata | None,
    ) -> None:
        self._service = service
        for decl in rpc_methods(service):
            setattr(self, decl.attr, _bind(client, decl, timeout, priority, metadata))

    def __repr__(self) -> str:
        return f"<stub of {self._service.__service_name__}>"


def _bind(
    client: Client,
    decl: MethodDecl,
    timeout: float | None,
    priority: int | None,
    metadata: Metadata | None,
) -> Callable[..., Any]:
    wire = decl.wire_name
    if decl.is_stream:
        check_item = result_validator("item", decl.item_type, decl.namespace)

        def open_stream(*args: Any, **kwargs: Any) -> Any:
            return client._stream(wire, args, kwargs, timeout, priority, metadata, check_item)

        open_stream.__name__ = decl.attr
        open_stream.__doc__ = decl.func.__doc__
        return open_stream

    check = result_validator("result", decl.result_type, decl.namespace)
    idempotent = decl.options.idempotent

    async def call(*args: Any, **kwargs: Any) -> Any:
        value = await client._call(wire, args, kwargs, timeout, priority, metadata, idempotent)
        return value if check is None else check(value)

    call.__name__ = decl.attr
    call.__doc__ = decl.func.__doc__
    return call


def make_stub(
    client: Client,
    service: Callable[..., S],
    *,
    timeout: float | None = None,
    priority: int | None = None,
    metadata: Metadata | None = None,
) -> S:
    """Build the typed stub of ``service`` on ``client`` (see :meth:`Client.stub`)."""
    if not (isinstance(service, type) and issubclass(service, Service)):
        raise TypeError(f"stub() needs a Service subclass, not {service!r}")
    if not rpc_methods(service):
        raise TypeError(f"{service.__qualname__} declares no @ucxrpc.rpc methods")
    stub: Any = _Stub(client, service, timeout, priority, metadata)
    return stub  # type: ignore[no-any-return]
