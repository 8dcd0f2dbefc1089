"""A server for the fault tests (tests/test_faults.py), in its own process.

Prints ``READY <port> <pid>`` and serves until killed or told otherwise on stdin::

    stop GRACE       STOPPING <t0>, then ``server.stop(GRACE)``: STOPPED <seconds>;
                     then the manager's shutdown: SHUTDOWN <seconds>; then exits
    shutdown GRACE   SHUTTING <t0>, then ``manager.shutdown(GRACE)``: SHUTDOWN <seconds>;
                     then exits
    arm SKIP         SIGKILL this process from a thread the moment a transfer is in
                     flight, after SKIP transfers (prints KILL <json> first)

Every line on stdout is one the test expects; anything the library prints would be
extra (the test checks that there is none, on stdout and stderr). ``stats`` returns
the handler counters (how many entered, finished, saw CancelledError, swallowed it)
and what the process holds (``faultlib.state``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

from faultlib import arm_self_kill, say, state
from transfer_rpcs import add_transfer_rpcs

import ucxrpc

server = ucxrpc.Server()
MANAGER: list[ucxrpc.Manager] = []
COUNTS = {
    "entered": 0,
    "finished": 0,
    "cancelled": 0,
    "swallowed": 0,
    "plain_entered": 0,
    "plain_finished": 0,
}
_LOCK = threading.Lock()  # plain handlers count from the handler threads
add_transfer_rpcs(server, memoryview)  # ping, sink, echo, big: zero-copy


@server.rpc
async def hold(seconds: float) -> str:
    """Waits ``seconds``; counts a cancellation it sees (and lets it through)."""
    COUNTS["entered"] += 1
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        COUNTS["cancelled"] += 1
        raise
    COUNTS["finished"] += 1
    return "DONE"


@server.rpc
async def swallow(seconds: float) -> str:
    """Runs ``seconds`` whatever happens: catches every cancellation and goes on."""
    COUNTS["entered"] += 1
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            await asyncio.sleep(left)
        except asyncio.CancelledError:
            COUNTS["swallowed"] += 1
    COUNTS["finished"] += 1
    return "SWALLOWED"


@server.rpc
def plain(seconds: float) -> str:
    """A plain handler (it runs in a thread) that blocks for ``seconds``."""
    with _LOCK:
        COUNTS["plain_entered"] += 1
    time.sleep(seconds)
    with _LOCK:
        COUNTS["plain_finished"] += 1
    return "PLAIN"


@server.rpc
async def stats() -> dict[str, Any]:
    with _LOCK:
        counts = dict(COUNTS)
    return {**counts, **state(MANAGER[0], server), "pid": os.getpid()}


async def commands(manager: ucxrpc.Manager) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while words := (await reader.readline()).decode().split():
        cmd, args = words[0], words[1:]
        if cmd == "stop":
            t0 = time.monotonic()
            say("STOPPING", t0)
            await server.stop(float(args[0]))
            say("STOPPED", round(time.monotonic() - t0, 4))
            t1 = time.monotonic()
            await manager.shutdown()
            say("SHUTDOWN", round(time.monotonic() - t1, 4))
            return
        if cmd == "shutdown":
            t0 = time.monotonic()
            say("SHUTTING", t0)
            await manager.shutdown(float(args[0]))
            say("SHUTDOWN", round(time.monotonic() - t0, 4))
            return
        if cmd == "arm":
            arm_self_kill(manager, int(args[0]))
            say("ARMED")
        elif cmd == "counts":
            say("COUNTS", json.dumps(COUNTS))
    await asyncio.Event().wait()  # stdin closed: serve until killed


async def main() -> None:
    async with ucxrpc.Manager() as manager:
        MANAGER.append(manager)
        await server.start(manager, "127.0.0.1", 0)
        say("READY", server.port, os.getpid())
        await commands(manager)
    with _LOCK:
        counts = dict(COUNTS)
    say("EXIT", json.dumps(counts))


if __name__ == "__main__":
    ucxrpc.run(main())
