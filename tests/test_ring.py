"""Frame rings: a writer and a reader in this process (the pidfd is our own), and the
reader against a writer that lies."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucxrpc.errors import ProtocolError
from ucxrpc.io import ring

pytestmark = pytest.mark.skipif(not ring.available(), reason="no frame rings on this system")


class Pair:
    def __init__(self, capacity: int = 4096) -> None:
        self.got: list[tuple[int, bytes]] = []
        self.errors: list[ProtocolError] = []
        self.reader = ring.Reader(
            lambda tag, frame: self.got.append((tag, bytes(frame))),
            self.errors.append,
            capacity,
        )
        self.pidfd = os.pidfd_open(os.getpid())
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        assert self.reader.fd is not None
        self.writer = ring.Writer.attach(
            self.pidfd, self.reader.fd, self.wake, capacity, self.reader.nonce
        )

    def close(self) -> None:
        self.writer.close()
        self.reader.close()
        os.close(self.pidfd)
        os.close(self.wake)

    def header(self) -> memoryview:
        """The ring as the peer maps it (what a lying writer controls)."""
        assert self.reader.fd is not None
        self.peer_map = mmap.mmap(self.reader.fd, ring.HEADER + self.reader.capacity)
        return memoryview(self.peer_map)


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def test_frames_arrive_in_order_across_many_wraps(pair: Pair) -> None:
    sent = []
    for i in range(2000):
        frame = os.urandom(1 + (i * 37) % 900)
        while not pair.writer.put(i, frame):
            assert pair.reader.poll() > 0  # full: the reader catches up
        sent.append((i, frame))
        if i % 3 == 0:
            pair.reader.poll()
    while pair.reader.poll():
        pass
    assert pair.got == sent and not pair.errors


def test_a_frame_too_large_or_a_full_ring_is_refused_not_lost(pair: Pair) -> None:
    assert not pair.writer.put(1, bytes(ring.MAX_RECORD + 1))
    n = 0
    while pair.writer.put(2, bytes(500)):
        n += 1
    assert 0 < n <= 4096 // 500
    assert pair.reader.poll(limit=1000) == n
    assert pair.writer.put(3, b"again")


def test_a_full_ring_holds_fewer_frames_than_half_the_receivers_window() -> None:
    # A frame that finds the ring full goes over UCX numbered after all those in the
    # ring: the receiver must still take it as within its window (4,096 frames).
    window = 4096
    p = Pair(ring.capacity_for(window))
    try:
        n = 0
        while p.writer.put(n, bytes(28)):  # the smallest frame there is (a prefix)
            n += 1
        assert 0 < n <= window // 2
    finally:
        p.close()
    assert ring.capacity_for(100) == 0  # no ring small enough: none is made


def test_a_sleeping_reader_is_woken(pair: Pair) -> None:
    fd = pair.wake
    assert pair.reader.doze()  # nothing waiting: it may sleep
    pair.writer.put(1, b"x")
    assert os.eventfd_read(fd) == 1 and pair.writer.wakes == 1
    assert not pair.reader.doze()  # something waits: do not sleep
    pair.reader.rouse()
    pair.writer.put(2, b"y")
    assert pair.writer.wakes == 1  # a polling reader is not woken
    assert pair.reader.poll() == 2
    # A reader that made its eventfd blocking since (they share its flags) is not
    # woken, rather than the writer blocking.
    assert pair.reader.doze()
    os.set_blocking(fd, True)
    try:
        assert pair.writer.put(3, b"z") and pair.writer.wakes == 1
    finally:
        os.set_blocking(fd, False)


U64 = struct.Struct("=Q")


@pytest.mark.parametrize(
    "lie",
    [
        "head behind",
        "head too far",
        "length too large",
        "record past head",
        "wrap past head",
    ],
)
def test_a_writer_that_lies_breaks_the_ring_and_nothing_else(pair: Pair, lie: str) -> None:
    view = pair.header()
    pair.writer.put(1, b"good")
    assert pair.reader.poll() == 1
    pos = U64.unpack_from(view, 0)[0]
    start = ring.HEADER + (pos & (pair.reader.capacity - 1))
    if lie == "head behind":
        U64.pack_into(view, 0, pos - 8)
    elif lie == "head too far":
        U64.pack_into(view, 0, pos + pair.reader.capacity + 8)
    elif lie == "length too large":
        struct.pack_into("=IIQ", view, start, ring.MAX_RECORD + 1, 0, 1)
        U64.pack_into(view, 0, pos + 64)
    elif lie == "record past head":
        struct.pack_into("=IIQ", view, start, 100, 0, 1)
        U64.pack_into(view, 0, pos + 32)
    else:
        struct.pack_into("=IIQ", view, start, 0xFFFFFFFF, 0, 0)
        U64.pack_into(view, 0, pos + 16)
    assert pair.reader.poll() == 0
    assert len(pair.errors) == 1 and "frame ring broken" in pair.errors[0].message
    assert pair.reader.dead and pair.reader.poll() == 0  # nothing read after that
    assert pair.got == [(1, b"good")]


def test_a_reader_that_lies_about_its_tail_breaks_the_writer(pair: Pair) -> None:
    U64.pack_into(pair.header(), 8, 1 << 40)
    with pytest.raises(ProtocolError, match="tail"):
        pair.writer.put(1, b"x")
    assert not pair.writer.put(2, b"y")  # broken for good: frames go another way


def test_only_a_sealed_ring_and_an_eventfd_are_taken() -> None:
    pidfd = os.pidfd_open(os.getpid())
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    blocking = os.eventfd(0)
    fds: list[int] = [pidfd, wake, blocking]
    try:
        plain = os.memfd_create("ucxrpc-ring")
        os.ftruncate(plain, ring.HEADER + 4096)
        read_end, write_end = os.pipe()
        good = ring.Reader(lambda t, f: None, lambda e: None, 4096)
        fds += [plain, read_end, write_end]
        assert good.fd is not None
        nonce = good.nonce

        def attach(ring_fd: int, wake_fd: int, capacity: int = 4096, n: int = nonce) -> None:
            ring.Writer.attach(pidfd, ring_fd, wake_fd, capacity, n)

        with pytest.raises(ProtocolError, match="sealed"):
            attach(plain, wake)  # not sealed
        with pytest.raises(ProtocolError, match="sealed"):
            attach(good.fd, wake, 8192)  # not that size
        with pytest.raises(ProtocolError, match="eventfd"):
            attach(good.fd, write_end)  # a pipe, not an eventfd
        with pytest.raises(ProtocolError, match="blocks"):
            attach(good.fd, blocking)  # a writer would block on it
        with pytest.raises(ProtocolError, match="not the ring announced"):
            attach(good.fd, wake, n=nonce ^ 1)  # another ring (an fd number reused)
        with pytest.raises(ProtocolError, match="refused"):
            attach(good.fd, wake, 3000)  # not a power of two
        with pytest.raises(ProtocolError, match="no such fds"):
            attach((1 << 32) + good.fd, wake)  # would wrap to a real fd number
        with pytest.raises(OSError):
            attach(99_999, wake)  # no such fd
        assert len(os.listdir("/proc/self/fd")) >= len(fds)  # nothing closed of ours
        good.close()
    finally:
        for fd in fds:
            os.close(fd)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3000), st.integers(0, 3)),  # (frame size, polls after)
        min_size=1,
        max_size=80,
    )
)
def test_any_sizes_and_poll_order_deliver_exactly_what_was_accepted(
    steps: list[tuple[int, int]],
) -> None:
    p = Pair(capacity=8192)
    try:
        accepted: list[tuple[int, bytes]] = []
        for i, (size, polls) in enumerate(steps):
            frame = bytes([i % 251]) * size
            if p.writer.put(i, frame):
                accepted.append((i, frame))
            for _ in range(polls):
                p.reader.poll(limit=2)
        while p.reader.poll():
            pass
        assert p.got == accepted and not p.errors
        assert p.reader.frames == p.writer.frames == len(accepted)
    finally:
        p.close()
