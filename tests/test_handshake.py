"""The control-connection handshake: transcript authentication, keys, validation, limits.

Most tests drive ``_control.answer`` and ``_control.initiate*`` over real loopback
sockets (no UCX needed: the worker addresses are synthetic but well formed); the relay
tests also run real managers, servers and clients.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import until

import ucxrpc
from ucxrpc.errors import ProtocolError, RpcError, Unauthenticated, Unavailable
from ucxrpc.io import control as _control
from ucxrpc.io import shared
from ucxrpc.io.control import read_message, write_message
from ucxrpc.wire import codec
from ucxrpc.wire.ucxaddr import tl_name_checksum

Message = dict[str, Any]
Edit = Callable[[Message], Message] | None


def fake_address(n: int) -> bytes:
    """A well-formed v1 worker address with one ``self`` interface (id ``n``)."""
    attrs = struct.pack("<fffI", 1e-9, 1e9, 1e-8, 0)
    return (
        b"\x20"  # version 1 (0), flags WORKER_UUID
        + n.to_bytes(8, "little")  # uuid
        + b"\x00\x00"  # md 0, device address of 0 bytes
        + tl_name_checksum("self").to_bytes(2, "little")
        + attrs
        + b"\x88"  # LAST | 8-byte interface address
        + n.to_bytes(8, "little")
        + b"\x85\x80"  # the pseudo device carrying release 21
    )


SERVER_ADDR, CLIENT_ADDR, RELAY_ADDR = fake_address(1), fake_address(2), fake_address(3)
SERVER_KEY, CLIENT_KEY = b"S" * 16, b"C" * 16
SERVER_CID, CLIENT_CID = 4242, 77
EXTRA = {"slot": 4096, "win": 16}


async def shut(writer: asyncio.StreamWriter) -> None:
    """Close a stream and wait until its socket is released."""
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Listener:
    """``asyncio.start_server`` on a free loopback port that, on exit, also waits for
    its connection handlers (Python 3.11's ``wait_closed`` does not)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.tasks: set[asyncio.Task[Any]] = set()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer)
        finally:
            await shut(writer)

    async def __aenter__(self) -> Listener:
        self._server = await asyncio.start_server(self._run, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        pending = {t for t in self.tasks if not t.done()}
        if pending:
            _, late = await asyncio.wait(pending, timeout=5)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        await self._server.wait_closed()


def config(token: str | None = None, timeout: float = 5.0) -> ucxrpc.Config:
    return ucxrpc.Config(auth_token=token, connect_timeout=timeout)


class Answerer(Listener):
    """A TCP server that runs ``_control.answer`` the way ``Server`` does."""

    def __init__(self, cfg: ucxrpc.Config) -> None:
        super().__init__(self._answer)
        self.cfg = cfg
        self.opened: list[Message] = []
        self.outcome: list[Any] = []
        self.done = asyncio.Event()

    def open_conn(self, hello: Message) -> int:
        self.opened.append(hello)
        return SERVER_CID

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ok = await _control.answer(
                reader, writer, self.cfg, SERVER_ADDR, self.open_conn, key=SERVER_KEY
            )
            self.outcome.append(ok)
            if ok:  # as a server does: the connection stays until the client leaves
                await asyncio.wait_for(_control.serve_control(reader, writer), 10)
        except RpcError as exc:
            self.outcome.append(exc)
            _control.refuse(writer, exc)
        except (TimeoutError, ConnectionError) as exc:
            self.outcome.append(exc)
        finally:
            await shut(writer)
            self.done.set()

    async def wait(self) -> Any:
        await asyncio.wait_for(self.done.wait(), 10)
        return self.outcome[-1]


class Relay(Listener):
    """A man in the middle on the control connection: it forwards every message and may
    replace fields of the challenge, the hello or the welcome."""

    def __init__(
        self,
        target: int,
        *,
        challenge: Edit = None,
        hello: Edit = None,
        welcome: Edit = None,
    ) -> None:
        super().__init__(self._relay)
        self.target = target
        self.edits = {"server": [challenge, welcome], "client": [hello]}
        self.seen: list[tuple[str, Message]] = []

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, side: str) -> None:
        edits = self.edits[side]
        n = 0
        try:
            while (msg := await read_message(src)) is not None:
                self.seen.append((side, dict(msg)))
                edit = edits[n] if n < len(edits) else None
                write_message(dst, edit(dict(msg)) if edit else msg)
                await dst.drain()
                n += 1
        except (OSError, RpcError):
            pass
        finally:
            await shut(dst)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(
            self._pump(s_reader, writer, "server"), self._pump(reader, s_writer, "client")
        )


async def connect(
    port: int, cfg: ucxrpc.Config, *, rich: bool = False
) -> _control.Handshake | tuple[bytes, int, int]:
    """Run the connecting side against ``port``; the writer is closed afterwards."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if rich:
            return await _control.initiate_handshake(
                reader, writer, cfg, CLIENT_ADDR, CLIENT_CID, dict(EXTRA), "test", key=CLIENT_KEY
            )
        return await _control.initiate(
            reader, writer, cfg, CLIENT_ADDR, CLIENT_CID, dict(EXTRA), "test"
        )
    finally:
        await shut(writer)


# -- the happy path ---------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "s3cret"])
async def test_handshake_exchanges_addresses_ids_limits_and_keys(token: str | None) -> None:
    async with Answerer(config(token)) as srv:
        done = await connect(srv.port, config(token), rich=True)
        assert await srv.wait() is True
    # Both sides run in this process, so each proved it can map the other's files and
    # read the other's memory.
    memory = done.peer_memory
    assert memory is not None and memory.pid == os.getpid()
    memory.close()
    assert done == _control.Handshake(
        SERVER_ADDR,
        SERVER_CID,
        config().max_message_size,
        SERVER_KEY,
        CLIENT_KEY,
        os.getpid(),
        True,
        memory,
        True,
    )
    (hello,) = srv.opened
    assert hello["key"] == CLIENT_KEY  # unmasked for open_conn
    assert hello["pid"] == os.getpid()
    assert hello["memory"] is not None and hello["memory"].pid == os.getpid()
    hello["memory"].close()
    assert (hello["addr"], hello["cid"], hello["slot"], hello["win"]) == (
        CLIENT_ADDR,
        CLIENT_CID,
        4096,
        16,
    )


async def test_the_tuple_form_of_initiate_still_works() -> None:
    async with Answerer(config()) as srv:
        assert await connect(srv.port, config()) == (
            SERVER_ADDR,
            SERVER_CID,
            config().max_message_size,
        )


async def test_random_keys_when_none_are_given() -> None:
    async with Answerer(config()) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        done = await _control.initiate_handshake(
            reader, writer, config(), CLIENT_ADDR, 5, dict(EXTRA), "test"
        )
        await shut(writer)
        await srv.wait()
    assert len(done.local_key) == _control.KEY_SIZE >= 8
    assert srv.opened[0]["key"] == done.local_key != CLIENT_KEY


# -- authentication ----------------------------------------------------------------------


async def test_wrong_token_is_refused_on_both_sides() -> None:
    async with Answerer(config("right")) as srv:
        with pytest.raises(Unauthenticated):
            await connect(srv.port, config("wrong"))
        assert isinstance(await srv.wait(), Unauthenticated)
    assert srv.opened == []


async def test_missing_proof_is_refused() -> None:
    async with Answerer(config("right")) as srv:
        with pytest.raises(Unauthenticated, match="bad or missing"):
            await connect(srv.port, config(None))
        assert isinstance(await srv.wait(), Unauthenticated)
    assert srv.opened == []


async def test_a_server_without_the_token_cannot_pass_as_one() -> None:
    async with Answerer(config(None)) as srv:
        with pytest.raises(Unauthenticated, match="did not prove"):
            await connect(srv.port, config("s3cret"))


async def test_a_server_cannot_reflect_the_clients_proof() -> None:
    """Role separation: the client's own proof is not a valid server proof."""

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        write_message(writer, {"v": codec.VERSION, "challenge": b"c" * 16})
        hello = await read_message(reader)
        assert hello is not None
        write_message(
            writer,
            {
                "v": codec.VERSION,
                "addr": SERVER_ADDR,
                "cid": 9,
                "max": 1 << 20,
                "key": SERVER_KEY,
                "proof": hello["proof"],
            },
        )
        await reader.read()

    async with Listener(fake) as server:
        with pytest.raises(Unauthenticated):
            await connect(server.port, config("s3cret"))


def _replace(field: str, value: Any) -> Callable[[Message], Message]:
    def edit(msg: Message) -> Message:
        msg[field] = value
        return msg

    return edit


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("addr", RELAY_ADDR),  # a relay putting itself on the data path
        ("cid", 99),
        ("max", 1 << 40),
        ("key", b"R" * 16),
        ("slot", 8192),
        ("win", 1),
        ("nonce", b"n" * 16),
    ],
)
async def test_a_relay_that_changes_a_hello_field_fails_authentication(
    field: str, value: Any
) -> None:
    async with (
        Answerer(config("s3cret")) as srv,
        Relay(srv.port, hello=_replace(field, value)) as mitm,
    ):
        with pytest.raises(Unauthenticated):
            await connect(mitm.port, config("s3cret"))
        assert isinstance(await srv.wait(), Unauthenticated)
    assert srv.opened == []  # open_conn (which makes the UCX endpoint) never ran


