"""Health checking, like gRPC's grpc.health.v1: check, watch, and a draining server.

Run it (server and client in one process)::

    python examples/health_check.py

Every server answers ``ucxrpc.health.check`` and ``ucxrpc.health.watch``; the
application sets the status of its services on ``server.health``. A watch reports the
status at once and then each change; when the server drains (``server.stop(grace)``)
every status reads NOT_SERVING and the watch ends. From a shell, or an orchestrator's
probe: ``ucxrpc health HOST:PORT [SERVICE]`` exits 0 only when SERVING.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Callable

import ucxrpc
from ucxrpc import HealthApi, HealthStatus


class Orders(ucxrpc.Service, name="orders.v1"):
    @ucxrpc.rpc
    @abstractmethod
    async def place(self, item: str, seconds: float = 0.0) -> str: ...


class OrdersImpl(Orders):
    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def place(self, item: str, seconds: float = 0.0) -> str:
        self.started.set()
        await asyncio.sleep(seconds)
        return f"placed {item}"


async def watch(health: HealthApi, service: str, seen: list[HealthStatus]) -> None:
    async for status in health.watch(service):
        print(f"  watch {service}: {status}")
        seen.append(status)
    print(f"  watch {service}: ended")


async def main() -> None:
    orders = OrdersImpl()
    server = ucxrpc.Server()
    server.add_service(orders)  # the service starts SERVING
    async with ucxrpc.Manager() as manager:
        await server.start(manager)
        async with await manager.connect("127.0.0.1", server.port) as client:
            health = client.stub(HealthApi)
            print(f"server: {await health.check()}")
            print(f"orders.v1: {await health.check('orders.v1')}")
            try:
                await health.check("billing.v1")
            except ucxrpc.RpcError as exc:
                print(f"billing.v1: {exc.code.name}")

            seen: list[HealthStatus] = []
            watching = asyncio.ensure_future(watch(health, "orders.v1", seen))
            await until(lambda: len(seen) == 1)
            # The database behind orders.v1 went away, then came back.
            server.health.set("orders.v1", HealthStatus.NOT_SERVING)
            await until(lambda: len(seen) == 2)
            print(f"orders.v1: {await health.check('orders.v1')}")
            server.health.set("orders.v1", "SERVING")
            await until(lambda: len(seen) == 3)

            # A slow call in flight, then a drain: health says NOT_SERVING at once.
            placing = asyncio.ensure_future(client.call("orders.v1.place", "book", 0.3))
            await orders.started.wait()
            stopping = asyncio.ensure_future(server.stop(grace=5.0))
            await watching
            print(f"while draining, server: {await health.check()}")
            print(f"the slow call: {await placing}")
            await stopping


async def until(predicate: Callable[[], bool]) -> None:
    """Wait (at most 5 s) until ``predicate()`` holds (the watch task appends)."""
    async with asyncio.timeout(5):
        while not predicate():  # noqa: ASYNC110 - a list another task fills
            await asyncio.sleep(0.001)


if __name__ == "__main__":
    ucxrpc.run(main())
