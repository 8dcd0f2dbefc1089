"""Shared parts: what travels in place of a large part's bytes between peers on one host.

A frame flagged ``Flags.SHARED_PARTS`` sends each part of at least
:data:`~ucxrpc.wire.codec.SHARED_MIN` bytes outside UCX, and the part's UCX message is
a fixed-size descriptor saying where the receiver finds its bytes:

* **in the sender's memory** (:data:`MEMORY`): the receiver reads ``length`` bytes at
  ``address`` of the sender's process (``process_vm_readv``: one copy, in place of
  the part's bytes on the wire), when the handshake proved it may, and then the 8
  bytes at ``ticket``: only if they still hold ``value`` were the bytes read the
  part's (the sender clears its ticket before it lets the buffer go: after the
  receiver's RELEASE, a timeout or the connection's end);
* **in a sealed memory file** of the sender (:data:`FILE`, Linux ``memfd``) that the
  receiver maps: the file holds the part's bytes followed by a trailer that binds it
  to one connection, frame and part.

::

    descriptor (32 bytes, big endian)          file (length + 32 bytes)
    offset  size  field                        offset  size    field
    0       1     kind (FILE or MEMORY)        0       length  the part's bytes
    1       7     length                       length  32      HMAC-SHA256(key, binding)
    8       8     fd or address (in the sender)
    16      8     ticket address (MEMORY; else 0)
    24      8     ticket value (MEMORY; else 0)

``binding`` is ``b"ucxrpc shared part\\0"`` followed by seq, part index and length,
and ``key`` is the receiving connection's 16-byte key, which only the two ends of the
connection know. A peer that names a file it did not make for this connection -- one
another client is sending, say -- cannot produce its trailer, so the receiver refuses
it; which process the descriptor refers to is fixed by the handshake, never by the
descriptor. A memory descriptor needs no trailer: it can only name the sender's own
memory, whose bytes the sender could as well have sent.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any, Final, NamedTuple

from ..errors import ProtocolError

__all__ = [
    "DESCRIPTOR_SIZE",
    "FILE",
    "MEMORY",
    "TRAILER_SIZE",
    "Descriptor",
    "check_trailer",
    "descriptor",
    "parse_descriptor",
    "trailer",
]

_DESCRIPTOR = struct.Struct("!QQQQ")
_LENGTH_BITS: Final = 56
_BINDING = struct.Struct("!IIQ")
_LABEL: Final = b"ucxrpc shared part\x00"

#: Bytes of a shared part's descriptor (its UCX message).
DESCRIPTOR_SIZE: Final = _DESCRIPTOR.size
#: Bytes of the trailer after a shared part's bytes.
TRAILER_SIZE: Final = hashlib.sha256().digest_size


#: Descriptor kind: the part is a sealed memory file; ``ref`` is its fd in the sender.
FILE: Final = 1
#: Descriptor kind: the part is in the sender's memory; ``ref`` is its address there.
MEMORY: Final = 2


class Descriptor(NamedTuple):
    """A parsed descriptor (see the module's table)."""

    kind: int
    ref: int
    length: int
    ticket: int = 0
    value: int = 0


def descriptor(kind: int, ref: int, length: int, ticket: int = 0, value: int = 0) -> bytes:
    """The descriptor of a shared part of ``length`` bytes: a file (``ref`` is the
    sender's fd) or memory (``ref`` is its address in the sender, and the 8 bytes at
    ``ticket`` hold ``value`` while the sender keeps the buffer)."""
    return _DESCRIPTOR.pack((kind << _LENGTH_BITS) | length, ref, ticket, value)


def parse_descriptor(buf: Any) -> Descriptor:
    """The fields of a received descriptor.

    Raises:
        ProtocolError: Not a descriptor (wrong size, unknown kind, no such fd or
            address, a ticket missing or where there is none).
    """
    if len(buf) != DESCRIPTOR_SIZE:
        raise ProtocolError(f"a shared-part descriptor is {DESCRIPTOR_SIZE} bytes, not {len(buf)}")
    word, ref, ticket, value = _DESCRIPTOR.unpack(buf)
    kind, length = word >> _LENGTH_BITS, word & ((1 << _LENGTH_BITS) - 1)
    if kind == FILE:
        valid = ref <= 0x7FFFFFFF and ticket == value == 0
    else:
        valid = kind == MEMORY and ref != 0 and ticket != 0 and value != 0
    if not valid:
        raise ProtocolError("malformed shared-part descriptor")
    return Descriptor(kind, ref, length, ticket, value)


def trailer(key: bytes, seq: int, part: int, length: int) -> bytes:
    """The trailer binding a shared part to its connection (``key``), frame and part."""
    return hmac.new(key, _LABEL + _BINDING.pack(seq, part, length), hashlib.sha256).digest()


def check_trailer(key: bytes, seq: int, part: int, length: int, got: bytes) -> bool:
    """Whether ``got`` is the trailer of that part (compared in constant time)."""
    return hmac.compare_digest(trailer(key, seq, part, length), got)
