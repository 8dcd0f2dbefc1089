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
import socket
from typing import Any

from . import codec
from .errors import ProtocolError

__all__ = ["auth_proof", "read_message", "tune_socket", "write_message"]


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
