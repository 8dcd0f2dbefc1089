"""Shared parts: what travels in place of a large part's bytes between peers on one host.

A frame flagged ``Flags.SHARED_PARTS`` sends each part of at least
:data:`~ucxrpc.wire.codec.SHARED_MIN` bytes as a sealed memory file of the sender
(Linux ``memfd``) that the receiver maps. The part's UCX message is then a fixed-size
descriptor naming the sender's file descriptor; the file holds the part's bytes
followed by a trailer that binds it to one connection, frame and part::

    descriptor (16 bytes, big endian)     file (length + 32 bytes)
    offset  size  field                   offset  size    field
    0       4     fd (in the sender)      0       length  the part's bytes
    4       8     length                  length  32      HMAC-SHA256(key, binding)
    12      4     0 (reserved)

``binding`` is ``b"ucxrpc shared part\\0"`` followed by seq, part index and length,
and ``key`` is the receiving connection's 16-byte key, which only the two ends of the
connection know. A peer that names a file it did not make for this connection -- one
another client is sending, say -- cannot produce its trailer, so the receiver refuses
it; which process the descriptor refers to is fixed by the handshake, never by the
descriptor.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any, Final

from ..errors import ProtocolError

__all__ = [
    "DESCRIPTOR_SIZE",
    "TRAILER_SIZE",
    "check_trailer",
    "descriptor",
    "parse_descriptor",
    "trailer",
]

_DESCRIPTOR = struct.Struct("!IQI")
_BINDING = struct.Struct("!IIQ")
_LABEL: Final = b"ucxrpc shared part\x00"

#: Bytes of a shared part's descriptor (its UCX message).
DESCRIPTOR_SIZE: Final = _DESCRIPTOR.size
#: Bytes of the trailer after a shared part's bytes.
TRAILER_SIZE: Final = hashlib.sha256().digest_size


def descriptor(fd: int, length: int) -> bytes:
    """The descriptor of a shared part: the sender's ``fd`` holding ``length`` bytes."""
    return _DESCRIPTOR.pack(fd, length, 0)


def parse_descriptor(buf: Any) -> tuple[int, int]:
    """``(fd, length)`` from a received descriptor.

    Raises:
        ProtocolError: Not a descriptor (wrong size or a reserved field set).
    """
    if len(buf) != DESCRIPTOR_SIZE:
        raise ProtocolError(f"a shared-part descriptor is {DESCRIPTOR_SIZE} bytes, not {len(buf)}")
    fd, length, reserved = _DESCRIPTOR.unpack(buf)
    if reserved:
        raise ProtocolError("malformed shared-part descriptor")
    return fd, length


def trailer(key: bytes, seq: int, part: int, length: int) -> bytes:
    """The trailer binding a shared part to its connection (``key``), frame and part."""
    return hmac.new(key, _LABEL + _BINDING.pack(seq, part, length), hashlib.sha256).digest()


def check_trailer(key: bytes, seq: int, part: int, length: int, got: bytes) -> bool:
    """Whether ``got`` is the trailer of that part (compared in constant time)."""
    return hmac.compare_digest(trailer(key, seq, part, length), got)
