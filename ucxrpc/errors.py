"""The exception tree and the status codes.

Every error ucxrpc raises derives from one root and carries a gRPC status code::

    RpcError(code, message, details)
    ├── Cancelled                 CANCELLED
    ├── RemoteError               UNKNOWN          (the handler raised)
    ├── InvalidArgument           INVALID_ARGUMENT (validation failed)
    ├── DeadlineExceeded          DEADLINE_EXCEEDED (also a TimeoutError)
    ├── ResourceExhausted         RESOURCE_EXHAUSTED (overload, message too large)
    ├── MethodNotFound            UNIMPLEMENTED
    ├── ProtocolError             INTERNAL         (malformed frame)
    │   └── InvalidReply                           (reply fails the declared type)
    ├── Unavailable               UNAVAILABLE
    │   └── ConnectionLost                         (the peer went away)
    └── Unauthenticated           UNAUTHENTICATED

This module imports only the standard library, so the pure codec can use it.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "Cancelled",
    "ConnectionLost",
    "DeadlineExceeded",
    "InsecureWarning",
    "InvalidArgument",
    "InvalidReply",
    "MethodNotFound",
    "ProtocolError",
    "RemoteError",
    "ResourceExhausted",
    "RpcError",
    "StatusCode",
    "Unauthenticated",
    "Unavailable",
    "error_from_payload",
    "error_payload",
    "error_from_status",
]


@enum.unique
class StatusCode(enum.IntEnum):
    """gRPC's canonical status codes, with gRPC's numbers."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """The root of every ucxrpc error.

    Handlers may raise it to choose the status the caller sees.

    Args:
        code: The status code.
        message: A human-readable message.
        details: Optional structured details (must be msgpack-serialisable).
    """

    default_code: StatusCode = StatusCode.UNKNOWN

    def __init__(
        self,
        code: StatusCode | int | None = None,
        message: str = "",
        details: Any = None,
    ) -> None:
        self.code = StatusCode(self.default_code if code is None else code)
        self.message = message
        self.details = details
        #: Metadata the server sent with the error (trailing metadata), if any.
        self.metadata: dict[str, str | bytes] = {}
        super().__init__(code, message, details)

    def __str__(self) -> str:
        text = f"[{self.code.name}] {self.message}"
        return text if self.details is None else f"{text} ({self.details!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (error_from_status, (int(self.code), self.message, self.details))


class _FixedCode(RpcError):
    """An error whose code is fixed by its class: ``Cls(message, details)``."""

    def __init__(self, message: str = "", details: Any = None) -> None:
        super().__init__(self.default_code, message, details)


class Cancelled(_FixedCode):
    """The call was cancelled (by the caller, or because its connection closed)."""

    default_code = StatusCode.CANCELLED


class InvalidArgument(_FixedCode):
    """The arguments failed validation; the message names the argument and why."""

    default_code = StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(_FixedCode, TimeoutError):
    """The call's deadline passed before a reply arrived."""

    default_code = StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(_FixedCode):
    """The peer is overloaded, or a message exceeds the size limit."""

    default_code = StatusCode.RESOURCE_EXHAUSTED


class MethodNotFound(_FixedCode):
    """No handler is registered under the method name."""

    default_code = StatusCode.UNIMPLEMENTED


class ProtocolError(_FixedCode):
    """A frame could not be parsed: unknown version or kind, truncated, oversized."""

    default_code = StatusCode.INTERNAL


class InvalidReply(ProtocolError):
    """The reply did not match the result type the method declares (typed stubs).

    The message names the field path, like ``result.text: Input should be a valid
    string``.
    """


class Unavailable(_FixedCode):
    """The peer cannot be reached."""

    default_code = StatusCode.UNAVAILABLE


class ConnectionLost(Unavailable):
    """The connection to the peer was lost while the call was pending."""


class Unauthenticated(_FixedCode):
    """The connection did not pass authentication."""

    default_code = StatusCode.UNAUTHENTICATED


class RemoteError(_FixedCode):
    """The remote handler raised an exception that was not an :class:`RpcError`.

    Attributes:
        remote_type: The qualified name of the exception type on the server.
        remote_traceback: The formatted traceback from the server ("" when hidden).
    """

    default_code = StatusCode.UNKNOWN

    def __init__(
        self,
        message: str = "",
        details: Any = None,
        *,
        remote_type: str = "",
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message, details)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"[{self.code.name}] {self.remote_type}: {self.message}"


_BY_CODE: dict[StatusCode, type[_FixedCode]] = {
    cls.default_code: cls
    for cls in (
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        ResourceExhausted,
        MethodNotFound,
        ProtocolError,
        Unavailable,
        Unauthenticated,
        RemoteError,
    )
}


def error_from_status(
    code: int,
    message: str,
    details: Any = None,
    remote_type: str = "",
    remote_traceback: str = "",
) -> RpcError:
    """Build the most specific :class:`RpcError` for a status received from a peer.

    Args:
        code: The numeric status code (unknown numbers map to ``UNKNOWN``).
        message: The error message.
        details: Structured details, if any.
        remote_type: For handler exceptions, the remote exception's type name.
        remote_traceback: For handler exceptions, the remote traceback text.

    Returns:
        An instance of the subclass matching ``code``, or :class:`RpcError`.
    """
    try:
        status = StatusCode(code)
    except ValueError:
        status = StatusCode.UNKNOWN
    if status is StatusCode.UNKNOWN:
        return RemoteError(
            message, details, remote_type=remote_type, remote_traceback=remote_traceback
        )
    cls = _BY_CODE.get(status)
    if cls is None:
        return RpcError(status, message, details)
    return cls(message, details)


def error_from_payload(value: Any) -> RpcError:
    """Build the error carried by an ERROR frame's payload.

    The payload is ``[code, message, details, remote_type, traceback]``; anything
    else is itself a :class:`ProtocolError`.
    """
    if type(value) is not list or len(value) != 5 or type(value[0]) is not int:
        return ProtocolError("malformed error reply")
    code, message, details, remote_type, tb = value
    return error_from_status(code, str(message), details, str(remote_type or ""), str(tb or ""))


def error_payload(exc: RpcError) -> list[Any]:
    """The ERROR frame payload for ``exc`` (the inverse of :func:`error_from_payload`)."""
    remote_type = getattr(exc, "remote_type", "")
    tb = getattr(exc, "remote_traceback", "")
    return [int(exc.code), exc.message, _plain(exc.details), remote_type, tb]


def _plain(details: Any) -> Any:
    """Details must cross the wire; anything msgpack cannot carry becomes its repr."""
    if details is None or isinstance(details, (str, int, float, bool, bytes, list, dict)):
        return details
    return repr(details)


class InsecureWarning(UserWarning):
    """A setting that leaves a server open to anyone who can reach it, such as a server
    listening beyond loopback without ``auth_token``. Silence it deliberately with
    :func:`warnings.filterwarnings` if the network is trusted."""
