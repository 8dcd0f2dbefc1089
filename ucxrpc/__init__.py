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
    from .manager import Manager, run
    from .server import Server

__all__ = [
    "Cancelled",
    "Client",
    "Config",
    "ConnectionLost",
    "DeadlineExceeded",
    "InvalidArgument",
    "Manager",
    "MethodNotFound",
    "Priority",
    "ProtocolError",
    "RemoteError",
    "ResourceExhausted",
    "RpcError",
    "Server",
    "StatusCode",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "run",
]

__version__ = "0.1.0"

_LAZY = {
    "Client": ".client",
    "Config": ".config",
    "Manager": ".manager",
    "Priority": "._handlers",
    "Server": ".server",
    "run": ".manager",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ucxrpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
