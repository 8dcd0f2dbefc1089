"""The bootstrap/control connection: an asyncio TCP stream beside the UCX data path.

It binds where the user says (127.0.0.1 by default), carries the handshake (protocol
version, UCX worker addresses, connection ids, per-connection keys, limits,
authentication) and stays open for the life of the connection: its end is the
liveness signal, so a peer whose process dies is noticed at once (the kernel closes
its sockets), not at a call's timeout.

The handshake, three messages (each a 4-byte length and a msgpack map, at most
:data:`HELLO_LIMIT` bytes, each read under ``config.connect_timeout``)::

    server -> client   challenge  {v, challenge}
    client -> server   hello      {v, addr, cid, max, nonce, key, [proof], slot?, win?, role?,
                                   eh?, shm?}
    server -> client   welcome    {v, addr, cid, max, key, [proof], shm?}   or {error, message}

* Every field is checked (type, range, length; the worker address by
  :func:`ucxrpc.wire.ucxaddr.validate_worker_address`) before anything reaches UCX, and a
  message with a missing, malformed or unknown field is a :class:`ProtocolError`.
* ``key`` is a random 16-byte secret of the sender's connection: the secret the sender
  expects in every frame it receives, and the key of its data tags.
* With ``auth_token`` set, both sides prove they know it with an HMAC-SHA256 over the
  whole transcript (every field of the challenge, the hello and, for the server, the
  welcome, in a canonical encoding), under a different label per role, compared in
  constant time. A relay that changes any field -- to put its own worker address on
  the data path, say -- fails the proof, and the keys travel masked by a pad derived
  from the token and the transcript (a one-time pad: both sides' random values are in
  it), so a relay that only forwards learns nothing it could use on the data path.
  Without a token the keys travel in clear (anyone may connect anyway).
* ``shm`` offers shared parts (:mod:`ucxrpc.io.shared`): it names a sealed memory file
  of the sender (pid and fd) holding the hello's nonce (the client's) or the
  challenge (the server's), and the address of the same bytes in the sender's memory
  (0: none offered). A side that can open the peer's file and finds that content
  there has proven both run on one host, in one pid namespace, with the right to open
  each other's files; one that also reads the content at the address has proven it
  may read the peer's memory. The server answers with its own probe only then, and
  with an address only if it reads the client's memory. Each side that proved it can
  map the peer's files says so on the data path (an empty RELEASE frame; ``[0]`` if
  it reads the peer's memory too), and a side sends parts shared only after hearing
  that.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..errors import ProtocolError, Unauthenticated, Unavailable, error_from_status
from ..wire import codec
from ..wire.ucxaddr import validate_worker_address
from . import shared

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "CHALLENGE_SIZE",
    "CONTROL_LIMIT",
    "HELLO_LIMIT",
    "KEY_SIZE",
    "Handshake",
    "answer",
    "initiate",
    "initiate_handshake",
    "listen",
    "read_message",
    "refuse",
    "serve_control",
    "tune_socket",
    "write_message",
]


async def listen(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str,
    port: int,
) -> asyncio.Server:
    """Serve control connections on ``host:port``, like :func:`asyncio.start_server`.

    A numeric address is bound here, without a name lookup: uvloop resolves names in
    libuv's thread pool, and a thread pool once started makes a forked child crash
    as it exits (libuv joins, at exit, the pool threads only the parent has).

    Raises:
        OSError: The address cannot be bound.
    """
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return await asyncio.start_server(handler, host, port)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(address), port))
        sock.listen(128)
        sock.setblocking(False)
        return await asyncio.start_server(handler, sock=sock)
    except BaseException:
        sock.close()
        raise


#: The largest handshake message accepted (refused from its length prefix alone).
HELLO_LIMIT: Final = 64 * 1024
#: The largest control message accepted after the handshake (heartbeats, bye).
CONTROL_LIMIT: Final = 64 * 1024
#: Bytes of the server's challenge and the client's nonce.
CHALLENGE_SIZE: Final = 16
#: Bytes of a per-connection key.
KEY_SIZE: Final = 16
_PROOF_SIZE: Final = hashlib.sha256().digest_size
#: The largest "max message size" a peer may announce.
_MAX_LIMIT: Final = (1 << 63) - 1
#: The largest reply slot a client may announce.
_MAX_SLOT: Final = 1 << 20
#: The largest stream window a client may announce (the server's MAX_WINDOW).
_MAX_WINDOW: Final = 1 << 16
_ROLES: Final = frozenset({"rpc", "messages"})

_DOMAIN: Final = b"ucxrpc handshake\x00"
_CLIENT_PROOF: Final = b"client proof\x00"
_SERVER_PROOF: Final = b"server proof\x00"
_CLIENT_KEY: Final = b"client key\x00"
_SERVER_KEY: Final = b"server key\x00"


@dataclass(frozen=True, slots=True)
class Handshake:
    """What the connecting side learned in the handshake.

    Attributes:
        peer_address: The peer's UCX worker address (validated).
        peer_conn_id: The connection id the peer assigned to us (put it in our tags).
        peer_max: The largest message the peer accepts.
        peer_key: The peer's key: the secret to put in every frame sent to it.
        local_key: Our key, as announced: the secret the peer puts in its frames.
        peer_pid: The peer's pid when we proved we can map its shared parts.
        peer_maps: The peer proved it can map ours (its welcome offered a probe).
        peer_memory: The peer, when we also proved we can read its memory.
        peer_reads: The peer proved it reads ours (its probe offered an address).
    """

    peer_address: bytes
    peer_conn_id: int
    peer_max: int
    peer_key: bytes
    local_key: bytes
    peer_pid: int | None = None
    peer_maps: bool = False
    peer_memory: shared.Peer | None = None
    peer_reads: bool = False


# -- framing -------------------------------------------------------------------------------


async def read_message(
    reader: asyncio.StreamReader, limit: int = CONTROL_LIMIT
) -> dict[str, Any] | None:
    """Read one control message; ``None`` when the peer closed the stream.

    Args:
        reader: The control stream.
        limit: The largest body accepted; a longer one is refused from its length
            prefix, before any of it is read.

    Raises:
        ProtocolError: The message is oversized or malformed.
    """
    try:
        prefix = await reader.readexactly(4)
        body = await reader.readexactly(codec.control_length(prefix, limit))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return codec.decode_control(body)


def write_message(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    """Queue one control message on ``writer``."""
    writer.write(codec.encode_control(message))


def tune_socket(writer: asyncio.StreamWriter) -> None:
    """Disable Nagle on the control socket (handshakes are small and latency-bound)."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _read_handshake(
    reader: asyncio.StreamReader, timeout: float, what: str
) -> dict[str, Any] | None:
    """One handshake message, within ``timeout`` seconds and :data:`HELLO_LIMIT` bytes."""
    try:
        async with asyncio.timeout(timeout):
            return await read_message(reader, HELLO_LIMIT)
    except TimeoutError:
        raise TimeoutError(f"no {what} within {timeout} s") from None


