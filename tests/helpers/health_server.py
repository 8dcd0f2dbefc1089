"""A server in its own process whose health a test steers through stdin.

Prints ``READY <port>``, then reads commands, one a line, answering ``OK``:
``set SERVICE STATUS`` (``-`` for the whole server), ``hold`` (a client of its own
starts a call of ``echo.v1.hold``, which runs until released), ``stop GRACE`` (starts
``server.stop(GRACE)``) and ``release`` (the held call returns; answers ``OK <result>``).
It exits when its stdin closes.
"""

from __future__ import annotations

import asyncio
import sys
from abc import abstractmethod

import ucxrpc


class Echo(ucxrpc.Service, name="echo.v1"):
    @ucxrpc.rpc
    @abstractmethod
    async def shout(self, text: str) -> str: ...

    @ucxrpc.rpc
    @abstractmethod
    async def hold(self) -> str: ...


class EchoImpl(Echo):
    def __init__(self) -> None:
        self.running = 0
        self.release = asyncio.Event()

    async def shout(self, text: str) -> str:
        return text.upper()

    async def hold(self) -> str:
        self.running += 1
        await self.release.wait()
        return "released"


async def main() -> None:
    impl = EchoImpl()
    server = ucxrpc.Server()
    server.add_service(impl)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stopping: list[asyncio.Task[None]] = []
    held: list[asyncio.Future[str]] = []
    async with ucxrpc.Manager() as manager:
        await server.start(manager, "127.0.0.1", 0)
        client = await manager.connect("127.0.0.1", server.port)
        print(f"READY {server.port}", flush=True)
        while line := (await reader.readline()).decode().split():
            answer = "OK"
            if line[0] == "set":
                server.health.set("" if line[1] == "-" else line[1], line[2])
            elif line[0] == "hold":
                held.append(asyncio.ensure_future(client.call("echo.v1.hold")))
                async with asyncio.timeout(10):
                    while impl.running == 0:  # noqa: ASYNC110 - a count the handler bumps
                        await asyncio.sleep(0.001)
            elif line[0] == "stop":
                stopping.append(loop.create_task(server.stop(float(line[1]))))
            elif line[0] == "release":
                impl.release.set()
                answer = f"OK {await held.pop()}"
            print(answer, flush=True)
        for task in stopping:
            await task
        await client.close()
        await server.stop(1.0)


if __name__ == "__main__":
    ucxrpc.run(main())
