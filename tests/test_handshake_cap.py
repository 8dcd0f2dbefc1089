"""Before authentication: the handshakes a server holds are capped, and a flood of
stalled ones closes the oldest rather than locking good clients out."""

from __future__ import annotations

import asyncio

import pytest

import ucxrpc

pytestmark = pytest.mark.timeout(60)
CAP = 8


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 0.05) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_stalled_handshakes_beyond_the_cap_close_the_oldest() -> None:
    async with ucxrpc.Manager(max_handshakes=CAP, connect_timeout=30.0) as manager:
        server = ucxrpc.Server()

        @server.rpc
        async def ping() -> str:
            return "PONG"

        await server.start(manager)
        held = []
        for i in range(3 * CAP):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            if i % 2:
                writer.write(b"\x00\x00")  # half a length prefix, then nothing
            held.append((reader, writer))
        async with asyncio.timeout(10):
            while True:
                closed = [await _closed(r) for r, _ in held]
                if sum(closed) == 2 * CAP:
                    break
        # The oldest went first (well before connect_timeout); the newest are held.
        assert closed == [True] * (2 * CAP) + [False] * CAP
        # A good client still gets in, and so would the next ones.
        async with await manager.connect("127.0.0.1", server.port) as client:
            assert await client.call("ping") == "PONG"
        assert [await _closed(r) for r, _ in held[-CAP + 1 :]] == [False] * (CAP - 1)
        for _, writer in held:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
        await server.stop()


async def test_a_messaging_endpoint_caps_its_handshakes_too() -> None:
    from ucxrpc.transport import Worker

    async with ucxrpc.Manager(max_handshakes=CAP, connect_timeout=30.0) as manager:
        worker = Worker(manager=manager)
        port = await worker.listen()
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2 * CAP)]
        async with asyncio.timeout(10):
            while sum([await _closed(r) for r, _ in held]) < CAP:
                pass
        assert [await _closed(r) for r, _ in held] == [True] * CAP + [False] * CAP
        for _, writer in held:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
        await worker.close_all()
