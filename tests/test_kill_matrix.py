"""Survival: a peer SIGKILLed in the middle of a large transfer never aborts or hangs the
process that survives it, and its pending calls fail with ConnectionLost within 1 s.

A small version of ``benchmarks/kill_matrix.py`` with the library's default UCX
configuration (``UCXRPC_UCX_OPTIONS`` is inherited from the environment, never set):
a few kills per direction at 8 MiB and 64 MiB, each after a random delay of up to two
calls so that kills land in every phase of a call. Every process is a helper from
``tests/helpers/kill_peer.py`` started with subprocess and killed by its pid.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "kill_matrix.py"
_spec = importlib.util.spec_from_file_location("kill_matrix", _PATH)
assert _spec is not None and _spec.loader is not None
km: Any = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("kill_matrix", km)
_spec.loader.exec_module(km)

KILLS = 4
MIB = 1 << 20


@pytest.fixture
def matrix(tmp_path: Path) -> Iterator[Any]:
    seed = random.randrange(1 << 30)
    m = km.Matrix("default", None, tmp_path, random.Random(seed))
    m.seed = seed
    try:
        yield m
    finally:
        m.close()


def _explain(rows: list[dict[str, Any]], seed: int) -> str:
    bad = [r for r in rows if r.get("abort") or r.get("hang") or "setup_error" in r]
    lines = [f"seed {seed}; {len(bad)} of {len(rows)} kills went wrong:"]
    for r in bad:
        what = "ABORT" if r.get("abort") else "HANG" if r.get("hang") else "SETUP"
        tail = r.get("stderr", "").strip().replace("\n", " | ")[-300:]
        lines.append(f"  kill {r['kill']}: {what} {km._brief(r)} {tail}")
    return "\n".join(lines)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mib", [8, 64])
def test_server_survives_clients_killed_mid_request(matrix: Any, mib: int) -> None:
    rows = matrix.client_killed(mib * MIB, KILLS)
    summary = km.summarize(rows, "client_killed")
    assert summary["aborts"] == 0, _explain(rows, matrix.seed)
    assert summary["hangs"] == 0 and summary["setup"] == 0, _explain(rows, matrix.seed)
    # Each time, a fresh connection was answered within 2 s.
    assert summary["late"] == 0, [r.get("probe_s") for r in rows]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mib", [8, 64])
def test_client_survives_server_killed_mid_reply(matrix: Any, mib: int) -> None:
    rows = matrix.server_killed(mib * MIB, KILLS)
    summary = km.summarize(rows, "server_killed")
    assert summary["aborts"] == 0, _explain(rows, matrix.seed)
    assert summary["hangs"] == 0 and summary["setup"] == 0, _explain(rows, matrix.seed)
    errors = [(r["error"], r["time_to_error"]) for r in rows if r.get("report") == "LOST"]
    assert all(e in km.ERROR_OK for e, _ in errors), errors
    assert all(t < km.DEADLINE_ERROR for _, t in errors), errors
