"""UCX worker-address validation: real addresses pass, damaged ones never hurt UCX.

``ucp_address_unpack`` trusts its input completely (a bad version byte is an assertion
that aborts the process, a bad length a read past the buffer), so
``ucxrpc.wire.ucxaddr.validate_worker_address`` must refuse what UCX cannot take. The
property checked here, on real addresses of this machine's workers and on random,
truncated and mutated bytes: an address is either refused by the validator, or UCX
can make an endpoint from it (and send on it) without the process dying. Endpoints
are made in a spawned probe process (never fork after UCX is initialised), one per
option set, which must still be alive and exit with status 0 at the end.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.spawn
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ucxrpc
from ucxrpc.errors import ProtocolError
from ucxrpc.io.control import read_message, write_message
from ucxrpc.wire.ucxaddr import (
    KNOWN_TRANSPORTS,
    MAX_ADDRESS_SIZE,
    parse_worker_address,
    tl_name_checksum,
    validate_worker_address,
)

#: UCX settings whose worker addresses differ in format or content.
ADDRESS_OPTIONS: list[dict[str, str]] = [
    {},
    {"TLS": "tcp"},
    {"TLS": "^cma"},
    {"TLS": "self"},
    {"TLS": "sysv,posix,self"},
    {"TLS": "cma,tcp"},
    {"ADDRESS_VERSION": "v2"},
    {"TLS": "tcp", "ADDRESS_VERSION": "v2"},
    {"ADDRESS_DEBUG_INFO": "y"},
]


def _ids(options: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


def accepted(buf: bytes) -> bool:
    """True when the validator accepts ``buf``; it may only ever raise ProtocolError."""
    try:
        validate_worker_address(buf)
    except ProtocolError as exc:
        assert "worker address" in exc.message
        return False
    return True


# -- real addresses ------------------------------------------------------------------------


@pytest.mark.parametrize("options", ADDRESS_OPTIONS, ids=_ids)
async def test_real_worker_addresses_are_accepted(options: dict[str, str]) -> None:
    async with ucxrpc.Manager(ucx_options=options) as manager:
        address = manager.worker_address
    validate_worker_address(address)
    parsed = parse_worker_address(address)
    assert parsed.version == (2 if options.get("ADDRESS_VERSION") == "v2" else 1)
    assert parsed.release == 21  # UCX 1.21 packed it
    assert parsed.entries
    wanted = {"tcp"} if options.get("TLS", "").startswith("tcp") else set()
    assert wanted <= {e.transport for e in parsed.entries}
    assert all(e.transport in KNOWN_TRANSPORTS.values() for e in parsed.entries)
    assert (parsed.name is not None) == (options.get("ADDRESS_DEBUG_INFO") == "y")


def test_transport_checksums_match_ucx() -> None:
    # ucs_crc16_string as it appears in real addresses of this build
    assert tl_name_checksum("tcp") == 0x19CF
    assert tl_name_checksum("self") == 0x7563
    assert set(KNOWN_TRANSPORTS.values()) == {"self", "tcp", "sysv", "posix", "cma"}


# -- hand-made bad addresses -----------------------------------------------------------------


def self_address(
    *, header: bytes = b"\x20", md: int = 0, iface: bytes = b"\x88" + bytes(8), tail: bytes = b""
) -> bytes:
    """A v1 address with one ``self`` interface, with parts replaceable."""
    attrs = struct.pack("<fffI", 1e-9, 1e9, 1e-8, 0)
    return (
        header
        + bytes(8)
        + bytes([md, 0])
        + tl_name_checksum("self").to_bytes(2, "little")
        + attrs
        + iface
        + b"\x85\x80"
        + tail
    )


def test_a_hand_made_address_is_accepted() -> None:
    validate_worker_address(self_address())


@pytest.mark.parametrize(
    ("buf", "why"),
    [
        (b"", "header missing"),
        (b"\x0f" + self_address()[1:], "unknown address version 15"),  # UCX: assertion
        (b"\x02" + self_address()[1:], "unknown address version 2"),
        (self_address()[:5], "truncated worker uuid"),
        (self_address(header=b"\x20")[:9] + b"\xff", "no transports"),
        (self_address(md=64), "md index 64"),
        (self_address(iface=b"\x8f" + bytes(15)), "self: expected"),
        (self_address(iface=b"\xbf" + bytes(8)), "truncated interface address"),
        (self_address(iface=b"\xc8" + bytes(8) + b"\x02ab\x80"), "endpoint addresses"),
        (self_address(tail=b"\x00"), "1 trailing bytes"),
        (bytes(MAX_ADDRESS_SIZE + 1), "exceeds the limit"),
        (struct.pack("<B", 0x11) + b"\xf0" + bytes(20), "unknown header flags"),
    ],
    ids=[
        "empty",
        "version-15",
        "version-2",
        "truncated-uuid",
        "no-devices",
        "md-index",
        "self-length",
        "iface-past-end",
        "ep-address",
        "trailing",
        "oversized",
        "v2-flags",
    ],
)
def test_malformed_addresses_are_refused_clearly(buf: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        validate_worker_address(buf)


def test_only_bytes_are_addresses() -> None:
    with pytest.raises(ProtocolError, match="expected bytes"):
        validate_worker_address(bytearray(self_address()))  # type: ignore[arg-type]


# -- the probe process -------------------------------------------------------------------------


def _probe_main(conn: Connection, options: dict[str, str]) -> None:
    """In a spawned process: a target worker whose address is handed out, and a prober
    worker that makes an endpoint from each address it is sent and sends on it."""
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    os.environ.setdefault("UCX_LOG_LEVEL", "fatal")  # refused endpoints log errors
    import numpy as np
    from ucxx._lib import libucxx as lib
    from ucxx._lib.arr import Array

    ctx = lib.UCXContext(options, (lib.Feature.TAG, lib.Feature.WAKEUP))
    target = lib.UCXWorker(ctx)
    prober = lib.UCXWorker(ctx)
    conn.send(bytes(target.address.tobytes()))
    # A small message (eager) and a large one (rendezvous: UCX picks a protocol from
    # the peer's interface attributes), sent from buffers shared by every endpoint.
    small = Array(np.zeros(64, dtype=np.uint8))
    large = Array(np.zeros(256 * 1024, dtype=np.uint8))
    keep: list[Any] = []
    while (buf := conn.recv()) is not None:
        try:
            ep = prober.create_endpoint_from_worker_address(
                lib.UCXAddress.create_from_buffer(buf), False
            )
            keep.append(ep)
            for data in (small, large):
                req = ep.tag_send(data, lib.UCXXTag((1 << 63) | 7))
                keep.append(req)
                end = time.monotonic() + 0.01
                while not req.completed and time.monotonic() < end:
                    prober.progress()
                    target.progress()
            outcome = "endpoint"
        except Exception as exc:  # UCX refused it: fine, it is alive
            outcome = type(exc).__name__
        conn.send(outcome)
    conn.send("bye")
    conn.close()
    os._exit(0)  # no finalizers: UCX objects die with the process


class Probe:
    """The parent's side of :func:`_probe_main`.

    Args:
        options: UCX settings of the probe's context.
        isolate: A wrapper that runs the probe in its own network, IPC, PID and mount
            namespaces (so mutated shared-memory segment ids, process ids and ports can
            only ever reach the probe itself), or None to run it as a plain process.
    """

    def __init__(self, options: dict[str, str], isolate: Path | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_probe_main, args=(child, options), daemon=True)
        saved = multiprocessing.spawn.get_executable()
        if isolate is not None:
            resource_tracker.ensure_running()  # outside the namespaces
            ctx.set_executable(str(isolate))
        try:
            self.proc.start()
        finally:
            ctx.set_executable(saved)
        child.close()
        self.tried = 0
        self.address: bytes = self._recv(60, "starting")

    def _recv(self, timeout: float, doing: str) -> Any:
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        self.proc.join(5)
        raise AssertionError(
            f"the probe process died or hung while {doing} (exit code {self.proc.exitcode})"
        )

    def endpoint(self, buf: bytes) -> str:
        """Make an endpoint from ``buf`` in the probe; the probe must survive it."""
        self.conn.send(buf)
        self.tried += 1
        outcome: str = self._recv(30, f"making an endpoint from {buf.hex()}")
        return outcome

    def close(self) -> int | None:
        try:
            self.conn.send(None)
            assert self._recv(30, "exiting") == "bye"
            self.proc.join(30)
        finally:
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(10)
            self.conn.close()
        return self.proc.exitcode


#: Runs the probe in new network (only ``lo``), IPC, PID and mount namespaces. The
#: shell stays PID 1 so that the probe keeps normal signal semantics (an abort is
#: exit status 134, not ignored as it would be for an init process).
_ISOLATE = """#!/bin/sh
exec unshare --net --ipc --pid --mount --fork --mount-proc --kill-child=SIGKILL \\
    /bin/sh -c 'ip link set lo up && "$0" "$@"; exit $?' {python} "$@"
