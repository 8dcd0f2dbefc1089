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
    InsecureWarning,
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
    from .batch import BatchCall, call_many, split_results
    from .calls.client import Client
    from .calls.context import CallContext, Metadata, current_call, current_deadline, time_remaining
    from .calls.health import Health, HealthApi, HealthStatus
    from .calls.interceptors import (
        Interceptor,
        LoggingInterceptor,
        MetricsInterceptor,
        Proceed,
        TokenAuth,
    )
    from .calls.liveness import KeepAlive, Reconnect
    from .calls.manager import Manager, run, ucx_info
    from .calls.reflection import MethodInfo, ServerDescription
    from .calls.server import Server
    from .calls.service import Service, rpc
    from .calls.stream import Stream
    from .calls.values import Buffer
    from .io.config import Config
    from .messaging.worker import Message, Worker, WorkerConfig, WorkerStats
    from .metrics import Metrics, MetricsEndpoint, enable_metrics, start_metrics_http
    from .pool import ClientPool
    from .protocol import Priority
    from .retry import Retry, RetryPolicy

__all__ = [
    "BatchCall",
    "Buffer",
    "CallContext",
    "Cancelled",
    "Client",
    "ClientPool",
    "Config",
    "ConnectionLost",
    "DeadlineExceeded",
    "Health",
    "HealthApi",
    "HealthStatus",
    "InsecureWarning",
    "Interceptor",
    "InvalidArgument",
    "InvalidReply",
    "KeepAlive",
    "LoggingInterceptor",
    "Manager",
    "Message",
    "Metadata",
    "MethodInfo",
    "MethodNotFound",
    "Metrics",
    "MetricsEndpoint",
    "MetricsInterceptor",
    "Priority",
    "Proceed",
    "ProtocolError",
    "Reconnect",
    "RemoteError",
    "ResourceExhausted",
    "Retry",
    "RetryPolicy",
    "RpcError",
    "Server",
    "ServerDescription",
    "Service",
    "StatusCode",
    "Stream",
    "TokenAuth",
    "Unauthenticated",
    "Unavailable",
    "Worker",
    "WorkerConfig",
    "WorkerStats",
    "__version__",
    "call_many",
    "current_call",
    "current_deadline",
    "enable_metrics",
    "rpc",
    "run",
    "split_results",
    "start_metrics_http",
    "time_remaining",
    "ucx_info",
]

__version__ = "0.1.0"

_LAZY = {
    "BatchCall": ".batch",
    "Buffer": ".calls.values",
    "CallContext": ".context",
    "Client": ".client",
    "ClientPool": ".pool",
    "Config": ".config",
    "Health": ".calls.health",
    "HealthApi": ".calls.health",
    "HealthStatus": ".calls.health",
    "Interceptor": ".interceptors",
    "KeepAlive": ".liveness",
    "LoggingInterceptor": ".interceptors",
    "Manager": ".manager",
    "Message": ".transport",
    "Metadata": ".context",
    "MethodInfo": ".reflection",
    "Metrics": ".metrics",
    "MetricsEndpoint": ".metrics",
    "MetricsInterceptor": ".interceptors",
    "Priority": ".protocol",
    "Proceed": ".interceptors",
    "Reconnect": ".liveness",
    "Retry": ".retry",
    "RetryPolicy": ".retry",
    "Server": ".server",
    "ServerDescription": ".reflection",
    "Service": ".service",
    "Stream": ".stream",
    "TokenAuth": ".interceptors",
    "Worker": ".transport",
    "WorkerConfig": ".transport",
    "WorkerStats": ".transport",
    "call_many": ".batch",
    "current_call": ".context",
    "current_deadline": ".context",
    "enable_metrics": ".metrics",
    "rpc": ".service",
    "run": ".manager",
    "split_results": ".batch",
    "start_metrics_http": ".metrics",
    "time_remaining": ".context",
    "ucx_info": ".manager",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ucxrpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
