"""Interceptors: middleware around calls, on the server and on the client.

An interceptor is an async callable ``(ctx, proceed) -> result``. It may read or add
metadata (``ctx.metadata``), refuse the call by raising an :class:`~ucxrpc.RpcError`,
time it, or change the result; ``await proceed()`` runs the rest of the chain and the
call itself. Interceptors run in the order given: the first is the outermost.

On the server, ``proceed()`` validates the arguments and runs the handler (for a
stream, the whole stream; it returns None). On the client, ``proceed()`` sends the
call and waits for its result (for a stream, it opens the stream and returns it).
The same interceptor object can serve both sides; ``ctx.side`` tells which.

Three come with ucxrpc: :class:`LoggingInterceptor`, :class:`MetricsInterceptor` and
:class:`TokenAuth`.
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import RpcError, StatusCode, Unauthenticated
from .context import CallContext

__all__ = [
    "DEFAULT_BUCKETS",
    "Interceptor",
    "LoggingInterceptor",
    "MethodMetrics",
    "MetricsInterceptor",
    "Proceed",
    "TimedInterceptor",
    "TokenAuth",
    "run_chain",
    "status_of",
]

#: Runs the rest of the chain and the call itself.
Proceed = Callable[[], Awaitable[Any]]
#: ``async def interceptor(ctx: CallContext, proceed: Proceed) -> Any``.
Interceptor = Callable[[CallContext, Proceed], Awaitable[Any]]

#: Latency histogram bucket bounds, in seconds (the last bucket is unbounded).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def run_chain(
    interceptors: Sequence[Interceptor], ctx: CallContext, final: Proceed
) -> Awaitable[Any]:
    """Run ``final`` inside ``interceptors`` (the first one outermost)."""

    def step(index: int) -> Awaitable[Any]:
        if index == len(interceptors):
            return final()
        return interceptors[index](ctx, lambda: step(index + 1))

    return step(0)


def status_of(exc: BaseException | None) -> StatusCode:
    """The status a call ended with: OK, the error's code, CANCELLED or UNKNOWN."""
    if exc is None:
        return StatusCode.OK
    if isinstance(exc, RpcError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError):
        return StatusCode.CANCELLED
    return StatusCode.UNKNOWN


class TimedInterceptor(ABC):
    """Base of interceptors that look at each call once it has finished.

    Subclasses implement :meth:`finished`; the base runs the call and measures it.
    """

    async def __call__(self, ctx: CallContext, proceed: Proceed) -> Any:
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            return await proceed()
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.finished(ctx, time.perf_counter() - start, status_of(error))

    @abstractmethod
    def finished(self, ctx: CallContext, seconds: float, status: StatusCode) -> None:
        """Called once per call, with its duration and the status it ended with."""


class LoggingInterceptor(TimedInterceptor):
    """Logs each call: side, kind, method, peer, status and duration.

    Successful calls log at ``level``; failed ones at WARNING.

    Args:
        logger: Where to log (default: the ``ucxrpc.calls`` logger).
        level: The level of successful calls.
    """

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self.logger = logger or logging.getLogger("ucxrpc.calls")
        self.level = level

    def finished(self, ctx: CallContext, seconds: float, status: StatusCode) -> None:
        """Log the finished call: at ``level`` when it succeeded, at ``WARNING`` when not."""
        self.logger.log(
            self.level if status is StatusCode.OK else logging.WARNING,
            "%s %s %s peer=%s -> %s in %.3f ms",
            ctx.side,
            ctx.kind,
            ctx.method,
            ctx.peer or "-",
            status.name,
            seconds * 1e3,
        )


