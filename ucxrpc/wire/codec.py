"""Pure msgpack framing: frames, header, tags, limits. Bytes in, frames out.

This module imports msgpack and the standard library only (no ucxx, no asyncio), so it
can be tested and fuzzed on bytes alone.

Frame layout (one UCX tag message; all integers big endian)::

    offset  size  field
    0       1     version       VERSION (3); anything else is a ProtocolError
    1       1     kind          Kind
    2       2     flags         Flags
    4       4     seq           the frame's number in its connection and direction
                                (0, 1, 2, ... modulo 2**32): the receiver delivers
                                frames in this order, whatever order UCX completes them
    8       8     secret        the receiving connection's secret (agreed in the
                                handshake); a frame with another secret is dropped
    16      4     call_id       the call the frame belongs to (equal to the tag's)
    20      4     header_len
    24      4     payload_len
    28      h     header        msgpack array [method, priority, timeout,
                                               part_sizes, metadata]
    28+h    p     payload       msgpack object (absent when Flags.PAYLOAD_OOB)

Large bytes-like values in the payload are not copied into msgpack: each becomes an
extension value (code ``EXT_PART``) naming a *part*, and the part travels as its own UCX
message on a data tag, sent straight from the caller's buffer (made contiguous first)
and received into a buffer of exactly the announced size once the receiver has
checked the size UCX reports for it. A frame larger than ``MAX_FRAME`` moves its
payload into its last part (``Flags.PAYLOAD_OOB``), so every frame is small.

A ``BATCH`` frame carries several complete frames back to back in its payload (each
with its own seq; the batch's own seq is 0 and ignored): frames queued for one peer
while the sender was busy leave as one UCX message.

Tag layout (64 bits)::

    63   62                    40 39                                           0
    +---+------------------------+----------------------------------------------+
    | 0 |   connection id (23)   |   call id (32)                  |  0 (8)     |  frame
    | 1 |   connection id (23)   |   key (40) XOR (seq (32) << 8 | part (8))    |  part
    +---+------------------------+----------------------------------------------+

* The connection id is chosen at random by the *receiving* worker and is unique among
  its live connections; UCX matches tags worker-wide, and the receiver routes each
  message to its connection by this field.
* A data part's tag binds it to exactly one frame (its seq) and part index, masked by
  a per-connection random key: a peer cannot aim a message at another connection's
  parts without knowing that connection's key.
"""

from __future__ import annotations

import ctypes
import enum
import math
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

import msgpack

from ..errors import ProtocolError, ResourceExhausted

__all__ = [
    "CONN_ID_BITS",
    "DATA_BIT",
    "DEFAULT_OOB_THRESHOLD",
    "FRAME_PROBE_MASK",
    "FRAME_PROBE_TAG",
    "KEY_MASK",
    "MAX_CALL_ID",
    "MAX_CONN_ID",
    "MAX_FRAME",
    "MAX_PARTS",
    "PART_PROBE_MASK",
    "PART_PROBE_TAG",
    "PREFIX_SIZE",
    "SEQ_MOD",
    "SHARED_MIN",
    "VERSION",
    "ArrayData",
    "Encoded",
    "Flags",
    "Header",
    "Kind",
    "Prefix",
    "add_flags",
    "contiguous",
    "control_length",
    "data_tag",
    "decode_control",
    "decode_header",
    "decode_payload",
    "encode",
    "encode_batch",
    "encode_control",
    "check_metadata",
    "frame_tag",
    "nbytes",
    "peek",
    "split_batch",
    "split_tag",
    "stamp",
    "to_bytes",
]

VERSION: Final = 3
_PREFIX = struct.Struct("!BBHIQIII")
PREFIX_SIZE: Final = _PREFIX.size
_STAMP = struct.Struct("!IQ")  # seq, secret at offset 4

