"""Health checking (like grpc.health.v1) over real UCX, and ``ucxrpc health`` as a probe."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import HELPERS

import ucxrpc
from ucxrpc import HealthApi, HealthStatus, StatusCode

ROOT = Path(__file__).parent.parent
UCXRPC = str(Path(sys.executable).with_name("ucxrpc"))
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}

SERVING, NOT_SERVING = HealthStatus.SERVING, HealthStatus.NOT_SERVING
UNKNOWN, SERVICE_UNKNOWN = HealthStatus.UNKNOWN, HealthStatus.SERVICE_UNKNOWN


class Echo(ucxrpc.Service, name="echo.v1"):
    @ucxrpc.rpc
    @abstractmethod
    async def shout(self, text: str) -> str: ...


class EchoImpl(Echo):
    async def shout(self, text: str) -> str:
        return text.upper()


def health_server() -> ucxrpc.Server:
    server = ucxrpc.Server()
    server.add_service(EchoImpl())
    return server


async def next_status(stream: AsyncIterator[HealthStatus]) -> HealthStatus:
    async with asyncio.timeout(10):
        return await anext(stream)


# -- the table --------------------------------------------------------------------------------


def test_a_new_server_serves_and_knows_its_services() -> None:
    server = ucxrpc.Server()
    assert server.health.statuses == {"": SERVING}
    server.add_service(EchoImpl())
    assert server.health.statuses == {"": SERVING, "echo.v1": SERVING}
    assert {"ucxrpc.health.check", "ucxrpc.health.watch"} <= set(server.handlers)


def test_set_takes_names_or_members_and_refuses_the_rest() -> None:
    health = ucxrpc.Server().health
    health.set("jobs", "NOT_SERVING")
    assert health.get("jobs") is NOT_SERVING
    health.set("jobs", HealthStatus.UNKNOWN)
    assert health.get("jobs") is UNKNOWN
    assert health.get("other") is None
    with pytest.raises(ValueError, match="SERVING, NOT_SERVING or UNKNOWN"):
        health.set("jobs", "serving-ish")
    with pytest.raises(ValueError, match="what a watch reports"):
        health.set("jobs", HealthStatus.SERVICE_UNKNOWN)
    assert health.get("jobs") is UNKNOWN


def test_add_service_keeps_a_status_set_before() -> None:
    server = ucxrpc.Server()
    server.health.set("echo.v1", "NOT_SERVING")  # warming up before registration
    server.add_service(EchoImpl())
    assert server.health.get("echo.v1") is NOT_SERVING


# -- check and watch over UCX ---------------------------------------------------------------------


async def test_check_reports_each_status_and_not_found(manager: ucxrpc.Manager) -> None:
    server = health_server()
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        stub = client.stub(HealthApi)
        assert await stub.check() is SERVING
        assert await stub.check("echo.v1") is SERVING
        server.health.set("echo.v1", "NOT_SERVING")
        assert await stub.check("echo.v1") is NOT_SERVING
        assert await stub.check() is SERVING  # the server as a whole is unchanged
        server.health.set("", UNKNOWN)
        assert await stub.check("") is UNKNOWN
        with pytest.raises(ucxrpc.RpcError) as caught:
            await stub.check("no.such.service")
        assert caught.value.code is StatusCode.NOT_FOUND
        assert "no.such.service" in caught.value.message
        # The plain method answers the status name.
        assert await client.call("ucxrpc.health.check", "echo.v1") == "NOT_SERVING"
    await server.stop()


async def test_reflection_lists_the_health_methods(manager: ucxrpc.Manager) -> None:
    server = health_server()
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        info = await client.describe()
    await server.stop()
    check, watch = info.get("ucxrpc.health.check"), info.get("ucxrpc.health.watch")
    assert check is not None and watch is not None
    assert (check.kind, watch.kind) == ("unary", "stream")
    assert check.result["enum"] == ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]
    assert check.params["properties"]["service"]["default"] == ""


async def test_watch_yields_at_once_then_each_change(manager: ucxrpc.Manager) -> None:
    server = health_server()
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        stub = client.stub(HealthApi)
        stream = stub.watch("echo.v1")
        assert await next_status(stream) is SERVING
        for status in (NOT_SERVING, UNKNOWN, SERVING):
            server.health.set("echo.v1", status)
            assert await next_status(stream) is status
        # Setting the same status again, or another service's, is no change.
        server.health.set("echo.v1", SERVING)
        server.health.set("", NOT_SERVING)
        server.health.set("echo.v1", NOT_SERVING)
        assert await next_status(stream) is NOT_SERVING

        whole = stub.watch()
        assert await next_status(whole) is NOT_SERVING
        server.health.set("", SERVING)
        assert await next_status(whole) is SERVING
    await server.stop()


async def test_watch_of_an_unknown_service_waits_for_it(manager: ucxrpc.Manager) -> None:
    server = health_server()
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        stream = client.stub(HealthApi).watch("late.v1")
        assert await next_status(stream) is SERVICE_UNKNOWN
        server.health.set("late.v1", NOT_SERVING)
        assert await next_status(stream) is NOT_SERVING
    await server.stop()


async def test_watch_hears_a_status_set_from_another_thread(manager: ucxrpc.Manager) -> None:
    server = health_server()

    @server.rpc
    def go_down() -> None:  # a plain handler: it runs in a worker thread
        server.health.set("echo.v1", "NOT_SERVING")

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        stream = client.stub(HealthApi).watch("echo.v1")
        assert await next_status(stream) is SERVING
        await client.call("go_down")
        assert await next_status(stream) is NOT_SERVING
        thread = threading.Thread(target=server.health.set, args=("echo.v1", "SERVING"))
        thread.start()
        thread.join(10)
        assert await next_status(stream) is SERVING
    await server.stop()


async def test_a_slow_watcher_costs_bounded_memory_and_gets_the_latest(
    manager: ucxrpc.Manager,
) -> None:
    server = health_server()
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        stream = client.stub(HealthApi).watch("echo.v1")
        assert await next_status(stream) is SERVING
        # 1,000 changes at once, with no chance for the watch to send any in between.
        for i in range(1000):
            server.health.set("echo.v1", (NOT_SERVING, UNKNOWN)[i % 2])
        seen = []
        async with asyncio.timeout(10):
            while not seen or seen[-1] is not UNKNOWN:
                seen.append(await anext(stream))
        assert 1 <= len(seen) <= 16  # the backlog kept, ending with the latest
    await server.stop()


async def test_draining_server_is_not_serving_and_watches_end(manager: ucxrpc.Manager) -> None:
    server = health_server()
    release = asyncio.Event()
    running = asyncio.Event()

    @server.rpc
    async def hold() -> str:
        running.set()
        await release.wait()
        return "done"

    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        stub = client.stub(HealthApi)
        server.health.set("extra", UNKNOWN)
        whole, service = stub.watch(), stub.watch("echo.v1")
        assert await next_status(whole) is SERVING
        assert await next_status(service) is SERVING
        held = asyncio.ensure_future(client.call("hold"))
        async with asyncio.timeout(10):
            await running.wait()
        # grace=None: stop waits for the held call, and for nothing else.
        stopping = asyncio.ensure_future(server.stop(grace=None))
        assert await next_status(whole) is NOT_SERVING
        assert await next_status(service) is NOT_SERVING
        with pytest.raises(StopAsyncIteration):
            await next_status(whole)  # the watch ends, so stop() does not wait on it
        with pytest.raises(StopAsyncIteration):
            await next_status(service)
        # During the drain, health calls are still answered and read NOT_SERVING...
        assert await stub.check() is NOT_SERVING
        assert await stub.check("extra") is NOT_SERVING
        late = stub.watch("echo.v1")
        assert await next_status(late) is NOT_SERVING
        with pytest.raises(StopAsyncIteration):
            await next_status(late)
        with pytest.raises(ucxrpc.RpcError) as caught:
            await stub.check("no.such.service")
        assert caught.value.code is StatusCode.NOT_FOUND
        # ...while other calls are refused.
        with pytest.raises(ucxrpc.Unavailable):
            await client.call("ping")
        assert server.health.draining and not stopping.done()
        release.set()
        assert await held == "done"
        async with asyncio.timeout(10):
            await stopping
    # Started again, the statuses the application set apply again.
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        stub = client.stub(HealthApi)
        assert await stub.check() is SERVING
        assert await stub.check("extra") is UNKNOWN
    await server.stop()


async def test_stop_with_a_grace_is_not_held_by_watches(manager: ucxrpc.Manager) -> None:
    server = health_server()
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        streams = [client.stub(HealthApi).watch() for _ in range(8)]
        for stream in streams:
            assert await next_status(stream) is SERVING
        start = time.monotonic()
        await server.stop(grace=30.0)
        assert time.monotonic() - start < 5.0


async def test_token_auth_can_exempt_the_health_methods(manager: ucxrpc.Manager) -> None:
    exempt = ["ucxrpc.health.check", "ucxrpc.health.watch"]
    server = ucxrpc.Server(interceptors=[ucxrpc.TokenAuth("s3cret", exempt=exempt)])
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        assert await client.stub(HealthApi).check() is SERVING
        with pytest.raises(ucxrpc.Unauthenticated):
            await client.describe()
    await server.stop()


# -- the command, against a server in its own process ---------------------------------------------


def health(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [UCXRPC, "health", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=ENV,
    )


def one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


class Steered:
    """``helpers/health_server.py``: its address, and a way to send it commands."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPERS / "health_server.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.readline().split()
        assert line[:1] == ["READY"], line
        self.address = f"127.0.0.1:{line[1]}"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert ready, "no answer from the health server within 30 s"
        return self.proc.stdout.readline()

    def send(self, command: str) -> str:
        """Send one command; what the server answered after ``OK``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.readline().strip().split(maxsplit=1)
        assert answer[:1] == ["OK"], answer
        return answer[1] if len(answer) > 1 else ""

    def finish(self) -> int:
        """Close its stdin (it stops serving, then exits); its exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def steered() -> Iterator[Steered]:
    server = Steered()
    yield server
    server.stop()