@pytest.mark.parametrize(
    ("field", "value"),
    [("addr", RELAY_ADDR), ("cid", 99), ("max", 1 << 40), ("key", b"R" * 16)],
)
async def test_a_tampered_welcome_field_fails_authentication(field: str, value: Any) -> None:
    async with (
        Answerer(config("s3cret")) as srv,
        Relay(srv.port, welcome=_replace(field, value)) as mitm,
    ):
        with pytest.raises(Unauthenticated, match="did not prove"):
            await connect(mitm.port, config("s3cret"))


async def test_a_tampered_challenge_fails_authentication() -> None:
    edit = _replace("challenge", b"x" * 16)
    async with Answerer(config("s3cret")) as srv, Relay(srv.port, challenge=edit) as mitm:
        with pytest.raises(Unauthenticated):
            await connect(mitm.port, config("s3cret"))
    assert srv.opened == []


async def test_a_forwarding_relay_learns_no_key() -> None:
    """With a token, the keys travel masked: what a relay sees is not what is used."""
    async with Answerer(config("s3cret")) as srv, Relay(srv.port) as mitm:
        done = await connect(mitm.port, config("s3cret"), rich=True)
        await srv.wait()
    assert isinstance(done, _control.Handshake)
    seen = dict(mitm.seen)
    assert seen["client"]["key"] not in (CLIENT_KEY, SERVER_KEY)
    assert seen["server"]["key"] not in (CLIENT_KEY, SERVER_KEY)
    assert (srv.opened[0]["key"], done.peer_key) == (CLIENT_KEY, SERVER_KEY)
    # Fresh randomness on both sides: the same keys travel differently every time.
    async with Answerer(config("s3cret")) as srv, Relay(srv.port) as again:
        await connect(again.port, config("s3cret"))
        await srv.wait()
    assert dict(again.seen)["client"]["key"] != seen["client"]["key"]


