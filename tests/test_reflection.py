"""Reflection and remote errors, over real UCX."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncIterator

import numpy as np
import pytest
from pydantic import BaseModel

import ucxrpc


class Job(BaseModel):
    name: str
    size: int = 1


class Done(BaseModel):
    name: str
    ok: bool


class Jobs(ucxrpc.Service, name="jobs.v2"):
    @ucxrpc.rpc(priority=ucxrpc.Priority.HIGH, timeout=3.0, idempotent=True)
    @abstractmethod
    async def run(self, job: Job, retries: int = 0) -> Done:
        """Run one job.

        Longer explanation that reflection leaves out.
        """

    @ucxrpc.rpc
    @abstractmethod
    def watch(self, name: str) -> AsyncIterator[Done]: ...


class JobsImpl(Jobs):
    async def run(self, job: Job, retries: int = 0) -> Done:
        return Done(name=job.name, ok=True)

    async def watch(self, name: str) -> AsyncIterator[Done]:
        yield Done(name=name, ok=False)


async def test_describe_lists_methods_with_kinds_and_schemas(manager: ucxrpc.Manager) -> None:
    server = ucxrpc.Server()
    server.add_service(JobsImpl())

    @server.rpc
    def norm(a: np.ndarray) -> float:
        return float(np.linalg.norm(a))

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        info = await client.describe()
    await server.stop()
    assert info.names == [
        "jobs.v2.run",
        "jobs.v2.watch",
        "norm",
        "ucxrpc.describe",
        "ucxrpc.health.check",
        "ucxrpc.health.watch",
    ]
    assert info.version == ucxrpc.__version__
    run = info.get("jobs.v2.run")
    assert run is not None
    assert (run.kind, run.priority, run.timeout, run.idempotent) == ("unary", 2, 3.0, True)
    assert run.doc == "Run one job."
    assert run.params["required"] == ["job"]
    assert run.params["properties"]["retries"] == {"default": 0, "type": "integer"}
    job = run.params["properties"]["job"]
    assert (job["title"], job["required"]) == ("Job", ["name"])
    assert run.result["required"] == ["name", "ok"]
    watch = info.get("jobs.v2.watch")
    assert watch is not None and watch.kind == "stream"
    assert watch.result["title"] == "Done"  # the schema of each item
    norm_info = info.get("norm")
    assert norm_info is not None
    assert "no JSON Schema" in norm_info.params["properties"]["a"]["description"]
    assert norm_info.result == {"type": "number"}
    assert info.get("missing") is None


class Boom(Exception):
    pass


async def _raise_boom() -> None:
    raise Boom("kaput")


@pytest.mark.parametrize("expose", [True, False])
async def test_remote_errors_and_tracebacks(expose: bool) -> None:
    async with ucxrpc.Manager(expose_tracebacks=expose) as manager:
        inner = ucxrpc.Server()
        inner.add_handler(_raise_boom, name="boom")
        await inner.start(manager)
        to_inner = await manager.connect("127.0.0.1", inner.port)
        outer = ucxrpc.Server()

        @outer.rpc
        async def relay() -> None:
            await to_inner.call("boom")

        @outer.rpc
        async def choose() -> None:
            raise ucxrpc.RpcError(ucxrpc.StatusCode.FAILED_PRECONDITION, "not yet", [1, 2])

        await outer.start(manager)
        async with await manager.connect("127.0.0.1", outer.port) as client:
            with pytest.raises(ucxrpc.RemoteError) as direct:
                await to_inner.call("boom")
            assert direct.value.remote_type == f"{__name__}.Boom"
            assert direct.value.message == "kaput"
            assert ('raise Boom("kaput")' in direct.value.remote_traceback) is expose
            assert (direct.value.remote_traceback == "") is not expose
            with pytest.raises(ucxrpc.RemoteError) as relayed:
                await client.call("relay")  # passed on unchanged through the middle server
            assert relayed.value.remote_type == f"{__name__}.Boom"
            assert (relayed.value.remote_traceback != "") is expose
            with pytest.raises(ucxrpc.RpcError) as chosen:
                await client.call("choose")
            assert type(chosen.value) is ucxrpc.RpcError
            assert chosen.value.code is ucxrpc.StatusCode.FAILED_PRECONDITION
            assert (chosen.value.message, chosen.value.details) == ("not yet", [1, 2])
        await to_inner.close()
        await outer.stop()
        await inner.stop()