# -- validation ----------------------------------------------------------------------------


def _check_version(message: dict[str, Any], what: str) -> None:
    v = message.get("v")
    if type(v) is not int or v != codec.VERSION:
        raise ProtocolError(
            f"{what}: peer speaks protocol version {v!r}, this side {codec.VERSION}"
        )


def _check_fields(
    message: dict[str, Any], what: str, required: Iterable[str], optional: Iterable[str]
) -> None:
    required = frozenset(required)
    unknown = sorted(str(k) for k in message if k not in required and k not in optional)
    if unknown:
        raise ProtocolError(f"{what}: unknown field(s) {', '.join(map(repr, unknown))}")
    missing = sorted(required - message.keys())
    if missing:
        raise ProtocolError(f"{what}: missing field(s) {', '.join(map(repr, missing))}")


def _int(message: dict[str, Any], field: str, low: int, high: int, what: str) -> int:
    value = message[field]
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"{what}: {field!r} must be an integer in [{low}, {high}]")
    return value


def _bytes(message: dict[str, Any], field: str, size: int, what: str) -> bytes:
    value = message[field]
    if type(value) is not bytes or len(value) != size:
        raise ProtocolError(f"{what}: {field!r} must be {size} bytes")
    return value


def _address(message: dict[str, Any], what: str) -> bytes:
    addr = message["addr"]
    if type(addr) is not bytes:
        raise ProtocolError(f"{what}: 'addr' must be bytes")
    try:
        validate_worker_address(addr)
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc.message}") from None
    return addr


def _check_challenge(first: dict[str, Any]) -> bytes:
    what = "malformed challenge"
    _check_fields(first, what, ("v", "challenge"), ())
    return _bytes(first, "challenge", CHALLENGE_SIZE, what)


_HELLO_REQUIRED: Final = ("v", "addr", "cid", "max", "nonce", "key")
_HELLO_OPTIONAL: Final = ("proof", "slot", "win", "role", "eh", "shm")
_WELCOME_REQUIRED: Final = ("v", "addr", "cid", "max", "key")
_WELCOME_OPTIONAL: Final = ("proof", "shm")
_PROBE_SIZE: Final = 16


