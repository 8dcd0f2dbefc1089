"""Shared fixtures: a running manager, a server with a test service, a connected client."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import ucxrpc

HELPERS = Path(__file__).parent / "helpers"


async def until(predicate: Any, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds: observable state, checked each millisecond."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - state owned by UCX callbacks, no event
            await asyncio.sleep(0.001)


def match_each(pattern: str, lines: list[str]) -> list[re.Match[str]]:
    """Match every line against ``pattern``; fail naming the first line that does not."""
    assert lines, f"no lines to match {pattern!r}"
    matches = []
    for line in lines:
        match = re.fullmatch(pattern, line)
        assert match is not None, f"{line!r} does not match {pattern!r}"
        matches.append(match)
    return matches


class Hanging:
    """A handler that waits until it is cancelled, recording both moments."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def __call__(self) -> None:
        self.entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def hanging_server(name: str) -> tuple[ucxrpc.Server, Hanging]:
    """A server whose method ``name`` hangs until cancelled."""
    server = ucxrpc.Server()
    handler = Hanging()
    server.add_handler(handler.__call__, name=name)
    return server, handler


@pytest.fixture
async def manager() -> AsyncIterator[ucxrpc.Manager]:
    async with ucxrpc.Manager() as m:
        yield m
    assert m.connections == 0


def make_service() -> ucxrpc.Server:
    """A server with the handlers most tests use."""
    server = ucxrpc.Server()

    @server.rpc
    async def ping() -> str:
        return "PONG"

    @server.rpc(name="echo")
    async def echo_impl(text: str) -> str:
        return "REPLY:" + text

    @server.rpc
    def add(a: int, b: int) -> int:
        return a + b

    @server.rpc
    async def blob(data: bytes) -> bytes:
        return data

    @server.rpc
    async def sleep(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "AWAKE"

    return server


@pytest.fixture
async def served(manager: ucxrpc.Manager) -> AsyncIterator[tuple[ucxrpc.Server, ucxrpc.Client]]:
    server = make_service()
    await server.start(manager, "127.0.0.1", 0)
    client = await manager.connect("127.0.0.1", server.port)
    yield server, client
    await client.close()
    await server.stop(grace=1.0)


class Proc:
    """A helper process started with subprocess (fork+exec: nothing of UCX is inherited)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.pid = self.popen.pid

    def read_ready(self, timeout: float = 30.0) -> list[str]:
        """Wait for the child's ``READY ...`` line (bounded by pytest-timeout)."""
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline().split()
        if not line or line[0] != "READY":
            self.stop()
            _, err = self.popen.communicate(timeout=timeout)
            raise AssertionError(f"helper did not start: {line!r} {err}")
        return line[1:]

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn() -> Iterator[Any]:
    """Start helper scripts from tests/helpers; every one is stopped by pid at the end."""
    procs: list[Proc] = []

    def start(script: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(str(HELPERS / script), *args, env=env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture
async def remote(spawn: Any) -> AsyncIterator[tuple[ucxrpc.Manager, ucxrpc.Client]]:
    """A client of ``helpers/serve.py`` running in a process of its own."""
    port = int(spawn("serve.py").read_ready()[0])
    async with ucxrpc.Manager() as manager:
        client = await manager.connect("127.0.0.1", port)
        yield manager, client
        await client.close()


def _ptrace_scope() -> int:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read())
    except OSError:
        return 0  # no Yama: processes of one user may read each other's memory


#: Yama's ptrace restriction here (0: none, so memory reads and frame rings work
#: between processes of one user).
PTRACE_SCOPE = _ptrace_scope()
