"""Kill matrix: does a peer SIGKILLed in the middle of a large transfer abort or hang
the process that survives it, for each candidate UCX configuration?

Every process runs ``tests/helpers/kill_peer.py`` (one role each), started with
``subprocess`` (fork+exec: this process never initialises UCX, nothing is inherited)
on 127.0.0.1 with port 0, and every one is killed by its pid when it is done with.

For each candidate (``UCXRPC_UCX_OPTIONS`` of every child):

* bench: a server and a client; p50 of a 64 B echo round trip, 16 MiB echo MiB/s
  (counted one way, as benchmarks/echo.py does);
* client killed mid-request: one server; per kill a fresh client that calls ``sink``
  and ``echo`` with SIZE bytes back to back is SIGKILLed after a random delay in
  [0, 2 x one call) (so kills land in every phase of a call); then the server must be
  alive and answer a fresh connection's ``ping`` within 2 s (a long-lived prober
  process makes the connection); the server's leftover UCX requests are recorded;
* server killed mid-reply: per kill a fresh server; a long-lived client calls ``echo``
  (SIZE each way) and ``big`` (a SIZE reply) back to back; the server is SIGKILLed
  after a random delay; the client must stay alive and its pending call must fail with
  ConnectionLost (or Unavailable) within 1 s (time from the kill, ``time.monotonic``
  is one clock for all processes).

Counted per (candidate, direction, size): survivor aborts (the surviving process died),
hangs (no answer / no failure in bound), wrong errors, late errors (> 1 s), and the
largest time to the error (server killed) or to the fresh call's answer (client killed).

Usage::

    python benchmarks/kill_matrix.py [--kills 20] [--sizes 8,64] [--candidates a,b]
                                     [--seed N] [--json bench-results/kill_matrix.json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "helpers"))

from childproc import HELPERS, ChildProcess

HELPER = HELPERS / "kill_peer.py"
MIB = 1 << 20

#: name -> ucx_options (without the UCX_ prefix). ``None``: the library's own default
#: (``UCXRPC_UCX_OPTIONS`` is inherited from this environment, not set).
CANDIDATES: dict[str, dict[str, str] | None] = {
    "default": None,
    "all": {"TLS": "all"},
    "nocma": {"TLS": "^cma"},
    "shm": {"TLS": "posix,sysv,self"},
    "tcp": {"TLS": "tcp", "NET_DEVICES": "lo"},
}
ERROR_OK = ("ConnectionLost", "Unavailable")
DEADLINE_ERROR = 1.0  # the pending call must fail within this (server killed)
DEADLINE_PROBE = 2.0  # a fresh call must be answered within this (client killed)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def idle_cpu_pct(pid: int, seconds: float = 1.0) -> int:
    """The CPU share (%) process ``pid`` uses over the next ``seconds``."""
    c0, w0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return round(100 * (cpu_seconds(pid) - c0) / (time.monotonic() - w0))


class Child(ChildProcess):
    """One helper process: stdout lines arrive on a queue, stderr goes to a file."""

    def __init__(
        self,
        role: str,
        *args: str,
        options: dict[str, str] | None,
        logdir: Path,
        lib: str | None,
    ) -> None:
        env = dict(os.environ)
        if options is not None:
            env["UCXRPC_UCX_OPTIONS"] = json.dumps(options)
        if lib:  # a snapshot of the library, ahead of the editable install
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [lib, env.get("PYTHONPATH")]))
        env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        super().__init__(HELPER, role, *args, env=env, logdir=logdir, errprefix=role)
        self.role = role

    def expect(self, prefix: str, timeout: float) -> str | None:
        """The next line starting with ``prefix`` (None: timeout or the child exited)."""
        for line in self.lines_within(timeout):
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
            if line.startswith("ERROR"):
                raise RuntimeError(f"{self.role} {self.pid}: {line}")
        return None

    def report(self, words: tuple[str, ...], timeout: float) -> str | None:
        """The next line starting with one of ``words``, looked for while the child
        lives (None: it ended or none came within ``timeout``)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.alive():
            try:
                line = self.next_line(0.5)
            except queue.Empty:
                continue
            if line is None:
                return None
            if line.startswith(words):
                return line
        return None

    def stderr_tail(self, lines: int = 6, sep: str = "\n") -> str:
        """The last non-empty lines of its stderr."""
        return super().stderr_tail(lines, sep)


