"""ucxrpc: asyncio RPC over UCX tag messaging.

Decorate functions on a :class:`Server`, start it on a :class:`Manager`, and call them
from a :class:`Client`. Heavy modules (ucxx, pydantic) load on first use, so importing
``ucxrpc.codec`` or ``ucxrpc.errors`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    Cancelled,
    ConnectionLost,
    DeadlineExceeded,
    InvalidArgument,
    InvalidReply,
    MethodNotFound,
    ProtocolError,
    RemoteError,
    ResourceExhausted,
    RpcError,
    StatusCode,
    Unauthenticated,
    Unavailable,
)

if TYPE_CHECKING:
    from ._handlers import Priority
    from .client import Client
    from .config import Config
    from .context import CallContext, Metadata, current_call, current_deadline, time_remaining
    from .interceptors import (
        Interceptor,
        LoggingInterceptor,
        MetricsInterceptor,
        Proceed,
        TokenAuth,
    )
    from .manager import Manager, run
    from .reflection import MethodInfo, ServerDescription
    from .server import Server
    from .service import Service, rpc
    from .stream import Stream

__all__ = [
    "CallContext",
    "Cancelled",
    "Client",
    "Config",
    "ConnectionLost",
    "DeadlineExceeded",
    "Interceptor",
    "InvalidArgument",
    "InvalidReply",
    "LoggingInterceptor",
    "Manager",
    "Metadata",
    "MethodInfo",
    "MethodNotFound",
    "MetricsInterceptor",
    "Priority",
    "Proceed",
    "ProtocolError",
    "RemoteError",
    "ResourceExhausted",
    "RpcError",
    "Server",
    "ServerDescription",
    "Service",
    "StatusCode",
    "Stream",
    "TokenAuth",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "current_call",
    "current_deadline",
    "rpc",
    "run",
    "time_remaining",
]

__version__ = "0.1.0"

_LAZY = {
    "CallContext": ".context",
    "Client": ".client",
    "Config": ".config",
    "Interceptor": ".interceptors",
    "LoggingInterceptor": ".interceptors",
    "Manager": ".manager",
    "Metadata": ".context",
    "MethodInfo": ".reflection",
    "MetricsInterceptor": ".interceptors",
    "Priority": "._handlers",
    "Proceed": ".interceptors",
    "Server": ".server",
    "ServerDescription": ".reflection",
    "Service": ".service",
    "Stream": ".stream",
    "TokenAuth": ".interceptors",
    "current_call": ".context",
    "current_deadline": ".context",
    "rpc": ".service",
    "run": ".manager",
    "time_remaining": ".context",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ucxrpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