CONN_ID_BITS: Final = 23
MAX_CONN_ID: Final = (1 << CONN_ID_BITS) - 1
MAX_CALL_ID: Final = (1 << 32) - 1
SEQ_MOD: Final = 1 << 32
MAX_PARTS: Final = 255
DATA_BIT: Final = 1 << 63
#: The bits of a data tag that are masked by the connection's key.
KEY_MASK: Final = (1 << 40) - 1
#: Probing with this tag and mask matches every frame and no data part.
FRAME_PROBE_TAG: Final = 0
FRAME_PROBE_MASK: Final = DATA_BIT
#: Probing with this tag and mask matches every data part and no frame.
PART_PROBE_TAG: Final = DATA_BIT
PART_PROBE_MASK: Final = DATA_BIT
#: Bytes-like values at least this long travel as separate parts.
DEFAULT_OOB_THRESHOLD: Final = 16 * 1024
#: The largest frame (prefix, header and inline payload); larger payloads travel as a
#: part. Receivers refuse larger frames without allocating for them.
MAX_FRAME: Final = 64 * 1024
#: A header larger than this is rejected before it is parsed.
MAX_HEADER_SIZE: Final = 32 * 1024
EXT_PART: Final = 1
#: An n-dimensional array: ``[dtype, shape, data]`` where data is bytes or a part.
EXT_ARRAY: Final = 2
_CONTROL_LEN = struct.Struct("!I")


class Kind(enum.IntEnum):
    """What a frame is."""

    REQUEST = 1
    NOTIFY = 2
    CANCEL = 3
    REPLY = 4
    ERROR = 5
    #: A request whose results come back as a stream of ITEM frames and an END.
    STREAM = 6
    #: One item of a stream (either direction).
    ITEM = 7
    #: The end of a stream (either direction: a half-close); its metadata is the
    #: trailing metadata.
    END = 8
    #: The consumer of a stream grants the producer more items (payload: a count).
    CREDIT = 9
    #: A raw tagged message of the messaging layer (call id = the user's tag;
    #: payload: the bytes).
    MESSAGE = 10
    #: Several complete frames in one UCX message (payload: the frames back to back).
    BATCH = 11
    #: The receiver of shared parts has mapped them: the sender may let them go
    #: (payload: a list of ``seq << 8 | part``).
    RELEASE = 12
    #: The sender reads frames from a ring it made (payload: ``[ring fd, wake-up fd,
    #: capacity]`` in the sender's process; see :mod:`ucxrpc.io.ring`).
    RING = 13


class Flags(enum.IntFlag):
    """Per-frame flags."""

    NONE = 0
    #: The msgpack payload is the frame's last part instead of inline.
    PAYLOAD_OOB = 1
    #: A REQUEST or STREAM whose caller streams items into it (ITEM frames, then END).
    INPUT_STREAM = 2
    #: The frame's parts of at least :data:`SHARED_MIN` bytes travel through same-host
    #: shared memory: each part's UCX message is a descriptor
    #: (:mod:`ucxrpc.wire.shared`) in place of its bytes.
    SHARED_PARTS = 4


_KIND_BY_VALUE: Final = {int(k): k for k in Kind}
_packb = msgpack.packb
_unpackb = msgpack.unpackb

# Explicit unpack limits where a message is small by contract (msgpack's defaults are
# the input's length: bounded, but only by it). A control message (the hello comes
# before authentication) is a map of a few fields; a frame header is an array of five
# fields, of at most MAX_HEADER_SIZE bytes.
_CONTROL_LIMITS: Final = {
    "max_str_len": 65536,
    "max_bin_len": 65536,
    "max_array_len": 256,
    "max_map_len": 256,
    "max_ext_len": 0,
}
_HEADER_LIMITS: Final = {
    "max_str_len": 32768,
    "max_bin_len": 32768,
    "max_array_len": 16384,  # MAX_HEADER_SIZE // 2: every entry takes 2 bytes or more
    "max_map_len": 16384,
    "max_ext_len": 0,
}
_pack_prefix = _PREFIX.pack
_unpack_prefix = _PREFIX.unpack_from
_KNOWN_FLAGS: Final = int(Flags.PAYLOAD_OOB | Flags.INPUT_STREAM | Flags.SHARED_PARTS)
#: With ``Flags.SHARED_PARTS``, exactly the parts announced at least this large are
#: shared (smaller ones travel as bytes, as always).
SHARED_MIN: Final = 256 * 1024
_FLAGS = struct.Struct("!H")


