"""Message priority: queued work starts (and queued sends leave) highest priority first.

Run it (every side in one process)::

    python examples/priority.py

Priorities order *waiting* work; they never preempt work that is running. So each half
first fills the only slot, then queues LOW, NORMAL and HIGH work behind it:

* RPC: ``Server(max_concurrency=1)`` runs one handler at a time. A ``hold`` call takes
  the slot and waits on a gate; LOW, NORMAL and HIGH calls queue behind it. When the
  gate opens they start HIGH first.
* Raw messages: ``WorkerConfig(send_window=1)`` lets one send be in flight. A 4 MiB
  message takes the window; LOW, NORMAL and HIGH sends queue behind it and leave, and
  so arrive, HIGH first.
"""

from __future__ import annotations

import asyncio

import ucxrpc
from ucxrpc import Priority
from ucxrpc.transport import Worker, WorkerConfig

#: Queued in this order; they should start in the reverse.
QUEUED = [Priority.LOW, Priority.NORMAL, Priority.HIGH]


# --8<-- [start:rpc]
async def rpc_priorities(manager: ucxrpc.Manager) -> None:
    server = ucxrpc.Server(max_concurrency=1)
    holding = asyncio.Event()
    gate = asyncio.Event()
    started: list[str] = []

    @server.rpc
    async def hold() -> None:
        holding.set()
        await gate.wait()

    @server.rpc
    async def job(name: str) -> str:
        started.append(name)
        return name

    await server.start(manager, "127.0.0.1", 0)
    try:
        async with await manager.connect("127.0.0.1", server.port) as client:
            holder = asyncio.ensure_future(client.call("hold", timeout=10))
            await asyncio.wait_for(holding.wait(), 10)
            jobs = [
                asyncio.ensure_future(client.call("job", p.name, priority=p, timeout=10))
                for p in QUEUED
            ]
            # Calls on one connection are handled in the order they arrive, and a call to
            # a method the server does not have is refused at once, without a slot. When
            # that refusal is back, the three jobs sent before it are queued.
            try:
                await client.call("no.such.method", timeout=10)
            except ucxrpc.MethodNotFound:
                pass
            print(f"rpc: sent {', '.join(p.name for p in QUEUED)} while 'hold' has the only slot")
            print(f"rpc: calls running or queued on the server: {server.inflight}")
            gate.set()
            await holder
            await asyncio.gather(*jobs)
            print(f"rpc: start order: {', '.join(started)}")
    finally:
        await server.stop(grace=1.0)


# --8<-- [end:rpc]


async def raw_priorities(manager: ucxrpc.Manager) -> None:
    receiver = Worker(manager=manager)
    # --8<-- [start:raw]
    sender = Worker(WorkerConfig(send_window=1), manager=manager)
    try:
        port = await receiver.listen()
        endpoint = await sender.connect("127.0.0.1", port)
        # All four sends start in one go: the first takes the window, the rest queue.
        sends = [asyncio.ensure_future(sender.send_tag(endpoint, 0, bytes(4 << 20)))]
        sends += [
            asyncio.ensure_future(sender.send_tag(endpoint, p + 1, p.name, priority=p))
            for p in QUEUED
        ]
        await asyncio.gather(*sends)
        # --8<-- [end:raw]
        print(f"raw: sent 4 MiB, then {', '.join(p.name for p in QUEUED)} with send_window=1")
        arrived = []
        for _ in sends:
            _, message = await receiver.next_message(timeout=10)
            arrived.append("4 MiB" if message.tag == 0 else message.as_text())
        print(f"raw: arrival order: {', '.join(arrived)}")
    finally:
        await sender.close_all()
        await receiver.close_all()


async def main() -> None:
    async with ucxrpc.Manager() as manager:
        await rpc_priorities(manager)
        await raw_priorities(manager)


if __name__ == "__main__":
    ucxrpc.run(main())