@pytest.mark.timeout(120)
def test_command_exits_0_only_when_serving(steered: Steered) -> None:
    out = health(steered.address)
    assert (out.returncode, out.stdout, out.stderr) == (0, "SERVING\n", "")
    out = health(steered.address, "echo.v1")
    assert (out.returncode, out.stdout) == (0, "SERVING\n")

    steered.send("set echo.v1 NOT_SERVING")
    out = health(steered.address, "echo.v1")
    assert (out.returncode, out.stdout, out.stderr) == (1, "NOT_SERVING\n", "")
    assert health(steered.address).returncode == 0  # the server as a whole still serves

    steered.send("set - UNKNOWN")
    out = health(steered.address)
    assert (out.returncode, out.stdout) == (1, "UNKNOWN\n")

    line = one_error_line(health(steered.address, "no.such.service"))
    assert line == f"error: {steered.address} knows no service 'no.such.service'"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_command_exits_1_when_nothing_answers() -> None:
    line = one_error_line(health(f"127.0.0.1:{free_port()}"))
    assert "cannot connect" in line
    assert "HOST:PORT" in one_error_line(health("nowhere"))


def test_command_timeout_bounds_a_server_that_never_answers() -> None:
    with socket.socket() as mute:  # accepts connections (the backlog) and never speaks
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        start = time.monotonic()
        port = mute.getsockname()[1]
        line = one_error_line(health(f"127.0.0.1:{port}", "--timeout", "0.5"))
        assert time.monotonic() - start < 20  # interpreter and UCX start, then 0.5 s
    assert line == f"error: no answer from 127.0.0.1:{port} within 0.5 s"


