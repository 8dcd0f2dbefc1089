"""What the fault tests' peers share: the state a process reports, and a self-kill.

Used by ``fault_server.py`` and ``fault_client.py`` (tests/test_faults.py). Times are
``time.monotonic()``, one clock for every process on the machine, so the test can
subtract a kill time printed by another process.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

import ucxrpc


def say(*words: object) -> None:
    """One event line for the parent (flushed at once: the parent waits for it)."""
    print(*words, flush=True)


def fds() -> int:
    """File descriptors open in this process."""
    return len(os.listdir("/proc/self/fd"))


def state(manager: ucxrpc.Manager, server: ucxrpc.Server | None = None) -> dict[str, Any]:
    """What this process holds: connections, UCX requests, parts, exports, handlers.

    Every count is a public property of the manager (its engine) or the server.
    """
    engine_ops = manager.engine.in_flight if manager.running else 0
    out: dict[str, Any] = {
        "manager_connections": manager.connections,
        "posted_receives": manager.posted_receives,
        "engine_in_flight": engine_ops,
        "awaited_parts": manager.awaited_parts,
        "announced_bytes": manager.announced_bytes,
        "exports_held": manager.shared_parts[2],
        "fds": fds(),
        "threads": threading.active_count(),
    }
    if server is not None:
        out["server_connections"] = server.connections
        out["server_inflight"] = server.inflight
    return out


def in_transfer(manager: ucxrpc.Manager) -> bool:
    """A large part is on its way on this side: a UCX request in flight, a part
    announced and not yet delivered, or a shared part lent and not yet released."""
    return bool(
        manager.engine.in_flight
        or manager.announced_bytes
        or manager.awaited_parts
        or manager.shared_parts[2]
    )


def arm_self_kill(manager: ucxrpc.Manager, skip: int = 0) -> None:
    """SIGKILL this process from a thread the moment a transfer is in flight.

    A thread, not a task: a part read out of the peer's memory is copied inside one
    callback of the event loop, which a task could not interrupt. ``skip`` transfers
    are let through first, so that the kill lands at a varying point of a call. Prints
    ``KILL <json>`` (the monotonic time and this side's state) just before the kill.
    The counters are read while the loop thread changes them; a read that races a
    resize is simply tried again.
    """

    def watch() -> None:
        seen, was = 0, False
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            try:
                now = in_transfer(manager)
                snapshot = state(manager) if now else None
            except (RuntimeError, ucxrpc.Unavailable):
                continue  # a dict changed size under us, or the engine is closing
            if now and not was:
                seen += 1
            was = now
            if now and seen > skip:
                say("KILL", json.dumps({"when": time.monotonic(), **(snapshot or {})}))
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0001)
        say("ERROR no transfer seen within 60 s")

    threading.Thread(target=watch, name="self-kill", daemon=True).start()
