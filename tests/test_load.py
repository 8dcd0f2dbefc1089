"""Load: 50 client processes against one server process lose, duplicate and corrupt
no call.

A smaller run of ``benchmarks/load.py`` (which, with its full parameters, 50 clients x
10,000 calls, gives the documented figures): every client is a process of its own
(``tests/helpers/load_client.py``, started with subprocess and stopped by its pid), its
calls carry a unique ``(client, seq)`` id, a payload derived from it (64 B to 1 MiB) and
a priority drawn from a seeded plan; the server (``tests/helpers/load_server.py``)
checks each payload against its id and counts every id, and a fresh client fetches the
count at the end through an RPC.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "load.py"
_spec = importlib.util.spec_from_file_location("load_bench", _PATH)
assert _spec is not None and _spec.loader is not None
load: Any = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("load_bench", load)
_spec.loader.exec_module(load)

CLIENTS = 50
CALLS = 300  # per client: 15,000 calls in all; about 100 s here with the start-up


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fifty_client_processes_lose_duplicate_and_corrupt_nothing(tmp_path: Path) -> None:
    seed = random.randrange(1 << 20)
    s = load.run(
        CLIENTS, CALLS, inflight=4, concurrency=64, seed=seed, timeout=200, logdir=tmp_path
    )
    t = s["tally"]
    where = f"seed {seed}: {s['examples']} {t['examples']}"
    # Every client got every reply, each its own id and bytes ...
    assert s["errors"] == {}, where
    assert s["wrong"] == 0, where
    assert s["ok"] == CLIENTS * CALLS, where
    # ... and the server saw every id exactly once, each with the bytes derived from it.
    assert (t["missing"], t["duplicated"], t["unexpected"], t["bad"]) == (0, 0, 0, 0), where
    assert t["seen"] == CLIENTS * CALLS, where
    # Every priority and size was exercised.
    assert all(row["calls"] > 0 for row in s["latency"] + s["latency_by_size"]), s["latency"]
    # The server holds nothing of the 50 closed connections (the tally client's aside).
    after = s["server_after"]
    assert after["connections"] == 1, after
    assert after["inflight"] == 1, after  # the stats call itself
    assert after["posted_receives"] == 0 and after["awaited_parts"] == 0, after