"""


@pytest.fixture(scope="module")
def isolate(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The namespace wrapper, when this machine allows it (root, unshare, ip)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return None
    wrapper = tmp_path_factory.mktemp("isolate") / "python"
    wrapper.write_text(_ISOLATE.format(python=sys.executable))
    wrapper.chmod(0o755)
    try:
        done = subprocess.run([str(wrapper), "-c", "pass"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return wrapper if done.returncode == 0 else None


#: (UCX settings, needs isolation). Loopback TCP reaches nothing but this host's
#: loopback ports even unisolated; mutated shared-memory addresses (segment ids,
#: process ids, /proc paths) are only tried where they can reach nothing but the probe.
PROBES: list[tuple[dict[str, str], bool]] = [
    ({"TLS": "tcp,self", "NET_DEVICES": "lo"}, False),
    ({"TLS": "tcp,self", "NET_DEVICES": "lo", "ADDRESS_VERSION": "v2"}, False),
    ({}, True),
    ({"ADDRESS_VERSION": "v2"}, True),
]


def _probe_id(param: tuple[dict[str, str], bool]) -> str:
    return _ids(param[0]) + ("-isolated" if param[1] else "")


@pytest.fixture(scope="module", params=PROBES, ids=_probe_id)
def probe(request: pytest.FixtureRequest, isolate: Path | None) -> Iterator[Probe]:
    options, needs_isolation = request.param
    if needs_isolation and isolate is None:
        pytest.skip("fuzzing shared-memory addresses needs network/IPC/PID namespaces (root)")
    p = Probe(options, isolate)
    try:
        yield p
    finally:
        assert p.close() == 0, "the probe process did not exit cleanly"


def _mutants(real: bytes) -> list[bytes]:
    return [real[:i] + bytes([v]) + real[i + 1 :] for i in range(len(real)) for v in range(256)]


def test_the_probe_address_is_real_and_works(probe: Probe) -> None:
    validate_worker_address(probe.address)
    assert probe.endpoint(probe.address) == "endpoint"


def test_truncations_and_extensions_are_refused(probe: Probe) -> None:
    real = probe.address
    for n in range(len(real)):
        assert not accepted(real[:n]), n
    for extra in (b"\x00", b"\xff", real):
        assert not accepted(real + extra)


def test_single_byte_mutations_are_refused_or_harmless(probe: Probe) -> None:
    mutants = _mutants(probe.address)
    ok = [m for m in mutants if m != probe.address and accepted(m)]
    assert len(ok) < len(mutants) * 0.95  # the structure is checked, not just the length
    rng = random.Random(len(probe.address))
    for buf in rng.sample(ok, min(250, len(ok))):
        probe.endpoint(buf)
    # every mutant of the header byte (version, flags) that passed, too
    for buf in ok:
        if buf[1:] == probe.address[1:]:
            probe.endpoint(buf)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_and_mutated_bytes_are_refused_or_harmless(
    probe: Probe, data: st.DataObject
) -> None:
    real = probe.address
    kind = data.draw(st.sampled_from(["random", "splice", "mutate"]))
    if kind == "random":
        buf = data.draw(st.binary(max_size=1024))
    elif kind == "splice":  # a real beginning, random bytes after it
        cut = data.draw(st.integers(0, len(real)))
        buf = real[:cut] + data.draw(st.binary(max_size=256))
    else:  # up to four bytes changed
        changed = bytearray(real)
        for _ in range(data.draw(st.integers(1, 4))):
            changed[data.draw(st.integers(0, len(real) - 1))] = data.draw(st.integers(0, 255))
        buf = bytes(changed)
    if accepted(buf):
        probe.endpoint(buf)


# -- a server fed random addresses ------------------------------------------------------------


async def _hello_with(port: int, address: bytes) -> tuple[dict[str, Any] | None, bytes]:
    """Speak the control protocol by hand; return the server's reply and what followed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        first = await asyncio.wait_for(read_message(reader), 5)
        assert first is not None and "challenge" in first
        hello = {
            "v": first["v"],
            "addr": address,
            "cid": 77,
            "max": 1 << 20,
            "nonce": os.urandom(16),
            "key": os.urandom(16),
            "slot": 4096,
            "win": 16,
        }
        write_message(writer, hello)
        reply = await asyncio.wait_for(read_message(reader, 1 << 20), 5)
        rest = await asyncio.wait_for(reader.read(), 5)
        return reply, rest
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_server_survives_random_worker_addresses() -> None:
    rng = random.Random(7)
    async with ucxrpc.Manager() as manager:
        server = ucxrpc.Server()

        @server.rpc
        async def ping() -> str:
            return "PONG"

        await server.start(manager, "127.0.0.1", 0)
        real = manager.worker_address
        bad = [
            b"",
            b"\x0f" + real[1:],  # the version nibble UCX asserts on (address.c)
            real[:-1],
            real + b"\x00",
            bytes([real[0]]) + bytes(8) + b"\x7f\x1f" + bytes(40),
            *(rng.randbytes(n) for n in (1, 2, 16, 64, len(real), 1000)),
        ]
        for address in bad:
            reply, rest = await _hello_with(server.port, address)
            assert reply is not None, address.hex()
            assert reply["error"] == int(ucxrpc.StatusCode.INTERNAL)
            assert "worker address" in reply["message"], reply
            assert rest == b""  # and the server hung up
        # An address too large for a hello is refused from the message length alone.
        reply, _ = await _hello_with(server.port, bytes(MAX_ADDRESS_SIZE + 1))
        assert reply is not None and "oversized" in reply["message"]
        assert manager.connections == 0
        async with await manager.connect("127.0.0.1", server.port) as client:
            assert await client.call("ping") == "PONG"
        await server.stop()
