"""Streams in both directions, and the credits that pace their producers.

A server stream is one call whose results arrive as ITEM frames followed by END (or
ERROR). A client stream (an ``AsyncIterator[T]`` parameter) is the same in the other
direction: after its REQUEST (or STREAM, for a bidirectional call) flagged
``INPUT_STREAM``, the caller sends ITEM frames and then END (a half-close).

Either way the consumer grants the producer credits: the producer may send
``window`` items ahead of what the consumer has taken, and the consumer grants more
as it takes them (half a window at a time), with CREDIT frames. A slow consumer
therefore slows the producer, and neither side buffers more than a window of items.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..errors import DeadlineExceeded, ProtocolError, RpcError, error_from_payload
from ..wire import codec
from ..wire.codec import Kind
from .values import from_array

if TYPE_CHECKING:
    from ..io.timers import Timer
    from .client import Client
    from .context import Metadata

__all__ = ["Credit", "InputStream", "Pump", "Stream", "StreamCall", "is_input_stream"]

T = TypeVar("T")

_ITEM = Kind.ITEM
_END = Kind.END
_ERROR = Kind.ERROR


class Credit:
    """The producer's side of flow control: how many items it may still send."""

    __slots__ = ("available", "waiter")

    def __init__(self, available: int) -> None:
        self.available = available
        self.waiter: asyncio.Future[None] | None = None

    async def take(self) -> None:
        """Wait for a credit and use it."""
        while self.available <= 0:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        self.available -= 1

    def grant(self, count: int) -> None:
        """The consumer took ``count`` items: allow as many more."""
        self.available += count
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def is_input_stream(value: Any) -> bool:
    """True for a value a caller streams into a call (any async iterable)."""
    return hasattr(value, "__aiter__") and not isinstance(value, (str, bytes, bytearray))


_END_OF_INPUT = object()


