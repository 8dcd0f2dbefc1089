"""Before authentication: a thousand idle and half-open control connections.

A server in its own process (``helpers/fuzz_server.py``) is held by 1,000 plain TCP
connections to its control port that never finish a handshake: connected and silent,
connected with part of a length prefix, or with a length prefix announcing a hello at
the cap (:data:`~ucxrpc.io.control.HELLO_LIMIT`) and all of it but its last byte.
While they are held a good client connects and calls; then the server closes each
within its handshake timeout (``connect_timeout``), or sooner: the server holds at
most ``max_handshakes`` (256 by default) handshakes at once, and one more closes the
oldest. So the memory held is bounded by the cap, whatever the number of connections,
and a good client's handshake (milliseconds) is never the oldest.

``pytest -s`` prints the figures.
"""

from __future__ import annotations

import asyncio
import json
import resource
import selectors
import socket
import struct
import time
from typing import Any

import pytest

import ucxrpc
from ucxrpc.io.control import HELLO_LIMIT

#: Long enough for all of them to be open at once (opening a thousand took 5-6 s here,
#: with the machine's load average at about 20).
HANDSHAKE_TIMEOUT = 15.0
TOKEN = "pre-auth token"
SERVER_ENV = {"UCXRPC_AUTH_TOKEN": TOKEN, "UCXRPC_CONNECT_TIMEOUT": str(HANDSHAKE_TIMEOUT)}
HELD = 1000
#: The server's default cap on handshakes held at once (Config.max_handshakes).
CAP = ucxrpc.Config().max_handshakes
#: How much later than its timeout (counted from the client's connect) the server may
#: close a held connection: a thousand wait in its accept queue, and this machine has
#: two cores shared with other work (up to 2.7 s late measured).
CLOSE_SLACK = 5.0
#: A good client's p50 while the connections are held may be at most this.
P50_BOUND = 0.005


def raise_nofile(want: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def open_held(port: int, kinds: list[str]) -> dict[socket.socket, float]:
    """Control connections that never complete their handshake, one of each kind in
    turn: all connected first, then each sent its part (so all are open at once)."""
    socks = {}
    for _ in range(HELD):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks[sock] = time.monotonic()
    for i, sock in enumerate(socks):
        kind = kinds[i % len(kinds)]
        if kind == "prefix":
            sock.sendall(b"\x00\x00")  # half of the length prefix
        elif kind == "body":
            sock.sendall(struct.pack("!I", HELLO_LIMIT) + b"\x80" * (HELLO_LIMIT - 1))
        sock.setblocking(False)
    return socks


async def p50(client: ucxrpc.Client, calls: int = 300) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        assert await client.call("ping", timeout=10) == "PONG"
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


async def wait_closed(
    socks: dict[socket.socket, float], seconds: float
) -> dict[socket.socket, float]:
    """When the server closed each socket (its end of file), within ``seconds``."""
    closed: dict[socket.socket, float] = {}
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ)
    end = time.monotonic() + seconds
    while len(closed) < len(socks) and time.monotonic() < end:
        for key, _ in sel.select(timeout=0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionError:
                data = b""
            if not data:
                closed[sock] = time.monotonic()
                sel.unregister(sock)
        await asyncio.sleep(0)
    sel.close()
    return closed


@pytest.mark.slow
@pytest.mark.timeout(110)
@pytest.mark.parametrize("mix", ["mixed", "all at the cap"])
async def test_a_thousand_held_handshakes_cost_bounded_memory_and_are_closed_in_time(
    spawn: Any, mix: str
) -> None:
    raise_nofile()
    server = spawn("fuzz_server.py", env=SERVER_ENV)
    port = int(server.read_ready()[0])
    kinds = ["silent", "prefix", "body"] if mix == "mixed" else ["body"]
    async with ucxrpc.Manager(auth_token=TOKEN) as manager:
        client = await manager.connect("127.0.0.1", port)
        quiet_p50 = await p50(client)
        before = await client.call("stats")

        socks: dict[socket.socket, float] = {}
        try:
            socks = await asyncio.get_running_loop().run_in_executor(None, open_held, port, kinds)
            opened = time.monotonic() - min(socks.values())
            # Until every one is accepted (a descriptor each in the server), for at most
            # a second: the highest memory seen while they are held.
            peak = await client.call("stats")
            end = time.monotonic() + 1.0
            while peak["fds"] < before["fds"] + CAP and time.monotonic() < end:
                await asyncio.sleep(0.05)
                stats = await client.call("stats")
                peak = stats if stats["rss"] >= peak["rss"] else peak
            held_p50 = await p50(client)
            # A new client can still connect and call while they are held.
            start = time.perf_counter()
            second = await manager.connect("127.0.0.1", port)
            assert await second.call("ping", timeout=10) == "PONG"
            connect_seconds = time.perf_counter() - start
            await second.close()

            closed = await wait_closed(socks, HANDSHAKE_TIMEOUT + CLOSE_SLACK + 5.0)
            lateness = [closed[s] - t for s, t in socks.items() if s in closed]
        finally:
            for sock in socks:
                sock.close()
        async with asyncio.timeout(10):
            while (after := await client.call("stats"))["fds"] > before["fds"]:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        after_p50 = await p50(client)
        await client.close()

    growth = peak["rss"] - before["rss"]
    figures = {
        "mix": mix,
        "held": HELD,
        "seconds to open them": round(opened, 2),
        "server fds before, held, after": [before["fds"], peak["fds"], after["fds"]],
        "server rss growth held (MB)": round(growth / 2**20, 1),
        "per held handshake (KiB)": round(growth / CAP / 1024, 1),
        "server rss after (MB above before)": round((after["rss"] - before["rss"]) / 2**20, 1),
        "good p50 quiet, held, after (ms)": [
            round(x * 1e3, 3) for x in (quiet_p50, held_p50, after_p50)
        ],
        "new client connect+call while held (ms)": round(connect_seconds * 1e3, 1),
        "closed by the server": len(closed),
        "seconds from open to close (min, max)": [
            round(min(lateness), 2) if lateness else None,
            round(max(lateness), 2) if lateness else None,
        ],
    }
    print("\nPRE-AUTH " + json.dumps(figures, indent=1))
    bound = (50 if mix == "mixed" else 100) << 20
    # At most the cap held at once (plus a few accepted while the oldest closes).
    assert before["fds"] + CAP // 2 <= peak["fds"] <= before["fds"] + CAP + 16, figures
    assert growth < bound, figures
    assert held_p50 <= P50_BOUND, figures
    assert len(closed) == HELD, figures
    assert max(lateness) <= HANDSHAKE_TIMEOUT + CLOSE_SLACK, figures
    # The newest ones (never pushed out) are held until the timeout, not sooner.
    newest = sorted(socks.items(), key=lambda item: item[1])[-CAP // 2 :]
    assert min(closed[s] - t for s, t in newest) >= HANDSHAKE_TIMEOUT - 0.5, figures
