"""Validation of packed UCP worker addresses (UCX 1.21) before they reach UCX.

A worker address arrives from a peer in its hello/welcome and becomes a UCX endpoint
(``ucp_ep_create`` with ``UCP_EP_PARAM_FIELD_REMOTE_ADDRESS``). UCX trusts it
completely: ``ucp_address_unpack`` (``src/ucp/wireup/address.c``) takes no length,
asserts on an unknown format version (``addr_version == UCP_OBJECT_VERSION_V2``, which
aborts the process), reads every length byte as given and walks past the end of the
buffer when they lie; the transports then read their device and interface addresses
without a length either. So :func:`validate_worker_address` parses the whole address
the way ``ucp_address_unpack`` does, with a bounds check on every read, and accepts
only what UCX 1.21 itself packs for a worker (``ucp_worker_get_address``).

Layout (little endian, as the packing host wrote it; ``v1`` is UCX's default
``UCX_ADDRESS_VERSION``, ``v2`` the compact one)::

    header      v1: 1 byte  = version (4 bits, 0) | flags (4 bits) << 4
                v2: 2 bytes = version (4 bits, 1) | release (4 bits) << 4, flags
    uuid        8 bytes (always in v1, whose unpacker is told to expect it;
                in v2 when the WORKER_UUID flag is set)
    client id   8 bytes when the CLIENT_ID flag is set
    name        when the DEBUG_INFO flag is set: 1 length byte + that many bytes
    devices     a single 0xff byte for "no devices", else, until one is LAST:
        md      1 byte: EMPTY (0x80) | md index (7 bits; v2: 0x7f = next byte)
        dev     1 byte: LAST 0x80 | NUM_PATHS 0x40 | SYS_DEVICE 0x20 | length
                (5 bits; v2: 0x1f = next byte); then the paths byte, the system
                device byte, the device address
        ifaces  unless EMPTY, until one is LAST:
            tl name checksum (2 bytes: crc16 of the transport name)
            attributes (v1: 16 bytes, 3 floats + prio/caps; v2: 8 bytes)
            iface   1 byte: LAST 0x80 | HAS_EP 0x40 | length (6 bits; v2: 0x3f =
                    next byte); then the interface address
            eps     when HAS_EP, until one is LAST: length byte, address,
                    lane byte (LAST 0x80 | lane)
    (v1: UCX 1.21 ends with an empty pseudo device whose md index is its release)

Beyond the framing:

* interface attributes must be finite and positive where UCX divides by them or
  compares with them, and a v2 interface that takes active messages must announce a
  segment size of at least 1 KiB (UCX asserts ``rkey_size <= am.max_bcopy`` when it
  sets the endpoint up: a fuzzed address with segment size 0 aborted the process);
* md indexes must be below 64 (UCX indexes 64-entry arrays with them);
* the device and interface addresses of the transports this build of UCX has on one
  host (``self``, ``tcp``, ``sysv``, ``posix``, ``cma``) must have the layouts those
  transports pack, namespace variants included, since their ``is_reachable`` and
  endpoint code read them without a length. An entry for another transport
  (InfiniBand, CUDA, ...) is checked for framing only: UCX hands it to a transport
  only when one with the same name checksum is present locally.

The tests fuzz this with random, truncated and mutated real addresses and make
endpoints (and send eager and rendezvous messages) from everything accepted, in a
probe process that must survive.

Not checked (and not checkable from the bytes): that the address belongs to the peer
that sent it, or that the ports, shared-memory segment ids, process ids and
``/proc/<pid>/fd/<n>`` references in it are the peer's own. A well-formed address can
name another process's segment or file on this host, which UCX then maps and writes
to; authenticate the handshake (``auth_token``) when peers are not trusted.

This module is pure: no ucxx, no asyncio.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Final

from ..errors import ProtocolError

__all__ = [
    "MAX_ADDRESS_SIZE",
    "KNOWN_TRANSPORTS",
    "AddressEntry",
    "WorkerAddress",
    "parse_worker_address",
    "tl_name_checksum",
    "validate_worker_address",
]

#: The largest worker address accepted (UCX 1.21 packs a few hundred bytes).
MAX_ADDRESS_SIZE: Final = 64 * 1024

_V1: Final = 0  # UCP_OBJECT_VERSION_V1
_V2: Final = 1  # UCP_OBJECT_VERSION_V2

# Header flags (UCP_ADDRESS_HEADER_FLAG_*).
_HDR_DEBUG_INFO: Final = 0x01
_HDR_WORKER_UUID: Final = 0x02
_HDR_CLIENT_ID: Final = 0x04
_HDR_AM_ONLY: Final = 0x08
_HDR_KNOWN: Final = _HDR_DEBUG_INFO | _HDR_WORKER_UUID | _HDR_CLIENT_ID | _HDR_AM_ONLY

_NULL_RESOURCE: Final = 0xFF  # UCP_NULL_RESOURCE: "no devices"
_MAX_RESOURCES: Final = 128  # UCP_MAX_RESOURCES: address entries per address
_MAX_MDS: Final = 64  # UCP_MAX_MDS: md indexes index arrays of this size
_MAX_LANES: Final = 64  # UCP_MAX_LANES: ep addresses per entry
_MAX_DEVICES: Final = 64  # device indexes index 64-bit device bitmaps

_FLAG_LAST: Final = 0x80  # UCP_ADDRESS_FLAG_LAST
_FLAG_HAS_EP_ADDR: Final = 0x40  # iface length byte
_FLAG_NUM_PATHS: Final = 0x40  # device length byte
_FLAG_SYS_DEVICE: Final = 0x20  # device length byte
_FLAG_MD_EMPTY_DEV: Final = 0x80  # md byte
_MD_MASK: Final = 0x7F  # UCP_ADDRESS_FLAG_MD_MASK
_DEVICE_LEN_MASK: Final = 0x1F  # UCP_ADDRESS_DEVICE_LEN_MASK
_IFACE_LEN_MASK: Final = 0x3F  # UCP_ADDRESS_IFACE_LEN_MASK
_MD_LEGACY_BITS: Final = 0x60  # UCP_ADDRESS_FLAG_MD_INDEX_LEGACY_BITS
_MAX_LEGACY_RELEASE: Final = 18  # releases up to 1.18 pack legacy md bits
_RELEASE_BITS_MAX: Final = 16  # UCP_ADDRESS_RELEASE_VERSION_MAX
_API_MINOR: Final = 21  # UCP_API_MINOR of UCX 1.21

_V1_ATTR = struct.Struct("<fffI")  # overhead, bandwidth, lat_ovh, prio_cap_flags
_V2_ATTR = struct.Struct("<BBBBHH")  # overhead, bandwidth, latency, prio, seg, flags
_V2_FLAGS_KNOWN: Final = (1 << 10) - 1  # UCP_ADDR_IFACE_FLAG_* (10 bits)
#: UCP_ADDR_IFACE_FLAG_AM_SYNC | CB_ASYNC | TAG_EAGER: the interface receives messages.
_V2_AM_FLAGS: Final = 0x02 | 0x04 | 0x20
_SEG_SIZE_FACTOR: Final = 64  # UCP_ADDRESS_IFACE_SEG_SIZE_FACTOR
#: The smallest segment size accepted for such an interface (UCX packs 8 KiB).
_MIN_AM_SEG_SIZE: Final = 1024
_FP8_EXPONENT_MASK: Final = 0x0F
_FP8_NAN: Final = 0x0F  # exponent nibble of NaN and infinity
_SYS_DEVICE_UNKNOWN: Final = 0xFF  # UCS_SYS_DEVICE_ID_UNKNOWN

# Transport address layouts (UCT, v1.21).
_LOCAL_ADDR_NS_FLAG: Final = 1 << 63  # UCT_IFACE_LOCAL_ADDR_FLAG_NS
_TCP_FLAG_LOOPBACK: Final = 0x01  # UCT_TCP_DEVICE_ADDR_FLAG_LOOPBACK
_AF_INET: Final = 2
_AF_INET6: Final = 10
_CMA_FLAG_PID_NS: Final = 1 << 31  # UCT_CMA_IFACE_ADDR_FLAG_PID_NS
_POSIX_FLAG_PROCFS: Final = 1 << 63  # UCT_POSIX_SEG_FLAG_PROCFS
_POSIX_FLAG_SHM_OPEN: Final = 1 << 62  # UCT_POSIX_SEG_FLAG_SHM_OPEN
_POSIX_FLAG_PID_NS: Final = 1 << 60  # UCT_POSIX_SEG_FLAG_PID_NS


def tl_name_checksum(name: str) -> int:
    """UCX's checksum of a transport name (``ucs_crc16_string``, CRC-16-CCITT).

    Args:
        name: A transport name such as ``"tcp"``.

    Returns:
        The 16-bit checksum an address entry carries for that transport.
    """
    crc = 0xFFFF
    for byte in name.encode():
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x8408 if crc & 1 else 0)
    return ~crc & 0xFFFF


#: Transports whose device and interface address layouts are checked, by checksum.
KNOWN_TRANSPORTS: Final = {
    tl_name_checksum(name): name for name in ("self", "tcp", "sysv", "posix", "cma")
}


@dataclass(frozen=True, slots=True)
class AddressEntry:
    """One transport interface of a worker address (an ``ucp_address_entry_t``).

    Attributes:
        tl_checksum: The transport name checksum.
        transport: The transport's name when it is one of :data:`KNOWN_TRANSPORTS`.
        md_index: The memory domain index (as UCX will use it).
        device_index: The position of the device in the address.
        device_address: The device address bytes.
        iface_address: The interface address bytes.
        num_paths: Paths on the device.
        sys_device: The system device id (255: unknown).
    """

    tl_checksum: int
    transport: str | None
    md_index: int
    device_index: int
    device_address: bytes
    iface_address: bytes
    num_paths: int
    sys_device: int


@dataclass(frozen=True, slots=True)
class WorkerAddress:
    """A parsed worker address.

    Attributes:
        version: 1 or 2 (``UCX_ADDRESS_VERSION``).
        flags: The header flags.
        uuid: The worker's unique id (0 when absent).
        release: The packer's UCX minor release (0 when unknown).
        name: The worker name (debug info), if packed.
        entries: The transport interfaces.
    """

    version: int
    flags: int
    uuid: int
    release: int
    name: bytes | None
    entries: tuple[AddressEntry, ...]


class _Reader:
    """Bounds-checked little-endian reads over the address."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def fail(self, why: str, at: int | None = None) -> ProtocolError:
        where = self.pos if at is None else at
        return ProtocolError(
            f"invalid UCX worker address ({len(self.buf)} bytes): {why} at byte {where}"
        )

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise self.fail(f"truncated {what} (needs {n} bytes, {len(self.buf) - self.pos} left)")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def byte(self, what: str) -> int:
        if self.pos >= len(self.buf):
            raise self.fail(f"truncated: {what} missing")
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def peek(self, what: str) -> int:
        if self.pos >= len(self.buf):
            raise self.fail(f"truncated: {what} missing")
        return self.buf[self.pos]

    def extended(self, first: int, mask: int, version: int, what: str) -> int:
        """``ucp_address_unpack_byte_extended``: v2 escapes a full mask to the next byte."""
        value = first & mask
        if version == _V2 and value == mask:
            value = self.byte(f"{what} (extension byte)")
        return value


