"""Many calls at once, with a bound on how many are in flight and an error per item.

::

    results = await call_many(client, [("add", 1, 2), BatchCall("echo", ("hi",))])
    ok, failed = split_results(results)

Results come back in the order of the calls. A call that fails does not stop the others:
its slot holds the :class:`~ucxrpc.RpcError` it raised, so one bad item costs one slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .errors import DeadlineExceeded, RpcError

if TYPE_CHECKING:
    from .messaging.worker import Worker

__all__ = ["BatchCall", "Caller", "call_many", "send_many", "split_results"]

T = TypeVar("T")


@dataclass(frozen=True)
class BatchCall:
    """One call of a batch.

    Attributes:
        method: The method name.
        args: Positional arguments.
        kwargs: Keyword arguments.
    """

    method: str
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


class Caller(Protocol):
    """Anything that makes calls like :meth:`Client.call <ucxrpc.Client.call>`:
    a :class:`~ucxrpc.Client` or a :class:`~ucxrpc.pool.ClientPool`."""

    async def call(
        self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Call ``method`` with ``args`` and ``kwargs`` within ``timeout`` seconds."""
        ...


def _as_call(item: BatchCall | tuple[Any, ...]) -> BatchCall:
    if isinstance(item, BatchCall):
        return item
    if isinstance(item, tuple) and item and isinstance(item[0], str):
        return BatchCall(item[0], item[1:])
    raise TypeError(f"a batch item must be a BatchCall or a (method, *args) tuple, not {item!r}")


async def call_many(
    client: Caller,
    calls: Iterable[BatchCall | tuple[Any, ...]],
    *,
    concurrency: int = 64,
    timeout: float | None = None,
) -> list[Any]:
    """Make every call in ``calls``, at most ``concurrency`` at a time.

    Args:
        client: What makes the calls: a :class:`~ucxrpc.Client`, or a
            :class:`~ucxrpc.pool.ClientPool` to spread them over several connections.
        calls: :class:`BatchCall` objects or ``(method, *args)`` tuples.
        concurrency: Calls in flight at most.
        timeout: Seconds for the whole batch (None: no deadline). Each call gets what
            remains of it; a call not started before it passes is not sent, and its slot
            holds a :class:`~ucxrpc.DeadlineExceeded`.

    Returns:
        One entry per call, in the order given: its result, or the
        :class:`~ucxrpc.RpcError` it failed with.

    Raises:
        TypeError: An item is neither a :class:`BatchCall` nor a ``(method, ...)`` tuple
            (checked before any call is sent).
        ValueError: ``concurrency`` is below 1.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    batch = [_as_call(item) for item in calls]
    results: list[Any] = [None] * len(batch)
    if not batch:
        return results
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout

    async def one(call: BatchCall) -> Any:
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(f"{call.method!r} was not sent: the batch's deadline had passed")
        return await client.call(call.method, *call.args, timeout=remaining, **call.kwargs)

    await _bounded(batch, one, results, concurrency)
    return results


async def send_many(
    worker: Worker,
    messages: Iterable[tuple[int, int, bytes | bytearray | memoryview | str]],
    *,
    concurrency: int = 64,
) -> list[RpcError | None]:
    """Send many raw messages (``(endpoint_id, tag, data)``), at most ``concurrency`` at once.

    Returns:
        One entry per message, in the order given: None when it was sent, or the
        :class:`~ucxrpc.RpcError` its send raised (an unknown endpoint, a lost
        connection, ...). One failure does not stop the others.

    Raises:
        ValueError: ``concurrency`` is below 1.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    batch = list(messages)
    results: list[Any] = [None] * len(batch)

    async def one(message: tuple[int, int, bytes | bytearray | memoryview | str]) -> None:
        endpoint_id, tag, data = message
        await worker.send_tag(endpoint_id, tag, data)

    await _bounded(batch, one, results, concurrency)
    return results


async def _bounded(
    items: Sequence[T],
    run: Callable[[T], Awaitable[Any]],
    results: list[Any],
    concurrency: int,
) -> None:
    """Run ``run`` on every item, ``concurrency`` at a time, storing results or errors."""
    if not items:
        return
    todo = iter(enumerate(items))

    async def lane() -> None:
        # Lanes share one iterator: each takes the next item as soon as it is free,
        # so exactly ``concurrency`` operations are in flight while items remain.
        for index, item in todo:
            try:
                results[index] = await run(item)
            except RpcError as exc:
                results[index] = exc

    loop = asyncio.get_running_loop()
    lanes = [loop.create_task(lane()) for _ in range(min(concurrency, len(items)))]
    try:
        await asyncio.gather(*lanes)
    except BaseException:
        for task in lanes:
            task.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
        raise


def split_results(results: Iterable[Any]) -> tuple[dict[int, Any], dict[int, RpcError]]:
    """Separate what :func:`call_many` returned into results and errors, by position.

    Returns:
        ``(ok, failed)``: the successful results and the errors, each keyed by the
        index of its call.
    """
    ok: dict[int, Any] = {}
    failed: dict[int, RpcError] = {}
    for index, value in enumerate(results):
        if isinstance(value, RpcError):
            failed[index] = value
        else:
            ok[index] = value
    return ok, failed
