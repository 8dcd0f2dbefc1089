"""Interceptors: logging, metrics and token auth around every call, plus call metadata.

Run it (server and clients in one process)::

    python examples/interceptors.py

The server logs each call to stderr, counts calls per method and refuses calls
without the bearer token. One client sends the token (and a request id, added by an
interceptor written as a plain function); another does not, and is refused.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import ucxrpc
from ucxrpc.interceptors import Proceed

TOKEN = "s3cret"
_request_ids = itertools.count(1)


async def add_request_id(ctx: ucxrpc.CallContext, proceed: Proceed) -> Any:
    """A client interceptor: tag each request with an id, before it is sent."""
    ctx.metadata["x-request-id"] = f"req-{next(_request_ids)}"
    return await proceed()


def build_server(*interceptors: ucxrpc.Interceptor) -> ucxrpc.Server:
    server = ucxrpc.Server(interceptors=interceptors)

    @server.rpc
    async def greet(name: str) -> str:
        return f"hello, {name}"

    @server.rpc
    async def whoami() -> str:
        """Answers with what the request carried, and sends metadata back."""
        call = ucxrpc.current_call()
        assert call is not None  # always set while a handler runs
        request_id = call.metadata.get("x-request-id", "-")
        call.response_metadata["x-request-id"] = request_id
        call.response_metadata["served-by"] = "example-server"
        return f"request {request_id!s} from {call.peer}"

    return server


def print_metrics(snapshot: dict[str, dict[str, Any]]) -> None:
    print(f"{'method':<8} {'calls':>5}  {'errors':<20} {'mean':>9}")
    for method, m in snapshot.items():
        errors = ", ".join(f"{code}={n}" for code, n in m["errors"].items()) or "-"
        mean_ms = m["mean_seconds"] * 1e3
        print(f"{method:<8} {m['calls']:>5}  {errors:<20} {mean_ms:>6.3f} ms")


async def main() -> None:
    # The LoggingInterceptor writes to the "ucxrpc.calls" logger: show it on stderr.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ucxrpc.calls").setLevel(logging.INFO)
    server = build_server(
        ucxrpc.LoggingInterceptor(),
        metrics := ucxrpc.MetricsInterceptor(),
        ucxrpc.TokenAuth(TOKEN),
    )
    async with ucxrpc.Manager() as manager:
        await server.start(manager, "127.0.0.1", 0)
        host, port = "127.0.0.1", server.port

        client = await manager.connect(
            host, port, interceptors=[ucxrpc.TokenAuth(TOKEN), add_request_id]
        )
        for name in ("ada", "grace", "linus"):
            print(await client.call("greet", name))
        reply, metadata = await client.call_with_metadata("whoami")
        print(f"whoami -> {reply}")
        print(f"response metadata: {dict(sorted(metadata.items()))}")

        anonymous = await manager.connect(host, port)  # no interceptors: no token
        try:
            await anonymous.call("greet", "mallory")
        except ucxrpc.Unauthenticated as exc:
            print(f"without the token: Unauthenticated: {exc.message}")

        await anonymous.close()
        await client.close()
        await server.stop(grace=1.0)

    print_metrics(metrics.snapshot())


if __name__ == "__main__":
    ucxrpc.run(main())
