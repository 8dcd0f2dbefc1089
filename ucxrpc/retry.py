"""Retrying failed calls: a backoff policy and the client interceptor that applies it.

A failed call is sent again only when doing so cannot do harm twice:

* the method is **idempotent**. A call that failed with ``UNAVAILABLE`` may still have
  run on the server (the connection can be lost after the handler started, or after it
  finished but before the reply arrived), so only methods whose second run changes
  nothing are retried: those declared ``@ucxrpc.rpc(idempotent=True)`` (typed stubs mark
  their calls) or named in ``Retry(methods=...)``;
* the error's status is in :attr:`RetryPolicy.retry_on`. By default that is ``UNAVAILABLE``
  alone: the server was unreachable or refused the call while shutting down, a condition
  that can pass. A status like ``INVALID_ARGUMENT`` or ``UNIMPLEMENTED`` would fail the
  same way every time;
* the pause before the next attempt ends before the call's deadline. The deadline covers
  every attempt; retries never extend it.

::

    retry = Retry(RetryPolicy(attempts=4, backoff=0.05), methods=["get_user"])
    client = await manager.connect(host, port, interceptors=[retry])
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from .calls.context import CallContext
from .calls.interceptors import Proceed
from .errors import RpcError, StatusCode

__all__ = ["RETRY_ATTEMPT_KEY", "Retry", "RetryPolicy"]

#: The metadata key telling the server which attempt a call is ("2", "3", ...).
RETRY_ATTEMPT_KEY = "retry-attempt"

# 2**64 times any sensible backoff is past any max_backoff; stop before floats overflow.
_MAX_DOUBLINGS = 64


@dataclass(frozen=True)
class RetryPolicy:
    """How often to retry, how long to wait in between, and after which statuses.

    Attributes:
        attempts: Attempts in all, the first one included (1 means never retry).
        backoff: The base delay in seconds.
        backoff_kind: ``"linear"``: the delay after attempt *n* is ``backoff * n``;
            ``"exponential"``: ``backoff * 2 ** (n - 1)``.
        max_backoff: No delay is longer than this many seconds.
        jitter: Each delay is scaled by a random factor in ``1 ± jitter``, so that
            clients failing together do not retry in lockstep (0 disables it).
        retry_on: The statuses worth retrying. ``UNAVAILABLE`` (the default) and
            ``RESOURCE_EXHAUSTED`` (the server refused the call as overloaded) are
            the usual choices. ``DEADLINE_EXCEEDED``, ``UNKNOWN`` or ``ABORTED`` may be
            added, at a risk: the handler may have run, in part or in full, before the
            call failed, and a retry of a timed-out call only helps when the timeout
            was the server's own limit rather than the call's deadline, which covers
            every attempt.

    Raises:
        ValueError: A field is out of range, or ``retry_on`` holds ``OK``.
    """

    attempts: int = 3
    backoff: float = 0.1
    backoff_kind: Literal["linear", "exponential"] = "linear"
    max_backoff: float = 5.0
    jitter: float = 0.1
    retry_on: frozenset[StatusCode] = frozenset({StatusCode.UNAVAILABLE})

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff and max_backoff must not be negative")
        if self.backoff_kind not in ("linear", "exponential"):
            raise ValueError(
                f"backoff_kind must be 'linear' or 'exponential', not {self.backoff_kind!r}"
            )
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        codes = frozenset(StatusCode(code) for code in self.retry_on)
        if StatusCode.OK in codes:
            raise ValueError("OK is not an error and cannot be retried")
        # Accept plain ints and other iterables, but keep the field a frozenset of codes.
        object.__setattr__(self, "retry_on", codes)

    def delay(self, attempt: int) -> float:
        """The pause in seconds after failed attempt number ``attempt`` (1-based).

        Raises:
            ValueError: ``attempt`` is below 1.
        """
        if attempt < 1:
            raise ValueError("attempt numbers start at 1")
        if self.backoff_kind == "linear":
            base = self.backoff * attempt
        else:
            base = self.backoff * 2.0 ** min(attempt - 1, _MAX_DOUBLINGS)
        if self.jitter:
            base *= 1.0 + random.uniform(-self.jitter, self.jitter)
        return min(base, self.max_backoff)


class Retry:
    """A client interceptor that retries failed idempotent unary calls.

    It acts only on unary calls made by a client (streams and notifications pass
    through untouched). A retried call carries ``metadata["retry-attempt"]`` with its
    attempt number (``"2"``, ``"3"``, ...) so the server can tell.

    Place it outermost in the client's interceptors so that the others (metrics,
    logging, auth) see, and run for, every attempt.

    Args:
        policy: When and how to retry (default: :class:`RetryPolicy` ``()``).
        methods: Method names to treat as idempotent, beyond those whose stubs say so.

    Attributes:
        attempts_made: Attempts sent by calls this interceptor retried or could have
            retried, first attempts included.
        retries: Of those, the attempts after a first.
    """

    def __init__(self, policy: RetryPolicy | None = None, *, methods: Iterable[str] = ()) -> None:
        self.policy = RetryPolicy() if policy is None else policy
        self.methods = frozenset(methods)
        self.attempts_made = 0
        self.retries = 0

    def applies_to(self, ctx: CallContext) -> bool:
        """Whether calls like ``ctx`` may be retried at all."""
        return (
            ctx.side == "client"
            and ctx.kind == "unary"
            and (ctx.idempotent or ctx.method in self.methods)
        )

    async def __call__(self, ctx: CallContext, proceed: Proceed) -> Any:
        if not self.applies_to(ctx):
            return await proceed()
        policy = self.policy
        loop = asyncio.get_running_loop()
        attempt = 1
        while True:
            self.attempts_made += 1
            try:
                return await proceed()
            except RpcError as exc:
                if exc.code not in policy.retry_on or attempt >= policy.attempts:
                    _note(exc, attempt)
                    raise
                pause = policy.delay(attempt)
                if ctx.deadline is not None and loop.time() + pause >= ctx.deadline:
                    # Sleeping would only end in DeadlineExceeded; the real cause is better.
                    _note(exc, attempt)
                    raise
            await asyncio.sleep(pause)
            attempt += 1
            self.retries += 1
            ctx.metadata[RETRY_ATTEMPT_KEY] = str(attempt)
            ctx.response_metadata = {}


def _note(exc: RpcError, attempts: int) -> None:
    if attempts > 1:
        exc.add_note(f"ucxrpc: gave up after {attempts} attempts")