def add_flags(frame: bytearray, flags: int) -> None:
    """Set ``flags`` in an encoded frame's prefix (before it is sent)."""
    (old,) = _FLAGS.unpack_from(frame, 2)
    _FLAGS.pack_into(frame, 2, old | flags)


_PAYLOAD_OOB: Final = int(Flags.PAYLOAD_OOB)
_isfinite = math.isfinite


def frame_tag(conn_id: int, call_id: int) -> int:
    """The tag of a frame for call ``call_id`` sent to connection ``conn_id``."""
    return (conn_id << 40) | (call_id << 8)


def data_tag(conn_id: int, key: int, seq: int, part: int) -> int:
    """The tag of data part ``part`` (1-based) of frame ``seq`` sent to ``conn_id``.

    ``key`` is the receiving connection's 40-bit data-tag key.
    """
    return DATA_BIT | (conn_id << 40) | ((key ^ ((seq << 8) | part)) & KEY_MASK)


def split_tag(tag: int) -> tuple[bool, int, int]:
    """Split a tag into ``(is_data, conn_id, low_40_bits)``."""
    return bool(tag & DATA_BIT), (tag >> 40) & MAX_CONN_ID, tag & KEY_MASK


class Prefix(NamedTuple):
    """The fixed-size start of a frame (see the module docstring)."""

    version: int
    kind: int
    flags: int
    seq: int
    secret: int
    call_id: int
    header_len: int
    payload_len: int


def peek(buf: Any) -> Prefix:
    """Read a frame's prefix without checking anything but its length.

    Raises:
        ProtocolError: Fewer bytes than a prefix.
    """
    if len(buf) < PREFIX_SIZE:
        raise ProtocolError(f"truncated frame: {len(buf)} bytes, the prefix needs {PREFIX_SIZE}")
    return Prefix._make(_unpack_prefix(buf))


def stamp(frame: bytearray, seq: int, secret: int) -> None:
    """Write a frame's seq and the receiver's secret into its prefix (at send time)."""
    _STAMP.pack_into(frame, 4, seq, secret)


class Header(NamedTuple):
    """The decoded header of a frame.

    Attributes:
        kind: What the frame is.
        call_id: The call it belongs to.
        method: The method name (requests and notifications).
        priority: The call's priority (higher runs first); ``None`` when the caller
            left it to the method's default.
        timeout: Seconds left until the call's deadline, ``None`` for no deadline.
        flags: Per-frame flags (:class:`Flags` bits).
        parts: Sizes of the data parts that follow the frame, in order.
        metadata: Per-call metadata, if any.
        seq: The frame's number in its connection and direction.
    """

    kind: Kind
    call_id: int
    method: str = ""
    priority: int | None = None
    timeout: float | None = None
    flags: int = 0
    parts: tuple[int, ...] = ()
    metadata: dict[str, Any] | None = None
    seq: int = 0


class Encoded(NamedTuple):
    """A frame ready to send: the frame bytes and the data parts that follow it.

    The frame's seq and secret are zero until :func:`stamp` fills them in.
    """

    frame: bytearray
    parts: list[Any]

    @property
    def size(self) -> int:
        """Total bytes on the wire (frame plus parts)."""
        return len(self.frame) + sum(_nbytes(p) for p in self.parts)