def test_proofs_are_compared_in_constant_time() -> None:
    source = inspect.getsource(_control)
    tree = ast.parse(source)
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("compare_digest")
    ]
    assert calls, "hmac.compare_digest is not used"
    secretish = ("proof", "mac", "digest", "hmac", "expected")
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
            isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops
        ):
            for operand in (node.left, *node.comparators):
                if isinstance(operand, ast.Constant):
                    continue
                text = ast.unparse(operand).lower()
                assert not any(word in text for word in secretish), (
                    f"line {node.lineno}: {ast.unparse(node)} compares a proof with ==/!="
                )


# -- relays against real servers and clients ---------------------------------------------


@pytest.fixture
async def secured() -> AsyncIterator[tuple[ucxrpc.Manager, ucxrpc.Server, list[str]]]:
    """A server that requires a token, and a record of the handler calls it ran."""
    ran: list[str] = []
    async with ucxrpc.Manager(auth_token="s3cret") as manager:
        server = ucxrpc.Server()

        @server.rpc
        async def ping() -> str:
            ran.append("ping")
            return "PONG"

        await server.start(manager, "127.0.0.1", 0)
        yield manager, server, ran
        await server.stop()


async def test_a_relay_cannot_put_itself_on_the_data_path(
    secured: tuple[ucxrpc.Manager, ucxrpc.Server, list[str]],
) -> None:
    manager, server, ran = secured
    async with ucxrpc.Manager() as relay_side, ucxrpc.Manager(auth_token="s3cret") as victim:
        own = relay_side.worker_address
        substitute = _replace("addr", own)
        async with Relay(server.port, hello=substitute) as mitm:
            with pytest.raises(Unauthenticated):
                await victim.connect("127.0.0.1", mitm.port)
        async with Relay(server.port, welcome=substitute) as mitm:
            with pytest.raises(Unauthenticated):
                await victim.connect("127.0.0.1", mitm.port)
        assert ran == []
        # The honest path (through a relay that only forwards) still works.
        async with Relay(server.port) as relay, await victim.connect("127.0.0.1", relay.port) as c:
            assert await c.call("ping") == "PONG"
    assert ran == ["ping"]
    await until(lambda: manager.connections == 0, timeout=5)


