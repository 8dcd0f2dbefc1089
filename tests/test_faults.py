"""Faults over real UCX, the peer always in a process of its own.

* a server SIGKILLed mid-call and mid-transfer (64 MiB requests and replies): every
  pending call fails with ConnectionLost within 1 s of the kill;
* a client SIGKILLed mid-call and mid-transfer: the server cancels its handlers and
  its counts (connections, calls, UCX requests, parts, exports, fds) return to what
  they were before the client came;
* SIGSTOP of either side with KeepAlive, then SIGCONT;
* ``server.stop(grace)`` and ``manager.shutdown(grace)`` under load, also with a
  handler that swallows CancelledError and a plain handler that runs on: in-flight
  calls finish, new calls get Unavailable, nothing is printed, the stop takes no
  longer than the grace and a small margin.

Helpers: ``helpers/fault_server.py``, ``helpers/fault_client.py`` (peers),
``helpers/faultlib.py`` (their state and self-kill), ``helpers/faultproc.py`` (the
process wrapper). Each test prints its figures on a ``FIGURES`` line (``pytest -s``).
Kills that must land mid-transfer are made by the dying process itself, from a thread,
the moment a large part is in flight on its side (``faultlib.arm_self_kill``).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import until
from helpers.faultproc import Peer

import ucxrpc
from ucxrpc.liveness import KeepAlive, Reconnect

MIB = 1 << 20
SIZE = 64 * MIB
#: Set on both peers for the variant whose large parts cross UCX itself (TCP here)
#: instead of being read out of the sender's memory.
UCX_PARTS = {"UCXRPC_SHARED_MEMORY": "false"}
#: What a peer holds that must return to its value before the dead peer came.
HELD = (
    "server_connections",
    "server_inflight",
    "manager_connections",
    "posted_receives",
    "engine_in_flight",
    "awaited_parts",
    "announced_bytes",
    "exports_held",
    "fds",
)


def figures(name: str, **values: Any) -> None:
    """One line of measured figures (shown with ``pytest -s``)."""
    print(f"FIGURES {name} {json.dumps(values, sort_keys=True)}")


async def start_server(env: dict[str, str] | None, stack: list[Peer]) -> tuple[Peer, int]:
    proc = Peer("fault_server.py", env=env)
    stack.append(proc)
    port = int((await proc.expect("READY")).split()[0])
    return proc, port


@pytest.fixture
async def procs() -> AsyncIterator[list[Peer]]:
    """Peers started by the test; each is stopped by its pid at the end."""
    started: list[Peer] = []
    yield started
    for proc in started:
        proc.stop()


async def stats_until(
    client: ucxrpc.Client, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """The server's stats, asked again and again until ``predicate`` holds."""
    async with asyncio.timeout(timeout):
        while not predicate(stats := await client.call("stats", timeout=5.0)):  # noqa: ASYNC110 - another process's state
            await asyncio.sleep(0.002)
    return stats


def held(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats[k] for k in HELD}


async def failure(call: Awaitable[Any]) -> tuple[BaseException | None, float]:
    """How ``call`` ended: its exception (None: it returned) and when (monotonic)."""
    try:
        await call
    except Exception as exc:
        return exc, time.monotonic()
    return None, time.monotonic()