def nbytes(buf: Any) -> int:
    """The length in bytes of a part (a memoryview's ``nbytes``, else ``len``)."""
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


_nbytes = nbytes


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_BYTES_DATA: Final = bytes.__basicsize__ - 1  # offset of a bytes object's first byte
_HUGE_PAGE: Final = 2 << 20
_MADV_HUGEPAGE: Final = 14
_madvise: Any = None
if sys.platform.startswith("linux") and sys.implementation.name == "cpython":
    _madvise = getattr(ctypes.CDLL(None), "madvise", None)
    if _madvise is not None:
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def to_bytes(buf: Any, fill: Callable[[int, memoryview], None] | None = None) -> bytes:
    """A ``bytes`` copy of a buffer's logical bytes.

    A large copy lands in fresh memory, where the page faults cost more than the copy
    (4,096 of them for 16 MiB). So a copy of at least 4 MiB asks the kernel for huge
    pages first (``madvise(MADV_HUGEPAGE)``, as numpy does for its arrays): one fault
    per 2 MiB. On this kind of machine a 16 MiB copy then takes about a fifth of the time.

    Args:
        buf: Any buffer.
        fill: For a large contiguous copy, what copies it: ``fill(address, view)``
            writes ``view``'s bytes at ``address`` (the I/O layer's copier, which
            uses both cores). The default copies here.
    """
    view = buf if type(buf) is memoryview else memoryview(buf)
    n = view.nbytes
    if n < 2 * _HUGE_PAGE or _madvise is None or not view.c_contiguous:
        return view.tobytes()
    out: bytes = _new_bytes(None, n)  # not filled yet: nobody else sees it
    addr = id(out) + _BYTES_DATA
    start = (addr + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    end = (addr + n) & ~(_HUGE_PAGE - 1)
    _madvise(start, end - start, _MADV_HUGEPAGE)  # a hint: failing changes nothing
    flat = view if view.ndim == 1 and view.format == "B" else view.cast("B")
    if fill is not None:
        fill(addr, flat)
    else:
        memoryview((ctypes.c_char * n).from_address(addr)).cast("B")[:] = flat
    return out


def contiguous(buf: Any) -> Any:
    """``buf`` as a C-contiguous, byte-addressed buffer of its logical bytes.

    bytes and bytearray are returned as they are; a memoryview (or any buffer) is cast
    to bytes when it is contiguous and copied when it is not (a strided view such as
    ``data[::-1]`` must never reach UCX as a raw pointer).
    """
    t = type(buf)
    if t is bytes or t is bytearray:
        return buf
    view = buf if t is memoryview else memoryview(buf)
    if view.nbytes == 0:
        return b""
    if view.c_contiguous:
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    return view.tobytes()


def _is_large(obj: Any, threshold: int) -> bool:
    # Called on every payload: plain loops, no generators.
    t = type(obj)
    if t is bytes or t is bytearray:
        return len(obj) >= threshold
    if t is list or t is tuple:
        for x in obj:
            tx = type(x)
            if tx is str or tx is int or tx is float or x is None:
                continue
            if _is_large(x, threshold):
                return True
        return False
    if t is dict:
        for x in obj.values():
            if _is_large(x, threshold):
                return True
        return False
    return t is memoryview  # may be strided: always taken through _extract


def _extract(obj: Any, parts: list[Any], threshold: int) -> Any:
    t = type(obj)
    if t is bytes or t is bytearray or t is memoryview:
        if t is memoryview:
            obj = contiguous(obj)
        if _nbytes(obj) >= threshold and len(parts) < MAX_PARTS - 1:
            parts.append(obj)
            return msgpack.ExtType(EXT_PART, bytes((len(parts) - 1,)))
        return obj
    if t is list or t is tuple:
        return [_extract(x, parts, threshold) for x in obj]
    if t is dict:
        return {k: _extract(v, parts, threshold) for k, v in obj.items()}
    return obj


class ArrayData:
    """An n-dimensional array in neutral form, as the codec carries it.

    The codec does not import numpy; the layer above turns arrays into this form
    before encoding and back (with ``array_hook``) after decoding.

    Attributes:
        dtype: numpy's type string (``"<f8"``, ``"|u1"``, ...), or a JSON description
            for structured and sub-array dtypes (see ``ucxrpc.calls.values``).
        shape: The array's shape.
        data: The elements in C order, as a bytes-like object.
    """

    __slots__ = ("data", "dtype", "shape")

    def __init__(self, dtype: str, shape: Sequence[int], data: Any) -> None:
        self.dtype = dtype
        self.shape = tuple(shape)
        self.data = data

    def __repr__(self) -> str:
        return f"ArrayData({self.dtype!r}, {self.shape!r}, <{_nbytes(self.data)} bytes>)"


def _packer_default(
    parts: list[Any], threshold: int, convert: Callable[[Any], Any] | None
) -> Callable[[Any], Any]:
    def default(obj: Any) -> Any:
        if convert is not None and type(obj) is not ArrayData:
            converted = convert(obj)
            if converted is not obj:
                obj = converted
                if type(obj) is not ArrayData:
                    return _extract(obj, parts, threshold)
        if type(obj) is ArrayData:
            data = _extract(_as_bytes_view(obj.data), parts, threshold)
            body = _packb([obj.dtype, list(obj.shape), data], use_bin_type=True)
            return msgpack.ExtType(EXT_ARRAY, body)
        # Anything else with the buffer protocol travels as raw bytes.
        return _extract(_as_bytes_view(obj), parts, threshold)

    return default


def _as_bytes_view(obj: Any) -> memoryview:
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"cannot serialize {type(obj).__qualname__!r}") from None
    if view.nbytes == 0:
        return memoryview(b"")  # a view with a zero in its shape cannot be cast
    return view.cast("B") if view.c_contiguous else memoryview(view.tobytes())