async def test_a_client_with_the_wrong_token_cannot_call(
    secured: tuple[ucxrpc.Manager, ucxrpc.Server, list[str]],
) -> None:
    _, server, ran = secured
    for token in ("wrong", None):
        async with ucxrpc.Manager(auth_token=token) as other:
            with pytest.raises(Unauthenticated):
                await other.connect("127.0.0.1", server.port)
    assert ran == []


# -- strict validation -------------------------------------------------------------------


def _good_hello(first: Message) -> Message:
    return {
        "v": first["v"],
        "addr": CLIENT_ADDR,
        "cid": CLIENT_CID,
        "max": 1 << 20,
        "nonce": b"n" * 16,
        "key": CLIENT_KEY,
        **EXTRA,
    }


async def _raw_hello(port: int, edit: Callable[[Message], None]) -> Message | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        first = await asyncio.wait_for(read_message(reader), 5)
        assert first is not None and set(first) == {"v", "challenge"}
        hello = _good_hello(first)
        edit(hello)
        write_message(writer, hello)
        return await asyncio.wait_for(read_message(reader), 5)
    finally:
        await shut(writer)


BAD_HELLOS: dict[str, Callable[[Message], None]] = {
    "unknown field": lambda h: h.update(extra=1),
    "no key": lambda h: h.pop("key"),
    "short key": lambda h: h.update(key=b"k" * 7),
    "str key": lambda h: h.update(key="k" * 16),
    "no nonce": lambda h: h.pop("nonce"),
    "long nonce": lambda h: h.update(nonce=b"n" * 17),
    "no addr": lambda h: h.pop("addr"),
    "junk addr": lambda h: h.update(addr=os.urandom(40)),
    "str addr": lambda h: h.update(addr="x"),
    "cid 0": lambda h: h.update(cid=0),
    "cid too big": lambda h: h.update(cid=codec.MAX_CONN_ID + 1),
    "bool cid": lambda h: h.update(cid=True),
    "float max": lambda h: h.update(max=1.5),
    "max 0": lambda h: h.update(max=0),
    "slot too small": lambda h: h.update(slot=8),
    "slot too big": lambda h: h.update(slot=1 << 40),
    "win 0": lambda h: h.update(win=0),
    "huge win": lambda h: h.update(win=1 << 20),
    "unknown role": lambda h: h.update(role="admin"),
    "short proof": lambda h: h.update(proof=b"p"),
    "short shm": lambda h: h.update(shm=b"\0" * 7),
    "long shm": lambda h: h.update(shm=b"\0" * 9),
    "str shm": lambda h: h.update(shm="12345678"),
    "int shm": lambda h: h.update(shm=12345678),
    "bool version": lambda h: h.update(v=True),
    "no version": lambda h: h.pop("v"),
}


