"""Priority admission on plain asyncio (no UCX)."""

from __future__ import annotations

import asyncio

from conftest import until

from ucxrpc.io.sched import PriorityLimiter


async def test_waiters_start_by_priority_then_fifo() -> None:
    limiter = PriorityLimiter(1)
    await limiter.acquire()
    order: list[str] = []

    async def job(name: str, priority: int) -> None:
        await limiter.acquire(priority)
        order.append(name)
        limiter.release()

    tasks = [
        asyncio.create_task(job(name, prio))
        for name, prio in [("low1", 0), ("normal1", 1), ("high1", 2), ("low2", 0), ("high2", 2)]
    ]
    await until(lambda: not (limiter.waiting < len(tasks)))
    limiter.release()
    await asyncio.gather(*tasks)
    assert order == ["high1", "high2", "normal1", "low1", "low2"]
    assert limiter.held == 0


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    limiter = PriorityLimiter(1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    limiter.release()
    assert limiter.held == 0
    assert limiter.try_acquire()


async def test_unlimited() -> None:
    limiter = PriorityLimiter(None)
    for _ in range(100):
        assert limiter.try_acquire()


async def test_keys_take_turns_within_a_priority() -> None:
    limiter = PriorityLimiter(1)
    await limiter.acquire()
    order: list[str] = []

    async def wait(key: str, priority: int = 1) -> None:
        await limiter.acquire(priority, key)
        order.append(key)
        limiter.release()

    # A flooder queues 50 calls before the other client's two.
    tasks = [asyncio.ensure_future(wait("flood")) for _ in range(50)]
    tasks += [asyncio.ensure_future(wait("other")) for _ in range(2)]
    tasks.append(asyncio.ensure_future(wait("urgent", 2)))
    await asyncio.sleep(0)
    limiter.release()
    await asyncio.gather(*tasks)
    assert order[0] == "urgent"  # a higher priority first
    assert order.index("other") <= 2 and order[1:5].count("other") == 2
    assert order.count("flood") == 50
