"""The call in progress: what a handler or an interceptor knows about its call.

While a handler runs, :func:`current_call` returns its :class:`CallContext`, and a call
made from inside the handler inherits the context's deadline: the remaining budget
travels down a chain of services without being passed by hand, and when the outer
call is cancelled or times out, the nested calls are cancelled with it.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from typing import Any, Literal

from ..errors import InvalidArgument

__all__ = [
    "CallContext",
    "CallKind",
    "Metadata",
    "current_call",
    "current_deadline",
    "time_remaining",
]

#: Per-call metadata: a small map of string keys to ``str`` or ``bytes`` values.
Metadata = dict[str, str | bytes]
#: What a call is: ``"unary"`` (one reply), ``"stream"`` (server streaming) or ``"notify"``.
#: The four call kinds (as in gRPC) and notifications: ``"stream"`` is server streaming,
#: ``"client_stream"`` takes a stream of items and returns one result, ``"bidi"`` both.
CallKind = Literal["unary", "stream", "client_stream", "bidi", "notify"]


class CallContext:
    """One call, as seen by a handler (``side == "server"``) or a client interceptor.

    Attributes:
        method: The method name.
        kind: ``"unary"``, ``"stream"`` or ``"notify"``.
        side: ``"server"`` in handlers and server interceptors, ``"client"`` in client
            interceptors.
        metadata: The request metadata. Client interceptors may add to it before
            the request is sent.
        response_metadata: Metadata sent back with the reply (the handler and server
            interceptors may set it); on the client, what the server sent.
        deadline: The call's deadline in the event loop's clock
            (``asyncio.get_running_loop().time()``), or None.
        priority: The call's priority (None: the method's default).
        peer: The other side, as ``host:port`` when known.
        args: The call's positional arguments (client side; on the server they are
            validated after the interceptors run).
        kwargs: The call's keyword arguments (client side).
        idempotent: The method may safely be retried (client side: set by typed stubs
            from ``@rpc(idempotent=True)``; read by :class:`~ucxrpc.Retry`).
    """

    __slots__ = (
        "args",
        "deadline",
        "idempotent",
        "kind",
        "kwargs",
        "metadata",
        "method",
        "peer",
        "priority",
        "response_metadata",
        "side",
    )

    def __init__(
        self,
        method: str,
        kind: CallKind = "unary",
        side: Literal["server", "client"] = "server",
        metadata: Metadata | None = None,
        deadline: float | None = None,
        priority: int | None = None,
        peer: str = "",
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        idempotent: bool = False,
    ) -> None:
        self.method = method
        self.kind: CallKind = kind
        self.side = side
        self.metadata: Metadata = {} if metadata is None else metadata
        self.response_metadata: Metadata = {}
        self.deadline = deadline
        self.priority = priority
        self.peer = peer
        self.args = args
        self.kwargs: dict[str, Any] = {} if kwargs is None else kwargs
        self.idempotent = idempotent

    def time_remaining(self) -> float | None:
        """Seconds left until the deadline (at least 0), or None without a deadline."""
        if self.deadline is None:
            return None
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # a plain handler, in a worker thread: the same clock
            now = time.monotonic()
        return max(self.deadline - now, 0.0)

    def __repr__(self) -> str:
        return f"<CallContext {self.side} {self.kind} {self.method!r} peer={self.peer!r}>"


_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "ucxrpc_call", default=None
)


def current_call() -> CallContext | None:
    """The context of the call being handled, or None outside a handler."""
    return _current.get()


def current_deadline() -> float | None:
    """The deadline of the call being handled, in the event loop's clock, or None.

    Calls made while handling a call inherit this deadline automatically.
    """
    ctx = _current.get()
    return None if ctx is None else ctx.deadline


def time_remaining() -> float | None:
    """Seconds left until the current call's deadline, or None (no call, no deadline)."""
    ctx = _current.get()
    return None if ctx is None else ctx.time_remaining()


def call_deadline(timeout: float | None, now: float) -> float | None:
    """The deadline of a call made now with ``timeout``: its own, or the deadline of the
    call being handled if that is earlier (None: no deadline at all).

    Raises:
        InvalidArgument: ``timeout`` is not a finite number of seconds >= 0 (NaN and
            infinity are refused: use None for no deadline).
    """
    if timeout is not None and (
        type(timeout) not in (int, float) or not (math.isfinite(timeout) and timeout >= 0)
    ):
        raise InvalidArgument(
            f"timeout must be a finite number of seconds >= 0 (or None), not {timeout!r}"
        )
    deadline = None if timeout is None else now + timeout
    outer = _current.get()
    if outer is None or outer.deadline is None:
        return deadline
    return outer.deadline if deadline is None else min(deadline, outer.deadline)


def enter(ctx: CallContext) -> None:
    """Make ``ctx`` the current call (in the running task's context)."""
    _current.set(ctx)
