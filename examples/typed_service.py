"""A typed service: an interface class, its implementation, and a typed client stub.

Run it (server and client in one process)::

    python examples/typed_service.py

The interface ``EchoApi`` is the contract both sides share. Arguments are validated
on the server from its annotations (pydantic models, dataclasses, TypedDicts, numpy
arrays), and the stub validates replies into the declared result types.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

# pydantic needs typing_extensions.TypedDict (not typing.TypedDict) before Python 3.12.
from typing_extensions import TypedDict

import ucxrpc


class EchoRequest(BaseModel):
    text: str
    times: int = 1


class EchoReply(BaseModel):
    text: str


@dataclass
class Point:
    x: float
    y: float


class Summary(TypedDict):
    count: int
    mean: float
    largest: float


class EchoApi(ucxrpc.Service, name="echo.v1"):
    """What clients may call: registered as ``echo.v1.<method>``."""

    @ucxrpc.rpc
    @abstractmethod
    async def shout(self, req: EchoRequest) -> EchoReply:
        """Repeat the text in upper case."""

    @ucxrpc.rpc(idempotent=True)
    @abstractmethod
    async def midpoint(self, a: Point, b: Point) -> Point:
        """The point halfway between two points."""

    @ucxrpc.rpc
    @abstractmethod
    async def summarize(self, values: npt.NDArray[np.float64]) -> Summary:
        """Count, mean and largest element of an array."""


class EchoImpl(EchoApi):
    async def shout(self, req: EchoRequest) -> EchoReply:
        return EchoReply(text=req.text.upper() * req.times)

    async def midpoint(self, a: Point, b: Point) -> Point:
        return Point((a.x + b.x) / 2, (a.y + b.y) / 2)

    async def summarize(self, values: npt.NDArray[np.float64]) -> Summary:
        return Summary(count=values.size, mean=float(values.mean()), largest=float(values.max()))


async def main() -> None:
    async with ucxrpc.Manager() as manager:
        server = ucxrpc.Server()
        server.add_service(EchoImpl())
        await server.start(manager, "127.0.0.1", 0)
        client = await manager.connect("127.0.0.1", server.port)
        stub = client.stub(EchoApi)

        reply = await stub.shout(EchoRequest(text="a", times=3))
        print(f"shout -> {type(reply).__name__}(text={reply.text!r})")

        middle = await stub.midpoint(Point(0, 0), Point(3, 4))
        print(f"midpoint -> {middle}")

        summary = await stub.summarize(np.arange(1.0, 101.0))
        print(f"summarize -> {summary}")

        try:
            await client.call("echo.v1.shout", {"text": "x", "times": "many"})
        except ucxrpc.InvalidArgument as exc:
            print(f"InvalidArgument: {exc.message}")

        description = await client.describe()
        print(f"server {description.version} serves:")
        for method in description.methods:
            print(f"  {method.name} ({method.kind})")

        await client.close()
        await server.stop(grace=1.0)


if __name__ == "__main__":
    ucxrpc.run(main())
