"""Authentication: a shared ``auth_token`` checked by an HMAC handshake before any call.

Run it::

    python examples/auth.py

With ``Config.auth_token`` set (or ``UCXRPC_AUTH_TOKEN``), the two sides of every
connection prove to each other that they know the token before the server serves a
call: a client without it, or with another one, is refused with ``Unauthenticated``.
A server started beyond loopback without a token warns (``InsecureWarning``).
"""

from __future__ import annotations

import warnings

import ucxrpc

server = ucxrpc.Server()


@server.rpc
async def secret() -> str:
    return "the answer is 42"


async def main() -> None:
    # --8<-- [start:token]
    token = "correct horse battery staple"  # in practice: from a secret store
    async with (
        ucxrpc.Manager(auth_token=token) as server_side,
        ucxrpc.Manager(auth_token=token) as client_side,
    ):
        await server.start(server_side, host="127.0.0.1", port=0)
        async with await client_side.connect("127.0.0.1", server.port) as client:
            print("with the token:", await client.call("secret"))

        for label, other in [("no token", None), ("another token", "guess")]:
            async with ucxrpc.Manager(auth_token=other) as intruder:
                try:
                    await intruder.connect("127.0.0.1", server.port)
                except ucxrpc.Unauthenticated as exc:
                    print(f"{label}: {type(exc).__name__}: {exc.message}")
        # --8<-- [end:token]
        await server.stop(grace=1.0)

    # --8<-- [start:warning]
    open_server = ucxrpc.Server()
    async with ucxrpc.Manager() as manager:  # no auth_token
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ucxrpc.InsecureWarning)
            await open_server.start(manager, host="0.0.0.0", port=0)
        await open_server.stop()
    for warning in caught:
        print(f"{warning.category.__name__}: {warning.message}")
    # --8<-- [end:warning]


if __name__ == "__main__":
    ucxrpc.run(main())
