"""Large copies on two cores: the split copy, its errors, its thread, and the data path
over real UCX at sizes on both sides of the split."""

from __future__ import annotations

import asyncio
import ctypes
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
from conftest import PTRACE_SCOPE, until

import ucxrpc
from ucxrpc.errors import ConnectionLost
from ucxrpc.io import copier, shared

pytestmark = pytest.mark.timeout(120)

SPLIT = copier.SPLIT_BYTES
SIZES = [SPLIT - 1, SPLIT, SPLIT + 1, SPLIT + 4097, 3 * SPLIT + 13]


def _address(buf: Any) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


@pytest.mark.parametrize("size", SIZES)
def test_a_split_copy_writes_every_byte_once(size: int) -> None:
    src = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros(size + 64, dtype=np.uint8)  # bytes past the end must stay untouched
    calls: list[tuple[int, int, str]] = []

    def copy(at: int, n: int) -> None:
        calls.append((at, n, threading.current_thread().name))
        ctypes.memmove(_address(dst) + at, _address(src) + at, n)

    copier.copy_split(copy, size)
    assert np.array_equal(dst[:size], src) and not dst[size:].any()
    assert sorted((at, n) for at, n, _ in calls) == _cover(calls, size)
    threads = {name for *_, name in calls}
    assert threads == (
        {"ucxrpc-copy", threading.current_thread().name}
        if size >= SPLIT
        else {threading.current_thread().name}
    )


def _cover(calls: list[tuple[int, int, str]], size: int) -> list[tuple[int, int]]:
    # The pieces, in order, tile [0, size) with no gap and no overlap.
    pieces = sorted((at, n) for at, n, _ in calls)
    end = 0
    for at, n in pieces:
        assert at == end and n > 0
        end += n
    assert end == size
    return pieces


@pytest.mark.parametrize("failing", ["ucxrpc-copy", "here"])
def test_an_error_in_either_half_is_raised_after_both_ended(failing: str) -> None:
    ended: list[int] = []
    here = threading.current_thread().name

    def copy(at: int, n: int) -> None:
        name = threading.current_thread().name
        if (name == here) == (failing == "here"):
            raise ConnectionLost(f"gone at {at}")
        time.sleep(0.05)  # the other half is still running when this one fails
        ended.append(at)

    with pytest.raises(ConnectionLost, match="gone at"):
        copier.copy_split(copy, 2 * SPLIT)
    assert len(ended) == 1  # the half that did not fail had ended before the raise


def test_the_helper_thread_ends_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(copier, "IDLE_SECONDS", 0.05)
    used: list[threading.Thread] = []

    def copy(at: int, n: int) -> None:
        used.append(threading.current_thread())

    deadline = time.monotonic() + 20
    # A helper started by an earlier test waits out the default idle time first.
    while len(used) < 2 or used[-1] is threading.current_thread():
        used.clear()
        copier.copy_split(copy, SPLIT)
        assert time.monotonic() < deadline
    first = used[-1]
    assert first.name == "ucxrpc-copy"
    while first.is_alive():  # it ends once idle
        assert time.monotonic() < deadline
        time.sleep(0.01)
    used.clear()
    copier.copy_split(copy, SPLIT)  # and another starts when needed
    helper = [t for t in used if t is not threading.current_thread()]
    assert helper and helper[0] is not first and helper[0].name == "ucxrpc-copy"


def test_an_interrupted_wait_still_waits_for_the_helper() -> None:
    # A signal handler that raises while this thread waits for the helper's half must
    # not let copy_split return while the helper still writes into the buffer.
    ended = threading.Event()
    here = threading.current_thread()

    def copy(at: int, n: int) -> None:
        if threading.current_thread() is not here:
            time.sleep(0.3)
            ended.set()

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            copier.copy_split(copy, 2 * SPLIT)
        assert ended.is_set()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_no_thread_to_be_had_copies_in_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(copier, "IDLE_SECONDS", 0.05)
    deadline = time.monotonic() + 20
    while any(t.name == "ucxrpc-copy" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.02)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    pieces: list[tuple[int, int]] = []
    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", refuse)
        copier.copy_split(lambda at, n: pieces.append((at, n)), 2 * SPLIT)
    assert pieces == [(0, 2 * SPLIT)]
    pieces.clear()
    copier.copy_split(lambda at, n: pieces.append((at, n)), 2 * SPLIT)  # not jammed
    assert sorted(pieces) == [(0, SPLIT), (SPLIT, SPLIT)]