def encode(
    kind: Kind,
    call_id: int,
    payload: Any = None,
    *,
    method: str = "",
    priority: int | None = None,
    timeout: float | None = None,
    metadata: dict[str, Any] | None = None,
    oob_threshold: int = DEFAULT_OOB_THRESHOLD,
    inline_limit: int = MAX_FRAME,
    max_size: int | None = None,
    default: Callable[[Any], Any] | None = None,
    flags: int = 0,
) -> Encoded:
    """Encode a frame (its seq and secret are stamped when it is sent).

    Args:
        kind: The frame kind.
        call_id: The call id (0..2**32-1).
        payload: Any msgpack-serialisable object; bytes-like values of at least
            ``oob_threshold`` bytes become separate parts.
        method: Method name (requests and notifications).
        priority: Call priority (0..255), or ``None`` for the method's default.
        timeout: Seconds left until the deadline (finite, >= 0), or ``None``.
        metadata: Per-call metadata (str keys, str or bytes values).
        oob_threshold: Size from which bytes-like values travel as parts.
        inline_limit: A frame that would be larger moves its payload into its last
            part (at most ``MAX_FRAME``).
        max_size: If set, the total size (frame and parts) may not exceed it.
        default: Converts objects msgpack does not know (models, dates, ...) into
            ones it does, or into :class:`ArrayData`; raises ``TypeError`` for the
            rest. Bytes-like values in what it returns may become parts too.
        flags: :class:`Flags` to set (``INPUT_STREAM``; ``PAYLOAD_OOB`` is decided here).

    Returns:
        The frame and its parts.

    Raises:
        TypeError: The payload holds a value msgpack cannot carry.
        ValueError: A timeout that is not a finite, non-negative number, a priority
            outside 0..255, metadata that is not str to str or bytes, or a header
            (metadata and part sizes) over its limit.
        ResourceExhausted: The message is larger than ``max_size``.
    """
    if timeout is not None and (
        type(timeout) not in (int, float) or not (_isfinite(timeout) and timeout >= 0)
    ):
        raise ValueError(f"timeout must be a finite number of seconds >= 0, not {timeout!r}")
    if priority is not None and (type(priority) is not int or not 0 <= priority <= 255):
        raise ValueError(f"priority must be an integer from 0 to 255, not {priority!r}")
    if metadata is not None:
        check_metadata(metadata)
    parts: list[Any] = []
    try:
        if _is_large(payload, oob_threshold):
            payload = _extract(payload, parts, oob_threshold)
        try:
            body = _packb(payload, use_bin_type=True)
        except TypeError:
            # Only objects msgpack does not know reach the (slower) buffer-protocol
            # hook; the parts extracted above stay valid (the hook appends after them).
            hook = _packer_default(parts, oob_threshold, default)
            body = _packb(payload, default=hook, use_bin_type=True)
    except RecursionError:
        raise TypeError("the value is nested too deeply to serialize") from None
    except UnicodeEncodeError as exc:
        raise TypeError(f"a string cannot be encoded as UTF-8: {exc}") from None
    except ValueError as exc:
        if "recursion" in str(exc):  # msgpack's own depth limit
            raise TypeError("the value is nested too deeply to serialize") from None
        raise
    sizes = [_nbytes(p) for p in parts]
    try:
        header = _packb([method, priority, timeout, sizes, metadata])
    except UnicodeEncodeError as exc:
        raise TypeError(f"a string cannot be encoded as UTF-8: {exc}") from None
    flags &= ~_PAYLOAD_OOB
    if PREFIX_SIZE + len(header) + len(body) > min(inline_limit, MAX_FRAME):
        flags |= _PAYLOAD_OOB
        parts.append(body)
        sizes.append(len(body))
        header = _packb([method, priority, timeout, sizes, metadata])
        body = b""
    if len(header) > MAX_HEADER_SIZE:
        raise ValueError(f"the frame header is {len(header)} bytes (limit {MAX_HEADER_SIZE})")
    frame = bytearray(_pack_prefix(VERSION, kind, flags, 0, 0, call_id, len(header), len(body)))
    frame += header
    frame += body
    if max_size is not None:
        total = len(frame) + sum(sizes)
        if total > max_size:
            raise ResourceExhausted(
                f"message of {total} bytes exceeds the limit of {max_size} bytes"
            )
    return Encoded(frame, parts)


