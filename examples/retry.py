"""Retrying idempotent calls that fail with UNAVAILABLE.

Run it (server and client in one process)::

    python examples/retry.py

The server's methods fail the first two calls for each key with ``Unavailable``, as a
server briefly overloaded or restarting would. ``lookup`` is idempotent (declared so in
the service interface) and ``get`` is named idempotent to the interceptor, so both are
retried until they succeed. ``charge`` is not idempotent: repeating a charge that may
have gone through could charge twice, so its failure reaches the caller at once.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import Counter

import ucxrpc
from ucxrpc.retry import RETRY_ATTEMPT_KEY, Retry, RetryPolicy

calls: Counter[str] = Counter()
attempts_seen: list[str] = []


def fail_twice(key: str) -> None:
    """Raise ``Unavailable`` on the first two calls for ``key``."""
    call = ucxrpc.current_call()
    assert call is not None  # always set while a handler runs
    attempts_seen.append(str(call.metadata.get(RETRY_ATTEMPT_KEY, "-")))
    calls[key] += 1
    if calls[key] <= 2:
        raise ucxrpc.Unavailable(f"busy, try {key!r} again")


class CatalogApi(ucxrpc.Service, name="catalog.v1"):
    @ucxrpc.rpc(idempotent=True)
    @abstractmethod
    async def lookup(self, sku: str) -> str: ...


class Catalog(CatalogApi):
    async def lookup(self, sku: str) -> str:
        fail_twice(sku)
        return f"{sku}: in stock"


server = ucxrpc.Server()
server.add_service(Catalog())


@server.rpc
async def get(key: str) -> str:
    fail_twice(key)
    return f"value of {key}"


@server.rpc
async def charge(amount: int) -> str:
    fail_twice(f"charge {amount}")
    return f"charged {amount}"


async def main() -> None:
    policy = RetryPolicy(attempts=4, backoff=0.05)  # linear: 0.05 s, 0.10 s, 0.15 s, ±10%
    exact = RetryPolicy(attempts=4, backoff=0.05, jitter=0.0)
    print("pauses between attempts:", ", ".join(f"{exact.delay(n):.2f} s" for n in (1, 2, 3)))
    retry = Retry(policy, methods=["get"])
    async with ucxrpc.Manager() as manager:
        await server.start(manager, "127.0.0.1", 0)
        async with await manager.connect("127.0.0.1", server.port, interceptors=[retry]) as client:
            value = await client.call("get", "k")
            seen = ", ".join(attempts_seen)
            print(f"get('k') -> {value!r} after {calls['k']} attempts (retry-attempt: {seen})")

            stub = client.stub(CatalogApi)
            print(f"lookup('a1') -> {await stub.lookup('a1')!r} after {calls['a1']} attempts")

            try:
                await client.call("charge", 10)
            except ucxrpc.Unavailable:
                n = calls["charge 10"]
                print(f"charge(10) -> Unavailable after {n} attempt: not idempotent, not retried")
        print(f"attempts made: {retry.attempts_made}, of which retries: {retry.retries}")
        await server.stop(grace=1.0)


if __name__ == "__main__":
    ucxrpc.run(main())
