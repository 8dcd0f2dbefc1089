"""Operations under a timeout: success, error and timeout are three distinct outcomes.

Run it (every side in one process)::

    python examples/timeouts.py

The same kind of operation is made three times, once ending in each outcome:

* an RPC call with ``timeout=``: a key that exists (ok), a key the handler refuses
  (error), a key whose handler takes too long (the deadline passes: the call raises
  ``DeadlineExceeded`` and the server cancels the handler);
* a raw request/reply with ``recv_tag(..., timeout=)``: a ``PING`` answered with
  ``PONG`` (ok), a reply larger than the receive limit (error: ``ResourceExhausted``),
  a request the peer never answers (timed out).

``DeadlineExceeded`` is an ``RpcError`` too, so it is caught first.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable

import ucxrpc
from ucxrpc.transport import Worker

#: Seconds every operation may take.
LIMIT = 0.2
#: Longer than the default receive limit (WorkerConfig.buffer_size, 64 KiB).
BIG = 100_000

server = ucxrpc.Server()
#: Set when the server cancels the slow handler at the call's deadline.
slow_handler_cancelled = asyncio.Event()


@server.rpc
async def fetch(key: str) -> str:
    if key == "slow":
        try:
            await asyncio.sleep(5)  # far longer than the caller waits
        except asyncio.CancelledError:
            slow_handler_cancelled.set()
            raise
    if key == "missing":
        raise ucxrpc.InvalidArgument(f"no value for {key!r}")
    return f"value of {key}"


# --8<-- [start:outcome]
async def outcome(operation: Awaitable[object]) -> str:
    """Run ``operation`` (itself bounded by LIMIT) and describe how it ended."""
    start = time.perf_counter()
    try:
        result = await operation
    except ucxrpc.DeadlineExceeded:
        return f"timed out after {LIMIT} s (waited {time.perf_counter() - start:.3f} s)"
    except ucxrpc.RpcError as exc:
        return f"error: {type(exc).__name__}: {exc.message}"
    return f"ok: {result!r}"


# --8<-- [end:outcome]


async def answer_requests(peer: Worker) -> None:
    """The raw peer: PING -> PONG, BIG -> BIG bytes, anything else -> no answer."""
    while True:
        endpoint, message = await peer.next_message()
        if message.data == b"PING":
            await peer.send_tag(endpoint, message.tag, b"PONG")
        elif message.data == b"BIG":
            await peer.send_tag(endpoint, message.tag, bytes(BIG))


# --8<-- [start:request]
async def request(worker: Worker, endpoint: int, tag: int, text: str) -> bytes:
    await worker.send_tag(endpoint, tag, text)
    return await worker.recv_tag(endpoint, tag, timeout=LIMIT)


# --8<-- [end:request]


async def main() -> None:
    async with ucxrpc.Manager() as manager:
        await server.start(manager, "127.0.0.1", 0)
        async with await manager.connect("127.0.0.1", server.port) as client:
            # --8<-- [start:calls]
            for key in ("a", "missing", "slow"):
                result = await outcome(client.call("fetch", key, timeout=LIMIT))
                print(f"rpc fetch({key!r}) -> {result}")
            # --8<-- [end:calls]
        await asyncio.wait_for(slow_handler_cancelled.wait(), 5)
        print("  the server cancelled the slow handler at the deadline")
        await server.stop(grace=1.0)

        peer, worker = Worker(manager=manager), Worker(manager=manager)
        port = await peer.listen()
        answering = asyncio.ensure_future(answer_requests(peer))
        try:
            endpoint = await worker.connect("127.0.0.1", port)
            for tag, text in enumerate(("PING", "BIG", "SILENT"), 1):
                print(f"raw {text} -> {await outcome(request(worker, endpoint, tag, text))}")
        finally:
            answering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answering
            await worker.close_all()
            await peer.close_all()


if __name__ == "__main__":
    ucxrpc.run(main())