def _unpack_release(packed: int) -> int:
    """``ucp_address_unpack_release_version`` for UCX 1.21."""
    delta = _API_MINOR % _RELEASE_BITS_MAX - packed
    base = (
        _API_MINOR // _RELEASE_BITS_MAX
        + (delta >= _RELEASE_BITS_MAX // 2)
        - (delta <= -_RELEASE_BITS_MAX // 2)
    )
    return packed + max(0, base) * _RELEASE_BITS_MAX


def parse_worker_address(buf: bytes) -> WorkerAddress:
    """Parse a packed UCP worker address as UCX 1.21's ``ucp_address_unpack`` would.

    Every read is bounds-checked, and everything ``ucp_address_unpack`` or the
    transports would trip over (an assertion, a read past the end, an index past an
    array) is refused, as is anything UCX 1.21 does not pack for a worker address.

    Args:
        buf: The address bytes as the peer sent them.

    Returns:
        The parsed address.

    Raises:
        ProtocolError: The bytes are not a valid worker address; the message says
            what is wrong and where.
    """
    if not isinstance(buf, bytes):
        raise ProtocolError(f"invalid UCX worker address: expected bytes, got {type(buf).__name__}")
    if len(buf) > MAX_ADDRESS_SIZE:
        raise ProtocolError(
            f"invalid UCX worker address: {len(buf)} bytes exceeds the limit of {MAX_ADDRESS_SIZE}"
        )
    r = _Reader(buf)
    head = r.byte("header")
    version = head & 0x0F
    if version == _V1:
        flags = head >> 4
        release = 0  # v1 carries it in a pseudo device after the real ones
    elif version == _V2:
        release = _unpack_release(head >> 4)
        flags = r.byte("header flags")
        if flags & ~_HDR_KNOWN:
            raise r.fail(f"unknown header flags 0x{flags:02x}", r.pos - 1)
    else:
        raise r.fail(f"unknown address version {version} (UCX knows 0 and 1)", 0)
    uuid = 0
    # The unpacker is called with UCP_ADDRESS_PACK_FLAG_WORKER_UUID: a v1 address
    # always carries the uuid, a v2 one when its header says so.
    if version == _V1 or flags & _HDR_WORKER_UUID:
        uuid = int.from_bytes(r.take(8, "worker uuid"), "little")
    if flags & _HDR_CLIENT_ID:
        r.take(8, "client id")
    name: bytes | None = None
    if flags & _HDR_DEBUG_INFO:
        length = r.byte("worker name length")
        name = r.take(length, "worker name")
    if r.peek("device list") == _NULL_RESOURCE:
        raise r.fail("the address has no transports")
    entries: list[AddressEntry] = []
    raw_md: list[int] = []
    device_index = 0
    ep_addresses = 0
    while True:
        if device_index >= _MAX_DEVICES:
            raise r.fail(f"more than {_MAX_DEVICES} devices")
        md_byte = r.byte("md index")
        empty = bool(md_byte & _FLAG_MD_EMPTY_DEV)
        md_index = r.extended(md_byte, _MD_MASK, version, "md index")
        dev_byte = r.byte("device address length")
        dev_flags = dev_byte & ~_DEVICE_LEN_MASK
        last_dev = bool(dev_flags & _FLAG_LAST)
        dev_len = r.extended(dev_byte, _DEVICE_LEN_MASK, version, "device address length")
        num_paths = 1
        if dev_flags & _FLAG_NUM_PATHS:
            num_paths = r.byte("number of paths")
            if num_paths < 2:
                raise r.fail(f"invalid number of paths {num_paths}", r.pos - 1)
        sys_device = _SYS_DEVICE_UNKNOWN
        if dev_flags & _FLAG_SYS_DEVICE:
            sys_device = r.byte("system device")
        if empty and last_dev:
            release = _unpack_release(md_index & (_RELEASE_BITS_MAX - 1))
        dev_addr = r.take(dev_len, "device address")
        last_tl = empty
        while not last_tl:
            if len(entries) >= _MAX_RESOURCES:
                raise r.fail(f"more than {_MAX_RESOURCES} transport entries")
            start = r.pos
            csum = int.from_bytes(r.take(2, "transport name checksum"), "little")
            _check_attributes(r, version)
            iface_byte = r.byte("interface address length")
            last_tl = bool(iface_byte & _FLAG_LAST)
            has_ep = bool(iface_byte & _FLAG_HAS_EP_ADDR)
            iface_len = r.extended(iface_byte, _IFACE_LEN_MASK, version, "iface address length")
            iface_addr = r.take(iface_len, "interface address")
            eps = 0
            last_ep = not has_ep
            while not last_ep:
                if eps >= _MAX_LANES:
                    raise r.fail(f"more than {_MAX_LANES} endpoint addresses")
                ep_len = r.byte("endpoint address length")
                r.take(ep_len, "endpoint address")
                lane = r.byte("lane index")
                last_ep = bool(lane & _FLAG_LAST)
                eps += 1
            ep_addresses += eps
            transport = KNOWN_TRANSPORTS.get(csum)
            if transport is not None:
                why = _check_transport(transport, dev_addr, iface_addr)
                if why:
                    raise r.fail(f"{transport}: {why}", start)
            raw_md.append(md_index)
            entries.append(
                AddressEntry(
                    csum,
                    transport,
                    md_index,
                    device_index,
                    dev_addr,
                    iface_addr,
                    num_paths,
                    sys_device,
                )
            )
        device_index += 1
        if last_dev:
            break
    if r.pos != len(buf):
        raise r.fail(f"{len(buf) - r.pos} trailing bytes after the last device")
    if ep_addresses:
        raise ProtocolError(
            "invalid UCX worker address: it carries endpoint addresses (a worker address has none)"
        )
    if not entries:
        raise ProtocolError("invalid UCX worker address: the address has no transports")
    legacy = version == _V1 and release <= _MAX_LEGACY_RELEASE
    fixed: list[AddressEntry] = []
    for entry, md in zip(entries, raw_md, strict=True):
        effective = md & ~_MD_LEGACY_BITS if legacy else md  # ..._adjust_unpacked_md_index
        if effective >= _MAX_MDS:
            raise ProtocolError(
                f"invalid UCX worker address: md index {effective} (UCX has at most {_MAX_MDS})"
            )
        fixed.append(entry if effective == md else _with_md(entry, effective))
    return WorkerAddress(version + 1, flags, uuid, release, name, tuple(fixed))


def _with_md(entry: AddressEntry, md_index: int) -> AddressEntry:
    return AddressEntry(
        entry.tl_checksum,
        entry.transport,
        md_index,
        entry.device_index,
        entry.device_address,
        entry.iface_address,
        entry.num_paths,
        entry.sys_device,
    )


def _check_attributes(r: _Reader, version: int) -> None:
    """The interface attributes (non-unified mode; no resource index is packed)."""
    at = r.pos
    if version == _V1:
        overhead, bandwidth, lat_ovh, _prio_caps = _V1_ATTR.unpack(
            r.take(_V1_ATTR.size, "interface attributes")
        )
        if not all(math.isfinite(v) for v in (overhead, bandwidth, lat_ovh)):
            raise r.fail("non-finite interface attribute", at)
        if bandwidth <= 0 or overhead < 0 or lat_ovh < 0:
            raise r.fail(
                f"invalid interface attributes (overhead {overhead}, bandwidth "
                f"{bandwidth}, latency {lat_ovh})",
                at,
            )
        return
    overhead8, bandwidth8, latency8, _prio, seg, iflags = _V2_ATTR.unpack(
        r.take(_V2_ATTR.size, "interface attributes")
    )
    for value in (overhead8, bandwidth8, latency8):
        if value & _FP8_EXPONENT_MASK == _FP8_NAN:
            raise r.fail("non-finite interface attribute", at)
    if bandwidth8 & _FP8_EXPONENT_MASK == 0:
        raise r.fail("zero interface bandwidth", at)
    if iflags & ~_V2_FLAGS_KNOWN:
        raise r.fail(f"unknown interface flags 0x{iflags:04x}", at)
    # An interface that takes active messages (the AM or tag lane) caps UCX's bcopy
    # size at its segment size; UCX asserts that its rendezvous keys fit in one
    # (ucp_ep.c: rkey_size <= am.max_bcopy), and fragment sizes derive from it.
    if iflags & _V2_AM_FLAGS and seg * _SEG_SIZE_FACTOR < _MIN_AM_SEG_SIZE:
        raise r.fail(f"segment size {seg * _SEG_SIZE_FACTOR} of an active-message interface", at)


def _check_local_device(dev: bytes) -> str:
    """``uct_iface_local_addr_ns_t``: a system id, plus a namespace when flagged."""
    if len(dev) not in (8, 16):
        return f"device address of {len(dev)} bytes (8 or 16 expected)"
    has_ns = bool(int.from_bytes(dev[:8], "little") & _LOCAL_ADDR_NS_FLAG)
    if has_ns != (len(dev) == 16):
        return "device address length does not match its namespace flag"
    return ""


def _check_transport(transport: str, dev: bytes, iface: bytes) -> str:
    """The address layouts UCT 1.21 packs for the transports of one host."""
    if transport == "self":
        if dev or len(iface) != 8:
            return "expected no device address and an 8-byte interface address"
        return ""
    if transport == "tcp":
        if len(dev) < 2 or dev[0] & ~_TCP_FLAG_LOOPBACK or dev[1] not in (_AF_INET, _AF_INET6):
            return "malformed device address"
        # flags, family, then uct_iface_local_addr_ns_t (loopback) or the IP address
        inet = 4 if dev[1] == _AF_INET else 16
        expected = 2 + (16 if dev[0] & _TCP_FLAG_LOOPBACK else inet)
        if len(dev) != expected:
            return f"device address of {len(dev)} bytes ({expected} expected)"
        if len(iface) != 2:
            return f"interface address of {len(iface)} bytes (2 expected)"
        return ""
    why = _check_local_device(dev)
    if why:
        return why
    if transport == "sysv":
        if len(iface) != 8:
            return f"interface address of {len(iface)} bytes (8 expected)"
        return ""
    if transport == "cma":
        # ucs_cma_iface_ext_device_addr_t: a pid, then (aligned) its pid namespace
        if len(iface) not in (4, 16):
            return f"interface address of {len(iface)} bytes (4 or 16 expected)"
        pid_ns = bool(int.from_bytes(iface[:4], "little") & _CMA_FLAG_PID_NS)
        if pid_ns != (len(iface) == 16):
            return "interface address length does not match its pid namespace flag"
        return ""
    # posix: uct_mm_iface_addr_t (the FIFO's segment id) + the mapper's part
    if len(iface) < 8:
        return f"interface address of {len(iface)} bytes (at least 8 expected)"
    seg_id = int.from_bytes(iface[:8], "little")
    rest = iface[8:]
    ns_size = 8 if seg_id & _POSIX_FLAG_PID_NS else 0
    if seg_id & (_POSIX_FLAG_PROCFS | _POSIX_FLAG_SHM_OPEN):
        if len(rest) != ns_size:
            return "interface address length does not match its segment flags"
        return ""
    # A backing file in a directory: the directory path follows, NUL-terminated.
    if len(rest) < max(2, ns_size) or rest[-1] != 0 or 0 in rest[:-1]:
        return "malformed backing file directory"
    return ""


def validate_worker_address(buf: bytes) -> None:
    """Refuse a worker address UCX could not safely unpack; see the module docstring.

    Args:
        buf: The address bytes as the peer sent them.

    Raises:
        ProtocolError: The bytes are not a valid UCX 1.21 worker address (too long,
            truncated, an unknown version or flag, a length or index out of range,
            trailing bytes, or a transport address of the wrong shape).
    """
    parse_worker_address(buf)
