"""Shared parts: large parts between processes on one host travel as sealed memory files.

From the bytes up: the descriptor and trailer (wire), the protocol machine's checks
(pure), the memory files themselves (this process), then real servers in their own
processes over UCX, and hostile peers naming files they should not.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import PTRACE_SCOPE, until
from helpers.rawpeer import RawPeer

import ucxrpc
from ucxrpc.errors import ConnectionLost, ProtocolError
from ucxrpc.io import shared
from ucxrpc.protocol import Deliver, Fail, Inbound, Outbound, Receive
from ucxrpc.wire import codec
from ucxrpc.wire import shared as wire
from ucxrpc.wire.codec import Flags, Kind

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not shared.available(), reason="no memfd on this system"),
]

MIB = 1 << 20
KEY = bytes(range(16))
SECRET, TAGKEY = 0x1122334455667788, 0xABCDE12345


# -- wire ---------------------------------------------------------------------------------


def test_a_descriptor_names_an_fd_or_an_address_and_a_length() -> None:
    desc = wire.descriptor(wire.FILE, 17, 5 * MIB)
    assert len(desc) == wire.DESCRIPTOR_SIZE
    assert wire.parse_descriptor(desc) == (wire.FILE, 17, 5 * MIB, 0, 0)
    mem = wire.descriptor(wire.MEMORY, 0x7F00_1234_5678, 5 * MIB, 0x7F00_0000_1000, 99)
    parsed = wire.parse_descriptor(mem)
    assert parsed == (wire.MEMORY, 0x7F00_1234_5678, 5 * MIB, 0x7F00_0000_1000, 99)
    bad_kind = bytes([3]) + desc[1:]
    huge_fd = wire.descriptor(wire.FILE, 1 << 40, 5 * MIB)
    null = wire.descriptor(wire.MEMORY, 0, 5 * MIB, 0x1000, 1)
    no_ticket = wire.descriptor(wire.MEMORY, 0x1000, 5 * MIB)
    file_ticket = wire.descriptor(wire.FILE, 17, 5 * MIB, 0x1000, 1)
    empty = bytes(wire.DESCRIPTOR_SIZE)
    for bad in (desc[:-1], desc + b"\0", bad_kind, empty, huge_fd, null, no_ticket, file_ticket):
        with pytest.raises(ProtocolError):
            wire.parse_descriptor(bad)


def test_a_trailer_binds_key_frame_part_and_length() -> None:
    mac = wire.trailer(KEY, 7, 1, 100)
    assert len(mac) == wire.TRAILER_SIZE
    assert wire.check_trailer(KEY, 7, 1, 100, mac)
    other_key = bytes(16)
    for args in ((other_key, 7, 1, 100), (KEY, 8, 1, 100), (KEY, 7, 2, 100), (KEY, 7, 1, 101)):
        assert not wire.check_trailer(*args, mac)


# -- the protocol machine --------------------------------------------------------------------


def _flagged(sizes: list[int]) -> tuple[Inbound, list[tuple[int, Any]]]:
    """A receiver, and the messages of a request whose parts of ``sizes`` are shared."""
    enc = codec.encode(
        Kind.REQUEST, 5, [[bytes(n) for n in sizes], {}], method="m", oob_threshold=1024
    )
    codec.add_flags(enc.frame, Flags.SHARED_PARTS)
    inbound = Inbound(9, SECRET, TAGKEY)
    return inbound, Outbound(9, SECRET, TAGKEY).send(5, enc)


def test_a_shared_part_is_received_as_a_descriptor_then_mapped() -> None:
    inbound, [(ftag, frame), (ptag, _)] = _flagged([codec.SHARED_MIN])
    inbound.on_frame(ftag, frame)
    inbound.on_part(ptag, wire.DESCRIPTOR_SIZE, "handle")
    [receive] = inbound.take()
    assert type(receive) is Receive and receive.shared is not None
    assert len(receive.buffer) == wire.DESCRIPTOR_SIZE
    assert receive.shared == (0, 1, codec.SHARED_MIN)
    mapped = memoryview(bytearray(codec.SHARED_MIN))
    inbound.on_part_done(receive.token, True, mapped)
    [deliver] = inbound.take()
    assert type(deliver) is Deliver and deliver.parts == [mapped]


def test_a_small_part_of_a_flagged_frame_travels_as_bytes() -> None:
    inbound, [(ftag, frame), (small, _), (big, _)] = _flagged(
        [codec.SHARED_MIN - 1, codec.SHARED_MIN]
    )
    inbound.on_frame(ftag, frame)
    inbound.on_part(small, codec.SHARED_MIN - 1, "h1")
    inbound.on_part(big, wire.DESCRIPTOR_SIZE, "h2")
    first, second = inbound.take()
    assert type(first) is Receive and first.shared is None
    assert len(first.buffer) == codec.SHARED_MIN - 1
    assert type(second) is Receive and second.shared is not None


@pytest.mark.parametrize("length", [0, wire.DESCRIPTOR_SIZE - 1, codec.SHARED_MIN])
def test_anything_but_a_descriptor_fails_the_call(length: int) -> None:
    inbound, [(ftag, frame), (ptag, _)] = _flagged([codec.SHARED_MIN])
    inbound.on_frame(ftag, frame)
    inbound.on_part(ptag, length, "handle")
    actions = inbound.take()
    assert [type(a).__name__ for a in actions] == ["Discard", "Fail"]
    assert "descriptor" in actions[1].error.message
    assert actions[0].release == (0 << 8) | 1  # the peer is told to close its file


def test_shared_parts_of_a_failed_call_are_released() -> None:
    inbound, [(ftag, frame), (p1, _), (p2, _)] = _flagged([codec.SHARED_MIN] * 2)
    inbound.on_frame(ftag, frame)
    inbound.on_part(p1, 3, "bad")  # not a descriptor: the call fails
    inbound.on_part(p2, wire.DESCRIPTOR_SIZE, "good")
    discards = [a for a in inbound.take() if type(a).__name__ == "Discard"]
    assert [d.release for d in discards] == [1, 2]


@pytest.mark.parametrize("mapped", [None, b"", b"x" * (codec.SHARED_MIN - 1)])
def test_mapped_bytes_of_another_length_fail_the_call(mapped: Any) -> None:
    inbound, [(ftag, frame), (ptag, _)] = _flagged([codec.SHARED_MIN])
    inbound.on_frame(ftag, frame)
    inbound.on_part(ptag, wire.DESCRIPTOR_SIZE, "handle")
    [receive] = inbound.take()
    inbound.on_part_done(receive.token, True, mapped)
    [fail] = inbound.take()
    assert type(fail) is Fail and isinstance(fail.error, ProtocolError)
    assert inbound.announced_bytes == 0


def test_a_mapping_failure_fails_that_call_with_its_reason() -> None:
    inbound, [(ftag, frame), (ptag, _)] = _flagged([codec.SHARED_MIN])
    inbound.on_frame(ftag, frame)
    inbound.on_part(ptag, wire.DESCRIPTOR_SIZE, "handle")
    [receive] = inbound.take()
    inbound.on_part_done(receive.token, False, error=ProtocolError("shared part refused: x"))
    [fail] = inbound.take()
    assert type(fail) is Fail and fail.error.message == "shared part refused: x"


# -- memory files (this process) ---------------------------------------------------------------


def _check(seq: int, part: int, length: int) -> Any:
    return lambda got: wire.check_trailer(KEY, seq, part, length, got)


@pytest.fixture
def fds() -> Iterator[list[int]]:
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def test_a_part_is_written_once_and_mapped_writable_copy_on_write(fds: list[int]) -> None:
    data = os.urandom(MIB + 1)
    fd = shared.export([data, wire.trailer(KEY, 3, 1, len(data))])
    fds.append(fd)
    view = shared.open_part(os.getpid(), fd, len(data), _check(3, 1, len(data)))
    assert view == data and not view.readonly
    view[0] ^= 0xFF  # the receiver's copy changes, the file does not
    again = shared.open_part(os.getpid(), fd, len(data), _check(3, 1, len(data)))
    assert again == data
    with pytest.raises(OSError):
        os.write(fd, b"more")  # sealed


def test_files_that_are_not_sealed_ucxrpc_memory_files_are_refused(fds: list[int]) -> None:
    n = codec.SHARED_MIN
    good = wire.trailer(KEY, 1, 1, n)
    unsealed = os.memfd_create("ucxrpc", os.MFD_ALLOW_SEALING)
    os.write(unsealed, bytes(n) + good)
    stranger = os.memfd_create("other", os.MFD_ALLOW_SEALING)
    os.write(stranger, bytes(n) + good)
    fcntl.fcntl(stranger, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK)
    read_end, write_end = os.pipe()
    short = shared.export([bytes(n - 1), good])
    wrong_mac = shared.export([bytes(n), wire.trailer(bytes(16), 1, 1, n)])
    fds.extend([unsealed, stranger, read_end, write_end, short, wrong_mac])
    cases = {
        unsealed: "not sealed",
        stranger: "not a ucxrpc memory file",
        read_end: "not a ucxrpc memory file",
        short: "announced",
        wrong_mac: "trailer",
        10_000: "unavailable",
    }
    for fd, reason in cases.items():
        with pytest.raises(ProtocolError, match=reason):
            shared.open_part(os.getpid(), fd, n, _check(1, 1, n))


def test_a_probe_proves_the_peer_can_be_read(fds: list[int]) -> None:
    fd, field = shared.make_probe(b"nonce-0123456789")
    fds.append(fd)
    assert shared.read_probe(field, b"nonce-0123456789") == os.getpid()
    assert shared.read_probe(field, b"nonce-9876543210") is None
    assert shared.read_probe(field[:-1], b"nonce-0123456789") is None
    assert shared.read_probe(bytes(8), b"nonce-0123456789") is None


def test_exports_are_bounded_released_and_expire() -> None:
    now = [0.0]
    exports = shared.Exports(limit=3 * MIB, hold=10.0, clock=lambda: now[0], max_files=3)
    made = [shared.export([bytes(MIB)]) for _ in range(3)]
    told: list[Any] = []
    for key, fd in enumerate(made):
        assert exports.room(MIB)
        exports.add(key, fd, MIB, told.append)
    assert not exports.room(1) and exports.bytes == 3 * MIB
    assert exports.release(0) and not exports.release(0)
    assert told == [None]
    with pytest.raises(OSError):
        os.fstat(made[0])  # closed
    assert exports.room(MIB) and not exports.room(MIB, files=2)  # files are bounded too
    now[0] = 11.0
    exports.expire()
    assert len(exports) == 0 and exports.bytes == 0
    assert [type(e).__name__ for e in told] == ["NoneType", "DeadlineExceeded", "DeadlineExceeded"]
    for fd in made[1:]:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_files_held_over_the_process_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared.Exports, "process_limit", shared.Exports.process_held + 1)
    one = shared.Exports(limit=MIB, hold=1.0, clock=lambda: 0.0)
    other = shared.Exports(limit=MIB, hold=1.0, clock=lambda: 0.0)
    one.add(1, shared.export([b"x"]), 1, None)
    assert not other.room(1)
    one.close()
    assert other.room(1)


def _memory_files() -> int:
    """The fds of this process that name ucxrpc memory files."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:ucxrpc")
        except OSError:
            pass
    return count


