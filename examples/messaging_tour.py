"""The tag-messaging layer of docs/messaging.md in one program: listen, connect, send,
receive, poll, statistics.

Run it::

    python examples/messaging_tour.py
"""

# --8<-- [start:all]
import ucxrpc
from ucxrpc.transport import Worker, WorkerConfig


async def main() -> None:
    async with ucxrpc.Manager() as manager:
        server = Worker(WorkerConfig(buffer_size=64 * 1024), manager=manager)
        client = Worker(manager=manager)
        port = await server.listen("127.0.0.1", 0)  # accept peers; 0 picks a port
        ep = await client.connect("127.0.0.1", port)  # -> endpoint id

        await client.send_tag(ep, 7, b"PING")  # returns once it has left
        peer, msg = await server.next_message(timeout=5)  # oldest message from anyone
        await server.send_tag(peer, msg.tag, b"PONG")  # reply on the same tag
        assert await client.recv_tag(ep, 7, timeout=5) == b"PONG"

        assert client.try_recv_tag(ep, 7) is None  # nothing there: None at once
        print(client.stats().summary())
        await client.close_all()
        await server.close_all()


ucxrpc.run(main())
# --8<-- [end:all]
