"""Typed stubs as a type checker sees them: mypy --strict on user code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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


# -- mypy on code outside the clone, and on the snippet of docs/services.md ---------------

DOCS = ROOT / "docs" / "services.md"
#: A cache of its own: the snippets are checked without the project's configuration.
OUTSIDE_CACHE = ROOT / ".mypy_cache" / "outside"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def _outside_mypy(directory: Path, source: str) -> tuple[str, int]:
    """``mypy --strict`` of the dev environment on ``source``, run in ``directory`` (not in
    the clone, and without its configuration): as a user's project would run it."""
    assert ROOT not in directory.parents
    (directory / "snippet.py").write_text(source)
    mypy = Path(sys.executable).parent / "mypy"
    proc = subprocess.run(
        [str(mypy), "--strict", "--cache-dir", str(OUTSIDE_CACHE), "snippet.py"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")},
    )
    return proc.stdout + proc.stderr, proc.returncode


@pytest.mark.timeout(320)
def test_code_outside_the_clone_finds_the_typed_package(tmp_path: Path) -> None:
    out, status = _outside_mypy(tmp_path, HEADER + GOOD)
    assert "import-not-found" not in out, out  # the editable install is one mypy follows
    assert 'Revealed type is "typing.Coroutine[Any, Any, snippet.EchoReply]"' in out, out
    assert 'Revealed type is "typing.AsyncIterator[int]"' in out, out
    assert status == 0, out


@pytest.mark.timeout(320)
def test_the_services_docs_snippet_type_checks_as_its_comments_say(tmp_path: Path) -> None:
    blocks = _python_blocks(DOCS.read_text())
    interface = next(b for b in blocks if "class EchoApi(" in b)
    snippet = next(b for b in blocks if "reveal_type(stub)" in b)
    source = "from __future__ import annotations\n\n" + interface + "\n\n" + snippet
    out, status = _outside_mypy(tmp_path, source)
    lines = source.splitlines()
    revealed = {
        int(m[1]): re.sub(r"\b[a-z_]+\.", "", m[2])  # snippet.EchoApi -> EchoApi
        for m in re.finditer(r'^snippet\.py:(\d+): note: Revealed type is "(.*)"$', out, re.M)
    }
    expected = {
        i + 1: line.split("#", 1)[1].strip()
        for i, line in enumerate(lines)
        if "reveal_type(" in line and "#" in line
    }
    assert len(expected) == 4 and revealed == expected, out
    errors = re.findall(r"^snippet\.py:(\d+): error: (.*?)  \[", out, re.M)
    documented = next(line for line in lines if line.lstrip().startswith("# error: "))
    shout_hi = next(i + 1 for i, line in enumerate(lines) if 'stub.shout("hi")' in line)
    # The only error is the one the snippet shows (no unused-coroutine, nothing else).
    assert errors == [(str(shout_hi), documented.split("# error: ", 1)[1])], out
    assert status == 1, out
