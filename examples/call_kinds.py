"""The four call kinds, as in gRPC: unary, server streaming, client streaming and
bidirectional, each by name and through a typed stub.

Run: python examples/call_kinds.py
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncIterator

from pydantic import BaseModel

import ucxrpc


class Reading(BaseModel):
    sensor: str
    value: float


class Stats(BaseModel):
    count: int
    mean: float


# --8<-- [start:interface]
class SensorApi(ucxrpc.Service, name="sensors.v1"):
    @ucxrpc.rpc
    @abstractmethod
    async def scale(self, value: float, factor: float) -> float:
        """Unary: one request, one reply."""

    @ucxrpc.rpc
    @abstractmethod
    def replay(self, count: int) -> AsyncIterator[Reading]:
        """Server streaming: one request, a stream of replies."""

    @ucxrpc.rpc
    @abstractmethod
    async def summarize(self, readings: AsyncIterator[Reading]) -> Stats:
        """Client streaming: a stream of requests, one reply."""

    @ucxrpc.rpc
    @abstractmethod
    def alarms(self, readings: AsyncIterator[Reading], limit: float) -> AsyncIterator[str]:
        """Bidirectional: replies flow while requests still come."""
        # --8<-- [end:interface]


# --8<-- [start:impl]
class Sensors(SensorApi):
    async def scale(self, value: float, factor: float) -> float:
        return value * factor

    async def replay(self, count: int) -> AsyncIterator[Reading]:
        for i in range(count):
            yield Reading(sensor="t1", value=20.0 + i)

    async def summarize(self, readings: AsyncIterator[Reading]) -> Stats:
        values = [r.value async for r in readings]
        return Stats(count=len(values), mean=sum(values) / max(len(values), 1))

    async def alarms(self, readings: AsyncIterator[Reading], limit: float) -> AsyncIterator[str]:
        async for r in readings:
            if r.value > limit:
                yield f"{r.sensor} at {r.value}"
        yield "done"  # the caller has half-closed: the server may still send


async def readings(values: list[float]) -> AsyncIterator[Reading]:
    for i, v in enumerate(values):
        yield Reading(sensor=f"s{i}", value=v)
        # --8<-- [end:impl]


async def main() -> None:
    server = ucxrpc.Server()
    server.add_service(Sensors())
    async with ucxrpc.Manager() as manager:
        await server.start(manager, "127.0.0.1", 0)
        async with await manager.connect("127.0.0.1", server.port) as client:
            # --8<-- [start:calls]
            stub = client.stub(SensorApi)
            print("unary:", await stub.scale(2.5, 4))
            print("server streaming:", [r.value async for r in stub.replay(3)])
            print("client streaming:", await stub.summarize(readings([1.0, 2.0, 6.0])))
            print("bidirectional:", [a async for a in stub.alarms(readings([3, 9, 1, 12]), 5)])
            # The same calls by name: any async iterable argument is streamed.
            stats = await client.call("sensors.v1.summarize", readings([4.0]))
            print("by name:", stats)
            # --8<-- [end:calls]
            description = await client.describe()
            for method in description.methods:
                if method.name.startswith("sensors."):
                    print(f"  {method.name}: {method.kind}")
        await server.stop()


if __name__ == "__main__":
    ucxrpc.run(main())
