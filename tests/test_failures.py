"""Dead peers, garbage on the wire, and clean shutdown, over real UCX."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import hanging_server, until
from helpers.rawpeer import RawPeer

import ucxrpc
from ucxrpc.io.control import read_message
from ucxrpc.wire import codec

HELPERS = Path(__file__).parent / "helpers"


async def test_server_killed_mid_call_fails_pending_calls_promptly(spawn: Any) -> None:
    proc = spawn("serve.py")
    (port,) = proc.read_ready()
    async with ucxrpc.Manager() as manager:
        client = await manager.connect("127.0.0.1", int(port))
        assert await client.call("ping") == "PONG"
        calls = [asyncio.ensure_future(client.call("sleep", 30.0, timeout=60)) for _ in range(5)]
        await until(lambda: client.pending >= 5)
        t0 = time.perf_counter()
        proc.kill()
        results = await asyncio.gather(*calls, return_exceptions=True)
        elapsed = time.perf_counter() - t0
        assert all(isinstance(r, ucxrpc.ConnectionLost) for r in results), results
        assert elapsed < 2.0
        assert manager.posted_receives == 0
        with pytest.raises(ucxrpc.ConnectionLost):
            await client.call("ping")
        await client.close()


async def test_client_killed_frees_its_state_on_the_server(
    manager: ucxrpc.Manager, tmp_path: Path
) -> None:
    server, hanging = hanging_server("hang")

    await server.start(manager)
    script = tmp_path / "client.py"
    script.write_text(
        "import sys, ucxrpc\n"
        "async def main():\n"
        "    async with ucxrpc.Manager() as m:\n"
        "        c = await m.connect('127.0.0.1', int(sys.argv[1]))\n"
        "        await c.call('hang')\n"
        "ucxrpc.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), str(server.port)])
    try:
        await asyncio.wait_for(hanging.entered.wait(), 30)
        assert manager.connections == 1
        proc.kill()
        await asyncio.wait_for(hanging.cancelled.wait(), 5)
        await until(lambda: not (manager.connections))
        assert server.inflight == 0
    finally:
        proc.kill()
        proc.wait(timeout=10)
    await server.stop()


def _garbage(
    kind: int = 1, version: int = codec.VERSION, header: bytes = b"", payload_len: int = 0
) -> bytearray:
    """A frame for call 7 with the given prefix fields (seq and secret stamped later)."""
    prefix = struct.pack("!BBHIQIII", version, kind, 0, 0, 0, 7, len(header), payload_len)
    return bytearray(prefix + header)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(_garbage(version=0xFF), id="unknown-version"),
        pytest.param(_garbage(kind=0x63), id="unknown-kind"),
        pytest.param(_garbage(header=b"\xc1"), id="bad-msgpack-header"),
        pytest.param(_garbage(header=msgpack.packb([1, 2, 3])), id="header-of-3-fields"),
        pytest.param(_garbage(payload_len=16), id="payload-announced-missing"),
        pytest.param(
            codec.encode(codec.Kind.REQUEST, 7, "not [args, kwargs]", method="ping").frame,
            id="payload-not-args-kwargs",
        ),
        pytest.param(codec.encode(codec.Kind.REPLY, 7, "a reply").frame, id="reply-to-a-server"),
        pytest.param(
            _garbage(header=msgpack.packb(["ping", None, float("nan"), [], None])),
            id="nan-timeout",
        ),
        pytest.param(
            _garbage(header=msgpack.packb(["ping", None, float("inf"), [], None])),
            id="infinite-timeout",
        ),
    ],
)
async def test_garbage_frame_gets_a_protocol_error_and_others_are_served(
    manager: ucxrpc.Manager, garbage: bytearray
) -> None:
    server = ucxrpc.Server()

    @server.rpc
    async def ping() -> str:
        return "PONG"

    await server.start(manager)
    other = await manager.connect("127.0.0.1", server.port)
    async with RawPeer.connected(server.port) as raw:
        # First a correct call from the raw peer, so we know the path works.
        await raw.send(1, codec.encode(codec.Kind.REQUEST, 1, [[], {}], method="ping"))
        header, value = await raw.expect_reply(1)
        assert (header.kind, value) == (codec.Kind.REPLY, "PONG")
        await raw.send_raw(7, raw.stamp_next(bytearray(garbage)))
        header, value = await raw.expect_reply(7)
        assert header.kind is codec.Kind.ERROR
        assert value[0] == ucxrpc.StatusCode.INTERNAL, value
        assert "Traceback" not in value[4]
        assert await other.call("ping") == "PONG"
        # The raw peer's connection survives a bad frame, too.
        await raw.send(8, codec.encode(codec.Kind.REQUEST, 8, [[], {}], method="ping"))
        assert (await raw.expect_reply(8))[1] == "PONG"
    await other.close()
    await server.stop()


async def test_oversized_request_is_refused_without_being_buffered() -> None:
    async with ucxrpc.Manager(max_message_size=1 << 20) as manager:
        server = ucxrpc.Server()

        @server.rpc
        async def ping() -> str:
            return "PONG"

        await server.start(manager)
        async with RawPeer.connected(server.port) as raw:
            big = codec.encode(codec.Kind.REQUEST, 3, [[b"x" * (2 << 20)], {}], method="ping")
            await raw.send(3, big, wait=False)  # the part is never taken: no completion
            _, value = await raw.expect_reply(3)
            assert value[0] == ucxrpc.StatusCode.RESOURCE_EXHAUSTED
            assert "exceeds the limit of 1048576 bytes" in value[1]
            await raw.send(4, codec.encode(codec.Kind.REQUEST, 4, [[], {}], method="ping"))
            assert (await raw.expect_reply(4))[1] == "PONG"
            # Nothing was received or allocated for the refused part: it is held as a
            # stranger's (bounded) until it times out.
            assert manager.posted_receives == 0 and manager.announced_bytes == 0
        await server.stop()


def test_bad_handshake_does_not_hurt_the_server(tmp_path: Path) -> None:
    async def main() -> None:
        async with ucxrpc.Manager(connect_timeout=0.5) as manager:
            server = ucxrpc.Server()

            @server.rpc
            async def ping() -> str:
                return "PONG"

            await server.start(manager)
            # A peer that speaks another version, one that sends junk, one that stays silent.
            for payload in (msgpack.packb({"v": 99}), b"\x00\x00\x00\x02\xc1\xc1", b""):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                await read_message(reader)
                if payload:
                    writer.write(
                        payload
                        if payload[:1] == b"\x00"
                        else len(payload).to_bytes(4, "big") + payload
                    )
                answer = await asyncio.wait_for(read_message(reader), 5)
                assert answer is None or "error" in answer
                writer.close()
                await writer.wait_closed()
            async with await manager.connect("127.0.0.1", server.port) as client:
                assert await client.call("ping") == "PONG"
            await server.stop()

    ucxrpc.run(main())


# Rounds of lifecycle.py with the garbage collector off: the OS threads left right after
# each shutdown, then after a collection.
_GC_ROUNDS = """
import asyncio, gc, sys
sys.path.insert(0, sys.argv[1])
import lifecycle, ucxrpc