def check_metadata(metadata: Any) -> None:
    """Reject metadata that is not a map of str to str or bytes.

    Raises:
        ValueError: Naming the offending entry.
    """
    if type(metadata) is not dict:
        raise ValueError(f"metadata must be a dict, not {type(metadata).__name__}")
    for key, value in metadata.items():
        if type(key) is not str or not (type(value) is str or type(value) is bytes):
            raise ValueError(
                f"metadata must map str to str or bytes, got {key!r}: {type(value).__name__}"
            )


def encode_batch(frames: Sequence[Any], secret: int) -> bytearray:
    """One BATCH frame holding ``frames`` (already stamped) back to back."""
    size = sum(len(f) for f in frames)
    out = bytearray(_pack_prefix(VERSION, Kind.BATCH, 0, 0, secret, 0, 0, size))
    for f in frames:
        out += f
    return out


def split_batch(payload: Any) -> list[memoryview]:
    """The frames inside a BATCH frame's payload.

    Raises:
        ProtocolError: A truncated or empty inner frame, or a batch inside a batch.
    """
    view = memoryview(payload)
    out: list[memoryview] = []
    pos, n = 0, len(view)
    while pos < n:
        if n - pos < PREFIX_SIZE:
            raise ProtocolError("truncated frame inside a batch")
        _, kind, _, _, _, _, hlen, plen = _unpack_prefix(view, pos)
        end = pos + PREFIX_SIZE + hlen + plen
        if end > n:
            raise ProtocolError("truncated frame inside a batch")
        if kind == Kind.BATCH:
            raise ProtocolError("a batch inside a batch")
        out.append(view[pos:end])
        pos = end
    return out


