"""A client for the fault tests (tests/test_faults.py), in its own process.

Usage::

    fault_client.py PORT hold N             N calls of hold(60) at once; SENT once
                                            they are made; runs until killed
    fault_client.py PORT request SIZE SKIP  two hold(60) calls, then sink(SIZE) back to
    fault_client.py PORT reply SIZE SKIP    back (reply: big(SIZE)) on two tasks; after
                                            the first: GO, then kills itself the moment
                                            a transfer is in flight, after SKIP of them
                                            (KILL <json> first: see faultlib)
    fault_client.py PORT keepalive INTERVAL TIMEOUT N SECONDS
                                            with KeepAlive(INTERVAL, TIMEOUT), N calls
                                            of hold(SECONDS); SENT; then one line per
                                            call as it ends, RESULT <i> <outcome>
                                            <monotonic>; then PING <outcome> for a call
                                            made afterwards; END; exits 0
"""

from __future__ import annotations

import asyncio
import sys
import time

from faultlib import arm_self_kill, say

import ucxrpc
from ucxrpc.liveness import KeepAlive


async def outcome(call: asyncio.Future[object]) -> str:
    try:
        return str(await call)
    except ucxrpc.RpcError as exc:
        return type(exc).__name__


async def main(port: int, mode: str, args: list[str]) -> None:
    async with ucxrpc.Manager() as manager:
        if mode == "keepalive":
            interval, timeout, n, seconds = float(args[0]), float(args[1]), int(args[2]), args[3]
            client = await manager.connect(
                "127.0.0.1", port, keepalive=KeepAlive(interval=interval, timeout=timeout)
            )
            calls = [asyncio.ensure_future(client.call("hold", float(seconds))) for _ in range(n)]
            say("SENT")
            for i, call in enumerate(calls):
                say("RESULT", i, await outcome(call), time.monotonic())
            say("PING", await outcome(asyncio.ensure_future(client.call("ping", timeout=5.0))))
            say("END")
            await client.close()
            return
        client = await manager.connect("127.0.0.1", port)
        if mode == "hold":
            calls = [asyncio.ensure_future(client.call("hold", 60.0)) for _ in range(int(args[0]))]
            say("SENT")
            await asyncio.gather(*calls)
            return
        size, skip = int(args[0]), int(args[1])
        method, arg = ("sink", b"\x5a" * size) if mode == "request" else ("big", size)
        holds = [asyncio.ensure_future(client.call("hold", 60.0)) for _ in range(2)]

        async def flood() -> None:
            while True:
                await client.call(method, arg, timeout=60)

        await client.call(method, arg, timeout=60)  # warm-up: the path works
        say("GO")
        arm_self_kill(manager, skip)
        await asyncio.gather(flood(), flood(), *holds)


if __name__ == "__main__":
    ucxrpc.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3:]))