def _check_common(message: dict[str, Any], what: str) -> None:
    """The fields a hello and a welcome share: address, connection id, limit, key, proof."""
    _address(message, what)
    _int(message, "cid", 1, codec.MAX_CONN_ID, what)
    _int(message, "max", 1, _MAX_LIMIT, what)
    _bytes(message, "key", KEY_SIZE, what)
    if "proof" in message:
        _bytes(message, "proof", _PROOF_SIZE, what)
    if "shm" in message:
        _bytes(message, "shm", _PROBE_SIZE, what)


def _check_hello(hello: dict[str, Any]) -> None:
    what = "malformed hello"
    _check_fields(hello, what, _HELLO_REQUIRED, _HELLO_OPTIONAL)
    _check_common(hello, what)
    _bytes(hello, "nonce", CHALLENGE_SIZE, what)
    if "slot" in hello:
        _int(hello, "slot", codec.PREFIX_SIZE + 64, _MAX_SLOT, what)
    if "win" in hello:
        _int(hello, "win", 1, _MAX_WINDOW, what)
    if "role" in hello and hello["role"] not in _ROLES:
        raise ProtocolError(f"{what}: 'role' must be one of {sorted(_ROLES)}")
    if "eh" in hello:
        _int(hello, "eh", 0, 1, what)


def _check_welcome(welcome: dict[str, Any]) -> None:
    what = "malformed welcome"
    _check_fields(welcome, what, _WELCOME_REQUIRED, _WELCOME_OPTIONAL)
    _check_common(welcome, what)


def _check_error(message: dict[str, Any]) -> None:
    """Raise the error a peer sent instead of its challenge or welcome."""
    if "error" not in message:
        return
    code, text = message.get("error"), message.get("message", "")
    if type(code) is not int or type(text) is not str or set(message) - {"error", "message"}:
        raise ProtocolError("malformed error message from the peer")
    raise error_from_status(code, text[:1024])


# -- transcript, proofs and key masks ------------------------------------------------------


def _field(value: Any) -> bytes:
    """A validated field value, tagged by type (only int, bytes and str get here)."""
    if type(value) is bytes:
        return b"b" + value
    if type(value) is str:
        return b"s" + value.encode()
    if type(value) is int:
        return b"i" + str(value).encode()
    raise ProtocolError(f"unexpected field type {type(value).__name__}")  # pragma: no cover


def _encode(label: bytes, message: dict[str, Any]) -> bytes:
    """A canonical, unambiguous encoding of every field of a message but its proof."""
    parts = [label]
    for key in sorted(k for k in message if k != "proof"):
        for item in (key.encode(), _field(message[key])):
            parts.append(len(item).to_bytes(4, "big"))
            parts.append(item)
    blob = b"".join(parts)
    return len(blob).to_bytes(4, "big") + blob


