"""Two hosts: a server and a client in two network namespaces joined by a veth pair.

Each test makes its own pair of namespaces (named after this process's pid), runs
``helpers/netns_server.py`` in one and ``helpers/netns_client.py`` in the other with
``ip netns exec`` (fork+exec: nothing of UCX is inherited; the test process never loads
UCX), with UCX on TCP over the veth (``TLS=tcp``, ``NET_DEVICES=<veth>``). Processes in
two network namespaces are two hosts to ucxrpc: no shared parts, no frame rings, every
byte crosses the veth.

* Over an impaired link every call completes exactly once: ``sch_netem`` (delay and
  loss) where the kernel has it; and, with no netem, a rate limit (HTB) with random loss
  (a classic-BPF classifier that sends a random 2% of the packets to a class whose queue
  holds none), a smaller MTU and no GSO (so what is dropped is single segments).
* A link taken down under pending calls fails them with ``ConnectionLost`` within the
  client's ``KeepAlive`` bound (``interval + timeout``), and the client reconnects
  (``Reconnect``) once the link is back; nothing is sent twice but an idempotent call,
  which a ``Retry`` interceptor sends again on the new connection.

Run ``python -m pytest -q -s tests/test_two_hosts.py`` to see the figures measured (one
JSON line per test).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

HELPERS = Path(__file__).parent / "helpers"
_serial = itertools.count()

#: The client's heartbeats in the link-down test: the bound a pending call must fail in.
INTERVAL, TIMEOUT = 1.0, 1.0
#: Room for scheduling on a loaded two-core machine, beyond ``INTERVAL + TIMEOUT``.
SLACK = 1.0
#: The random loss of the HTB impairment, per packet and direction.
LOSS = 0.02


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (or ``tc`` when the first argument is ``tc``)."""
    cmd = list(args) if args[0] == "tc" else ["ip", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        done = subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: command not found")
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done


class Child:
    """A helper run with ``ip netns exec`` (which execs: the child's pid is ours to kill);
    its stdout lines are read by a thread, its stderr goes to a file."""

    def __init__(self, netns: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._err = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env={**os.environ, **env},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(self.popen.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line(self, timeout: float) -> str:
        """The next line printed, within ``timeout`` seconds."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s; stderr: {self.stderr()}") from None
        if line is None:
            self.lines.put(None)
            raise AssertionError(f"the helper exited ({self.popen.wait()}): {self.stderr()}")
        return line

    def event(self, timeout: float) -> dict[str, Any]:
        """The next JSON line printed, within ``timeout`` seconds."""
        event: dict[str, Any] = json.loads(self.line(timeout))
        return event

    def until(self, ev: str, timeout: float) -> dict[str, Any]:
        """Events up to and including the first ``ev``; fail after ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while True:
            event = self.event(max(0.01, end - time.monotonic()))
            if event["ev"] == ev:
                return event

    def send(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def stderr(self) -> str:
        self._err.flush()
        return self.log.read_text()[-3000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                stream.close()
        self._err.close()


class TwoHosts:
    """Two network namespaces joined by a veth pair, ``10.231.X.1`` (server) and
    ``10.231.X.2`` (client), and the helpers started in them."""

    def __init__(self, tmp: Path) -> None:
        n = next(_serial)
        tag = f"{os.getpid()}x{n}"
        self.tmp = tmp
        self.server_ns, self.client_ns = f"ucxrpc-s{tag}", f"ucxrpc-c{tag}"
        self.server_dev, self.client_dev = f"vs{tag}", f"vc{tag}"
        subnet = f"10.231.{(os.getpid() + n) % 250 + 1}"
        self.server_ip, self.client_ip = f"{subnet}.1", f"{subnet}.2"
        self.children: list[Child] = []
        self.made: list[str] = []

    def create(self) -> None:
        for ns in (self.server_ns, self.client_ns):
            done = ip("netns", "add", ns, check=False)
            if done.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {done.stderr.strip()}")
            self.made.append(ns)
        done = ip(
            "link", "add", self.server_dev, "netns", self.server_ns, "type", "veth",
            "peer", "name", self.client_dev, "netns", self.client_ns, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot create a veth pair: {done.stderr.strip()}")
        for ns, dev, addr in (
            (self.server_ns, self.server_dev, self.server_ip),
            (self.client_ns, self.client_dev, self.client_ip),
        ):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")

    def ends(self) -> list[tuple[str, str]]:
        return [(self.server_ns, self.server_dev), (self.client_ns, self.client_dev)]

    def start(self, side: str, script: str, *args: str, **env: str) -> Child:
        ns, dev = (self.server_ns, self.server_dev) if side == "server" else self.ends()[1]
        ucx = {"TLS": "tcp", "NET_DEVICES": dev}
        child = Child(
            ns,
            [str(HELPERS / script), *args],
            {"UCXRPC_UCX_OPTIONS": json.dumps(ucx), **env},
            self.tmp / f"{side}-{len(self.children)}.log",
        )
        self.children.append(child)
        return child

    def serve(self) -> int:
        server = self.start("server", "netns_server.py", self.server_ip)
        line = server.line(timeout=30).split()
        assert line[0] == "READY", line
        return int(line[1])

    def destroy(self) -> None:
        for child in self.children:
            child.stop()
        for ns in self.made:
            ip("netns", "del", ns, check=False)  # takes its end of the veth pair along
        for dev in (self.server_dev, self.client_dev):
            # Left in the root namespace only if moving it failed half-way.
            if ip("link", "show", dev, check=False).returncode == 0:
                ip("link", "del", dev, check=False)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[TwoHosts]:
    pair = TwoHosts(tmp_path)
    try:
        pair.create()
        yield pair
    finally:
        pair.destroy()


def _bpf_drop(loss: float, classid: int) -> str:
    """Classic BPF for cls_bpf: a random ``loss`` of the packets goes to ``classid``,
    the rest to the qdisc's default class (there is no act_gact here to drop them)."""
    threshold = int(2**32 * (1 - loss))
    load_random = 0xFFFFF000 + 56  # SKF_AD_OFF + SKF_AD_RANDOM
    return f"4,32 0 0 {load_random},37 0 1 {threshold},6 0 0 {classid},6 0 0 0"


def _impair_netem(hosts: TwoHosts) -> None:
    for ns, dev in hosts.ends():
        done = ip(
            "tc", "-n", ns, "qdisc", "add", "dev", dev, "root",
            "netem", "delay", "10ms", "5ms", "loss", "2%", check=False,
        )  # fmt: skip
        if done.returncode != 0:
            why = "the kernel has no sch_netem" if "unknown" in done.stderr else "no netem"
            pytest.skip(f"{why} (tc qdisc add ... netem: {done.stderr.strip()})")


def _impair_htb(hosts: TwoHosts) -> None:
    for ns, dev in hosts.ends():
        steps = [
            ("ip", "-n", ns, "link", "set", dev, "mtu", "1400"),
            # TCP then builds wire-sized packets (no 64 KiB GSO ones): loss hits segments.
            ("ip", "-n", ns, "link", "set", dev, "gso_max_segs", "1"),
            ("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
             "default", "10", "r2q", "1000"),
            ("tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10",
             "htb", "rate", "400mbit"),
            ("tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:20",
             "htb", "rate", "400mbit"),
            ("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:20", "handle", "20:",
             "pfifo", "limit", "0"),
            ("tc", "-n", ns, "filter", "add", "dev", dev, "parent", "1:", "prio", "1", "bpf",
             "bytecode", _bpf_drop(LOSS, 0x10020), "classid", "1:20"),
        ]  # fmt: skip
        for step in steps:
            done = ip(*step[1:], check=False) if step[0] == "ip" else ip(*step, check=False)
            if done.returncode != 0:
                pytest.skip(f"cannot impair the link ({' '.join(step)}): {done.stderr.strip()}")


def _link_stats(hosts: TwoHosts) -> tuple[int, int]:
    """Packets the root qdiscs of both ends sent, and those they dropped."""
    sent = dropped = 0
    for ns, dev in hosts.ends():
        stats = json.loads(ip("tc", "-s", "-j", "-n", ns, "qdisc", "show", "dev", dev).stdout)
        for q in stats:
            if q.get("root"):
                sent += q.get("packets", 0)
                dropped += q.get("drops", 0)
    return sent, dropped


@pytest.mark.slow
@pytest.mark.timeout(100)
@pytest.mark.parametrize("impairment", ["netem", "htb-loss"])
def test_every_call_completes_exactly_once_over_an_impaired_link(
    hosts: TwoHosts, impairment: str
) -> None:
    (_impair_netem if impairment == "netem" else _impair_htb)(hosts)
    port = hosts.serve()
    calls = 240
    client = hosts.start(
        "client", "netns_client.py", "mix", hosts.server_ip, str(port),
        "--calls", str(calls), "--seed", "7", "--concurrency", "8",
    )  # fmt: skip
    events = []
    while (event := client.event(timeout=80))["ev"] != "done":
        events.append(event)
    done = event
    assert client.popen.wait(timeout=20) == 0, client.stderr()

    results = [e for e in events if e["ev"] == "call"]
    assert sorted(e["id"] for e in results) == list(range(1, calls + 1))
    bad = [e for e in results if not (e["ok"] and e["check"])]
    assert not bad, bad[:5]
    assert all(e["n"] == 1 for e in results if e["kind"] == "deposit")
    # The server ran each call once: nothing lost, nothing run twice.
    assert done["counts"] == {f"{e['kind']}:{e['id']}": 1 for e in results}
    kinds = {e["kind"] for e in results}
    assert kinds == {"deposit", "echo", "burst"}
    assert max(e["size"] for e in results) == 1 << 20
    # Two hosts: nothing went through shared memory, the bytes crossed the link.
    assert done["shared"] == [0, 0, 0]
    sent = sum(e["size"] for e in results if e["kind"] != "burst")
    received = sum(
        e["size"] if e["kind"] == "echo" else e["size"] + e["size"] // 2 + 1
        for e in results
        if e["kind"] != "deposit"
    )
    assert done["sent"] > sent and done["received"] > received
    packets, dropped = _link_stats(hosts)
    assert dropped > 0, "the impairment dropped nothing: the test did not test loss"
    print(
        json.dumps(
            {
                "test": "impaired",
                "impairment": impairment,
                "calls": len(results),
                "exactly_once": sum(1 for v in done["counts"].values() if v == 1),
                "by_kind": {k: sum(1 for e in results if e["kind"] == k) for k in sorted(kinds)},
                "mib_sent": round(sent / 2**20, 1),
                "mib_received": round(received / 2**20, 1),
                "seconds": done["seconds"],
                "slowest_call_s": max(e["s"] for e in results),
                "packets_sent": packets,
                "packets_dropped": dropped,
            }
        )
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("end", ["server", "client"])
def test_link_down_fails_pending_calls_within_the_keepalive_bound_then_reconnects(
    hosts: TwoHosts, end: str
) -> None:
    port = hosts.serve()
    client = hosts.start(
        "client", "netns_client.py", "linkdown", hosts.server_ip, str(port),
        "--interval", str(INTERVAL), "--timeout", str(TIMEOUT), "--holds", "4",
        UCXRPC_CONNECT_TIMEOUT="2",
    )  # fmt: skip
    pending = client.until("pending", timeout=30)
    ns, dev = hosts.ends()[0 if end == "server" else 1]
    t_down = time.monotonic()
    ip("-n", ns, "link", "set", dev, "down")

    failed = []
    while (event := client.event(timeout=40))["ev"] != "during":
        failed.append(event)
    during = event
    assert sorted(e["id"] for e in failed) == pending["ids"]
    bound = INTERVAL + TIMEOUT
    for e in failed:
        assert e["err"] == "ConnectionLost", e
        assert e["t"] is not None and t_down <= e["t"] <= t_down + bound + SLACK, (
            f"call {e['id']} failed {e['t'] - t_down:.3f} s after the link went down "
            f"(bound {bound} s)"
        )
    # Made while disconnected: refused at once, never sent (checked in the tally below).
    assert during["err"] in ("Unavailable", "ConnectionLost"), during
    assert during["s"] < 0.5, during
    down_done = client.until("down_done", timeout=15)

    ip("-n", ns, "link", "set", dev, "up")
    t_up = time.monotonic()
    client.send("up")
    reconnected = client.until("reconnected", timeout=30)
    assert reconnected["t"] is not None, reconnected
    assert reconnected["reconnects"] == 1
    retried = client.until("retried", timeout=30)
    assert retried["value"] == 250 and retried["retries"] > down_done["retries"], retried
    after = client.until("after", timeout=30)
    assert all(r["ok"] and r["check"] for r in after["results"]), after
    tally = client.until("tally", timeout=20)
    assert client.popen.wait(timeout=20) == 0, client.stderr()

    counts = tally["counts"]
    # Every call reached the server once: the pending ones were not resent on reconnection,
    # the one refused while disconnected was never sent.
    assert {k: counts.get(k) for k in ("hold:100", "hold:101", "hold:102", "hold:103")} == {
        "hold:100": 1, "hold:101": 1, "hold:102": 1, "hold:103": 1,
    }  # fmt: skip
    assert counts.get("trickle:200") == 1
    # The idempotent lookup was sent again after the reconnection, and ran twice.
    assert counts.get("lookup:250") == 2
    assert "deposit:300" not in counts
    for key in ("deposit:1", "deposit:400", "echo:401", "burst:402", "deposit:500"):
        assert counts.get(key) == 1, (key, counts)
    # The server freed the lost connection: the reconnected one and the fresh one are left.
    assert tally["connections"] == 2, tally
    times = [e["t"] - t_down for e in failed]
    print(
        json.dumps(
            {
                "test": "link down",
                "end": end,
                "pending": len(failed),
                "bound_s": bound,
                "fail_after_down_s": [round(min(times), 3), round(max(times), 3)],
                "error": sorted({e["msg"] for e in failed}),
                "during_s": during["s"],
                "down_s": round(t_up - t_down, 3),
                "reconnect_after_up_s": round(reconnected["t"] - t_up, 3),
                "retried_after_up_s": round(retried["t"] - t_up, 3),
                "retry_attempts": retried["retries"],
                "fresh_connect_s": after["fresh_connect_s"],
                "server_freed_after_up_s": tally["freed_s"],
            }
        )
    )