def decode_header(
    buf: Any, *, max_size: int | None = None, exact: bool = True
) -> tuple[Header, memoryview]:
    """Decode a frame's header; the payload is returned undecoded.

    Args:
        buf: The received bytes (bytes, bytearray or memoryview).
        max_size: If set, a frame announcing more bytes (frame plus parts) is rejected.
        exact: Require ``buf`` to hold exactly one frame; when False, bytes after the
            frame are ignored.

    Returns:
        The header and a view of the inline payload (empty with ``PAYLOAD_OOB``).

    Raises:
        ProtocolError: Unknown version or kind, truncated, oversized or malformed.
    """
    n = len(buf)
    if n < PREFIX_SIZE:
        raise ProtocolError(f"truncated frame: {n} bytes, the prefix needs {PREFIX_SIZE}")
    version, kind, flags, seq, _, call_id, hlen, plen = _unpack_prefix(buf)
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    kind_enum = _KIND_BY_VALUE.get(kind)
    if kind_enum is None:
        raise ProtocolError(f"unknown frame kind {kind}")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown frame flags {flags:#x}")
    if hlen > MAX_HEADER_SIZE:
        raise ProtocolError(f"oversized header: {hlen} bytes (limit {MAX_HEADER_SIZE})")
    end = PREFIX_SIZE + hlen
    total = end + plen
    if total > n:
        raise ProtocolError(f"truncated frame: {n} bytes received, {total} announced")
    if exact and total != n:
        raise ProtocolError(f"frame of {total} bytes followed by {n - total} stray bytes")
    if kind_enum is Kind.BATCH:
        return Header(kind_enum, call_id, seq=seq), memoryview(buf)[end:total]
    try:
        fields = _unpackb(buf[PREFIX_SIZE:end], **_HEADER_LIMITS)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"malformed frame header: {exc}") from None
    if type(fields) is not list or len(fields) != 5:
        raise ProtocolError("malformed frame header: expected an array of 5 fields")
    method, priority, timeout, part_sizes, metadata = fields
    if (
        type(method) is not str
        or not (priority is None or (type(priority) is int and 0 <= priority <= 255))
        or not (timeout is None or type(timeout) is float or type(timeout) is int)
        or type(part_sizes) is not list
        or not (metadata is None or type(metadata) is dict)
    ):
        raise ProtocolError("malformed frame header: a field has the wrong type")
    if timeout is not None and not (_isfinite(timeout) and timeout >= 0):
        raise ProtocolError(f"malformed frame header: timeout {timeout!r} is not finite and >= 0")
    if metadata:
        for key, value in metadata.items():
            if type(key) is not str or not (type(value) is str or type(value) is bytes):
                raise ProtocolError("malformed frame header: metadata must map str to str or bytes")
    if part_sizes:
        if len(part_sizes) > MAX_PARTS or any(type(s) is not int or s < 0 for s in part_sizes):
            raise ProtocolError("malformed frame header: bad part sizes")
        if max_size is not None and total + sum(part_sizes) > max_size:
            raise ProtocolError(
                f"oversized message: {total + sum(part_sizes)} bytes announced, "
                f"the limit is {max_size}"
            )
    elif flags & _PAYLOAD_OOB:
        raise ProtocolError("malformed frame: out-of-band payload without its part")
    if flags & _PAYLOAD_OOB and plen:
        raise ProtocolError("malformed frame: out-of-band payload and an inline one")
    if max_size is not None and total > max_size:
        raise ProtocolError(f"oversized message: {total} bytes, the limit is {max_size}")
    header = Header(
        kind_enum, call_id, method, priority, timeout, flags, tuple(part_sizes), metadata, seq
    )
    return header, memoryview(buf)[end:total]


