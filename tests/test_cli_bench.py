"""``ucxrpc bench`` as a user runs it: the installed command against real servers."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cli_run import UCXRPC, Procs, Terminal, one_error_line, ucxrpc


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    p = Procs()
    try:
        _, addr = p.serve()
        yield addr
    finally:
        p.stop()


@pytest.fixture(scope="module")
def noping() -> Iterator[str]:
    """A server without ``ping`` whose first method (``boom``) fails."""
    p = Procs()
    try:
        _, addr = p.serve("tests.helpers.cli_noping:server")
        yield addr
    finally:
        p.stop()


def test_without_method_and_without_ping_it_says_which_methods_exist(noping: str) -> None:
    line = one_error_line(ucxrpc("bench", noping, "--duration", "0.5"))
    assert "no method 'ping'" in line and "--method" in line, line
    assert "add" in line and "boom" in line, line


def test_every_error_names_the_method(noping: str, address: str) -> None:
    line = one_error_line(ucxrpc("bench", noping, "--method", "boom", "--duration", "0.5"))
    assert line.startswith("error: bench boom: the first call failed:"), line
    assert "RuntimeError: boom" in line
    line = one_error_line(ucxrpc("bench", noping, "--method", "nope"))
    assert "no method 'nope'" in line and "add, boom" in line, line
    line = one_error_line(ucxrpc("bench", address, "--method", "add", "--args", "[1, 2"))
    assert "--args is not valid JSON" in line, line


def test_arguments_with_args(noping: str, tmp_path: Path) -> None:
    numbers = tmp_path / "bench.json"
    out = ucxrpc(
        "bench", noping, "--method", "add", "--args", '{"a": 2, "b": 3}',
        "--duration", "0.5", "--json", str(numbers),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(numbers.read_text())
    assert (data["method"], data["errors"]) == ("add", 0) and data["calls"] > 0
    out = ucxrpc("bench", noping, "--method", "add", "--args", "[2]", "--duration", "0.3")
    assert out.returncode == 0, out.stderr


def test_the_default_callers_follow_the_core_count(address: str, tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    expected = min(64, max(4, 4 * cores))
    out = ucxrpc("bench", "--help", env={"COLUMNS": "200"})
    assert re.search(rf"--concurrency .*\[default: {expected}\]", out.stdout), out.stdout
    assert "4 per core" in out.stdout
    numbers = tmp_path / "bench.json"
    out = ucxrpc("bench", address, "--duration", "0.3", "--json", str(numbers))
    assert out.returncode == 0, out.stderr
    assert json.loads(numbers.read_text())["concurrency"] == expected
    assert f"{expected} callers" in out.stderr


def test_the_plot_has_a_log_axis_and_says_so(address: str, tmp_path: Path) -> None:
    plot = tmp_path / "latency.png"
    out = ucxrpc("bench", address, "--duration", "0.5", "--plot", str(plot))
    assert out.returncode == 0, out.stderr
    assert f"latency histogram: {plot} (log-spaced bins on a log latency axis)" in out.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_progress_bar_is_drawn_less_than_10_times_a_second(
    address: str, tmp_path: Path
) -> None:
    term = Terminal(
        UCXRPC, "bench", address, "--duration", "2", env={"HOME": str(tmp_path), "TERM": "xterm"}
    )
    try:
        assert term.wait(timeout=60) == 0, term.output
    finally:
        term.close()
    assert "calls/s" in term.output
    draws = term.output.count("calling")
    # Drawn every 0.2 s (about 12 draws in 2 s); a refresh thread at 10 Hz drew 20 and
    # more, and cost a quarter of the calls/s.
    assert 1 <= draws <= 16, (draws, term.output[-2000:])
