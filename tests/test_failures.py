"""Dead peers, garbage on the wire, and clean shutdown, over real UCX."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import hanging_server, until

import ucxrpc
from ucxrpc import codec
from ucxrpc._control import read_message, write_message
from ucxrpc._ucx import Array, lib

HELPERS = Path(__file__).parent / "helpers"


async def test_server_killed_mid_call_fails_pending_calls_promptly(spawn: Any) -> None:
    proc = spawn("serve.py")
    (port,) = proc.read_ready()
    async with ucxrpc.Manager() as manager:
        client = await manager.connect("127.0.0.1", int(port))
        assert await client.call("ping") == "PONG"
        calls = [asyncio.ensure_future(client.call("sleep", 30.0, timeout=60)) for _ in range(5)]
        await until(lambda: not (manager.posted_receives < 5))
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


class RawPeer:
    """A peer written against ucxx's low-level API: handshake, then arbitrary tag traffic."""

    def __init__(self) -> None:
        self.ctx = lib.UCXContext({}, (lib.Feature.TAG, lib.Feature.WAKEUP))
        self.worker = lib.UCXWorker(self.ctx)
        self.cid = 4242
        self.keep: list[Any] = []

    async def connect(self, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await read_message(self.reader)) is not None
        write_message(
            self.writer,
            {
                "v": 1,
                "addr": self.worker.address.tobytes(),
                "cid": self.cid,
                "slot": 4096,
                "max": 1 << 30,
                "nonce": b"n" * 16,
            },
        )
        welcome = await read_message(self.reader)
        assert welcome is not None and "cid" in welcome, welcome
        self.server_cid = welcome["cid"]
        addr = lib.UCXAddress.create_from_buffer(welcome["addr"])
        self.ep = self.worker.create_endpoint_from_worker_address(addr, False)

    async def progress_until(self, req: Any, seconds: float = 5.0) -> None:
        end = time.monotonic() + seconds
        while not req.completed:
            self.worker.progress()
            if time.monotonic() > end:
                raise TimeoutError("raw request did not complete")
            await asyncio.sleep(0.0005)

    async def send_raw(self, call_id: int, data: bytes) -> None:
        self.keep.append(data)
        req = self.ep.tag_send(Array(data), lib.UCXXTag(codec.frame_tag(self.server_cid, call_id)))
        await self.progress_until(req)

    async def expect_reply(self, call_id: int) -> tuple[codec.Header, Any]:
        slot = bytearray(4096)
        req = self.worker.tag_recv(
            Array(slot),
            lib.UCXXTag(codec.frame_tag(self.cid, call_id)),
            lib.UCXXTagMask((1 << 64) - 1),
        )
        self.keep.append(req)
        await self.progress_until(req)
        req.check_error()
        header, payload = codec.decode_header(slot, exact=False)
        return header, codec.decode_payload(header, payload, [])

    def close(self) -> None:
        self.writer.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 40,  # unknown version
        b"\x01\x63" + b"\x00" * 20,  # unknown kind
        b"\x01",  # truncated prefix
        b"\x01\x01\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00",  # header announced, missing
        codec.encode(codec.Kind.REQUEST, 7, "not [args, kwargs]", method="ping").frame,
        codec.encode(codec.Kind.REPLY, 7, "a reply sent to a server").frame,
    ],
)
async def test_garbage_frame_gets_a_protocol_error_and_others_are_served(
    manager: ucxrpc.Manager, garbage: bytes
) -> None:
    server = ucxrpc.Server()

    @server.rpc
    async def ping() -> str:
        return "PONG"

    await server.start(manager)
    other = await manager.connect("127.0.0.1", server.port)
    raw = RawPeer()
    try:
        await raw.connect(server.port)
        # First a correct call from the raw peer, so we know the path works.
        await raw.send_raw(1, codec.encode(codec.Kind.REQUEST, 1, [[], {}], method="ping").frame)
        header, value = await raw.expect_reply(1)
        assert (header.kind, value) == (codec.Kind.REPLY, "PONG")
        await raw.send_raw(7, garbage)
        header, value = await raw.expect_reply(7)
        assert header.kind is codec.Kind.ERROR
        assert value[0] == ucxrpc.StatusCode.INTERNAL, value
        assert await other.call("ping") == "PONG"
        # The raw peer's connection survives a bad frame, too.
        await raw.send_raw(8, codec.encode(codec.Kind.REQUEST, 8, [[], {}], method="ping").frame)
        assert (await raw.expect_reply(8))[1] == "PONG"
    finally:
        raw.close()
    await other.close()
    await server.stop()


async def test_oversized_request_is_refused_without_being_buffered() -> None:
    async with ucxrpc.Manager(max_message_size=1 << 20) as manager:
        server = ucxrpc.Server()

        @server.rpc
        async def ping() -> str:
            return "PONG"

        await server.start(manager)
        raw = RawPeer()
        try:
            await raw.connect(server.port)
            big = codec.encode(codec.Kind.REQUEST, 3, [["x" * (2 << 20)], {}], method="ping")
            await raw.send_raw(3, big.frame)
            _, value = await raw.expect_reply(3)
            assert value[0] == ucxrpc.StatusCode.RESOURCE_EXHAUSTED
            assert "exceeds the server's limit" in value[1]
            await raw.send_raw(
                4, codec.encode(codec.Kind.REQUEST, 4, [[], {}], method="ping").frame
            )
            assert (await raw.expect_reply(4))[1] == "PONG"
        finally:
            raw.close()
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
