"""Soak: many calls on one connection, mixing sizes, deadlines, cancels and handler
errors, leave the server holding what it held before; every deadline surfaces as
DeadlineExceeded.

A smaller run of ``benchmarks/soak.py`` (which, with its full parameters, makes
1,000,000 calls and gives the documented figures): the server runs in a process of its
own (``tests/helpers/load_server.py``), the client too (``tests/helpers/load_client.py
soak``), both started with subprocess and stopped by their pid.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import ucxrpc

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
_spec = importlib.util.spec_from_file_location("soak_bench", _PATH)
assert _spec is not None and _spec.loader is not None
soak: Any = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("soak_bench", soak)
_spec.loader.exec_module(soak)

CALLS = 100_000  # about 90 s here (benchmarks/soak.py makes 1,000,000)


async def test_a_handler_stopped_by_its_own_timeout_fails_with_deadline_exceeded(
    manager: ucxrpc.Manager,
) -> None:
    """The server's deadline (here the handler's ``timeout=``, the caller has none)
    must reach the caller as DeadlineExceeded. Under uvloop the deadline's timer may
    fire while ``loop.time()`` still reads just short of the deadline; the server took
    that for the handler's own TimeoutError and answered RemoteError(TimeoutError),
    about one call in 25 here."""
    server = ucxrpc.Server()

    @server.rpc(timeout=0.005)
    async def slow() -> str:
        await asyncio.sleep(0.05)
        return "late"

    await server.start(manager, "127.0.0.1", 0)
    client = await manager.connect("127.0.0.1", server.port)
    seen: Counter[str] = Counter()
    for _ in range(200):
        try:
            await client.call("slow")
        except ucxrpc.RemoteError as exc:
            seen[f"RemoteError({exc.remote_type})"] += 1
        except ucxrpc.RpcError as exc:
            seen[type(exc).__name__] += 1
    await client.close()
    await server.stop(grace=1.0)
    assert seen == {"DeadlineExceeded": 200}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_long_soak_leaves_the_server_as_it_was(tmp_path: Path) -> None:
    seed = random.randrange(1 << 20)
    r = soak.run(CALLS, concurrency=32, segments=5, seed=seed, timeout=200, logdir=tmp_path)
    where = f"seed {seed}: {r['wrong'][:10]}"
    # Every call had the outcome its kind must have: echoes the same bytes, deadlines
    # DeadlineExceeded (never RemoteError wrapping TimeoutError), cancels CancelledError,
    # handler errors RemoteError naming ValueError.
    assert r["unexpected"] == {}, where
    assert r["wrong_count"] == 0, where
    assert sum(sum(v.values()) for v in r["outcomes"].values()) == CALLS
    for kind in r["outcomes"]:
        assert sum(r["outcomes"][kind].values()) > 0, kind
    # The server's memory grew by less than 20 MB after the warm-up segment ...
    assert r["rss_growth"] < soak.RSS_LIMIT, r["rss_growth"]
    # ... and its tasks, calls, posted receives, frames and parts waiting, pending
    # sends and shared parts are back where they were; the client's too.
    assert r["changed"] == {}, r["changed"]
    assert r["client_changed"] == {}, r["client_changed"]
    # Every handler a deadline or a cancel interrupted was cancelled, none ran on.
    assert r["handlers_unfinished"] == {"nap": 0, "capped": 0}
    events = r["snapshots"][-1]["server"]["events"]
    assert events.get("capped_finished", 0) == 0, events
    assert events.get("nap_finished_deadline", 0) == 0, events
    # Not asserted: a cancelled call's handler (asleep 0.5 s) that ran to the end, so
    # its CANCEL reached the server late or not at all: 8 of 15,051 in the 1,000,000
    # call run (see docs/reliability.md); the cause is not established yet.
