"""Coverage-guided fuzzing of the wire and protocol layers with atheris (libFuzzer):
a bounded run in its own process must end without a crash (anything raised other
than an RpcError stops libFuzzer, which then exits non-zero and writes the input)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).parent / "helpers" / "atheris_wire.py"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", [1, 2])
def test_the_decoders_and_the_inbound_machine_survive_a_fuzz_run(tmp_path: Path, seed: int) -> None:
    out = subprocess.run(
        [sys.executable, str(HARNESS), "-runs=100000", f"-seed={seed}", "-max_total_time=120"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DONE" in out.stderr, out.stderr[-3000:]
    assert not list(tmp_path.glob("crash-*"))


def test_the_harness_would_report_a_crash(tmp_path: Path) -> None:
    # The same harness around a decoder that raises something else must fail.
    code = (
        "import sys, atheris\n"
        "def one(data):\n"
        "    if data[:2] == b'ok':\n"
        "        raise KeyError('not an RpcError')\n"
        "atheris.Setup(sys.argv, one)\n"
        "atheris.Fuzz()\n"
    )
    seed_dir = tmp_path / "corpus"
    seed_dir.mkdir()
    (seed_dir / "seed").write_bytes(b"ok")
    out = subprocess.run(
        [sys.executable, "-c", code, "-runs=10", str(seed_dir)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "KeyError" in out.stdout + out.stderr
    assert list(tmp_path.glob("crash-*"))
