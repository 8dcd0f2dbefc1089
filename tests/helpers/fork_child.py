"""A parent that calls a server, forks a child that does MODE, then calls again.

Prints JSON lines: {"child": ...} from the child, {"status": ...} and {"after": ...}
from the parent. Usage: fork_child.py PORT MODE, MODE one of exit, exit-in-loop,
use, new-manager, kill, os-exit.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import ucxrpc


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
    elif mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "os-exit":
        os._exit(0)
    # exit / exit-in-loop: leave the coroutine, so the manager's `async with` closes
    # everything the child inherited, and the interpreter exits normally.


async def main(port: int, mode: str) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: a shared part, lent and read
    async with ucxrpc.Manager() as manager:
        client = await manager.connect("127.0.0.1", port)
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
        for _ in range(20):
            assert await client.call("ping") == "PONG"
            assert await client.call("reverse", big) == big[::-1]
        say(after="ok")
        await client.close()


if __name__ == "__main__":
    ucxrpc.run(main(int(sys.argv[1]), sys.argv[2]))
