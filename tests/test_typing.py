"""Typed stubs as a type checker sees them: mypy --strict on user code."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parent.parent

HEADER = """
from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from pydantic import BaseModel

import ucxrpc


class EchoRequest(BaseModel):
    text: str
    times: int = 1


class EchoReply(BaseModel):
    text: str


class EchoApi(ucxrpc.Service, name="echo.v1"):
    @ucxrpc.rpc
    @abstractmethod
    async def shout(self, req: EchoRequest) -> EchoReply: ...

    @ucxrpc.rpc(priority=ucxrpc.Priority.HIGH)
    @abstractmethod
    def count(self, n: int) -> AsyncIterator[int]: ...

    @ucxrpc.rpc
    @abstractmethod
    def ticks(self) -> AsyncGenerator[float, None]: ...  # closable with aclosing()


class EchoImpl(EchoApi):
    async def shout(self, req: EchoRequest) -> EchoReply:
        return EchoReply(text=req.text.upper() * req.times)

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def ticks(self) -> AsyncGenerator[float, None]:
        while True:
            yield 1.0
"""

GOOD = """
async def use(client: ucxrpc.Client, server: ucxrpc.Server) -> str:
    server.add_service(EchoImpl())
    stub = client.stub(EchoApi, timeout=1.0)
    pending = reveal_type(stub.shout(EchoRequest(text="a")))
    reply = await pending
    total = 0
    async for n in reveal_type(stub.count(3)):
        total += n
    async with aclosing(stub.ticks()) as ticks:
        async for tick in ticks:
            total += int(tick)
            break
    return reply.text + str(total)
"""

BAD = """
async def use(client: ucxrpc.Client) -> int:
    stub = client.stub(EchoApi)
    reply = await stub.shout("not a request")
    return reply.text
"""


def _mypy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> tuple[str, int]:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(HEADER + body)
    monkeypatch.chdir(ROOT)  # so that mypy finds the package and its configuration
    out, err, status = api.run(
        ["--strict", "--config-file", str(ROOT / "pyproject.toml"), str(snippet)]
    )
    return out + err, status


@pytest.mark.timeout(180)
def test_a_stub_is_typed_as_its_interface(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, status = _mypy(tmp_path, monkeypatch, GOOD)
    assert 'Revealed type is "typing.Coroutine[Any, Any, snippet.EchoReply]"' in out, out
    assert 'Revealed type is "typing.AsyncIterator[int]"' in out, out
    assert status == 0, out
    assert "error" not in out, out


@pytest.mark.timeout(180)
def test_wrong_types_through_a_stub_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, status = _mypy(tmp_path, monkeypatch, BAD)
    assert status == 1, out
    assert (
        'Argument 1 to "shout" of "EchoApi" has incompatible type "str"; expected "EchoRequest"'
        in out
    ), out
    assert 'Incompatible return value type (got "str", expected "int")' in out, out