# -- 1. the server is SIGKILLed ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("parts", ["memory", "ucx"])
async def test_server_killed_mid_call_and_mid_transfer_fails_every_call_within_1s(
    procs: list[Peer], parts: str
) -> None:
    """Three calls waiting in handlers and two 64 MiB transfers in flight (an echo's
    request or reply, a 64 MiB reply); the server kills itself while a part is on its
    way. Twice per variant, each time at a later transfer."""
    env = UCX_PARTS if parts == "ucx" else None
    rows = []
    for skip in (0, 3):
        server, port = await start_server(env, procs)
        async with ucxrpc.Manager(shared_memory=parts == "memory") as manager:
            client = await manager.connect("127.0.0.1", port)
            data = bytes(SIZE)
            assert len(await client.call("echo", data, timeout=30)) == SIZE
            assert len(await client.call("big", SIZE, timeout=30)) == SIZE

            async def loop(
                client: ucxrpc.Client, method: str, arg: Any
            ) -> tuple[BaseException | None, float]:
                while True:
                    exc, when = await failure(client.call(method, arg, timeout=60))
                    if exc is not None:
                        return exc, when

            holds = [asyncio.ensure_future(failure(client.call("hold", 30.0))) for _ in range(3)]
            await stats_until(client, lambda s: s["entered"] >= 3)
            transfers = [
                asyncio.ensure_future(loop(client, "echo", data)),
                asyncio.ensure_future(loop(client, "big", SIZE)),
            ]
            server.send(f"arm {skip}")
            kill = await server.expect_json("KILL")
            async with asyncio.timeout(10):
                ends = await asyncio.gather(*holds, *transfers)
            after = {"connections": manager.connections}
            await until(lambda: not manager.engine.in_flight and not manager.posted_receives)
            after.update(
                in_flight=manager.engine.in_flight,
                posted_receives=manager.posted_receives,
                announced_bytes=manager.announced_bytes,
                exports_held=manager.shared_parts[2],
            )
            errors = [type(exc).__name__ for exc, _ in ends]
            times = [round(when - kill["when"], 4) for _, when in ends]
            assert errors == ["ConnectionLost"] * 5, ends
            assert all(t < 1.0 for t in times), times
            with pytest.raises(ucxrpc.ConnectionLost):
                await client.call("ping")
            assert after == {
                "connections": 0,
                "in_flight": 0,
                "posted_receives": 0,
                "announced_bytes": 0,
                "exports_held": 0,
            }
            await client.close()
        rows.append({"server_at_kill": kill, "time_to_failure_s": times})
    figures(f"server_killed[{parts}]", rows=rows)


# -- 2. a client is SIGKILLed -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("mode", "parts"),
    [
        ("hold", "memory"),
        ("request", "memory"),
        ("reply", "memory"),
        ("request", "ucx"),
        ("reply", "ucx"),
    ],
)
async def test_client_killed_mid_call_and_mid_transfer_frees_its_state(
    procs: list[Peer], mode: str, parts: str
) -> None:
    """hold: four calls waiting in handlers, the client killed by the test; request /
    reply: two calls waiting in handlers and 64 MiB sinks (or 64 MiB replies) back to
    back on two tasks, the client killing itself while a part is in flight. The server's
    handlers must see CancelledError and its counts return to where they were."""
    env = UCX_PARTS if parts == "ucx" else None
    _, port = await start_server(env, procs)
    async with ucxrpc.Manager() as manager:
        observer = await manager.connect("127.0.0.1", port)
        baseline = await observer.call("stats")
        waiting = 4 if mode == "hold" else 2
        args = ["4"] if mode == "hold" else [str(SIZE), "1"]
        victim = Peer("fault_client.py", str(port), mode, *args, env=env)
        procs.append(victim)
        if mode == "hold":
            await victim.expect("SENT")
            before = await stats_until(observer, lambda s: s["entered"] >= waiting)
            t_kill = victim.signal(signal.SIGKILL)
            at_kill: dict[str, Any] = {}
        else:
            await victim.expect("GO", 60)
            before = await stats_until(observer, lambda s: s["entered"] >= waiting)
            at_kill = await victim.expect_json("KILL")
            t_kill = at_kill["when"]
        assert await victim.exited(10) == -signal.SIGKILL

        def freed(s: dict[str, Any]) -> bool:
            return s["cancelled"] >= waiting and held(s) == held(baseline)

        try:
            after = await stats_until(observer, freed, timeout=15)
        except TimeoutError:
            after = await observer.call("stats")
            raise AssertionError(
                f"not freed: before {held(baseline)}, after {held(after)}, "
                f"cancelled {after['cancelled']}"
            ) from None
        freed_s = round(time.monotonic() - t_kill, 4)
        # Every handler that waited saw CancelledError; none finished for a dead client.
        assert (after["cancelled"], after["finished"]) == (waiting, 0)
        assert held(after) == held(baseline)
        assert await observer.call("ping") == "PONG"
        await observer.close()
    figures(
        f"client_killed[{mode}-{parts}]",
        baseline=held(baseline),
        with_victim=held(before),
        victim_at_kill=at_kill,
        after=held(after),
        cancelled=after["cancelled"],
        freed_s=freed_s,
    )


