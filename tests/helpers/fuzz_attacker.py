"""A hostile peer in its own process: raw ucxx traffic and bad handshakes at a server.

Usage: ``fuzz_attacker.py PORT TOKEN SEED MESSAGES SECONDS [both|sessions|preauth] [RATE]``
(the sixth argument picks the hostile sessions, the bad handshakes or both; the
messages are paced at RATE a second, by default to fill nine tenths of the seconds)

It opens hostile sessions one after another (each a real, authenticated handshake by
:class:`helpers.rawpeer.RawPeer`, then a burst of random, truncated, oversized,
wrong-version, wrong-kind and wrong-secret frames, frames for strangers' connection
ids, frames announcing parts that never come, and orphan parts on random data tags),
and meanwhile bad handshakes at the control port (garbage, oversized length prefixes,
wrong versions, malformed hellos, a wrong token, silence). It stops after ``MESSAGES``
UCX messages, or ``SECONDS``, whichever comes first.

Prints ``START`` when the first session is up and ``DONE <json>`` at the end: messages
sent by kind, and what each session and each bad handshake observed.

Every session must end with the server closing its control connection: by itself
(a protocol violation it detected) or after one last frame whose prefix names another
call than its tag (a violation every server must close for). A bad handshake must get
an error message or a closed connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.rawpeer import RawPeer
from ucxx._lib import libucxx as lib
from ucxx._lib.arr import Array

from ucxrpc.config import Config
from ucxrpc.io.control import initiate_handshake
from ucxrpc.wire import codec
from ucxrpc.wire.codec import Kind

_FRAMES = (lib.UCXXTag(codec.FRAME_PROBE_TAG), lib.UCXXTagMask(codec.FRAME_PROBE_MASK))
#: Hostile frames per session before it ends.
SESSION_MESSAGES = 200
#: Messages sent between two looks at the worker (and a short pause): the attack is
#: paced so that it lasts seconds, not a burst the good client never meets.
BURST = 20
#: Kinds of body messages and their weights (none of them needs to break the session).
BODY_KINDS = {
    "random": 10,
    "truncated": 10,
    "wrong-version": 8,
    "wrong-kind": 8,
    "wrong-secret": 10,
    "mutated": 10,
    "phantom-parts": 3,
    "stranger": 6,
    "orphan-part": 12,
    "valid": 3,
}
#: Kinds that break a session (sent as its last message, one session in two).
FATAL_KINDS = ["oversized", "tag-mismatch", "out-of-window", "bad-batch"]
PREAUTH_KINDS = [
    "garbage",
    "oversized-prefix",
    "short-body",
    "not-msgpack",
    "not-a-map",
    "wrong-version",
    "unknown-field",
    "bad-address",
    "wrong-token",
    "hang-up",
    "silent",
]


class Attacker:
    """One raw UCX worker; a session is a handshake on it with a fresh id and key."""

    def __init__(self, port: int, token: str, rng: random.Random, rate: float) -> None:
        self.start = time.monotonic()
        self.rate = rate
        self.next_burst = self.start
        self.port = port
        self.token = token
        self.rng = rng
        self.raw = RawPeer()
        self.sent: Counter[str] = Counter()
        self.session_outcomes: Counter[str] = Counter()
        self.preauth_outcomes: Counter[str] = Counter()
        self.preauth_sent: Counter[str] = Counter()
        self.failures: list[str] = []
        self.errors_received = 0
        self.pending: list[tuple[Any, Any]] = []
        self.send_failures = 0
        self.cids: list[int] = []
        self.session_errors = 0

    # -- sending ----------------------------------------------------------------------

    def progress(self) -> None:
        self.raw.worker.progress()
        self.pending = [(r, b) for r, b in self.pending if not r.completed]
        self._drain_replies()

    def _drain_replies(self) -> None:
        """Receive what the server sent (error replies); count errors for our sessions."""
        worker = self.raw.worker
        for _ in range(256):
            probe = worker.tag_probe(*_FRAMES, True)
            if not probe.matched:
                return
            buf = bytearray(probe.length)
            req = worker.tag_recv_with_handle(Array(buf), probe)
            self.pending.append((req, buf))
            frames = [buf]
            if (probe.sender_tag.value >> 40) & codec.MAX_CONN_ID != self.raw.cid:
                continue  # for an earlier session
            try:
                if codec.peek(buf).kind == Kind.BATCH:
                    _, payload = codec.decode_header(buf)
                    frames = [bytearray(f) for f in codec.split_batch(payload)]
                for frame in frames:
                    if codec.peek(frame).kind == Kind.ERROR:
                        self.errors_received += 1
                        self.session_errors += 1
            except Exception:
                pass

    async def send(self, kind: str, tag: int, data: Any) -> None:
        self.sent[kind] += 1
        try:
            req = self.ep.tag_send(Array(data), lib.UCXXTag(tag))
            self.pending.append((req, data))
        except Exception:
            self.send_failures += 1
        count = sum(self.sent.values())
        if count % BURST == 0:
            self.progress()
            # Paced, and never catching up after a pause (a test may stop this process
            # for a while): a burst leaves BURST / rate seconds after the last one.
            now = time.monotonic()
            self.next_burst = max(now, self.next_burst + BURST / self.rate)
            await asyncio.sleep(max(0.001, self.next_burst - now))

    # -- frames -----------------------------------------------------------------------

    def frame(self, kind: Kind = Kind.REQUEST, payload: Any = None, **kw: Any) -> bytearray:
        kw.setdefault("method", self.rng.choice(["ping", "echo", "nope", ""]))
        return codec.encode(kind, self.rng.randrange(1, 1 << 20), payload, **kw).frame

    def stamped(self, frame: bytearray, consume: bool = True, secret: int | None = None) -> bytes:
        raw = self.raw
        if consume:
            raw.stamp_next(frame, secret)
        else:
            codec.stamp(frame, raw.out.next_seq, raw.server_secret if secret is None else secret)
        return bytes(frame)

    def tag(self, frame: bytes | bytearray, conn_id: int | None = None) -> int:
        call_id = codec.peek(frame).call_id if len(frame) >= codec.PREFIX_SIZE else 7
        return codec.frame_tag(self.raw.server_cid if conn_id is None else conn_id, call_id)

    async def body(self, kind: str) -> None:
        rng = self.rng
        if kind == "random":
            data = rng.randbytes(rng.randrange(0, 300))
            await self.send(
                kind, codec.frame_tag(self.raw.server_cid, rng.randrange(1 << 32)), data
            )
        elif kind == "truncated":
            full = self.stamped(self.frame(payload=[rng.randbytes(rng.randrange(0, 200))]))
            cut = full[: rng.randrange(codec.PREFIX_SIZE, len(full))]
            await self.send(kind, self.tag(full), cut)
        elif kind == "wrong-version":
            frame = bytearray(self.stamped(self.frame(payload=[])))
            frame[0] = rng.choice([0, 1, 2, 4, 255, rng.randrange(256)]) or 9
            await self.send(kind, self.tag(frame), frame)
        elif kind == "wrong-kind":
            frame = bytearray(self.stamped(self.frame(payload=[1])))
            frame[1] = rng.choice([0, 14, 99, 255, Kind.REPLY, Kind.ERROR, Kind.ITEM, Kind.END])
            await self.send(kind, self.tag(frame), frame)
        elif kind == "wrong-secret":
            secret = rng.randrange(1 << 64)
            frame = self.stamped(self.frame(payload=[]), consume=False, secret=secret)
            await self.send(kind, self.tag(frame), frame)
        elif kind == "mutated":
            frame = bytearray(self.stamped(self.frame(payload=[rng.randbytes(16)])))
            for _ in range(rng.randrange(1, 4)):
                # Past the secret: a mutated secret is only a wrong-secret frame.
                pos = rng.randrange(codec.PREFIX_SIZE - 8, len(frame))
                frame[pos] = rng.randrange(256)
            await self.send(kind, self.tag(frame), frame)
        elif kind == "phantom-parts":
            enc = codec.encode(
                Kind.REQUEST, rng.randrange(1, 1 << 20), [b"x" * 20_000], method="echo"
            )
            frame = self.stamped(enc.frame)
            await self.send(kind, self.tag(frame), frame)  # its part never follows
        elif kind == "stranger":
            frame = self.stamped(self.frame(payload=[]), consume=False)
            conn_id = rng.choice([*self.cids[-5:-1], rng.randrange(1, codec.MAX_CONN_ID)])
            await self.send(kind, self.tag(frame, conn_id), frame)
        elif kind == "orphan-part":
            size = rng.choice([0, 1, 100, 4096, 70_000, rng.randrange(1, 1 << 18)])
            if rng.random() < 0.02:
                size = rng.choice([1 << 21, 1 << 23])
            conn_id = (
                self.raw.server_cid if rng.random() < 0.8 else rng.randrange(1, codec.MAX_CONN_ID)
            )
            low = rng.randrange(1 << 40)
            await self.send(kind, codec.DATA_BIT | (conn_id << 40) | low, bytes(size))
        elif kind == "valid":
            enc = codec.encode(Kind.REQUEST, rng.randrange(1, 1 << 20), [], method="ping")
            frame = self.stamped(enc.frame)
            await self.send(kind, self.tag(frame), frame)

    async def fatal(self, kind: str) -> None:
        rng = self.rng
        if kind == "oversized":
            size = rng.choice([codec.MAX_FRAME + 1, 1 << 18, 1 << 20])
            await self.send(kind, codec.frame_tag(self.raw.server_cid, 5), bytes(size))
        elif kind == "tag-mismatch":
            await self.tag_mismatch(kind)
        elif kind == "out-of-window":
            frame = self.frame(payload=[])
            codec.stamp(
                frame,
                (self.raw.out.next_seq + 1 + rng.randrange(1 << 20, 1 << 31)) % codec.SEQ_MOD,
                self.raw.server_secret,
            )
            await self.send(kind, self.tag(frame), bytes(frame))
        elif kind == "bad-batch":
            inner = self.frame(payload=[])
            codec.stamp(inner, self.raw.out.next_seq, self.raw.server_secret)
            batch = codec.encode_batch([bytes(inner)[:-2]], self.raw.server_secret)
            await self.send(kind, codec.frame_tag(self.raw.server_cid, 0), bytes(batch))

    async def tag_mismatch(self, kind: str) -> None:
        frame = self.stamped(self.frame(payload=[]), consume=False)
        call_id = codec.peek(frame).call_id
        await self.send(kind, codec.frame_tag(self.raw.server_cid, call_id ^ 1), frame)

    # -- sessions ---------------------------------------------------------------------

    async def closed_by_server(self, seconds: float) -> bool:
        """Whether the server closes the session's control connection within ``seconds``
        (the UCX worker is progressed meanwhile, so the server's sends can leave)."""
        reader = self.raw.reader
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.progress()
            try:
                data = await asyncio.wait_for(reader.read(4096), 0.01)
            except TimeoutError:
                continue
            except ConnectionError:
                return True
            if not data:
                return True
        return False

    async def session(self, messages: int, deadline: float) -> None:
        raw, rng = self.raw, self.rng
        raw.cid = rng.randrange(1, codec.MAX_CONN_ID)
        raw.key = os.urandom(16)
        self.cids.append(raw.cid)
        self.session_errors = 0
        await raw.connect(self.port, Config(shared_memory=False, auth_token=self.token))
        self.cids.append(raw.server_cid)
        self.ep = raw.ep
        kinds, weights = zip(*BODY_KINDS.items(), strict=True)
        fatal = rng.random() < 0.5
        for _ in range(messages - int(fatal)):
            if time.monotonic() > deadline:
                break
            await self.body(rng.choices(kinds, weights)[0])
        if fatal:
            await self.fatal(rng.choice(FATAL_KINDS))
        if await self.closed_by_server(0.05 if not fatal else 5.0):
            outcome = "closed by the server"
        else:
            # It broke nothing the server must close for: one frame that it must.
            await self.tag_mismatch("tag-mismatch (last)")
            if await self.closed_by_server(5.0):
                outcome = "closed after the last frame"
            else:
                outcome = "left open"
                self.failures.append(f"session {raw.server_cid}: not closed by the server")
        self.session_outcomes[outcome] += 1
        if self.session_errors:
            self.session_outcomes["got error replies"] += 1
        raw.close()

    # -- bad handshakes ---------------------------------------------------------------

    async def preauth(self, kind: str, timeout: float) -> None:
        """One bad handshake; the server must answer with an error or close."""
        self.preauth_sent[kind] += 1
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            if kind == "wrong-token":
                try:
                    await initiate_handshake(
                        reader,
                        writer,
                        Config(shared_memory=False, auth_token="not the token"),
                        bytes(self.raw.worker.address.tobytes()),
                        1234,
                        {},
                        "server",
                    )
                except Exception as exc:
                    self.preauth_outcomes[f"refused: {type(exc).__name__}"] += 1
                    return
                self.failures.append("a wrong token was accepted")
                return
            body = self.hello_bytes(kind)
            if body is not None:
                writer.write(body)
                await writer.drain()
            elif kind == "hang-up":
                writer.close()
                self.preauth_outcomes["hung up"] += 1
                return
            got = await self.answer(reader, timeout)
            self.preauth_outcomes[got] += 1
            if got == "no answer":
                self.failures.append(f"bad handshake {kind!r}: neither an error nor a close")
        except ConnectionError:
            self.preauth_outcomes["closed"] += 1
        finally:
            writer.close()

    def hello_bytes(self, kind: str) -> bytes | None:
        rng = self.rng
        addr = bytes(self.raw.worker.address.tobytes())
        hello = {
            "v": codec.VERSION,
            "addr": addr,
            "cid": 77,
            "max": 1 << 20,
            "nonce": os.urandom(16),
            "key": os.urandom(16),
        }
        if kind == "garbage":
            return rng.randbytes(rng.randrange(1, 2000))
        if kind == "oversized-prefix":
            return struct.pack("!I", rng.randrange(64 * 1024 + 1, 1 << 32))
        if kind == "short-body":
            return struct.pack("!I", 1000) + rng.randbytes(rng.randrange(0, 999))
        if kind == "not-msgpack":
            return struct.pack("!I", 3) + b"\xc1\xc1\xc1"
        if kind == "not-a-map":
            return codec.encode_control([1, 2, 3])  # type: ignore[arg-type]
        if kind == "wrong-version":
            return codec.encode_control({**hello, "v": rng.choice([0, 2, 4, 255, "3"])})
        if kind == "unknown-field":
            return codec.encode_control({**hello, "evil": b"x" * 1000})
        if kind == "bad-address":
            return codec.encode_control({**hello, "addr": rng.randbytes(rng.randrange(0, 600))})
        if kind == "silent":
            return b""
        return None

    async def answer(self, reader: asyncio.StreamReader, timeout: float) -> str:
        """What the server did after the challenge: sent an error, or closed."""
        end = time.monotonic() + timeout
        data = b""
        while time.monotonic() < end:
            try:
                chunk = await asyncio.wait_for(
                    reader.read(65536), max(0.01, end - time.monotonic())
                )
            except TimeoutError:
                break
            except ConnectionError:
                return "closed"
            if not chunk:
                return "error message, closed" if b"error" in data else "closed"
            data += chunk
        return "no answer"


async def main() -> None:
    port, token, seed = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    messages, seconds = int(sys.argv[4]), float(sys.argv[5])
    connect_timeout = float(os.environ.get("UCXRPC_CONNECT_TIMEOUT", "10"))
    rng = random.Random(seed)
    what = sys.argv[6] if len(sys.argv) > 6 else "both"
    # By default spread over nine tenths of the time given, so that it ends in time.
    rate = float(sys.argv[7]) if len(sys.argv) > 7 else messages / (0.9 * seconds)
    attacker = Attacker(port, token, rng, rate)
    start = attacker.start
    deadline = start + seconds
    print("START", flush=True)

    async def preauth_loop() -> None:
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while time.monotonic() < deadline and not done.is_set():
            kind = PREAUTH_KINDS[i % len(PREAUTH_KINDS)]
            i += 1
            task = asyncio.create_task(attacker.preauth(kind, connect_timeout + 3.0))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(0.05)
        if tasks:
            await asyncio.wait(tasks, timeout=connect_timeout + 5.0)

    done = asyncio.Event()
    side = asyncio.create_task(preauth_loop() if what != "sessions" else asyncio.sleep(0))
    sessions = 0
    if what == "preauth":
        await asyncio.sleep(seconds)
    while (
        what != "preauth" and sum(attacker.sent.values()) < messages and time.monotonic() < deadline
    ):
        left = messages - sum(attacker.sent.values())
        await attacker.session(min(SESSION_MESSAGES, left), deadline)
        sessions += 1
    attack_seconds = time.monotonic() - start
    done.set()
    await side
    end = time.monotonic() + 5.0
    while attacker.pending and time.monotonic() < end:
        attacker.progress()
        await asyncio.sleep(0.001)
    report = {
        "sent": dict(attacker.sent),
        "messages": sum(attacker.sent.values()),
        "sessions": sessions,
        "session_outcomes": dict(attacker.session_outcomes),
        "errors_received": attacker.errors_received,
        "send_failures": attacker.send_failures,
        "preauth_sent": dict(attacker.preauth_sent),
        "preauth_outcomes": dict(attacker.preauth_outcomes),
        "failures": attacker.failures,
        "attack_seconds": attack_seconds,
    }
    print("DONE " + json.dumps(report), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