@pytest.mark.timeout(120)
def test_command_watch_streams_changes_until_the_server_drains(steered: Steered) -> None:
    watch = subprocess.Popen(
        [UCXRPC, "health", steered.address, "echo.v1", "--watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=ENV,
    )
    try:
        assert watch.stdout is not None
        assert watch.stdout.readline() == "SERVING\n"
        steered.send("set echo.v1 NOT_SERVING")
        assert watch.stdout.readline() == "NOT_SERVING\n"
        steered.send("set echo.v1 SERVING")
        assert watch.stdout.readline() == "SERVING\n"
        # A call in flight holds the drain open: the watch says NOT_SERVING and ends.
        steered.send("hold")
        steered.send("stop 60")
        assert watch.stdout.readline() == "NOT_SERVING\n"
        out, err = watch.communicate(timeout=30)
        assert (watch.returncode, out, err) == (1, "", "")
        # New probes cannot connect while it drains: not SERVING either.
        assert "cannot connect" in one_error_line(health(steered.address))
        assert steered.send("release") == "released"
    finally:
        if watch.poll() is None:
            watch.kill()
        watch.communicate(timeout=10)
    assert steered.finish() == 0  # the drain ended with the held call


def test_health_check_example() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "health_check.py")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr == ""
    assert out.stdout.splitlines() == [
        "server: SERVING",
        "orders.v1: SERVING",
        "billing.v1: NOT_FOUND",
        "  watch orders.v1: SERVING",
        "  watch orders.v1: NOT_SERVING",
        "orders.v1: NOT_SERVING",
        "  watch orders.v1: SERVING",
        "  watch orders.v1: NOT_SERVING",
        "  watch orders.v1: ended",
        "while draining, server: NOT_SERVING",
        "the slow call: placed book",
    ]