# -- 3. SIGSTOP with KeepAlive ----------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_stopped_server_is_detected_and_resumes_after_sigcont(procs: list[Peer]) -> None:
    """The client (KeepAlive 0.2 s / 0.3 s, Reconnect) sees its pending calls fail
    with ConnectionLost within interval + timeout; calls made meanwhile fail with
    Unavailable. After SIGCONT the server cancels the lost connection's handlers, frees
    it, and the client reconnects on its own."""
    interval, timeout = 0.2, 0.3
    server, port = await start_server(None, procs)
    async with ucxrpc.Manager(connect_timeout=1.0) as manager:
        client = await manager.connect(
            "127.0.0.1",
            port,
            keepalive=KeepAlive(interval=interval, timeout=timeout),
            reconnect=Reconnect(initial=0.05, maximum=0.2),
        )
        baseline = await client.call("stats")
        calls = [asyncio.ensure_future(failure(client.call("hold", 30.0))) for _ in range(3)]
        await stats_until(client, lambda s: s["entered"] >= 3)
        t_stop = server.signal(signal.SIGSTOP)
        async with asyncio.timeout(10):
            ends = await asyncio.gather(*calls)
        detect = [round(when - t_stop, 4) for _, when in ends]
        for exc, _ in ends:
            assert isinstance(exc, ucxrpc.ConnectionLost), exc
            assert "did not answer a heartbeat within 0.3 s" in str(exc)
        # The bound: the next heartbeat leaves within `interval`, its answer is awaited
        # for `timeout`; 0.2 s more for scheduling on a loaded machine.
        assert all(t < interval + timeout + 0.2 for t in detect), detect
        with pytest.raises(ucxrpc.Unavailable):
            await client.call("ping")  # while reconnecting: at once
        with pytest.raises(ucxrpc.Unavailable):
            await client.wait_connected(timeout=1.5)  # no handshake while stopped
        t_cont = server.signal(signal.SIGCONT)
        await client.wait_connected(timeout=10)
        reconnect_s = round(time.monotonic() - t_cont, 4)
        assert await client.call("ping") == "PONG"
        assert client.reconnects == 1
        after = await stats_until(
            client, lambda s: s["cancelled"] >= 3 and held(s) == held(baseline)
        )
        freed_s = round(time.monotonic() - t_cont, 4)
        assert (after["cancelled"], after["finished"]) == (3, 0)
        await client.close()
    assert server.popen.poll() is None  # it survived all that
    figures(
        "server_stopped",
        detect_s=detect,
        bound_s=interval + timeout,
        reconnect_after_sigcont_s=reconnect_s,
        freed_after_sigcont_s=freed_s,
        baseline=held(baseline),
        after=held(after),
    )


@pytest.mark.timeout(60)
async def test_stopped_client_finishes_its_calls_after_sigcont(procs: list[Peer]) -> None:
    """A client with KeepAlive (0.2 s / 0.3 s) stopped while three hold(0.5) calls run.

    The server does not notice (only clients send heartbeats): it finishes the calls
    and sends the replies. After SIGCONT the client takes them: every call returns,
    a new call is answered, and the heartbeat does not declare the live server lost.
    """
    _, port = await start_server(None, procs)
    async with ucxrpc.Manager() as manager:
        observer = await manager.connect("127.0.0.1", port)
        baseline = await observer.call("stats")
        victim = Peer("fault_client.py", str(port), "keepalive", "0.2", "0.3", "3", "0.5")
        procs.append(victim)
        await victim.expect("SENT")
        await stats_until(observer, lambda s: s["entered"] >= 3)
        t_stop = victim.signal(signal.SIGSTOP)
        # Stopped for well past interval + timeout, and until the server has answered.
        during = await stats_until(
            observer, lambda s: s["finished"] >= 3 and time.monotonic() - t_stop > 1.5
        )
        stopped_s = round(time.monotonic() - t_stop, 4)
        assert during["server_connections"] == baseline["server_connections"] + 1
        t_cont = victim.signal(signal.SIGCONT)
        results = [(await victim.expect("RESULT")).split() for _ in range(3)]
        ping = await victim.expect("PING")
        await victim.expect("END")
        assert await victim.exited(10) == 0
        assert [r[1] for r in results] == ["DONE"] * 3, results
        assert ping == "PONG"
        assert victim.stderr == ""
        after = await stats_until(observer, lambda s: held(s) == held(baseline))
        await observer.close()
    figures(
        "client_stopped",
        stopped_s=stopped_s,
        results_after_sigcont_s=[round(float(r[2]) - t_cont, 4) for r in results],
        server_connections_while_stopped=during["server_connections"],
        baseline=held(baseline),
        after=held(after),
    )


