"""Tuning UCX and the runtime: ``ucx_options``, ``progress_mode``, ``UCXRPC_*`` variables.

Run it (server and client in one process, on two managers, so two UCX workers)::

    python examples/ucx_tuning.py

UCX settings are given without their ``UCX_`` prefix in ``Config.ucx_options``, as
keyword arguments of ``Manager`` or ``Config``, or from the environment as
``UCXRPC_UCX_OPTIONS='{"TLS": "tcp"}'`` (every ``Config`` field has its ``UCXRPC_*``
variable). Plain ``UCX_*`` variables work too (``UCX_TLS=tcp python ...``): UCX reads
them itself, and ``ucx_options`` override them. ``ucxrpc info`` shows the transports and
devices a setting leaves, and where each setting came from.

The script runs 200 calls under each of three settings and prints their p50 latency:
the defaults (every transport: shared memory between the two workers), keyword
arguments (``TLS=tcp,self,sm``, loopback only, ``progress_mode="polling"``) and
environment variables (``TLS=tcp``, ``progress_mode=efficient``, and no short
scheduler slice while a reply is awaited: ``sched_slice_us=0``). Then it shows that
UCX refuses an option it does not know when the manager starts.

Runtime: ``ucxrpc.run`` runs the program on uvloop (a faster asyncio event loop), and
the progress engine runs on that loop, with no thread of its own. Async handlers run on
the loop; plain ``def`` handlers run in the manager's thread pool (``manager.executor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator

import ucxrpc

#: Timed calls per setting.
CALLS = 200

server = ucxrpc.Server()


@server.rpc
async def ping() -> str:
    return "PONG"


# --8<-- [start:plain]
@server.rpc
def thread_name() -> str:
    """A plain function: it runs in the manager's thread pool."""
    return threading.current_thread().name


# --8<-- [end:plain]


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Set environment variables for the duration of a block."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def p50_latency(config: ucxrpc.Config) -> float:
    """Median round trip of CALLS calls, in microseconds, under ``config``."""
    async with ucxrpc.Manager(config) as server_side, ucxrpc.Manager(config) as client_side:
        await server.start(server_side, "127.0.0.1", 0)
        try:
            async with await client_side.connect("127.0.0.1", server.port) as client:
                await client.call("ping")  # the first call also warms up the path
                times = []
                for _ in range(CALLS):
                    start = time.perf_counter()
                    await client.call("ping", timeout=5)
                    times.append((time.perf_counter() - start) * 1e6)
        finally:
            await server.stop(grace=1.0)
    times.sort()
    return times[len(times) // 2]


async def main() -> None:
    # --8<-- [start:loop]
    loop = asyncio.get_running_loop()
    print(f"event loop: {type(loop).__module__}.{type(loop).__qualname__}")
    # --8<-- [end:loop]

    # --8<-- [start:settings]
    settings = {
        "defaults": ucxrpc.Config(),
        "keywords": ucxrpc.Config(
            ucx_options={"TLS": "tcp,self,sm", "NET_DEVICES": "lo"}, progress_mode="polling"
        ),
    }
    with environment(
        UCXRPC_UCX_OPTIONS='{"TLS": "tcp"}',
        UCXRPC_PROGRESS_MODE="efficient",
        UCXRPC_SCHED_SLICE_US="0",
    ):
        settings["environment"] = ucxrpc.Config()  # reads the UCXRPC_* variables
    # --8<-- [end:settings]

    for label, config in settings.items():
        micros = await p50_latency(config)
        print(
            f"{label}: progress_mode={config.progress_mode} ucx_options={config.ucx_options} "
            f"sched_slice_us={config.sched_slice_us:g} -> p50 {micros:.1f} us over {CALLS} calls"
        )

    prefixed = ucxrpc.Config(ucx_options={"UCX_TLS": "tcp"})
    print(f"UCX_ prefixes are dropped: {{'UCX_TLS': 'tcp'}} -> {prefixed.ucx_options}")

    async with ucxrpc.Manager() as manager:
        await server.start(manager, "127.0.0.1", 0)
        async with await manager.connect("127.0.0.1", server.port) as client:
            name = await client.call("thread_name", timeout=5)
        await server.stop(grace=1.0)
    print(f"plain handlers run in the thread pool: {name}; async ones on the loop's thread")

    # --8<-- [start:unknown]
    try:
        async with ucxrpc.Manager(ucx_options={"NO_SUCH_OPTION": "1"}):
            print("UCX accepted NO_SUCH_OPTION")
    except ucxrpc.Unavailable as exc:
        print(f"an unknown UCX option is refused at start: {exc.message}")
    # --8<-- [end:unknown]


if __name__ == "__main__":
    ucxrpc.run(main())
