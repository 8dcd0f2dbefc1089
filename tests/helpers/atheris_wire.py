"""Coverage-guided fuzzing (atheris, libFuzzer) of the wire and protocol layers.

Each input is split by its first byte into a target and the bytes it is given:
decode_header + decode_payload, split_batch, decode_control, control_length, and an
Inbound machine fed the bytes as frames of its own connection. Anything raised other
than an RpcError is a crash (libFuzzer stops and writes the input).

    python tests/helpers/atheris_wire.py -runs=20000 [-seed=1] [corpus_dir]
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["ucxrpc.wire", "ucxrpc.protocol"]):
    from ucxrpc.errors import RpcError
    from ucxrpc.protocol import Inbound
    from ucxrpc.wire import codec

CONN, SECRET, KEY = 7, 0x1234_5678_9ABC_DEF0, 0x55
MAX_PART = 1 << 16


def _frame(data: bytes) -> None:
    header, payload = codec.decode_header(data, exact=bool(data[:1] == b"\x03"))
    if sum(header.parts) <= MAX_PART:
        parts = [bytearray(n) for n in header.parts]
        codec.decode_payload(header, payload, parts)


def _inbound(data: bytes) -> None:
    # Frames of this connection: its secret put in place (or not, by the first byte),
    # the tag naming the call the frame names, so the machine goes past its checks.
    machine = Inbound(CONN, SECRET, KEY)
    keep_secret = bool(data[:1]) and data[0] & 1
    for start in range(1, len(data), 97):
        chunk = bytearray(data[start : start + 97])
        if keep_secret and len(chunk) >= 16:
            chunk[8:16] = SECRET.to_bytes(8, "big")
        call_id = int.from_bytes(chunk[16:20], "big") if len(chunk) >= 20 else 0
        try:
            tag = codec.frame_tag(CONN, call_id)
        except (ValueError, RpcError):
            tag = codec.frame_tag(CONN, 0)
        machine.on_frame(tag, chunk)
        machine.take()


TARGETS = [
    _frame,
    codec.split_batch,
    codec.decode_control,
    lambda data: codec.control_length(data[:4].ljust(4, b"\0"), 1 << 16),
    _inbound,
]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    target, body = TARGETS[data[0] % len(TARGETS)], data[1:]
    try:
        target(body)
    except RpcError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