def test_a_busy_helper_is_not_waited_for() -> None:
    # Another thread's long copy holds the helper: this copy runs in one piece here
    # rather than behind it.
    release = threading.Event()
    holding = threading.Event()

    def slow(at: int, n: int) -> None:
        if threading.current_thread().name == "ucxrpc-copy":
            holding.set()
            release.wait(10)

    other = threading.Thread(target=copier.copy_split, args=(slow, 2 * SPLIT))
    other.start()
    try:
        assert holding.wait(10)
        names: list[str] = []
        copier.copy_split(lambda at, n: names.append(threading.current_thread().name), SPLIT)
        assert names == [threading.current_thread().name]
    finally:
        release.set()
        other.join(10)


def test_lent_counts_stay_exact_when_a_callback_raises() -> None:
    exports = shared.Exports(1 << 30, 60.0, time.monotonic)
    before = (shared.Exports.process_lending, shared.Exports.process_held)

    def boom(exc: BaseException | None) -> None:
        raise RuntimeError("callback failed")

    for key in range(3):
        exports.add(key, shared.Lent(bytes(SPLIT)), SPLIT, boom)
    assert shared.Exports.process_lending == before[0] + 3
    with pytest.raises(RuntimeError, match="callback failed"):
        exports.close()
    assert (shared.Exports.process_lending, shared.Exports.process_held) == before
    assert len(exports) == 0 and exports.bytes == 0


def test_a_forked_child_copies_without_its_parents_thread() -> None:
    # In a child of fork the helper thread does not exist: without the at-fork reset
    # the child's split copy would wait for it for ever (the alarm fails the child).
    code = (
        "import os, signal\n"
        "from ucxrpc.io import copier\n"
        "copier.copy_split(lambda at, n: None, copier.SPLIT_BYTES)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    signal.alarm(10)\n"
        "    copier.copy_split(lambda at, n: None, copier.SPLIT_BYTES)\n"
        "    os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "0", out.stderr


@pytest.mark.parametrize("size", [SPLIT + 1, 16 << 20])
def test_to_bytes_is_the_logical_bytes(size: int) -> None:
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    assert copier.to_bytes(memoryview(data)) == data.tobytes()
    words = data[: size // 4 * 4].view(np.int32)
    assert copier.to_bytes(memoryview(words)) == words.tobytes()  # format "i", cast
    assert copier.to_bytes(memoryview(data)[::-1]) == data[::-1].tobytes()  # strided


@pytest.mark.skipif(PTRACE_SCOPE > 0, reason="Yama forbids reading another process")
@pytest.mark.parametrize("size", [SPLIT + 3, 9 << 20])
def test_a_split_read_of_a_peer_that_died_is_connection_lost(size: int) -> None:
    code = (
        "import os, sys\n"
        "from ucxrpc.io import shared\n"
        f"data = bytes(range(256)) * ({size} // 256 + 1)\n"
        f"lent = shared.Lent(memoryview(data)[:{size}])\n"
        "print(os.getpid(), lent.address, lent.ticket, lent.value, flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdin is not None
    pid, address, ticket, value = map(int, child.stdout.readline().split())
    peer = shared.Peer(pid)
    try:
        got = peer.read(address, size, ticket, value)
        assert bytes(got) == (bytes(range(256)) * (size // 256 + 1))[:size]
        child.kill()
        child.wait(timeout=10)
        with pytest.raises(ConnectionLost):
            peer.read(address, size, ticket, value)
    finally:
        peer.close()
        child.stdin.close()
        child.stdout.close()


@pytest.mark.parametrize("size", SIZES)
async def test_echo_over_ucx_on_both_sides_of_the_split(
    remote: tuple[ucxrpc.Manager, ucxrpc.Client], size: int
) -> None:
    _, client = remote
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    back = await client.call("echo_view", memoryview(data))
    assert bytes(back) == data
    assert await client.call("reverse", data) == data[::-1]


async def test_a_large_call_does_not_poll_for_its_reply(
    remote: tuple[ucxrpc.Manager, ucxrpc.Client],
) -> None:
    # Polling while the server copies a large request out of this process takes the
    # core the copy needs; small calls still poll (their reply is a wake-up away).
    manager, client = remote
    engine = manager.engine
    small = asyncio.ensure_future(client.call("sleep", 30.0))
    await until(lambda: client.pending == 1 and engine.awaiting == 1)
    for size in (SPLIT, 3 * SPLIT + 13):
        # The server holds the reply for a while: the large call is surely in flight.
        big = asyncio.ensure_future(client.call("held", memoryview(bytes(size)), 0.5))
        await until(lambda: client.pending == 2)
        assert engine.awaiting == 1  # the small call's, not the large one's
        assert await big == size
        await until(lambda: shared.Exports.process_lending == 0)
    small.cancel()
    with pytest.raises(asyncio.CancelledError):
        await small
    assert engine.awaiting == 0