def decode_payload(
    header: Header,
    payload: Any,
    parts: Sequence[Any] = (),
    *,
    array_hook: Callable[[ArrayData], Any] | None = None,
) -> Any:
    """Decode a frame's payload, putting its received parts back in place.

    Args:
        header: The frame's header (from :func:`decode_header`).
        payload: The inline payload view.
        parts: The received data parts, in order (``len == len(header.parts)``).
        array_hook: Turns each decoded :class:`ArrayData` into an array object
            (default: the :class:`ArrayData` itself).

    Returns:
        The payload object. Parts come back as the received buffers (bytearray).

    Raises:
        ProtocolError: Malformed msgpack or a reference to a missing part.
    """
    if len(parts) != len(header.parts):
        raise ProtocolError(f"frame announced {len(header.parts)} parts, {len(parts)} given")
    if header.flags & _PAYLOAD_OOB:
        payload, parts = parts[-1], parts[:-1]
    ext_hook: _ExtHook | None
    if parts:
        ext_hook = _ExtHook(parts, array_hook)
    else:
        # The common case: no parts. Reuse one hook per array_hook (no allocation).
        ext_hook = _NO_PART_HOOKS.get(array_hook)
        if ext_hook is None:
            ext_hook = _NO_PART_HOOKS[array_hook] = _ExtHook((), array_hook)
    try:
        return _unpackb(payload, ext_hook=ext_hook, use_list=True, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed payload: {exc}") from None


class _ExtHook:
    """Resolves extension values: parts by index, arrays through ``array_hook``."""

    __slots__ = ("array_hook", "parts")

    def __init__(self, parts: Sequence[Any], array_hook: Callable[[ArrayData], Any] | None) -> None:
        self.parts = parts
        self.array_hook = array_hook

    def __call__(self, code: int, data: bytes) -> Any:
        if code == EXT_PART and len(data) == 1 and data[0] < len(self.parts):
            return self.parts[data[0]]
        if code == EXT_ARRAY:
            return self._array(data)
        raise ProtocolError(f"bad extension value (code {code})")

    def _array(self, data: bytes) -> Any:
        fields = _unpackb(data, ext_hook=self, use_list=True)
        if (
            type(fields) is not list
            or len(fields) != 3
            or type(fields[0]) is not str
            or type(fields[1]) is not list
            or any(type(n) is not int or n < 0 for n in fields[1])
            or not isinstance(fields[2], (bytes, bytearray, memoryview))
        ):
            raise ProtocolError("malformed array value")
        array = ArrayData(fields[0], fields[1], fields[2])
        if self.array_hook is None:
            return array
        try:
            return self.array_hook(array)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed array value: {exc}") from None


_NO_PART_HOOKS: dict[Callable[[ArrayData], Any] | None, _ExtHook] = {}


def encode_control(message: dict[str, Any]) -> bytes:
    """Encode a control message (bootstrap connection): 4-byte length + msgpack map."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return _CONTROL_LEN.pack(len(body)) + body


def control_length(prefix: bytes, limit: int = 1 << 20) -> int:
    """The body length announced by a control message's 4-byte prefix.

    Raises:
        ProtocolError: The announced length exceeds ``limit``.
    """
    (n,) = _CONTROL_LEN.unpack(prefix)
    if n > limit:
        raise ProtocolError(f"oversized control message: {n} bytes (limit {limit})")
    return int(n)


def decode_control(body: bytes) -> dict[str, Any]:
    """Decode a control message body.

    Raises:
        ProtocolError: The body is not a msgpack map.
    """
    try:
        obj = msgpack.unpackb(body, **_CONTROL_LIMITS)
    except Exception as exc:
        raise ProtocolError(f"malformed control message: {exc}") from None
    if type(obj) is not dict:
        raise ProtocolError("malformed control message: expected a map")
    return obj
