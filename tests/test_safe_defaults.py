"""Safe defaults: what a server gives away unless it is told to."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import ucxrpc

pytestmark = pytest.mark.timeout(60)
UCXRPC = str(Path(sys.executable).with_name("ucxrpc"))


def _server() -> ucxrpc.Server:
    server = ucxrpc.Server()

    @server.rpc
    async def boom() -> None:
        raise ValueError("secret path /srv/app/settings.py")

    return server


async def test_tracebacks_stay_on_the_server_by_default(manager: ucxrpc.Manager) -> None:
    assert ucxrpc.Config().expose_tracebacks is False
    server = _server()
    await server.start(manager)
    async with await manager.connect("127.0.0.1", server.port) as client:
        with pytest.raises(ucxrpc.RemoteError) as info:
            await client.call("boom")
    assert info.value.remote_type == "ValueError" and info.value.remote_traceback == ""
    await server.stop()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
async def test_serving_beyond_loopback_without_a_token_warns(host: str) -> None:
    async with ucxrpc.Manager() as manager:
        server = _server()
        with pytest.warns(ucxrpc.InsecureWarning, match="without auth_token"):
            try:
                await server.start(manager, host, 0)
            except ucxrpc.Unavailable:  # no IPv6 here: the warning came first
                if host != "::":
                    raise
        await server.stop()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
async def test_serving_on_loopback_or_with_a_token_does_not_warn(host: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ucxrpc.InsecureWarning)
        async with ucxrpc.Manager() as manager:
            server = _server()
            try:
                await server.start(manager, host, 0)
            except ucxrpc.Unavailable:  # ::1 where IPv6 is off
                assert host == "::1"
            await server.stop()
        async with ucxrpc.Manager(auth_token="t0ken") as manager:
            server = _server()
            await server.start(manager, "0.0.0.0", 0)
            await server.stop()


def test_the_token_is_never_shown() -> None:
    config = ucxrpc.Config(auth_token="hunter2-secret")
    for text in (repr(config), str(config), str(config.model_dump()), config.model_dump_json()):
        assert "hunter2-secret" not in text
    assert config.auth_token is not None
    assert config.auth_token.get_secret_value() == "hunter2-secret"


def test_the_serve_command_prints_the_warning_in_one_line() -> None:
    proc = subprocess.Popen(
        [UCXRPC, "serve", "ucxrpc.demo:build_server", "--host", "0.0.0.0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("serving ")
        line = proc.stderr.readline()
        assert line.startswith("warning: ucxrpc: serving on 0.0.0.0 without auth_token")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _listening(pid: int) -> set[str]:
    """The local addresses (hex, as in /proc/net/tcp) of process ``pid``'s listening
    TCP sockets."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    found.add(fields[1].split(":")[0])
    return found


LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}


#: A client of its own (this process may hold other tests' managers): it connects to
#: the server on 127.0.0.1, makes a small and a large call, says READY and waits.
_LOOPBACK_CLIENT = """
import asyncio, sys
import ucxrpc

async def main():
    async with ucxrpc.Manager() as manager:
        client = await manager.connect("127.0.0.1", int(sys.argv[1]))
        assert await client.call("ping") == "PONG"
        assert await client.call("reverse", bytes(1 << 20)) == bytes(1 << 20)
        assert manager.confined
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await client.close()

ucxrpc.run(main())
"""


async def test_a_server_on_loopback_listens_on_loopback_only(spawn: Any) -> None:
    # helpers/serve.py serves on 127.0.0.1; UCX used to listen on every device too
    # (tcp/eth0), reachable from other hosts. Server and client each in a process of
    # its own, looked at while both are connected.
    proc = spawn("serve.py")
    port = int(proc.read_ready()[0])
    client = subprocess.Popen(
        [sys.executable, "-c", _LOOPBACK_CLIENT, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        line = await asyncio.wait_for(asyncio.to_thread(client.stdout.readline), 60)
        assert line.strip() == "READY", line
        for pid in (proc.pid, client.pid):
            addresses = _listening(pid)
            assert addresses and addresses <= LOOPBACK_HEX, (pid, addresses)
        await asyncio.to_thread(client.communicate, "\n", 30)
        assert client.returncode == 0
    finally:
        if client.poll() is None:
            client.kill()
        client.communicate(timeout=10)


async def test_a_manager_kept_on_loopback_says_so_when_asked_for_more() -> None:
    async with ucxrpc.Manager() as manager:
        server = _server()
        await server.start(manager, "127.0.0.1", 0)
        assert manager.confined
        with pytest.raises(ucxrpc.Unavailable, match=r"kept on loopback.*NET_DEVICES"):
            await manager.connect("192.0.2.1", 9)
        await server.stop()
    async with ucxrpc.Manager(ucx_options={"NET_DEVICES": "all"}) as manager:
        server = _server()
        await server.start(manager, "127.0.0.1", 0)
        assert not manager.confined
        await server.stop()


async def test_a_server_beyond_loopback_uses_every_device() -> None:
    async with ucxrpc.Manager(auth_token="t") as manager:
        server = _server()
        await server.start(manager, "0.0.0.0", 0)
        assert not manager.confined
        async with await manager.connect("127.0.0.1", server.port) as client:
            with pytest.raises(ucxrpc.RemoteError):
                await client.call("boom")
        await server.stop()


async def test_polling_a_messaging_worker_first_does_not_unconfine_it() -> None:
    from ucxrpc.transport import Worker

    async with ucxrpc.Manager() as manager:
        worker = Worker(manager=manager)
        assert worker.progress() == 0 and not manager.ucx_ready  # nothing made yet
        waiting = asyncio.ensure_future(worker.next_message(timeout=0.05))
        with pytest.raises(ucxrpc.DeadlineExceeded):
            await waiting
        assert not manager.ucx_ready
        await worker.listen("127.0.0.1")
        assert manager.confined
        await worker.close_all()