@dataclass
class MethodMetrics:
    """What :class:`MetricsInterceptor` recorded for one method.

    Attributes:
        calls: Calls finished (successfully or not).
        errors: Failed calls by status name (``"DEADLINE_EXCEEDED"``: 3, ...).
        total_seconds: The sum of all durations.
        buckets: Upper bounds of the latency histogram (seconds).
        counts: Calls per bucket; one more than ``buckets`` (the last is unbounded).
    """

    buckets: tuple[float, ...]
    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    total_seconds: float = 0.0
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def record(self, seconds: float, status: StatusCode) -> None:
        """Add one finished call."""
        self.calls += 1
        self.total_seconds += seconds
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        if status is not StatusCode.OK:
            self.errors[status.name] = self.errors.get(status.name, 0) + 1

    def quantile(self, q: float) -> float:
        """Estimate the ``q`` quantile (0..1) of the latency, in seconds.

        Like Prometheus' ``histogram_quantile``: the quantile's bucket is found and
        the value interpolated linearly within it. A quantile in the unbounded last
        bucket is reported as the largest finite bound.
        """
        if not 0 <= q <= 1:
            raise ValueError("q must be between 0 and 1")
        if self.calls == 0:
            return 0.0
        rank = q * self.calls
        seen = 0
        lower = 0.0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            if count and seen + count >= rank:
                return lower + (bound - lower) * max(rank - seen, 0.0) / count
            seen += count
            lower = bound
        return lower

    def as_dict(self) -> dict[str, Any]:
        """A plain-data view (JSON-serialisable except the infinite last bound)."""
        return {
            "calls": self.calls,
            "errors": dict(self.errors),
            "total_seconds": self.total_seconds,
            "mean_seconds": self.total_seconds / self.calls if self.calls else 0.0,
            "buckets": list(self.buckets),
            "counts": list(self.counts),
        }


class MetricsInterceptor(TimedInterceptor):
    """Counts calls, errors by status and a latency histogram, per method.

    Args:
        buckets: Histogram bucket upper bounds in seconds, increasing.
    """

    def __init__(self, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("buckets must be strictly increasing")
        self.buckets = bounds
        self._methods: dict[str, MethodMetrics] = {}
        self._lock = threading.Lock()

    def finished(self, ctx: CallContext, seconds: float, status: StatusCode) -> None:
        """Record the finished call under its method (see :meth:`record`)."""
        self.record(ctx.method, seconds, status)

    def record(self, method: str, seconds: float, status: StatusCode) -> None:
        """Add one finished call of ``method``."""
        with self._lock:
            entry = self._methods.get(method)
            if entry is None:
                entry = self._methods[method] = MethodMetrics(self.buckets)
            entry.record(seconds, status)

    def get(self, method: str) -> MethodMetrics | None:
        """What was recorded for ``method`` (None if it was never called)."""
        return self._methods.get(method)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every method's metrics as plain data, by method name."""
        with self._lock:
            return {name: m.as_dict() for name, m in sorted(self._methods.items())}

    def reset(self) -> None:
        """Forget everything recorded so far."""
        with self._lock:
            self._methods.clear()


class TokenAuth:
    """A bearer token in the call metadata: added by clients, checked by servers.

    On the client it sets ``metadata[key] = "Bearer <token>"``. On the server it
    refuses calls without the right value with :class:`~ucxrpc.Unauthenticated`
    before the arguments are even validated.

    Args:
        token: The shared token.
        key: The metadata key (gRPC's convention, ``"authorization"``, by default).
        exempt: Methods served without a token (health checks, reflection, ...).
    """

    def __init__(
        self, token: str, *, key: str = "authorization", exempt: Sequence[str] = ()
    ) -> None:
        if not token:
            raise ValueError("the token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self.key = key
        self.exempt = frozenset(exempt)

    async def __call__(self, ctx: CallContext, proceed: Proceed) -> Any:
        if ctx.side == "client":
            ctx.metadata[self.key] = self._expected.decode()
        elif ctx.method not in self.exempt:
            value = ctx.metadata.get(self.key)
            given = value.encode() if isinstance(value, str) else value
            if given is None or not hmac.compare_digest(given, self._expected):
                raise Unauthenticated(f"{ctx.method!r} needs a valid bearer token")
        return await proceed()