class InputStream(AsyncIterator[Any]):
    """The server's side of a client stream: the items, in order, as the handler's
    ``AsyncIterator[T]`` argument.

    Args:
        window: Items the caller may send ahead of what the handler has taken.
        grant: Sends the caller a CREDIT for that many more items.
        convert: Validates each item into the declared item type (None: as received).
    """

    def __init__(
        self,
        window: int,
        grant: Callable[[int], None],
        convert: Callable[[Any], Any] | None = None,
    ) -> None:
        self._window = window
        self._step = max(window // 2, 1)
        self._grant = grant
        self.convert = convert
        self._items: deque[Any] = deque()
        self._taken = 0
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self.error: RpcError | None = None

    def put(self, kind: Kind, value: Any) -> None:
        """An ITEM (its value) or the END of the input arrived."""
        if self._ended or self.error is not None:
            return
        if kind is _END:
            self._ended = True
        elif len(self._items) >= self._window:
            self.error = ProtocolError(
                f"the caller sent more than {self._window} stream items without credit"
            )
        else:
            self._items.append(value)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> InputStream:
        return self

    async def __anext__(self) -> Any:
        while True:
            if self.error is not None:
                raise self.error
            if self._items:
                value = self._items.popleft()
                self._taken += 1
                if self._taken >= self._step:
                    self._grant(self._taken)
                    self._taken = 0
                return value if self.convert is None else self.convert(value)
            if self._ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


class Pump:
    """The caller's side of a client stream: sends the items of ``source`` as the
    server grants credits, then END.

    Args:
        source: The caller's async iterable.
        window: Items that may be sent before the first credit.
        send: Sends one ITEM (a value) or, with ``None`` and ``end=True``, the END.
    """

    def __init__(
        self,
        source: AsyncIterable[Any],
        window: int,
        send: Callable[[Kind, Any], None],
    ) -> None:
        self.source = source
        self.credit = Credit(window)
        self._send = send
        self.task: asyncio.Task[None] | None = None

    def start(self, on_error: Callable[[BaseException], None]) -> None:
        """Start sending in a task; ``on_error`` gets what the source raised."""
        self.task = asyncio.get_running_loop().create_task(self._run(on_error))

    async def _run(self, on_error: Callable[[BaseException], None]) -> None:
        credit = self.credit
        try:
            async for item in self.source:
                if credit.available > 0:
                    credit.available -= 1
                else:
                    await credit.take()
                self._send(_ITEM, item)
            self._send(_END, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            on_error(exc)

    def stop(self) -> None:
        """The call ended: stop sending."""
        if self.task is not None and not self.task.done():
            self.task.cancel()


class StreamCall:
    """The client's state of one open stream, registered with the client by call id.

    Frames reach it in the order the server sent them, each with its parts (the
    connection's protocol machine sees to that).
    """

    def __init__(self, client: Client, call_id: int, window: int) -> None:
        self.client = client
        self.call_id = call_id
        self.window = window
        self.credit_step = max(window // 2, 1)
        # Each entry: (kind, value, metadata)
        self.items: deque[tuple[Kind, Any, Metadata | None]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.done = False
        self.metadata: Metadata = {}
        self.unacked = 0
        self.timer: Timer | None = None

    @property
    def buffered(self) -> int:
        """Items received and not yet taken by the consumer."""
        return len(self.items)

    # -- frames from the server ---------------------------------------------------------------

    def on_frame(self, header: codec.Header, payload: memoryview, parts: list[Any]) -> None:
        """The next frame of this stream (in order, with its parts)."""
        kind = header.kind
        if kind is not _ITEM and kind is not _END and kind is not _ERROR:
            self.fail(ProtocolError(f"unexpected {kind.name} frame in a stream"))
            return
        if kind is _ITEM and len(self.items) >= self.window:
            # The server may be at most a window ahead of what was taken.
            self.fail(ProtocolError(f"the server sent more than {self.window} items ahead"))
            return
        try:
            value = codec.decode_payload(header, payload, parts, array_hook=from_array)
        except RpcError as err:
            kind, value = _ERROR, err
        else:
            if kind is _ERROR:
                value = error_from_payload(value)
        self.items.append((kind, value, header.metadata))
        if len(self.items) == 1:
            self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """End the stream with ``exc`` (deadline, lost connection, bad frame)."""
        if self.error is None:
            self.error = exc
        self._wake()

    # -- the consumer ---------------------------------------------------------------------------

    async def next(self) -> Any:
        """The next item.

        Raises:
            StopAsyncIteration: The stream ended.
            RpcError: The server ended the stream with an error, or the call failed.
        """
        while True:
            if self.error is not None:
                if isinstance(self.error, DeadlineExceeded):
                    self.finish()  # the server holds the same deadline and stops itself
                else:
                    self.abandon()
                raise self.error
            items = self.items
            if items:
                kind, value, metadata = items.popleft()
                if kind is _ITEM:
                    self.unacked += 1
                    if self.unacked >= self.credit_step:
                        self.client._grant(self.call_id, self.unacked)
                        self.unacked = 0
                    return value
                self.metadata = metadata or {}
                self.finish()
                if kind is _END:
                    raise StopAsyncIteration
                if isinstance(value, RpcError):
                    value.metadata = self.metadata
                raise value
            if self.done:
                raise StopAsyncIteration
            self.waiter = self.client._loop.create_future()
            await self.waiter

    def finish(self) -> None:
        """The stream ended normally: forget it (nothing to tell the server)."""
        if not self.done:
            self.done = True
            self.client._end_stream(self)

    def abandon(self) -> None:
        """Stop consuming: tell the server to cancel the generator, and forget the call."""
        if not self.done:
            self.done = True
            self.client._end_stream(self, cancel=True)


class Stream(AsyncIterator[T], Generic[T]):
    """The results of a streaming call: ``async for item in client.stream(...)``.

    The request is sent on the first iteration (or on ``async with``). The generator
    on the server is cancelled by :meth:`aclose`, by leaving ``async with``, by
    cancelling the consuming task, or when the stream is dropped unfinished: leaving
    ``async for item in client.stream(...)`` early drops it at once, but a stream kept
    in a variable stays open until it is closed or garbage collected, so close it (or
    use ``async with``). The call's deadline covers the whole stream.

    Attributes:
        method: The method name.
    """

    def __init__(
        self,
        client: Client,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        timeout: float | None,
        priority: int | None,
        metadata: Metadata | None,
        convert: Callable[[Any], T] | None = None,
    ) -> None:
        self.method = method
        self._client = client
        self._request = (args, kwargs, timeout, priority, metadata)
        self._convert = convert
        self._call: StreamCall | None = None
        self._closed = False

    async def _open(self) -> StreamCall:
        if self._closed:
            raise RuntimeError("the stream is closed")
        args, kwargs, timeout, priority, metadata = self._request
        self._call = await self._client._open_stream(
            self.method, args, kwargs, timeout, priority, metadata
        )
        return self._call

    def __aiter__(self) -> Stream[T]:
        return self

    async def __anext__(self) -> T:
        call = self._call
        if call is None:
            if self._closed:
                raise StopAsyncIteration
            call = await self._open()
        try:
            value = await call.next()
        except asyncio.CancelledError:
            call.abandon()
            raise
        if self._convert is None:
            return value  # type: ignore[no-any-return]
        try:
            return self._convert(value)
        except RpcError:
            call.abandon()
            raise

    async def aclose(self) -> None:
        """Stop the stream; the server's generator is cancelled if it is still running."""
        self._closed = True
        if self._call is not None:
            self._call.abandon()

    async def __aenter__(self) -> Stream[T]:
        if self._call is None:
            await self._open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def metadata(self) -> Metadata:
        """The trailing metadata the server sent with the end of the stream."""
        return {} if self._call is None else self._call.metadata

    @property
    def buffered(self) -> int:
        """Items received and not yet consumed (at most the stream window)."""
        return 0 if self._call is None else self._call.buffered

    def __del__(self) -> None:
        # ``async for ...: break`` drops the last reference here: cancel on the server.
        call = self._call
        if call is not None and not call.done:
            loop = call.client._loop
            if not loop.is_closed():
                loop.call_soon_threadsafe(call.abandon)
