"""The quick start of docs/index.md: a server, a client and three kinds of call.

Run it::

    python examples/quickstart.py
"""

# --8<-- [start:all]
import ucxrpc

server = ucxrpc.Server()


@server.rpc  # the method name defaults to the function's name
async def echo(text: str) -> str:
    return "REPLY:" + text


@server.rpc
def add(a: int, b: int) -> int:  # a plain function: runs in the manager's thread pool
    return a + b


@server.rpc
async def log(message: str) -> None:
    print(message)


async def main() -> None:
    async with ucxrpc.Manager() as manager:
        await server.start(manager, host="127.0.0.1", port=0)  # port 0: pick a free one
        client = await manager.connect("127.0.0.1", server.port)
        async with client:  # closes the connection
            reply = await client.call("echo", "hi", timeout=1.0, priority=ucxrpc.Priority.HIGH)
            assert reply == "REPLY:hi"
            assert await client.call("add", 2, b=3) == 5
            await client.notify("log", "fire and forget")  # one-way, no reply
        await server.stop(grace=5.0)  # let in-flight calls finish


ucxrpc.run(main())  # runs the coroutine on uvloop
# --8<-- [end:all]
