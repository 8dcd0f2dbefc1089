"""The bootstrap/control connection: an asyncio TCP stream beside the UCX data path.

It binds where the user says (127.0.0.1 by default), carries the handshake (protocol
version, UCX worker addresses, connection ids, limits, authentication) and stays open
for the life of the connection: its end is the liveness signal, so a peer whose process
dies is noticed at once (the kernel closes its sockets), not at a call's timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import codec
from .errors import ProtocolError, Unauthenticated, Unavailable, error_from_status

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "answer",
    "auth_proof",
    "initiate",
    "read_message",
    "refuse",
    "serve_control",
    "tune_socket",
    "write_message",
]


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """Read one control message; ``None`` when the peer closed the stream.

    Raises:
        ProtocolError: The message is oversized or malformed.
    """
    try:
        prefix = await reader.readexactly(4)
        body = await reader.readexactly(codec.control_length(prefix))
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


def auth_proof(token: str, challenge: bytes, role: bytes) -> bytes:
    """HMAC-SHA256 proof of knowing ``token`` for a challenge."""
    return hmac.new(token.encode(), role + challenge, hashlib.sha256).digest()


def check_version(message: dict[str, Any]) -> None:
    """Reject a peer that speaks another protocol version."""
    if message.get("v") != codec.VERSION:
        raise ProtocolError(
            f"peer speaks protocol version {message.get('v')!r}, this side {codec.VERSION}"
        )


def _token(config: Config) -> str | None:
    return config.auth_token.get_secret_value() if config.auth_token else None


async def answer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    config: Config,
    worker_address: bytes,
    open_conn: Callable[[dict[str, Any]], int],
) -> bool:
    """The accepting side of the handshake.

    ``open_conn(hello)`` sets up the connection (it may refuse by raising an
    :class:`~ucxrpc.RpcError`) and returns the connection id this side assigned.

    Returns:
        False when the peer went away before saying hello.

    Raises:
        RpcError: The hello was refused (the caller reports it to the peer).
        TimeoutError: No hello within ``config.connect_timeout``.
    """
    tune_socket(writer)
    challenge = os.urandom(16)
    write_message(writer, {"v": codec.VERSION, "challenge": challenge})
    hello = await asyncio.wait_for(read_message(reader), config.connect_timeout)
    if hello is None:
        return False
    check_version(hello)
    token = _token(config)
    if token is not None:
        proof = hello.get("proof")
        expected = auth_proof(token, challenge, b"client")
        if not isinstance(proof, bytes) or not hmac.compare_digest(proof, expected):
            raise Unauthenticated("bad or missing auth token")
    local_id = open_conn(hello)
    welcome: dict[str, Any] = {
        "v": codec.VERSION,
        "addr": worker_address,
        "cid": local_id,
        "max": config.max_message_size,
    }
    if token is not None and isinstance(hello.get("nonce"), bytes):
        welcome["proof"] = auth_proof(token, hello["nonce"], b"server")
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
            write_message(writer, {"t": "pong", "n": msg.get("n")})


async def initiate(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    config: Config,
    worker_address: bytes,
    local_id: int,
    extra: dict[str, Any],
    peer: str,
) -> tuple[bytes, int, int]:
    """The connecting side of the handshake.

    Args:
        extra: More hello fields (the reply slot size, the stream window, ...).
        peer: ``host:port``, for messages.

    Returns:
        The peer's worker address, the connection id it assigned to us, and its
        largest accepted message.

    Raises:
        Unavailable: The peer closed the connection during the handshake.
        Unauthenticated: The peer refused our token or could not prove its own.
        ProtocolError: A malformed or incompatible reply.
    """
    tune_socket(writer)
    first = await read_message(reader)
    if first is None:
        raise Unavailable(f"{peer} closed the connection during the handshake")
    check_version(first)
    nonce = os.urandom(16)
    hello: dict[str, Any] = {
        "v": codec.VERSION,
        "addr": worker_address,
        "cid": local_id,
        "max": config.max_message_size,
        "nonce": nonce,
        **extra,
    }
    token = _token(config)
    challenge = first.get("challenge")
    if token is not None and isinstance(challenge, bytes):
        hello["proof"] = auth_proof(token, challenge, b"client")
    write_message(writer, hello)
    welcome = await read_message(reader)
    if welcome is None:
        raise Unavailable(f"{peer} closed the connection during the handshake")
    if "error" in welcome:
        raise error_from_status(int(welcome["error"]), str(welcome.get("message", "")))
    check_version(welcome)
    if token is not None and welcome.get("proof") != auth_proof(token, nonce, b"server"):
        raise Unauthenticated(f"{peer} did not prove it knows the auth token")
    addr, cid, peer_max = welcome.get("addr"), welcome.get("cid"), welcome.get("max")
    if not isinstance(addr, bytes) or type(cid) is not int or type(peer_max) is not int:
        raise ProtocolError(f"malformed welcome from {peer}")
    return addr, cid, peer_max


def refuse(writer: asyncio.StreamWriter, exc: Any) -> None:
    """Tell the peer why its hello was refused (before closing)."""
    if not writer.is_closing():
        write_message(writer, {"error": int(exc.code), "message": exc.message})
