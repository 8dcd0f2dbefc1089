"""Explicit msgpack limits on the decodes whose size is fixed by contract: a control
message (the hello comes before authentication) and a frame header."""

from __future__ import annotations

import msgpack
import pytest

from ucxrpc.errors import ProtocolError
from ucxrpc.wire import codec
from ucxrpc.wire.codec import Kind


@pytest.mark.parametrize(
    "body",
    [
        {"v": 3, "junk": list(range(300))},  # an array longer than any field needs
        {f"k{i}": 0 for i in range(300)},  # a map of more fields than any message has
        {"v": 3, "x": msgpack.ExtType(1, b"x")},  # no extension types in control
    ],
)
def test_a_control_message_past_its_limits_is_refused(body: object) -> None:
    with pytest.raises(ProtocolError, match="malformed control message"):
        codec.decode_control(msgpack.packb(body))


def test_a_control_message_within_them_decodes() -> None:
    body = {"v": 3, "addr": b"a" * 4000, "nonce": b"n" * 32, "list": list(range(200))}
    assert codec.decode_control(msgpack.packb(body)) == body


def test_a_header_past_its_limits_is_refused() -> None:
    enc = codec.encode(Kind.REQUEST, 1, [[], {}], method="m", metadata={"a": "b"})
    frame = bytes(enc.frame)
    # Rebuild the header with a metadata map of 5,000 entries (under 32 KiB).
    header = msgpack.packb(["m", None, None, [], {str(i): 0 for i in range(5000)}])
    assert len(header) < codec.MAX_HEADER_SIZE
    hlen_at = 20
    old_hlen = int.from_bytes(frame[hlen_at : hlen_at + 4], "big")
    payload = frame[codec.PREFIX_SIZE + old_hlen :]
    bad = (
        frame[:hlen_at]
        + len(header).to_bytes(4, "big")
        + frame[hlen_at + 4 : codec.PREFIX_SIZE]
        + header
        + payload
    )
    with pytest.raises(ProtocolError, match="malformed frame header"):
        codec.decode_header(bad)
