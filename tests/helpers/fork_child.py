"""A parent that calls a server, forks a child that does MODE, then calls again.

Prints JSON lines: {"child": ...} from the child, {"status": ...} and {"after": ...}
from the parent. Usage: fork_child.py PORT MODE, MODE one of exit, exit-in-loop,
use, new-manager, idle-manager, kill, os-exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import ucxrpc
from ucxrpc.liveness import KeepAlive

IDLE: list[ucxrpc.Manager] = []
PORT: list[int] = []


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def child(client: ucxrpc.Client, mode: str) -> None:
    signal.alarm(20)  # a child that hangs fails the test instead of wedging it
    if mode == "use":
        try:
            await client.call("ping")
            say(child="call succeeded")
        except ucxrpc.RpcError as exc:
            say(child=type(exc).__name__, message=exc.message)
    elif mode == "new-manager":
        try:
            async with ucxrpc.Manager():
                say(child="manager started")
        except ucxrpc.RpcError as exc:
            say(child=type(exc).__name__, message=exc.message)
    elif mode == "idle-manager":
        try:  # started in the parent, never used there: no UCX of its own yet
            await IDLE[0].connect("127.0.0.1", PORT[0])
            say(child="connected")
        except ucxrpc.RpcError as exc:
            say(child=type(exc).__name__, message=exc.message)
    elif mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "os-exit":
        os._exit(0)
    # exit / exit-in-loop: leave the coroutine, so the manager's `async with` closes
    # everything the child inherited, and the interpreter exits normally.


async def main(port: int, mode: str) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: a shared part, lent and read
    async with ucxrpc.Manager() as manager:
        # Heartbeats on the control connection, and a server of the parent's own: the
        # child must leave the loop's watches of both (and of UCX's fd) in place.
        client = await manager.connect("127.0.0.1", port, keepalive=KeepAlive(0.2, 0.6))
        own = ucxrpc.Server()

        @own.rpc
        async def ping() -> str:
            return "OWN"

        await own.start(manager)
        idle = ucxrpc.Manager()
        await idle.start()
        IDLE.append(idle)
        PORT.append(port)
        assert await client.call("ping") == "PONG"
        assert await client.call("reverse", big) == big[::-1]
        pid = os.fork()
        if pid == 0:
            await child(client, mode)
            if mode == "exit-in-loop":
                return
            sys.exit(0)
        _, status = os.waitpid(pid, 0)  # noqa: ASYNC222 - the parent waits, on purpose
        say(status=os.waitstatus_to_exitcode(status))
        await asyncio.sleep(1.5)  # heartbeats go on meanwhile (a lost one ends the client)
        for _ in range(20):
            assert await client.call("ping") == "PONG"
            assert await client.call("reverse", big) == big[::-1]
        async with await manager.connect("127.0.0.1", own.port) as again:
            assert await again.call("ping") == "OWN"  # the parent still accepts
        say(after="ok")
        await client.close()
        await idle.shutdown()


if __name__ == "__main__":
    ucxrpc.run(main(int(sys.argv[1]), sys.argv[2]))