@pytest.mark.parametrize("name", list(BAD_HELLOS))
async def test_every_hello_field_is_validated_before_open_conn(name: str) -> None:
    async with Answerer(config()) as srv:
        reply = await _raw_hello(srv.port, BAD_HELLOS[name])
        outcome = await srv.wait()
    assert isinstance(outcome, ProtocolError), outcome
    assert reply is not None and reply["error"] == int(ucxrpc.StatusCode.INTERNAL)
    assert srv.opened == []


def _fake_server(welcome: Callable[[Message], Message | bytes]) -> Listener:
    """A server that sends a challenge, then ``welcome(hello)`` (a message or raw bytes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        write_message(writer, {"v": codec.VERSION, "challenge": b"c" * 16})
        hello = await read_message(reader)
        if hello is not None:
            reply = welcome(hello)
            if isinstance(reply, bytes):
                writer.write(reply)
            else:
                write_message(writer, reply)
            await writer.drain()
            await reader.read()

    return Listener(handle)


def _welcome(**changes: Any) -> Callable[[Message], Message]:
    def make(hello: Message) -> Message:
        msg: Message = {"v": codec.VERSION, "addr": SERVER_ADDR, "cid": 9, "max": 1 << 20}
        msg["key"] = SERVER_KEY
        msg.update(changes)
        return {k: v for k, v in msg.items() if v is not None}

    return make


@pytest.mark.parametrize(
    "changes",
    [
        {"addr": b"\x0f" + SERVER_ADDR[1:]},  # the version nibble UCX asserts on
        {"addr": SERVER_ADDR[:-1]},
        {"cid": 0},
        {"cid": "9"},
        {"max": -1},
        {"key": None},
        {"key": b"k"},
        {"extra": 1},
        {"shm": b"\0" * 7},
        {"shm": 1},
    ],
    ids=repr,
)
async def test_a_malformed_welcome_is_refused_before_it_reaches_ucx(changes: Message) -> None:
    async with _fake_server(_welcome(**changes)) as server:
        with pytest.raises(ProtocolError, match="malformed welcome"):
            await connect(server.port, config())


# -- limits and timeouts -----------------------------------------------------------------


async def test_an_oversized_hello_is_refused_from_its_length_alone() -> None:
    async with ucxrpc.Manager(connect_timeout=30) as manager:
        server = ucxrpc.Server()

        @server.rpc
        async def ping() -> str:
            return "PONG"

        await server.start(manager, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await read_message(reader)
        announced = 512 * 1024  # above the 64 KiB hello limit, far below the old 1 MiB
        writer.write(announced.to_bytes(4, "big") + b"\x80" * 100)  # and then nothing
        await writer.drain()
        reply = await asyncio.wait_for(read_message(reader), 3)
        assert reply is not None and "oversized" in reply["message"], reply
        assert await asyncio.wait_for(reader.read(), 3) == b""  # and the server hung up
        await shut(writer)
        async with await manager.connect("127.0.0.1", server.port) as client:
            assert await client.call("ping") == "PONG"
        await server.stop()


async def test_an_oversized_welcome_is_refused_from_its_length_alone() -> None:
    async with _fake_server(lambda hello: (10 << 20).to_bytes(4, "big")) as server:
        with pytest.raises(ProtocolError, match="oversized"):
            await asyncio.wait_for(connect(server.port, config(), rich=False), 3)


@pytest.mark.parametrize(
    "sent", [b"", b"\x00\x00\x00\x40" + b"\x80" * 10], ids=["silent", "partial"]
)
async def test_the_server_gives_up_on_a_hello_that_does_not_come(sent: bytes) -> None:
    async with Answerer(config(timeout=0.3)) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        assert await read_message(reader) is not None
        writer.write(sent)
        start = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - start < 3
        assert isinstance(await srv.wait(), TimeoutError)
        await shut(writer)
    assert srv.opened == []


@pytest.mark.parametrize("stage", ["challenge", "welcome"])
async def test_the_client_gives_up_on_a_silent_server(stage: str) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if stage == "welcome":
            write_message(writer, {"v": codec.VERSION, "challenge": b"c" * 16})
        await reader.read()  # never answers

    async with Listener(silent) as server:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(connect(server.port, config(timeout=0.3), rich=False), 5)
        assert time.monotonic() - start < 3


async def test_a_server_that_hangs_up_is_unavailable() -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await shut(writer)

    async with Listener(rude) as server:
        with pytest.raises(Unavailable, match="closed the connection"):
            await connect(server.port, config())


@pytest.mark.parametrize(("server_shares", "client_shares"), [(True, False), (False, True)])
async def test_shared_parts_need_both_sides(server_shares: bool, client_shares: bool) -> None:
    async with Answerer(ucxrpc.Config(shared_memory=server_shares)) as srv:
        done = await connect(srv.port, ucxrpc.Config(shared_memory=client_shares), rich=True)
        assert await srv.wait() is True
    assert isinstance(done, _control.Handshake) and done.peer_pid is None
    (hello,) = srv.opened
    assert hello["pid"] is None
    assert ("shm" in hello) is client_shares


async def test_a_probe_naming_a_file_without_the_nonce_is_not_trusted() -> None:
    # The hello's nonce is b"n" * 16; this file holds something else.
    fd, field = shared.make_probe(b"not the nonce...")
    try:
        async with Answerer(config()) as srv:
            reply = await _raw_hello(srv.port, lambda h: h.update(shm=field))
            assert await srv.wait() is True
        assert reply is not None and "shm" not in reply  # no probe offered back
        (hello,) = srv.opened
        assert hello["pid"] is None
    finally:
        os.close(fd)


async def test_a_probe_holding_the_nonce_is_trusted() -> None:
    fd, field = shared.make_probe(b"n" * 16)
    try:
        async with Answerer(config()) as srv:
            reply = await _raw_hello(srv.port, lambda h: h.update(shm=field))
            assert await srv.wait() is True
        assert reply is not None and len(reply["shm"]) == 16
        # The probe offered no memory to read, so the server reads none and offers none.
        assert not shared.offers_memory(reply["shm"])
        (hello,) = srv.opened
        assert hello["pid"] == os.getpid()
    finally:
        os.close(fd)


_RELAY = """
import asyncio, sys
target = int(sys.argv[1])
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    finally:
        w.close()
async def handle(r, w):
    r2, w2 = await asyncio.open_connection("127.0.0.1", target)
    await asyncio.gather(pipe(r, w2), pipe(r2, w))
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()
asyncio.run(main())
"""


async def test_a_probe_relayed_by_another_process_is_not_trusted() -> None:
    """The probe names a process that can be read, but not the one at the other end of
    the control connection (a relay is): shared parts stay off."""
    async with Answerer(config()) as srv:
        relay = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _RELAY, str(srv.port), stdout=asyncio.subprocess.PIPE
        )
        try:
            assert relay.stdout is not None
            port = int(await asyncio.wait_for(relay.stdout.readline(), 10))
            done = await connect(port, config(), rich=True)
            assert await srv.wait() is True
        finally:
            relay.kill()
            await relay.wait()
    (hello,) = srv.opened
    assert "shm" in hello and hello["pid"] is None
    assert isinstance(done, _control.Handshake) and done.peer_pid is None