def _mac(token: bytes, label: bytes, data: bytes) -> bytes:
    return hmac.new(token, label + data, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _client_pad(token: bytes, challenge: bytes, nonce: bytes) -> bytes:
    return _mac(token, _CLIENT_KEY, _DOMAIN + challenge + nonce)[:KEY_SIZE]


def _server_pad(token: bytes, transcript: bytes) -> bytes:
    return _mac(token, _SERVER_KEY, transcript)[:KEY_SIZE]


def _token(config: Config) -> bytes | None:
    return config.auth_token.get_secret_value().encode() if config.auth_token else None


def _sharing(config: Config) -> bool:
    return config.shared_memory and shared.available()


def _probed(writer: asyncio.StreamWriter, field: bytes, content: bytes) -> int | None:
    """The peer's pid, if its probe holds ``content`` and its process is the one at
    the other end of this control connection."""
    pid = shared.read_probe(field, content)
    if pid is None:
        return None
    peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
    if not isinstance(peer, tuple) or not isinstance(local, tuple):
        return None
    return pid if shared.owns_connection(pid, peer, local) else None


def _verify(proof: Any, expected: bytes) -> bool:
    """Constant-time proof check (also when the proof is missing or mistyped)."""
    given = proof if type(proof) is bytes else b""
    return hmac.compare_digest(given, expected)


# -- the two sides -------------------------------------------------------------------------


async def answer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    config: Config,
    worker_address: bytes,
    open_conn: Callable[[dict[str, Any]], int],
    *,
    key: bytes | None = None,
) -> bool:
    """The accepting side of the handshake.

    ``open_conn(hello)`` sets up the connection (it may refuse by raising an
    :class:`~ucxrpc.RpcError`) and returns the connection id this side assigned. It
    is called only once the hello is fully validated (and authenticated, with a
    token), with the hello's fields; its ``"key"`` is the client's key, unmasked (the
    secret to put in frames sent to the client), its ``"pid"`` the client's pid
    when this side proved it can map the client's shared parts (else None), and its
    ``"probe"`` the fd of this side's probe for the client to read (else None): the
    connection owns it from then on (``Link.connect(probe=...)``).

    Args:
        reader: The control stream.
        writer: The control stream.
        config: Supplies ``connect_timeout``, ``auth_token``, ``max_message_size``.
        worker_address: This side's UCX worker address.
        open_conn: Sets up the connection; returns its id.
        key: This side's key for the connection (the secret it expects in frames
            from the client); a random one when omitted.

    Returns:
        False when the peer went away before saying hello.

    Raises:
        RpcError: The hello was refused (the caller reports it to the peer):
            :class:`ProtocolError` when malformed or oversized,
            :class:`Unauthenticated` when the proof is missing or wrong.
        TimeoutError: No complete hello within ``config.connect_timeout``.
    """
    local_key = os.urandom(KEY_SIZE) if key is None else key
    if len(local_key) != KEY_SIZE:
        raise ValueError(f"a connection key is {KEY_SIZE} bytes")
    tune_socket(writer)
    challenge = os.urandom(CHALLENGE_SIZE)
    first: dict[str, Any] = {"v": codec.VERSION, "challenge": challenge}
    write_message(writer, first)
    hello = await _read_handshake(reader, config.connect_timeout, "hello")
    if hello is None:
        return False
    _check_version(hello, "hello")
    _check_hello(hello)
    token = _token(config)
    transcript = _DOMAIN + _encode(b"challenge", first) + _encode(b"hello", hello)
    if token is not None:
        if not _verify(hello.get("proof"), _mac(token, _CLIENT_PROOF, transcript)):
            raise Unauthenticated("bad or missing auth token")
        peer_key = _xor(hello["key"], _client_pad(token, challenge, hello["nonce"]))
    else:
        peer_key = hello["key"]
    peer_pid = probe = memory = None
    if "shm" in hello and _sharing(config):
        peer_pid = _probed(writer, hello["shm"], hello["nonce"])
        if peer_pid is not None:
            if config.shared_reads:
                memory = shared.Peer.probed(peer_pid, hello["shm"], hello["nonce"])
            try:
                # Memory is offered only to a peer whose memory this side reads, as
                # files are: the welcome's address says so.
                probe = shared.Probe(challenge, memory=memory is not None)
            except OSError:
                probe = None
    opened = {**hello, "key": peer_key, "pid": peer_pid, "probe": probe, "memory": memory}
    try:
        # The connection owns the probe and the peer from here (the probe is let go
        # once the peer read it).
        local_id = open_conn(opened)
    except BaseException:
        if probe is not None:
            probe.close()
        if memory is not None:
            memory.close()
        raise
    if type(local_id) is not int or not 0 < local_id <= codec.MAX_CONN_ID:
        raise ValueError(f"open_conn returned an invalid connection id {local_id!r}")
    welcome: dict[str, Any] = {
        "v": codec.VERSION,
        "addr": worker_address,
        "cid": local_id,
        "max": config.max_message_size,
        "key": local_key if token is None else _xor(local_key, _server_pad(token, transcript)),
    }
    if probe is not None:
        welcome["shm"] = probe.field
    if token is not None:
        transcript += _encode(b"welcome", welcome)
        welcome["proof"] = _mac(token, _SERVER_PROOF, transcript)
    write_message(writer, welcome)
    await writer.drain()
    return True


async def serve_control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """After the handshake: answer heartbeats until the peer says bye or goes away.

    Returns:
        True when the peer said bye (a clean close), False when the stream ended.
    """
    while True:
        msg = await read_message(reader)
        if msg is None:
            return False
        if msg.get("t") == "bye":
            return True
        if msg.get("t") == "ping":
            beat = msg.get("n")
            write_message(writer, {"t": "pong", "n": beat if type(beat) is int else None})
            # A peer that pings and never reads must not grow this side's buffer.
            await writer.drain()


