"""A concurrent burst: 1,000 calls and 1,000 raw sends in flight at once, awaited together.

Run it (every side in one process)::

    python examples/burst.py

Every operation is started at once and awaited with ``asyncio.gather(...,
return_exceptions=True)``, so one failure does not hide the others: each slot of the
result holds a value or the exception that operation raised. A few operations fail on
purpose (the server refuses every 200th number; every 200th raw send names an endpoint
that does not exist), and the counts of successes and failures are printed with the
time the whole burst took.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence

import ucxrpc
from ucxrpc.transport import Worker

#: Operations in each burst.
N = 1000
#: Every FAIL_EVERY-th operation fails on purpose.
FAIL_EVERY = 200
#: An endpoint id that the sending worker does not have.
NO_SUCH_ENDPOINT = 999

server = ucxrpc.Server()


@server.rpc
async def square(n: int) -> int:
    if n % FAIL_EVERY == FAIL_EVERY - 1:
        raise ucxrpc.InvalidArgument(f"{n} is refused on purpose")
    return n * n


def report(what: str, results: Sequence[object], seconds: float) -> list[int]:
    """Print the counts of a burst; return the indexes that succeeded."""
    ok = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    failures = Counter(type(r).__name__ for r in results if isinstance(r, BaseException))
    kinds = ", ".join(f"{name} x{count}" for name, count in sorted(failures.items()))
    print(
        f"{what}: {len(results)} in flight at once, {len(ok)} ok, "
        f"{len(results) - len(ok)} failed ({kinds or 'none'}) in {seconds * 1e3:.1f} ms"
    )
    first = next((r for r in results if isinstance(r, ucxrpc.RpcError)), None)
    if first is not None:
        print(f"  first failure: {type(first).__name__}: {first.message}")
    return ok


# --8<-- [start:calls]
async def burst_calls(client: ucxrpc.Client) -> None:
    start = time.perf_counter()
    results = await asyncio.gather(
        *(client.call("square", n, timeout=10) for n in range(N)), return_exceptions=True
    )
    ok = report("calls", results, time.perf_counter() - start)
    correct = sum(results[i] == i * i for i in ok)
    print(f"  {correct} of the {len(ok)} results are correct")


# --8<-- [end:calls]


async def burst_sends(manager: ucxrpc.Manager) -> None:
    receiver, sender = Worker(manager=manager), Worker(manager=manager)
    try:
        port = await receiver.listen()
        endpoint = await sender.connect("127.0.0.1", port)
        start = time.perf_counter()
        # --8<-- [start:sends]
        results = await asyncio.gather(
            *(
                sender.send_tag(
                    NO_SUCH_ENDPOINT if i % FAIL_EVERY == FAIL_EVERY - 1 else endpoint,
                    1,
                    i.to_bytes(4, "big"),
                )
                for i in range(N)
            ),
            return_exceptions=True,
        )
        # --8<-- [end:sends]
        ok = report("raw sends", results, time.perf_counter() - start)
        received = set()
        for _ in ok:  # exactly the messages that were sent
            _, message = await receiver.next_message(timeout=5)
            received.add(int.from_bytes(message.data, "big"))
        print(
            f"  the receiver got {len(received)} distinct messages, all sent ones: "
            f"{received == set(ok)}"
        )
        print(f"  sender stats: {sender.stats().messages_sent} messages sent")
    finally:
        await sender.close_all()
        await receiver.close_all()


async def main() -> None:
    async with ucxrpc.Manager() as manager:
        await server.start(manager, "127.0.0.1", 0)
        async with await manager.connect("127.0.0.1", server.port) as client:
            await burst_calls(client)
        await burst_sends(manager)
        await server.stop(grace=1.0)


if __name__ == "__main__":
    ucxrpc.run(main())
