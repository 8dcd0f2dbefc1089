"""A live server under hostile traffic keeps serving a good client, and forgets the attack.

Three processes: the server (``helpers/fuzz_server.py``), a hostile peer
(``helpers/fuzz_attacker.py``: raw ucxx frames and parts after real handshakes, and bad
handshakes at the control port) and this test, the good client, calling ``ping`` and
``echo`` of mixed sizes one after another before, during and after the attack.

What must hold:

* the good client sees no error, and its p99 during and after the attack is at most
  ``max(2 x b, b + FLOOR)``, where ``b`` is the p99 of its baseline: its calls before
  the attack and in the half-second pauses the test makes in it (so under the same
  load from the rest of the machine); its p50 likewise, with ``FLOOR_P50``;
* the server survives, and once the hostile peer is gone its posted receives, call
  tables, connections and requests in flight are back where they were, its drive cost
  (requests checked per drive) too, and its RSS within 10 MB;
* every hostile session is closed by the server, and every bad handshake gets an error
  or a closed connection.

``pytest -s`` prints the figures (messages by kind, latencies, server counters).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import pytest
from helpers.rawpeer import RawPeer

import ucxrpc
from ucxrpc.wire import codec

TOKEN = "live fuzz token"
#: The server gives up on a silent handshake after this many seconds (the default is 10).
CONNECT_TIMEOUT = 3.0
SERVER_ENV = {"UCXRPC_AUTH_TOKEN": TOKEN, "UCXRPC_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT)}
#: UCX messages the hostile peer sends, and the seconds it may take.
MESSAGES = 12_000
ATTACK_SECONDS = 20.0
#: Messages a second while the attack runs (it is paused half of the time).
RATE = 2500
#: Echo sizes the good client cycles through (with a ping between two echoes).
SIZES = (0, 100, 4096, 60_000)
#: Seconds of calls measured before and after the attack.
PHASE_SECONDS = 5.0
#: Seconds of calls measured while the attack runs, then while it is paused, in turn.
WINDOW = 0.5
#: What a p99 may exceed its baseline by when that is more than twice the baseline.
#: On this shared two-core machine (load average 2-6 from other test runs) the p99 of
#: two quiet phases of one run differed by up to 7 ms (4.2 to 11.6 ms): a call that
#: waits a scheduler slice or two is noise, not a defect. The p50 is held tighter.
FLOOR = 0.010
#: The same for the p50, which scheduler noise hardly moves.
FLOOR_P50 = 0.0005
#: A first, shorter attack before the baseline: the server's memory pools (UCX's and
#: malloc's) grow to their high-water mark on the first hostile traffic (about 10 MB,
#: a second attack adds nothing), and that is not a leak.
WARMUP_MESSAGES = 3000
#: Server state that must come back to where it was once the hostile peer is gone.
STATE = (
    "posted_receives",
    "awaited_parts",
    "announced_bytes",
    "worker_connections",
    "server_connections",
    "inflight",
    "engine_in_flight",
)
RSS_SLACK = 10 << 20


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class GoodClient:
    """Calls one after another, recording each call's latency (and any error)."""

    def __init__(self, client: ucxrpc.Client) -> None:
        self.client = client
        self.payloads = [bytes(size) for size in SIZES]
        self.errors: list[str] = []
        self.n = 0

    async def run(
        self, seconds: float | None = None, stop: asyncio.Event | None = None
    ) -> list[float]:
        latencies: list[float] = []
        end = time.monotonic() + (seconds if seconds is not None else 60.0)
        while time.monotonic() < end and not (stop is not None and stop.is_set()):
            self.n += 1
            payload = self.payloads[(self.n // 2) % len(self.payloads)]
            start = time.perf_counter()
            try:
                if self.n % 2:
                    assert await self.client.call("ping", timeout=10) == "PONG"
                else:
                    got = await self.client.call("echo", payload, timeout=10)
                    assert len(got) == len(payload)
            except Exception as exc:
                self.errors.append(repr(exc))
                continue
            latencies.append(time.perf_counter() - start)
        return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "calls": len(latencies),
        "p50_ms": round(quantile(latencies, 0.5) * 1e3, 3),
        "p99_ms": round(quantile(latencies, 0.99) * 1e3, 3),
    }


def per_drive(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Requests checked per drive between two stats snapshots (the cost of a drive)."""
    drives = after["drives"] - before["drives"]
    return (after["checked"] - before["checked"]) / max(1, drives)


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_a_live_server_shrugs_off_hostile_frames_and_handshakes(spawn: Any) -> None:
    server = spawn("fuzz_server.py", env=SERVER_ENV)
    port = server.read_ready()[0]
    loop = asyncio.get_running_loop()
    async with ucxrpc.Manager(auth_token=TOKEN) as manager:
        client = await manager.connect("127.0.0.1", int(port))
        good = GoodClient(client)
        await good.run(1.0)  # warm up (shared parts, rings, caches)
        fresh = await client.call("stats")
        warmup = spawn("fuzz_attacker.py", port, TOKEN, "0", str(WARMUP_MESSAGES), "4")
        assert warmup.popen.stdout is not None
        await loop.run_in_executor(None, warmup.popen.stdout.read)
        assert warmup.popen.wait(timeout=10) == 0
        await good.run(1.0)
        stats0 = await client.call("stats")
        before = await good.run(PHASE_SECONDS)
        stats1 = await client.call("stats")

        args = (port, TOKEN, "1", str(MESSAGES), str(ATTACK_SECONDS), "both", str(RATE))
        attacker = spawn("fuzz_attacker.py", *args)
        assert attacker.popen.stdout is not None
        line = await loop.run_in_executor(None, attacker.popen.stdout.readline)
        assert line.strip() == "START", line
        # The attack is paused (SIGSTOP) for half of each second: calls made in the
        # pauses are measured under the same load from the rest of the machine as the
        # calls made during the attack, and are part of the baseline.
        finished = asyncio.ensure_future(loop.run_in_executor(None, attacker.popen.stdout.readline))
        during: list[float] = []
        paused: list[float] = []
        while not finished.done():
            during += await good.run(WINDOW)
            os.kill(attacker.pid, signal.SIGSTOP)
            await asyncio.sleep(0.05)  # let the server take what was sent
            paused += await good.run(WINDOW)
            os.kill(attacker.pid, signal.SIGCONT)
        line = await finished
        assert line.startswith("DONE "), (
            line,
            attacker.popen.stderr.read() if attacker.popen.stderr else "",
        )
        report = json.loads(line[5:])
        attacker.popen.wait(timeout=10)
        assert server.popen.poll() is None, "the server died under attack"

        # Once the hostile connections are closed, what they left must be gone.
        async def settled() -> dict[str, Any]:
            while True:
                stats = await client.call("stats")
                if all(stats[k] == stats1[k] for k in STATE):
                    return stats
                await asyncio.sleep(0.1)

        try:
            stats2 = await asyncio.wait_for(settled(), 20.0)
        except TimeoutError:
            stats2 = await client.call("stats")
        after = await good.run(PHASE_SECONDS)
        stats3 = await client.call("stats")
        await client.close()

    baseline = before + paused
    figures = {
        "load average": os.getloadavg(),
        "attack": report,
        "good client": {
            "before": summary(before),
            "attack paused": summary(paused),
            "baseline (before and paused)": summary(baseline),
            "during": summary(during),
            "after": summary(after),
            "errors": len(good.errors),
        },
        "server": {
            "before": {k: stats1[k] for k in (*STATE, "rss", "fds", "dropped", "discarded")},
            "after": {k: stats3[k] for k in (*STATE, "rss", "fds", "dropped", "discarded")},
            "rss_growth_mb": round((stats3["rss"] - stats1["rss"]) / 2**20, 2),
            "rss_growth_of_the_warmup_mb": round((stats0["rss"] - fresh["rss"]) / 2**20, 2),
            "checked_per_drive_baseline": round(per_drive(stats0, stats1), 3),
            "checked_per_drive_after": round(per_drive(stats2, stats3), 3),
        },
    }
    print("\nLIVE FUZZ " + json.dumps(figures, indent=1))

    assert not good.errors, good.errors[:5]
    assert report["messages"] >= 10_000
    assert not report["failures"], report["failures"]
    outcomes = report["session_outcomes"]
    closed = outcomes.get("closed by the server", 0) + outcomes.get(
        "closed after the last frame", 0
    )
    assert closed == report["sessions"], outcomes
    assert "no answer" not in report["preauth_outcomes"], report["preauth_outcomes"]
    assert sum(report["preauth_sent"].values()) >= 50
    base99 = quantile(baseline, 0.99)
    bound = max(2 * base99, base99 + FLOOR)
    assert quantile(during, 0.99) <= bound, figures["good client"]
    assert quantile(after, 0.99) <= bound, figures["good client"]
    base50 = quantile(baseline, 0.5)
    bound50 = max(2 * base50, base50 + FLOOR_P50)
    assert quantile(during, 0.5) <= bound50, figures["good client"]
    assert quantile(after, 0.5) <= bound50, figures["good client"]
    assert {k: stats3[k] for k in STATE} == {k: stats1[k] for k in STATE}
    assert stats3["rss"] - stats1["rss"] < RSS_SLACK, figures["server"]
    assert per_drive(stats2, stats3) <= 2 * per_drive(stats0, stats1) + 0.5, figures["server"]


@pytest.mark.timeout(60)
async def test_a_large_orphan_part_does_not_stay_in_the_servers_memory(spawn: Any) -> None:
    """A data part for no frame is received into the engine's scratch buffer and thrown
    away. The buffer grew to the part's size and stayed so: one 64 MiB part from a
    connected peer left the server 64 MiB larger for good (up to ``junk_limit``,
    256 MiB by default). It is let go once the part is in."""
    port = int(spawn("fuzz_server.py").read_ready()[0])
    async with ucxrpc.Manager() as manager:
        client = await manager.connect("127.0.0.1", port)
        before = await client.call("stats")
        async with RawPeer.connected(port) as raw:
            tag = codec.DATA_BIT | (raw.server_cid << 40) | 12345
            await raw.send_tagged(tag, bytes(64 << 20), wait=True)
            async with asyncio.timeout(20):
                while True:
                    stats = await client.call("stats")
                    if stats["discarded"] > before["discarded"] and not stats["posted_receives"]:
                        break
                    await asyncio.sleep(0.05)
        assert stats["rss"] - before["rss"] < RSS_SLACK, (stats["rss"] - before["rss"]) >> 20
        await client.close()