# -- 4. stop and shutdown under load ----------------------------------------------------------

GRACE = 1.5
LONG = 4.0  # the long handlers' own duration: past the grace


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["stop", "shutdown"])
@pytest.mark.parametrize("long", ["hold", "swallow", "plain"])
async def test_stop_under_load_is_bounded_by_the_grace_and_prints_nothing(
    procs: list[Peer], how: str, long: str
) -> None:
    """Four calls that end within the grace, two long ones of the given kind (hold:
    cancellable; swallow: catches CancelledError and runs on; plain: a ``def`` handler
    in a thread) and a stream of pings, when the server is told ``stop 1.5`` (then its
    manager is shut down) or ``shutdown 1.5``."""
    server, port = await start_server(None, procs)
    async with ucxrpc.Manager() as manager:
        client = await manager.connect("127.0.0.1", port)
        short = [asyncio.ensure_future(client.call("hold", 0.5)) for _ in range(4)]
        longs = [asyncio.ensure_future(failure(client.call(long, LONG))) for _ in range(2)]
        pings = {"ok": 0}

        async def ping_loop() -> BaseException:
            while True:
                try:
                    await client.call("ping", timeout=5.0)
                except Exception as exc:
                    return exc
                pings["ok"] += 1

        key = "plain_entered" if long == "plain" else "entered"
        need = 2 if long == "plain" else 6
        pinger = asyncio.ensure_future(ping_loop())
        await stats_until(client, lambda s: s[key] >= need and s["entered"] >= 4)
        await until(lambda: pings["ok"] >= 20)
        server.send(f"{how} {GRACE}")
        t0 = float((await server.expect("STOPPING" if how == "stop" else "SHUTTING")).split()[0])
        with pytest.raises(ucxrpc.Unavailable) as refused:
            await client.call("ping")  # a new call once the stop has begun
        async with asyncio.timeout(GRACE + 5):
            assert await asyncio.gather(*short) == ["DONE"] * 4  # in flight: finished
            ends = await asyncio.gather(*longs)
            ping_error = await pinger
        if how == "stop":
            stop_s = float(await server.expect("STOPPED"))
        shutdown_s = float(await server.expect("SHUTDOWN"))
        counts = json.loads(await server.expect("EXIT"))
        with pytest.raises(ucxrpc.Unavailable):
            await manager.connect("127.0.0.1", port, timeout=2.0)  # a new connection
        rc = await server.exited(LONG + 10)
        exit_s = round(time.monotonic() - t0, 4)
        lines = await server.rest()
        await client.close()
    assert isinstance(ping_error, ucxrpc.Unavailable), ping_error
    for exc, _ in ends:  # cut off at the grace: their connection was closed
        assert isinstance(exc, ucxrpc.ConnectionLost), exc
    total = stop_s + shutdown_s if how == "stop" else shutdown_s
    assert total < GRACE + 1.0, total
    assert rc == 0
    assert server.stderr == ""
    words = [line.split()[0] for line in lines]
    expected = ["READY", "STOPPING", "STOPPED", "SHUTDOWN", "EXIT"]
    assert words == (expected if how == "stop" else ["READY", "SHUTTING", "SHUTDOWN", "EXIT"])
    if long == "swallow":
        assert counts["swallowed"] >= 2, counts
    figures(
        f"stop[{how}-{long}]",
        grace=GRACE,
        stop_s=stop_s if how == "stop" else None,
        shutdown_s=shutdown_s,
        stop_plus_shutdown_s=round(total, 4),
        process_exit_s=exit_s,
        new_call=f"{type(refused.value).__name__}: {refused.value.message}",
        pings_ok=pings["ok"],
        ping_error=type(ping_error).__name__,
        long_calls=[type(exc).__name__ for exc, _ in ends],
        counts=counts,
    )