class Matrix:
    """The processes and measurements for one candidate configuration."""

    def __init__(
        self,
        name: str,
        options: dict[str, str] | None,
        logdir: Path,
        rng: random.Random,
        lib: str | None = None,
    ) -> None:
        self.lib = lib
        self.name = name
        self.options = options
        self.logdir = logdir
        self.rng = rng
        self.children: list[Child] = []

    def start(self, role: str, *args: str) -> Child:
        child = Child(role, *args, options=self.options, logdir=self.logdir, lib=self.lib)
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            child.stop()
        self.children.clear()

    def _ready(self, role: str, what: str) -> tuple[Child, str]:
        """Start ``role`` and wait for its READY line: the child and the rest of it."""
        child = self.start(role)
        ready = child.expect("READY", 30)
        if ready is None:
            child.stop()
            raise RuntimeError(f"{self.name}: {what} did not start: {child.stderr_tail()}")
        return child, ready

    def server(self) -> tuple[Child, int]:
        srv, port = self._ready("serve", "server")
        return srv, int(port)

    def caller(self) -> Child:
        return self._ready("caller", "caller")[0]

    def retire(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def _kill_mid_call(self, rec: dict[str, Any], go: str, victim: Child) -> float:
        """SIGKILL ``victim`` after a random delay in [0, 2 x one call) (``go``: its
        seconds per call; both go into ``rec``); the ``time.monotonic()`` of the kill."""
        call_s = float(go)
        delay = self.rng.uniform(0.0, 2.0 * call_s)
        rec.update(call_s=call_s, delay=round(delay, 5))
        time.sleep(delay)
        t_kill = time.monotonic()
        victim.kill()
        self.retire(victim)
        return t_kill

    # -- phases ---------------------------------------------------------------------------

    def bench(self) -> dict[str, Any]:
        srv, port = self.server()
        cli = self.caller()
        try:
            cli.send(f"bench {port}")
            line = cli.expect("BENCH", 120)
            if line is None:
                return {"error": f"bench failed: {cli.stderr_tail()} {srv.stderr_tail()}"}
            return dict(json.loads(line))
        finally:
            self.retire(cli)
            self.retire(srv)

    def client_killed(self, size: int, kills: int) -> list[dict[str, Any]]:
        """Kill clients mid-request; the server must survive and answer."""
        records: list[dict[str, Any]] = []
        srv, port = self.server()
        prober = self.caller()
        for i in range(kills):
            rec: dict[str, Any] = {"kill": i}
            flood = self.start("flood", str(port), str(size))
            go = flood.expect("GO", 30)
            if go is None:
                rec["setup_error"] = (flood.stderr_tail() or "client did not start").strip()
                rec["server_rc"] = srv.returncode(wait=0.5)
                self.retire(flood)
            else:
                self._kill_mid_call(rec, go, flood)
                rec.update(self._probe(prober, port))
                if "peer_state" in rec:
                    rec["server_state"] = rec.pop("peer_state")
                if rec["probe"] == "no answer" and not prober.alive():
                    rec["prober_rc"] = prober.returncode()
                    self.retire(prober)
                    prober = self.caller()
                elif rec["probe"] != "ok" and srv.alive():
                    time.sleep(5.0)  # still deaf 5 s later: wedged for good?
                    rec["reprobe"] = self._probe(prober, port)["probe"]
                rec["server_rc"] = srv.returncode(wait=0.05)
            records.append(rec)
            if _went_wrong(rec, srv, "server_rc", answered=rec.get("probe") == "ok"):
                self.retire(srv)  # a fresh server for the next kill
                srv, port = self.server()
        # What the server keeps (and burns) once every client is gone.
        idle = idle_cpu_pct(srv.pid)
        if records:
            records[-1]["server_idle_cpu_pct"] = idle
        self.retire(prober)
        self.retire(srv)
        return records

    def _probe(self, cli: Child, port: int) -> dict[str, Any]:
        """A fresh connection from ``cli`` must be answered within 2 s."""
        cli.send(f"probe {port}")
        line = cli.expect("PROBE", 10)
        if line is None:
            return {"probe": "no answer"}
        status, secs, rest = [*line.split(maxsplit=2), ""][:3]
        out: dict[str, Any] = {"probe": status, "probe_s": float(secs)}
        if status == "ok":
            out["peer_state"] = json.loads(rest)
        else:
            out["probe_error"] = rest
        return out

    def server_killed(self, size: int, kills: int) -> list[dict[str, Any]]:
        """Kill servers mid-reply; the client must survive and fail the call in time.

        Before each kill (and once after the last) the client first makes a fresh call
        to the new server: its answer within 2 s is the health check of the kill before
        (a survivor whose shared-memory FIFO was wedged by the dead peer fails it).
        """
        records: list[dict[str, Any]] = []
        cli = self.caller()

        def after(prev: dict[str, Any] | None, port: int) -> bool:
            """Check the survivor of ``prev`` with a fresh call; False: restarted."""
            nonlocal cli
            check = self._probe(cli, port)
            if prev is None:
                return True
            prev["next_probe"] = check["probe"]
            prev["next_probe_s"] = check.get("probe_s")
            if check["probe"] == "ok":
                return True
            prev["hang"] = True
            prev["wedged"] = check.get("probe_error", check["probe"])
            if not cli.alive():
                prev["abort"] = True
                prev["stderr"] = cli.stderr_tail()
            self.retire(cli)
            cli = self.caller()
            return False

        prev: dict[str, Any] | None = None
        for i in range(kills):
            rec: dict[str, Any] = {"kill": i}
            srv, port = self.server()
            if not after(prev, port):
                self._probe(cli, port)  # the fresh caller's own first call
            cli.send(f"victim {port} {size}")
            try:
                go = cli.expect("GO", 60)
            except RuntimeError as exc:  # the caller printed ERROR: the warm-up failed
                go, rec["setup_error"] = None, str(exc)
            if go is None:
                rec.setdefault("setup_error", "victim did not start")
                rec["client_rc"] = cli.returncode(wait=0.5)
                self.retire(srv)
            else:
                t_kill = self._kill_mid_call(rec, go, srv)
                line = cli.report(("LOST", "HANG", "ERROR"), 30)
                rec["client_rc"] = cli.returncode(wait=0.2)
                if line is None:
                    rec["report"] = "no answer"
                else:
                    kind, _, body = line.partition(" ")
                    rec["report"] = kind
                    if kind in ("LOST", "HANG"):
                        data = json.loads(body)
                        rec.update(data)
                        rec["time_to_error"] = round(data["when"] - t_kill, 4)
                    else:
                        rec["message"] = body
            records.append(rec)
            prev = rec
            if _went_wrong(rec, cli, "client_rc", answered=rec.get("report") == "LOST"):
                self.retire(cli)
                cli = self.caller()
                prev = None  # nothing left to check: a fresh client
        if prev is not None:
            srv, port = self.server()
            after(prev, port)
            self.retire(srv)
        # Does the survivor keep burning CPU once every server is gone?
        time.sleep(1.0)
        idle = idle_cpu_pct(cli.pid)
        if records:
            records[-1]["client_idle_cpu_pct"] = idle
        self.retire(cli)
        return records


def _went_wrong(rec: dict[str, Any], survivor: Child, rc: str, *, answered: bool) -> bool:
    """Mark the kill of ``rec`` an abort (``rec[rc]``, the survivor's return code, is
    set: it died; its stderr is kept) or a hang (it lives but did not ``answer``);
    whether it is either."""
    if rec[rc] is not None:
        rec["abort"] = True
        rec["stderr"] = survivor.stderr_tail()
    elif not answered:
        rec["hang"] = True
    return bool(rec.get("abort") or rec.get("hang"))


def summarize(rows: list[dict[str, Any]], direction: str) -> dict[str, Any]:
    aborts = sum(1 for r in rows if r.get("abort"))
    hangs = sum(1 for r in rows if r.get("hang"))
    setup = sum(1 for r in rows if "setup_error" in r)
    out: dict[str, Any] = {"kills": len(rows), "aborts": aborts, "hangs": hangs, "setup": setup}
    if direction == "client_killed":
        # The fresh connection's answer time, over the kills the server survived.
        times = [r["probe_s"] for r in rows if r.get("probe") == "ok"]
        out["max_s"] = max(times) if times else None
        out["late"] = sum(1 for t in times if t > DEADLINE_PROBE)
        states = [r["server_state"] for r in rows if "server_state" in r]
        out["leftover_ops"] = states[-1]["ops"] if states else None
        out["leftover_mib"] = states[-1]["ops_mib"] if states else None
        out["rss_mib"] = states[-1]["rss_mib"] if states else None
        out["idle_cpu_pct"] = rows[-1].get("server_idle_cpu_pct") if rows else None
    else:
        lost = [r for r in rows if r.get("report") == "LOST"]
        times = [r["time_to_error"] for r in lost]
        out["max_s"] = max(times) if times else None
        out["late"] = sum(1 for t in times if t > DEADLINE_ERROR)
        out["wrong_error"] = sum(1 for r in lost if r["error"] not in ERROR_OK)
        last = lost[-1]["after_close"] if lost else None
        out["leftover_ops"] = None if last is None else last["ops"]
        out["leftover_mib"] = None if last is None else last["ops_mib"]
        out["rss_mib"] = None if last is None else last["rss_mib"]
        out["cpu_after_loss_pct"] = max((r["cpu_pct_after"] for r in lost), default=None)
        out["idle_cpu_pct"] = rows[-1].get("client_idle_cpu_pct") if rows else None
        out["close_hangs"] = sum(1 for r in lost if r.get("close_s") is None)
    out["ok"] = not (aborts or hangs or setup or out["late"] or out.get("wrong_error"))
    return out


def print_table(results: dict[str, Any]) -> None:
    head = (
        f"{'candidate':<9} {'direction':<14} {'MiB':>4} {'kills':>5} {'aborts':>6} "
        f"{'hangs':>5} {'late':>4} {'wrong':>5} {'max s':>7} {'left ops':>8} "
        f"{'left MiB':>8} {'cpu%':>5}"
    )
    print(head)
    print("-" * len(head))
    for name, res in results.items():
        for key, s in res["summary"].items():
            direction, size = key.rsplit("/", 1)
            mx = "-" if s["max_s"] is None else f"{s['max_s']:.3f}"
            print(
                f"{name:<9} {direction:<14} {size:>4} {s['kills']:>5} {s['aborts']:>6} "
                f"{s['hangs'] + s['setup']:>5} {s['late']:>4} {s.get('wrong_error', 0):>5} "
                f"{mx:>7} {s['leftover_ops']!s:>8} {s['leftover_mib']!s:>8} "
                f"{s['idle_cpu_pct']!s:>5}"
            )
    print()
    print(f"{'candidate':<9} {'options':<36} {'p50 us':>7} {'p99 us':>7} {'16MiB MiB/s':>11}")
    for name, res in results.items():
        b = res["bench"]
        print(
            f"{name:<9} {_options(res['options']):<36} {b.get('p50_us', '-')!s:>7} "
            f"{b.get('p99_us', '-')!s:>7} {b.get('mib_per_s', b.get('error', '-'))!s:>11}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kills per direction and size")
    parser.add_argument("--sizes", default="8,64", help="transfer sizes in MiB")
    parser.add_argument(
        "--candidates",
        default="default,nocma,shm,tcp",
        help=f"names to run, of {', '.join(CANDIDATES)}",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help='an extra candidate, e.g. rc1=\'{"TLS": "^cma", "RNDV_THRESH": "inf"}\'',
    )
    parser.add_argument(
        "--directions",
        default="client_killed,server_killed",
        help="which halves of the matrix to run ('none': only the bench)",
    )
    parser.add_argument("--no-bench", action="store_true", help="skip p50 / MiB/s")
    parser.add_argument(
        "--progress-mode",
        default=None,
        help="UCXRPC_PROGRESS_MODE for every child (default: inherited / the library's)",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--lib",
        default=None,
        metavar="DIR|REV",
        help="run the children against this copy of ucxrpc: a directory holding the "
        "ucxrpc package, or a git revision to export (git archive) into a temporary one "
        "(default: the working tree)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every record here")
    args = parser.parse_args()

    candidates = dict(CANDIDATES)
    for spec in args.option:
        name, _, body = spec.partition("=")
        candidates[name] = json.loads(body)
    names = [n for n in args.candidates.split(",") if n] + [
        s.partition("=")[0] for s in args.option if s.partition("=")[0] not in args.candidates
    ]
    if args.progress_mode:
        os.environ["UCXRPC_PROGRESS_MODE"] = args.progress_mode  # children inherit it
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    sizes = [int(s) for s in args.sizes.split(",")]
    directions = [d for d in args.directions.split(",") if d and d != "none"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kill-matrix-") as tmp:
        lib = export_lib(args.lib, Path(tmp)) if args.lib else None
        if lib:
            print(f"library: {args.lib} -> {lib}", flush=True)
        for name in names:
            options = candidates[name]
            m = Matrix(name, options, Path(tmp), rng, lib)
            res: dict[str, Any] = {"options": options, "summary": {}, "records": {}}
            results[name] = res
            t0 = time.monotonic()
            try:
                res["bench"] = {} if args.no_bench else m.bench()
                print(f"[{name}] bench {res['bench']}", flush=True)
                for direction in directions:
                    for size in sizes:
                        run = getattr(m, direction)
                        rows = run(size * MIB, args.kills)
                        key = f"{direction}/{size}"
                        res["records"][key] = rows
                        res["summary"][key] = summarize(rows, direction)
                        print(f"[{name}] {key}: {res['summary'][key]}", flush=True)
                        for r in rows:
                            if r.get("abort") or r.get("hang"):
                                tail = r.get("stderr", "").replace("\n", " | ")[-240:]
                                print(f"    kill {r['kill']}: {_brief(r)} {tail}", flush=True)
            finally:
                m.close()
            res["seconds"] = round(time.monotonic() - t0, 1)
    print(f"\nseed {seed}, {args.kills} kills per direction and size\n")
    print_table(results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "seed": seed,
            "kills": args.kills,
            "lib": args.lib,
            "progress_mode": os.environ.get("UCXRPC_PROGRESS_MODE"),
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"\nwrote {args.json}")


def export_lib(spec: str, tmp: Path) -> str:
    """A directory to put first on the children's PYTHONPATH."""
    if (Path(spec) / "ucxrpc" / "__init__.py").is_file():
        return str(Path(spec).resolve())
    repo = HELPER.parent.parent.parent
    out = tmp / "lib"
    out.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", spec, "ucxrpc"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return str(out)


def _options(options: dict[str, str] | None) -> str:
    return "(library default)" if options is None else json.dumps(options)


def _brief(r: dict[str, Any]) -> str:
    keys = (
        "delay",
        "call_s",
        "probe",
        "probe_error",
        "report",
        "error",
        "server_rc",
        "client_rc",
        "setup_error",
    )
    return " ".join(f"{k}={r[k]}" for k in keys if k in r)


if __name__ == "__main__":
    main()