def test_mapped_parts_hold_no_fd_and_are_bounded(
    fds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    n = codec.SHARED_MIN
    fd = shared.export([bytes(n), wire.trailer(KEY, 1, 1, n)])
    fds.append(fd)
    before = _memory_files()
    views = [shared.open_part(os.getpid(), fd, n, _check(1, 1, n)) for _ in range(200)]
    assert _memory_files() == before  # a mapping keeps no fd open
    monkeypatch.setattr(shared._Mappings, "limit", shared._Mappings.live)
    with pytest.raises(ProtocolError, match="are mapped in this process"):
        shared.open_part(os.getpid(), fd, n, _check(1, 1, n))
    live = shared._Mappings.live
    del views
    assert shared._Mappings.live == live - 200  # unmapped with their last view


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file of another user")
def test_a_file_of_another_user_is_refused_even_by_root(fds: list[int]) -> None:
    # A privileged receiver must not open what an unprivileged peer points it at.
    n = codec.SHARED_MIN
    os.seteuid(65534)  # files made now belong to nobody
    try:
        fd = shared.export([bytes(n), wire.trailer(KEY, 1, 1, n)])
    finally:
        os.seteuid(0)
    fds.append(fd)
    with pytest.raises(ProtocolError, match="of this user"):
        shared.open_part(os.getpid(), fd, n, _check(1, 1, n))


# -- two processes over UCX ---------------------------------------------------------------------

SIZES = [
    codec.SHARED_MIN - 1,
    256 * 1024 - 1,
    256 * 1024,
    256 * 1024 + 1,
    MIB,
    16 * MIB + 3,
]


@pytest.mark.parametrize("size", SIZES)
async def test_large_values_cross_processes_intact(remote: Any, size: int) -> None:
    manager, client = remote
    data = os.urandom(size)
    assert await client.call("reverse", data) == data[::-1]
    assert await client.call("echo_view", memoryview(data)) == data
    sent, received, _ = manager.shared_parts
    stats = await client.call("stats")
    if size >= manager.config.shared_min:
        assert sent == 2 and received == 2, manager.shared_parts
        assert stats["received"] == 2 and stats["sent"] == 2
        # Where the kernel lets two processes of one user read each other's memory,
        # every part was read (no file made); under Yama's ptrace_scope, none was.
        reads = 2 if PTRACE_SCOPE == 0 else 0
        assert manager.shared_reads == reads and stats["read"] == reads
    else:
        assert sent == received == 0 and stats["received"] == 0


async def test_arrays_keep_dtype_and_shape_and_are_writable(remote: Any) -> None:
    manager, client = remote
    values = np.arange(300_000, dtype=np.float64).reshape(600, 500)
    got = await client.call("doubled", values)
    assert got.dtype == values.dtype and got.shape == values.shape
    assert np.array_equal(got, values * 2)
    got[0, 0] = -1.0  # writable on this side too
    assert manager.shared_parts[1] == 1


async def test_a_stream_of_mixed_sizes_arrives_in_order(remote: Any) -> None:
    _, client = remote
    sizes = [12_000, 300_000, 20, 2 * MIB, 40_000, 256 * 1024, 5, 9 * MIB]
    items = [item async for item in client.stream("blobs", sizes)]
    assert [len(i) for i in items] == sizes
    assert all(item == bytes([i % 251]) * len(item) for i, item in enumerate(items))


def _part_files() -> int:
    """This process's fds that are shared-part files (not rings, not probes)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == "/memfd:ucxrpc (deleted)"
        except OSError:
            pass
    return count


async def test_every_file_is_released_and_no_fd_is_left(remote: Any) -> None:
    manager, client = remote
    await client.call("ping")  # both sides have taken each other's frame ring by now
    before = (await client.call("stats"))["fds"]
    mine = _part_files()
    exports = client.link.exports
    assert exports is not None  # both sides proved the probe: sharing from the start
    data = os.urandom(MIB)
    for _ in range(50):
        assert await client.call("echo_view", data) == data
    # The peer's RELEASE frames follow the replies: wait for the last ones.
    await until(lambda: manager.shared_parts[2] == 0)
    assert client.link.exports is exports  # one account of files held, kept
    stats = await client.call("stats")
    assert stats["held"] == 0 and stats["sent"] == 50
    assert stats["fds"] == before
    assert _part_files() == mine  # and this process holds no more shared-part files


async def test_with_reads_off_parts_travel_as_memory_files_both_ways(spawn: Any) -> None:
    port = int(spawn("serve.py").read_ready()[0])
    async with ucxrpc.Manager(shared_reads=False) as manager:
        client = await manager.connect("127.0.0.1", port)
        assert client.link.peer_memory is None and not client.link.peer_reads
        data = os.urandom(2 * MIB)
        assert await client.call("reverse", data) == data[::-1]
        assert manager.shared_parts[:2] == (1, 1) and manager.shared_reads == 0
        stats = await client.call("stats")
        assert stats["received"] == 1 and stats["read"] == 0  # the server read no memory
        await client.close()


async def test_shared_memory_off_sends_everything_over_ucx(spawn: Any) -> None:
    port = int(spawn("serve.py").read_ready()[0])
    async with ucxrpc.Manager(shared_memory=False) as manager:
        client = await manager.connect("127.0.0.1", port)
        data = os.urandom(2 * MIB)
        assert await client.call("reverse", data) == data[::-1]
        assert manager.shared_parts == (0, 0, 0)
        assert (await client.call("stats"))["received"] == 0
        await client.close()


# -- hostile peers ------------------------------------------------------------------------------


async def _send_shared(
    raw: RawPeer, call_id: int, desc: bytes, size: int, method: str = "blob"
) -> Any:
    enc = codec.encode(Kind.REQUEST, call_id, [[bytes(size)], {}], method=method)
    codec.add_flags(enc.frame, Flags.SHARED_PARTS)
    (ftag, frame), (ptag, _) = raw.out.send(call_id, enc)
    await raw.send_tagged(ftag, frame)
    await raw.send_tagged(ptag, desc)
    return await raw.expect_reply(call_id)


async def test_a_peer_naming_files_it_should_not_gets_errors_and_nothing_else(
    served: Any, fds: list[int]
) -> None:
    server, client = served
    n = MIB
    async with RawPeer.connected(server.port, config=ucxrpc.Config()) as raw:
        # The victim's key: a file made for the victim's connection, named by the
        # attacker on its own, is refused for its trailer.
        victim_key = os.urandom(16)
        seq = raw.out.next_seq
        theirs = shared.export([os.urandom(n), wire.trailer(victim_key, seq, 1, n)])
        unsealed = os.memfd_create("ucxrpc", os.MFD_ALLOW_SEALING)
        os.write(unsealed, bytes(n + wire.TRAILER_SIZE))
        read_end, write_end = os.pipe()
        fds.extend([theirs, unsealed, read_end, write_end])
        cases = [
            (wire.descriptor(wire.FILE, theirs, n), "trailer"),
            (wire.descriptor(wire.FILE, unsealed, n), "not sealed"),
            (wire.descriptor(wire.FILE, read_end, n), "not a ucxrpc memory file"),
            (wire.descriptor(wire.FILE, 9_999, n), "unavailable"),
            (wire.descriptor(wire.FILE, theirs, n - 1), "announced"),
            (wire.descriptor(wire.FILE, theirs, n)[:-1], "descriptor"),
        ]
        for call_id, (desc, reason) in enumerate(cases, 1):
            header, value = await _send_shared(raw, call_id, desc, n)
            assert header.kind is Kind.ERROR, value
            assert value[0] == ucxrpc.StatusCode.INTERNAL and reason in value[1], value
        # The connection goes on, and so does everyone else's.
        await raw.send(99, codec.encode(Kind.REQUEST, 99, [[b"ok"], {}], method="blob"))
        assert (await raw.expect_reply(99))[1] == b"ok"
    data = os.urandom(n)
    assert await client.call("blob", data) == data


async def test_a_peer_that_did_not_prove_it_may_share_cannot_send_shared(served: Any) -> None:
    server, _ = served
    raw = RawPeer()
    await raw.connect(server.port)  # offers no shared parts
    try:
        n = MIB
        seq = raw.out.next_seq
        fd = shared.export([bytes(n), wire.trailer(raw.key, seq, 1, n)])
        try:
            header, value = await _send_shared(raw, 1, wire.descriptor(wire.FILE, fd, n), n)
        finally:
            os.close(fd)
        assert header.kind is Kind.ERROR and "may not share" in value[1], value
    finally:
        raw.close()


async def test_a_peer_naming_memory_it_should_not_gets_errors_and_nothing_else(
    served: Any,
) -> None:
    server, client = served

    async def head(data: bytes) -> list[Any]:
        return [len(data), data[:16]]

    server.add_handler(head, name="head")
    n = MIB
    async with RawPeer.connected(server.port, config=ucxrpc.Config()) as raw:
        mine = os.urandom(n)
        lent = shared.Lent(mine)
        withdrawn = shared.Lent(mine)
        withdrawn.withdraw()

        def memory(address: int, length: int, ticket: shared.Lent = lent) -> bytes:
            return wire.descriptor(wire.MEMORY, address, length, ticket.ticket, ticket.value)

        where = lent.address
        cases = [
            (memory(4096, n), "cannot read"),  # nothing mapped there
            (memory(where, n - 1), "announced"),
            (memory((1 << 63) + 4096, n), "cannot read"),  # the kernel's half
            (memory(where, n, withdrawn), "withdrawn"),  # let go before it was read
            (wire.descriptor(wire.MEMORY, where, n, 4096, lent.value), "cannot read"),
        ]
        for call_id, (desc, reason) in enumerate(cases, 1):
            header, value = await _send_shared(raw, call_id, desc, n)
            assert header.kind is Kind.ERROR, value
            assert value[0] == ucxrpc.StatusCode.INTERNAL and reason in value[1], value
        # Its own memory, named right, is read: the bytes are what it holds.
        header, value = await _send_shared(raw, 50, memory(where, n), n, method="head")
        assert header.kind is Kind.REPLY and value[0] == len(mine), value
        assert value[1] == mine[:16]
    data = os.urandom(n)
    assert await client.call("blob", data) == data


async def test_memory_is_read_only_from_a_peer_that_offered_it(served: Any) -> None:
    server, _ = served
    # Files offered, memory not: the server proved it may map files, not read memory.
    async with RawPeer.connected(server.port, config=ucxrpc.Config(shared_reads=False)) as raw:
        assert not raw.reads
        lent = shared.Lent(os.urandom(MIB))
        desc = wire.descriptor(wire.MEMORY, lent.address, MIB, lent.ticket, lent.value)
        header, value = await _send_shared(raw, 1, desc, MIB)
        assert header.kind is Kind.ERROR and "not read" in value[1], value


def test_reading_a_peer_gives_its_bytes_and_checks_every_address() -> None:
    data = os.urandom(3 * MIB + 5)
    lent = shared.Lent(data)
    peer = shared.Peer(os.getpid())
    try:
        got = peer.read(lent.address, len(data), lent.ticket, lent.value)
        assert got == data and not got.readonly  # a private, writable copy
        with pytest.raises(ProtocolError, match="cannot read"):
            peer.read(4096, MIB, lent.ticket, lent.value)
        # Runs into a page that cannot be read: an error, never a short part.
        libc = ctypes.CDLL(None)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        pages = mmap.mmap(-1, 2 * mmap.PAGESIZE)
        start = ctypes.addressof(ctypes.c_char.from_buffer(pages))
        assert libc.mprotect(start + mmap.PAGESIZE, mmap.PAGESIZE, 0) == 0  # PROT_NONE
        with pytest.raises(ProtocolError, match="cannot read"):
            peer.read(start + 100, mmap.PAGESIZE, lent.ticket, lent.value)
        # Once the sender let the buffer go, a late read fails (whatever is there now).
        lent.withdraw()
        with pytest.raises(ProtocolError, match="withdrawn"):
            peer.read(shared.address_of(data), len(data), lent.ticket, lent.value)
        assert not peer.forbidden
    finally:
        peer.close()
    assert not peer.alive()  # let go: a bare pid proves nothing
    with pytest.raises(ConnectionLost):
        peer.read(shared.address_of(data), len(data), lent.ticket, lent.value)


def test_a_peer_is_watched_whatever_its_pidfd_number() -> None:
    # select() cannot take fds from 1,024 on; a busy server has that many.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the fd limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        data = os.urandom(MIB)
        lent = shared.Lent(data)
        probe = shared.Probe(b"n" * 16)
        peer = shared.Peer.probed(os.getpid(), probe.field, b"n" * 16)
        probe.close()
        assert peer is not None and peer.alive()
        assert peer.read(lent.address, MIB, lent.ticket, lent.value) == data
        peer.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_reading_a_peer_that_died_is_connection_lost() -> None:
    code = (
        "import os, sys\n"
        "from ucxrpc.io import shared\n"
        "lent = shared.Lent(os.urandom(1 << 20))\n"
        "print(os.getpid(), lent.address, lent.ticket, lent.value, flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdin is not None
    pid, address, ticket, value = map(int, child.stdout.readline().split())
    peer = shared.Peer(pid)
    try:
        assert len(peer.read(address, 1 << 20, ticket, value)) == 1 << 20 and peer.alive()
        child.kill()
        child.wait(timeout=10)
        assert not peer.alive()
        with pytest.raises(ConnectionLost):
            peer.read(address, 1 << 20, ticket, value)
    finally:
        peer.close()
        child.stdin.close()
        child.stdout.close()


def test_a_probe_offers_memory_only_when_asked() -> None:
    with_memory, without = shared.Probe(b"n" * 16), shared.Probe(b"n" * 16, memory=False)
    try:
        assert shared.offers_memory(with_memory.field)
        assert not shared.offers_memory(without.field)
        pid = shared.read_probe(with_memory.field, b"n" * 16)
        assert pid == os.getpid()
        peer = shared.Peer.probed(pid, with_memory.field, b"n" * 16)
        assert peer is not None
        peer.close()
        assert shared.Peer.probed(pid, with_memory.field, b"m" * 16) is None  # wrong bytes
        assert shared.Peer.probed(pid, without.field, b"n" * 16) is None
    finally:
        with_memory.close()
        without.close()
        with_memory.close()  # closing twice is harmless


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a network namespace")
def test_processes_in_two_network_namespaces_do_not_share() -> None:
    code = (
        "import ctypes, os, sys\n\n"
        "if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:\n\n"
        "    sys.exit('unshare failed')\n\n"
        "from ucxrpc.io import shared\n\n"
        "fd, field = shared.make_probe(b'n' * 16)\n\n"
        "print(field.hex(), flush=True)\n\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        field = bytes.fromhex(child.stdout.readline().strip())
        assert shared.read_probe(field, b"n" * 16) is None
    finally:
        child.kill()
        child.wait(timeout=10)
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
    # The same probe from this namespace is trusted.
    fd, field = shared.make_probe(b"n" * 16)
    try:
        assert shared.read_probe(field, b"n" * 16) == os.getpid()
    finally:
        os.close(fd)


def test_a_part_of_a_peer_that_died_is_connection_lost() -> None:
    n = codec.SHARED_MIN
    code = (
        "import os, sys\n\n"
        "from ucxrpc.io import shared\n"
        f"fd = shared.export([bytes({n}), bytes({wire.TRAILER_SIZE})])\n\n"
        "print(os.getpid(), fd, flush=True)\n\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        pid, fd = map(int, child.stdout.readline().split())
        assert shared.open_part(pid, fd, n, lambda got: True).nbytes == n  # alive: fine
    finally:
        child.kill()
        child.wait(timeout=10)
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
    with pytest.raises(ucxrpc.ConnectionLost, match="is gone"):
        shared.open_part(pid, fd, n, lambda got: True)
