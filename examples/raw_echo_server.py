"""The design notes' example server, on the raw tag-messaging layer (``ucxrpc.transport``).

Run it, then point ``raw_echo_client.py`` at the port it prints::

    python examples/raw_echo_server.py --port 13337
    python examples/raw_echo_client.py 127.0.0.1:13337

It prints ``READY <port>`` once it listens (``--port 0``, the default, picks a free
port), then answers every message from any peer on the tag it came on:

* ``PING`` -> ``PONG``
* ``ECHO:<x>`` -> ``REPLY:<x>``
* anything else -> ``RECEIVED:<msg>``

It runs until SIGINT (Ctrl-C) or SIGTERM, or with ``--count N`` until it has answered N
messages, and exits 0 either way. It prints a line per message only with ``--verbose``
(a benchmark sends thousands), and exits 1 with one line when it cannot listen.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import ucxrpc
from ucxrpc.transport import Worker, WorkerConfig


# --8<-- [start:server]
def answer(text: str) -> str:
    """The reply to one message."""
    if text == "PING":
        return "PONG"
    if text.startswith("ECHO:"):
        return "REPLY:" + text[5:]
    return "RECEIVED:" + text


async def serve(worker: Worker, stop: asyncio.Event, count: int | None, quiet: bool) -> int:
    """Answer messages until ``stop`` is set or ``count`` have been answered."""
    answered = 0
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while count is None or answered < count:
            receiving = asyncio.ensure_future(worker.next_message())
            await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not receiving.done():
                receiving.cancel()
                await asyncio.wait({receiving})
                break
            endpoint, message = receiving.result()
            text = message.as_text()
            reply = answer(text)
            try:
                await worker.send_tag(endpoint, message.tag, reply)
            except ucxrpc.RpcError as exc:  # that peer is gone: keep answering the others
                print(f"endpoint {endpoint}: cannot reply: {exc.message}", flush=True)
                continue
            answered += 1
            if not quiet:
                print(f"endpoint {endpoint} tag {message.tag}: {text!r} -> {reply!r}", flush=True)
    finally:
        stopping.cancel()
        await asyncio.wait({stopping})
    return answered


# --8<-- [end:server]


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: pick a free one)")
    parser.add_argument("--count", type=int, default=None, help="stop after N messages")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per message")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no line per message (the default)"
    )
    args = parser.parse_args()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async with ucxrpc.Manager() as manager:
        worker = Worker(WorkerConfig(), manager=manager)
        try:
            try:
                port = await worker.listen(args.host, args.port)
            except ucxrpc.RpcError as exc:  # it says where and why
                print(f"error: {exc.message}", file=sys.stderr)
                return 1
            except OSError as exc:
                reason = exc.strerror or exc
                print(f"error: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
                return 1
            print(f"READY {port}", flush=True)
            quiet = args.quiet or not args.verbose
            answered = await serve(worker, stop, args.count, quiet)
            print(f"answered {answered} messages", flush=True)
            print(worker.stats().summary(), flush=True)
        finally:
            await worker.close_all()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    return 0


if __name__ == "__main__":
    sys.exit(ucxrpc.run(main()))