async def initiate_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    config: Config,
    worker_address: bytes,
    local_id: int,
    extra: dict[str, Any],
    peer: str,
    *,
    key: bytes | None = None,
) -> Handshake:
    """The connecting side of the handshake.

    Args:
        reader: The control stream.
        writer: The control stream.
        config: Supplies ``connect_timeout`` (for each read), ``auth_token`` and
            ``max_message_size``.
        worker_address: This side's UCX worker address.
        local_id: The connection id this side assigned (the peer puts it in its tags).
        extra: More hello fields: ``slot`` (the reply slot size), ``win`` (the stream
            window), ``role``.
        peer: ``host:port``, for messages.
        key: This side's key (the secret it expects in frames from the peer); a
            random one when omitted.

    Returns:
        The validated :class:`Handshake`.

    Raises:
        Unavailable: The peer closed the connection during the handshake.
        Unauthenticated: The peer refused our token or could not prove its own.
        ProtocolError: A malformed, oversized or incompatible reply.
        TimeoutError: A reply did not come within ``config.connect_timeout``.
        RpcError: The peer refused the hello (the error it sent).
    """
    local_key = os.urandom(KEY_SIZE) if key is None else key
    if len(local_key) != KEY_SIZE:
        raise ValueError(f"a connection key is {KEY_SIZE} bytes")
    tune_socket(writer)
    timeout = config.connect_timeout
    first = await _read_handshake(reader, timeout, f"challenge from {peer}")
    if first is None:
        raise Unavailable(f"{peer} closed the connection during the handshake")
    _check_error(first)
    _check_version(first, f"challenge from {peer}")
    challenge = _check_challenge(first)
    token = _token(config)
    nonce = os.urandom(CHALLENGE_SIZE)
    wire_key = local_key
    if token is not None:
        wire_key = _xor(local_key, _client_pad(token, challenge, nonce))
    hello: dict[str, Any] = {
        **extra,
        "v": codec.VERSION,
        "addr": worker_address,
        "cid": local_id,
        "max": config.max_message_size,
        "nonce": nonce,
        "key": wire_key,
    }
    probe = None
    if _sharing(config):
        try:
            probe = shared.Probe(nonce, memory=config.shared_reads)
            hello["shm"] = probe.field
        except OSError:
            probe = None
    try:
        return await _finish_handshake(
            reader, writer, config, first, challenge, hello, token, local_key, peer
        )
    finally:
        if probe is not None:
            probe.close()


async def _finish_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    config: Config,
    first: dict[str, Any],
    challenge: bytes,
    hello: dict[str, Any],
    token: bytes | None,
    local_key: bytes,
    peer: str,
) -> Handshake:
    timeout = config.connect_timeout
    _check_hello(hello)  # our own fields obey the rules we enforce on peers
    transcript = _DOMAIN + _encode(b"challenge", first) + _encode(b"hello", hello)
    if token is not None:
        hello["proof"] = _mac(token, _CLIENT_PROOF, transcript)
    write_message(writer, hello)
    welcome = await _read_handshake(reader, timeout, f"welcome from {peer}")
    if welcome is None:
        raise Unavailable(f"{peer} closed the connection during the handshake")
    _check_error(welcome)
    _check_version(welcome, f"welcome from {peer}")
    _check_welcome(welcome)
    if token is not None:
        server_transcript = transcript + _encode(b"welcome", welcome)
        if not _verify(welcome.get("proof"), _mac(token, _SERVER_PROOF, server_transcript)):
            raise Unauthenticated(f"{peer} did not prove it knows the auth token")
        peer_key = _xor(welcome["key"], _server_pad(token, transcript))
    else:
        peer_key = welcome["key"]
    peer_pid = memory = None
    if "shm" in welcome and "shm" in hello:
        peer_pid = _probed(writer, welcome["shm"], challenge)
        if peer_pid is not None and config.shared_reads:
            memory = shared.Peer.probed(peer_pid, welcome["shm"], challenge)
    return Handshake(
        welcome["addr"],
        welcome["cid"],
        welcome["max"],
        peer_key,
        local_key,
        peer_pid,
        peer_pid is not None,
        memory,
        peer_pid is not None and shared.offers_memory(welcome["shm"]),
    )


async def initiate(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    config: Config,
    worker_address: bytes,
    local_id: int,
    extra: dict[str, Any],
    peer: str,
) -> tuple[bytes, int, int]:
    """The connecting side of the handshake, for callers that do not use the keys yet.

    Same as :func:`initiate_handshake` (which see), returning only the peer's worker
    address, the connection id it assigned to us and its largest accepted message.
    """
    done = await initiate_handshake(reader, writer, config, worker_address, local_id, extra, peer)
    return done.peer_address, done.peer_conn_id, done.peer_max


def refuse(writer: asyncio.StreamWriter, exc: Any) -> None:
    """Tell the peer why its hello was refused (before closing)."""
    if not writer.is_closing():
        write_message(writer, {"error": int(exc.code), "message": exc.message})
