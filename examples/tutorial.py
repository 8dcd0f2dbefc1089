"""The tutorial (docs/tutorial.md) as one program: every snippet it shows comes from here.

Run it::

    python examples/tutorial.py

It prints what the tutorial says each step prints, and checks the rest with asserts.
"""

# --8<-- [start:head]
import asyncio

# --8<-- [end:head]
# --8<-- [start:validation_import]
from pydantic import BaseModel

# --8<-- [end:validation_import]
# --8<-- [start:import]
import ucxrpc

# --8<-- [end:import]
# --8<-- [start:lookup_import]
from ucxrpc import RpcError, StatusCode

# --8<-- [end:lookup_import]
# --8<-- [start:handlers]
server = ucxrpc.Server()


@server.rpc
async def ping() -> str:
    return "PONG"


@server.rpc(name="echo")
async def echo_text(text: str) -> str:
    return "REPLY:" + text


@server.rpc
def checksum(data: bytes) -> int:
    return sum(data) & 0xFFFFFFFF


# --8<-- [end:handlers]


# --8<-- [start:validation]
class EchoRequest(BaseModel):
    text: str
    times: int = 1


class EchoReply(BaseModel):
    text: str


@server.rpc
async def shout(req: EchoRequest) -> EchoReply:
    return EchoReply(text=req.text.upper() * req.times)


@server.rpc
def add(a: int, b: int) -> int:
    return a + b


# --8<-- [end:validation]

slow_cancelled = asyncio.Event()


# --8<-- [start:slow]
@server.rpc
async def slow(seconds: float) -> str:
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        print("slow: cancelled")  # runs when the deadline passes
        slow_cancelled.set()
        raise
    return "done"


# --8<-- [end:slow]


# --8<-- [start:report]
@server.rpc(timeout=2.0)
async def report() -> str:
    ...
    # --8<-- [end:report]
    await asyncio.sleep(0.1)
    return "report"


# --8<-- [start:boom]
@server.rpc
async def boom() -> None:
    raise ValueError("bad value")


# --8<-- [end:boom]


# --8<-- [start:lookup]
@server.rpc
async def lookup(key: str) -> str:
    raise RpcError(StatusCode.NOT_FOUND, f"no such key: {key}", {"key": key})


# --8<-- [end:lookup]


def priority_server() -> ucxrpc.Server:
    """The server of the Priorities section."""
    # --8<-- [start:priorities]
    server = ucxrpc.Server(max_concurrency=4)

    @server.rpc(priority=ucxrpc.Priority.HIGH)
    async def health() -> str:
        return "ok"

    @server.rpc
    async def work(job: str) -> None:
        ...
        # --8<-- [end:priorities]
        await asyncio.sleep(0)

    return server


async def tour(manager: ucxrpc.Manager, client: ucxrpc.Client) -> None:
    """The tutorial's other steps, on the same connection."""
    # --8<-- [start:validation_calls]
    await client.call("add", "4", 3)  # 7: "4" is converted
    await client.call("shout", {"text": "a", "times": 2})  # {'text': 'AA'}
    # --8<-- [end:validation_calls]
    assert await client.call("add", "4", 3) == 7
    assert await client.call("shout", {"text": "a", "times": 2}) == {"text": "AA"}

    # --8<-- [start:invalid]
    try:
        await client.call("add", "x", 3)
    except ucxrpc.InvalidArgument as exc:
        print(exc.message)
        # a: Input should be a valid integer, unable to parse string as an integer

    try:
        await client.call("shout", {"text": "a", "times": "x"})
    except ucxrpc.InvalidArgument as exc:
        print(exc.message)
        # req.times: Input should be a valid integer, unable to parse string as an integer
    # --8<-- [end:invalid]

    # --8<-- [start:slow_call]
    try:
        await client.call("slow", 5.0, timeout=0.2)
    except ucxrpc.DeadlineExceeded:
        ...
    # --8<-- [end:slow_call]
    await asyncio.wait_for(slow_cancelled.wait(), 5.0)
    assert await client.call("report") == "report"

    busy = priority_server()
    await busy.start(manager, host="127.0.0.1", port=0)
    async with await manager.connect("127.0.0.1", busy.port) as other:
        client, kept = other, client
        # --8<-- [start:priority_calls]
        await client.call("work", "nightly-report", priority=ucxrpc.Priority.LOW)
        await client.call("work", "user-request", priority=ucxrpc.Priority.HIGH)
        # --8<-- [end:priority_calls]
        assert await client.call("health") == "ok"
        client = kept
    await busy.stop(grace=1.0)

    # --8<-- [start:boom_call]
    try:
        await client.call("boom")
    except ucxrpc.RemoteError as exc:
        print(exc.remote_type)  # ValueError
        print(exc.message)  # bad value
        print(exc.remote_traceback)  # "" by default: the server keeps its traceback
    # --8<-- [end:boom_call]

    # --8<-- [start:lookup_call]
    try:
        await client.call("lookup", "k")
    except RpcError as exc:
        print(exc.code.name, exc.message, exc.details)
        # NOT_FOUND no such key: k {'key': 'k'}
    # --8<-- [end:lookup_call]


async def connection_loss(manager: ucxrpc.Manager) -> None:
    """A server that goes away with a call pending: the call fails with ConnectionLost."""
    doomed = ucxrpc.Server()

    @doomed.rpc
    async def report() -> str:
        await asyncio.sleep(30)
        return "never"

    await doomed.start(manager, host="127.0.0.1", port=0)
    client = await manager.connect("127.0.0.1", doomed.port)
    stopping = asyncio.get_running_loop().call_later(
        0.2, lambda: asyncio.ensure_future(doomed.stop(grace=0.0))
    )
    lost = False
    # --8<-- [start:connection_lost]
    try:
        await client.call("report", timeout=30.0)
    except ucxrpc.ConnectionLost:
        ...  # the server went away; reconnect with manager.connect(...)
        # --8<-- [end:connection_lost]
        lost = True
    stopping.cancel()
    print(f"connection lost: {lost}, client closed: {client.closed}")


async def shutdown() -> None:
    """The Shutdown section, on a manager of its own."""
    # --8<-- [start:shutdown]
    async with ucxrpc.Manager() as manager:
        await server.start(manager)
        ...
        await server.stop(grace=5.0)
    # --8<-- [end:shutdown]


# --8<-- [start:main]
async def main() -> None:
    async with ucxrpc.Manager() as manager:
        await server.start(manager, host="127.0.0.1", port=0)
        async with await manager.connect("127.0.0.1", server.port) as client:
            print(await client.call("ping"))  # PONG
            print(await client.call("echo", "hi"))  # REPLY:hi
            print(await client.call("checksum", b"abc"))  # 294
            # --8<-- [end:main]
            await tour(manager, client)
        await connection_loss(manager)
        # --8<-- [start:main_end]
        await server.stop(grace=5.0)


ucxrpc.run(main())
# --8<-- [end:main_end]
ucxrpc.run(shutdown())