async def main():
    gc.disable()
    for _ in range(2):
        await lifecycle.one_round()
        left = lifecycle.os_threads()
        gc.collect()
        print(f"threads {left} {lifecycle.os_threads()}")

ucxrpc.run(main()) if sys.argv[2] == "uvloop" else asyncio.run(main())
"""


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_what_shutdown_leaves_does_not_wait_for_the_garbage_collector(loop: str) -> None:
    """A shut-down manager's UCX worker (and UCX's async thread with it) goes at shutdown,
    not when a collection frees the links of clients still held or left in reference
    cycles: otherwise the thread count after a shutdown depends on when the collector
    last ran (what made the lifecycle check below fail now and then)."""
    out = subprocess.run(
        [sys.executable, "-c", _GC_ROUNDS, str(HELPERS), loop],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rounds = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("threads")]
    assert len(rounds) == 2, out.stdout
    for left, after_collection in rounds:
        assert left == after_collection, out.stdout


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_shutdown_leaves_nothing_running_and_prints_nothing(loop: str) -> None:
    out = subprocess.run(
        [sys.executable, str(HELPERS / "lifecycle.py"), loop],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert "tasks 0" in lines
    assert "threads 1" in lines
    assert "os_threads_growth 0" in lines
    assert lines.count("pending call ended with Cancelled") == 4
