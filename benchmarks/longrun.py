"""`make bench`, long run: the live agent left running under steady real gRPC traffic stays bounded.

Issue 8: an agent left running for days must not become the leak it hunts. This runs
`tracer capture --iface lo --max-db-size 8M --retain 1h` for --minutes (default 10) while
real grpcio processes on loopback, started here, talk to one grpcio server
(tests/peers/grpcio_server.py):
- --pools pooled clients, one connection each, making unary RPCs continuously, paced to a
  combined --rpc-rate (what the machine gives is measured and printed);
- a churning client that dials a new connection for each call and closes it after
  (--churn-rate connections per second: what retention prunes);
- a leaker that opens a connection every --leak-interval seconds and never closes it
  (open connections are never pruned).
The clients are this same file run with --role. Every --sample seconds it records the
resident memory of the capture process and of its store worker (psutil), the size of the
database file and its write-ahead log, the connections in the database (open, closed),
those retention pruned (prunes.connections) and the agent's packets, drops and lag
(now - captures.last_ts), read through a read-only connection (WAL: readers never block
the writer). It prints a row every 30 s, then a verdict:
- each process's RSS levelled off: the largest sample of the last third of the run is at
  most the largest of the middle third plus RSS_SLACK (10%, or 3 MiB if more);
- the database levelled off (the same rule, with the cap itself as a floor), retention
  pruned, and the database (file + -wal, as the cap counts them) was never larger than the
  cap plus --wal-slack of it (10%: see wal_tolerance());
- every connection the leaker holds open (its sockets, from the kernel through psutil) is
  an open connection in the database at the end, none pruned;
- the agent never stalled (lag at most MAX_LAG_S), exited 0 within STOP_LIMIT_S of
  SIGINT, and the run lasted what was asked.
Exit status 0 when all hold, 1 otherwise (the numbers are printed either way).

Needs root (packet socket); without it, says so and exits 0. Every process it starts is
stopped at the end, also on Ctrl-C, SIGTERM or an error, and each has its own time limit
so that a run killed hard leaves nothing behind for long.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import stop_process

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVER = ROOT / "tests" / "peers" / "grpcio_server.py"

MAX_DB_SIZE = "8M"
MAX_DB_BYTES = 8 << 20  # what the agent reads "8M" as (binary units)
RETAIN = "1h"
RETENTION_INTERVAL_S = 60.0  # the agent's retention pass (store.retention.INTERVAL_S)
PRINT_EVERY_S = 30.0
RSS_SLACK = 0.10
RSS_SLACK_BYTES = 3 << 20
MAX_LAG_S = 10.0  # the agent stores every half second; this much behind is a stall
STOP_LIMIT_S = 5.0  # SIGINT -> exit (DESIGN: "stop it cleanly within a second")
STOP_WAIT_S = 60.0  # how long the agent is given before it is killed
START_WAIT_S = 60.0
STORE_DELAY_S = 2.0  # a connection is in the database this long after it opened

METHOD = "/helloworld.Greeter/SayHello"
REQUEST = b"\x0a\x08longrun!"  # HelloRequest{name: "longrun!"}
# Each channel its own TCP connection (grpcio shares one per target otherwise), no proxy,
# and no client idle timeout: a leaked channel stays connected however long the run.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0),
                   ("grpc.client_idle_timeout_ms", 2**31 - 1)]
REPORT_S = 1.0  # a client prints its counts this often
RPC_TIMEOUT_S = 5.0


# -- the traffic: this file run with --role -------------------------------------------------


class Counts:
    """What a client did; printed as ``COUNTS rpcs errors connections`` every REPORT_S."""

    def __init__(self) -> None:
        self.rpcs = self.errors = self.connections = 0

    def line(self) -> str:
        return f"COUNTS {self.rpcs} {self.errors} {self.connections}"


def role_main(args: argparse.Namespace) -> int:
    import grpc

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    counts = Counts()

    def report() -> None:
        while not stop.wait(REPORT_S):
            print(counts.line(), flush=True)

    threading.Thread(target=report, daemon=True).start()
    deadline = time.monotonic() + args.lifetime
    target = args.target

    def call(method: Any) -> None:
        """One RPC through ``method`` (a channel's multi-callable, raw bytes both ways)."""
        try:
            method(REQUEST, timeout=RPC_TIMEOUT_S)
            counts.rpcs += 1
        except grpc.RpcError:
            counts.errors += 1
            stop.wait(0.1)

    def pace(done: int, began: float) -> float:
        """Sleep until the ``done``-th call is due at --rate; returns the (maybe moved)
        start, so that a stall is not made up for by a burst later."""
        if args.rate <= 0:
            return began
        ahead = done / args.rate - (time.monotonic() - began)
        if ahead > 0:
            stop.wait(ahead)
        elif ahead < -1.0:
            began += -ahead - 1.0
        return began

    kept: list[Any] = []  # the leaker's channels, referenced until exit
    if args.role == "pool":
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        kept.append(channel)
        counts.connections = 1
        method = channel.unary_unary(METHOD)
        began, n = time.monotonic(), 0
        while not stop.is_set() and time.monotonic() < deadline:
            call(method)
            n += 1
            began = pace(n, began)
    elif args.role == "churn":
        began, n = time.monotonic(), 0
        while not stop.is_set() and time.monotonic() < deadline:
            with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
                call(channel.unary_unary(METHOD))
            counts.connections += 1
            n += 1
            began = pace(n, began)
    else:  # leak
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        while not stop.is_set() and time.monotonic() < deadline:
            channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
            kept.append(channel)  # the bug being modelled: never closed
            call(channel.unary_unary(METHOD))
            counts.connections += 1
            stop.wait(args.interval)
        stop.wait(max(0.0, deadline - time.monotonic()))  # hold them until told to stop
    print(counts.line(), flush=True)
    return 0


# -- processes -------------------------------------------------------------------------------


class Peer:
    """One traffic process, its stdout read as it comes (its last COUNTS line kept)."""

    def __init__(self, name: str, cmd: list[str], log: IO[str]) -> None:
        self.name = name
        # Its own session: a Ctrl-C reaches only the benchmark, which stops the children
        # in order (the agent first, while the traffic still flows).
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=log, text=True,
                                     start_new_session=True)
        self.first = ""
        self.rpcs = self.errors = self.connections = 0
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if parts[:1] == ["COUNTS"] and len(parts) == 4:
                self.rpcs, self.errors, self.connections = (int(p) for p in parts[1:])
            elif not self.first:
                self.first = line.strip()
            self._started.set()
        self._started.set()

    def wait_started(self, timeout: float = 30.0) -> str:
        if not self._started.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} did not start (exit status {self.proc.poll()})")
        return self.first

    def stop(self) -> None:
        stop_process(self.proc)
        self._reader.join(5)


def rss_of(proc: psutil.Process | None) -> int:
    if proc is None:
        return 0
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


def cpu_of(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- samples -------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the traffic started
    capture_rss: int
    worker_rss: int
    db_bytes: int  # file + -wal
    wal_bytes: int
    open: int
    closed: int
    pruned: int
    prunes: int
    packets: int
    drops: int
    lag: float  # now - captures.last_ts: how far the stored totals are behind
    rpcs: int  # the clients' own counts, cumulative
    errors: int
    churned: int
    leaked: int
    agent_cpu: float  # CPU seconds of the capture process and its worker, cumulative


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_db(db: Path) -> dict[str, Any]:
    """The numbers the sampler wants, through a read-only connection."""
    con = sqlite3.connect(db.as_uri() + "?mode=ro", uri=True, timeout=5)
    try:
        open_, closed = con.execute(
            "SELECT COALESCE(SUM(is_open), 0), COALESCE(SUM(NOT is_open), 0)"
            " FROM connections").fetchone()
        pruned, prunes = con.execute(
            "SELECT COALESCE(SUM(connections), 0), COUNT(*) FROM prunes").fetchone()
        cap = con.execute("SELECT packets, drops, last_ts, status FROM captures"
                          " ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        con.close()
    packets, drops, last_ts, status = cap if cap else (0, 0, None, None)
    return {"open": open_, "closed": closed, "pruned": pruned, "prunes": prunes,
            "packets": packets or 0, "drops": drops or 0, "last_ts": last_ts,
            "status": status}


def leaks_in_db(db: Path, port: int, client_ports: set[int],
                pid: int) -> tuple[set[int], set[int], int]:
    """Of ``client_ports`` (loopback clients of ``port``): those the database has as open
    connections, those it has only as closed, and how many of the open ones it attributes
    to ``pid``."""
    con = sqlite3.connect(db.as_uri() + "?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute(
            "SELECT orig_p, is_open, pid FROM connections WHERE resp_p = ?"
            " AND orig_h IN ('127.0.0.1', '::1', '::ffff:127.0.0.1')", [port]).fetchall()
    finally:
        con.close()
    mine = [(p, is_open, owner) for p, is_open, owner in rows if p in client_ports]
    opened = {p for p, is_open, _owner in mine if is_open}
    closed = {p for p, is_open, _owner in mine if not is_open} - opened
    attributed = len({p for p, is_open, owner in mine if is_open and owner == pid})
    return opened, closed, attributed


def kernel_ports(pid: int, port: int) -> set[int]:
    """Local ports of ``pid``'s established TCP connections to ``port`` (the kernel's
    socket table and the process's descriptors, through psutil)."""
    conns = psutil.Process(pid).net_connections("tcp")
    return {c.laddr.port for c in conns if c.status == psutil.CONN_ESTABLISHED
            and c.raddr and c.raddr.port == port}


def ss_count(port: int) -> int | None:
    """`ss -tn state established '( dport = :PORT )'`: every client connection to the
    server (pools, leaker, churn calls in flight); None without ss."""
    try:
        out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.splitlines() if line.strip())


# -- the verdict -----------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def thirds(samples: list[Sample], length: float) -> tuple[list[Sample], list[Sample]]:
    middle = [s for s in samples if length / 3 <= s.t < 2 * length / 3]
    last = [s for s in samples if s.t >= 2 * length / 3]
    return middle, last


def slope_per_hour(samples: list[Sample], value: Callable[[Sample], float]) -> float:
    """Least-squares slope of ``value(sample)`` in units per hour."""
    if len(samples) < 3:
        return 0.0
    xs = [s.t for s in samples]
    ys = [float(value(s)) for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    if not den:
        return 0.0
    return 3600 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def wal_tolerance(slack: float) -> int:
    """What the database (file + -wal) may exceed the cap by: the write-ahead log between
    two checkpoints, pages written since the last one that the main file does not hold
    yet. The cap counts the -wal file (store.retention.database_bytes does too), so that
    allowance is small: a tenth of the cap by default, several seconds of this traffic's
    log. SQLite's default checkpoint point (1000 pages, 4 MiB of 4 KiB pages,
    a log file that keeps that size between checkpoints) would be half of an 8 MiB cap: an
    agent held to a small cap has to size its log, or count it, to stay within it."""
    return int(MAX_DB_BYTES * slack)


@dataclass
class Check:
    what: str
    ok: bool
    numbers: str


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    length: float = 0.0  # seconds of traffic with the agent running
    asked: float = 0.0
    stop_s: float | None = None
    exit_status: int | None = None
    leak_kernel: set[int] = field(default_factory=set)
    leak_in_db: set[int] = field(default_factory=set)
    leak_closed_in_db: set[int] = field(default_factory=set)
    ss_established: int | None = None
    final: dict[str, Any] = field(default_factory=dict)
    final_bytes: int = 0
    page_size: int = 4096
    cpu: dict[str, float] = field(default_factory=dict)  # cores, by process (group)
    wal_slack: float = 0.10
    leak_attributed: int = 0  # of the leaker's connections, attributed to its pid
    leak_opened: int = 0  # what the leaker says it opened
    leak_checked: bool = False
    notes: list[str] = field(default_factory=list)


def checks(run: Run) -> list[Check]:
    out: list[Check] = []
    samples = run.samples
    middle, last = thirds(samples, run.length)
    if not middle or not last:
        return [Check("enough samples", False, f"{len(samples)} samples over {run.length:.0f}s")]
    readers: list[tuple[str, Callable[[Sample], int]]] = [
        ("capture process RSS", lambda s: s.capture_rss),
        ("store worker RSS", lambda s: s.worker_rss)]
    for label, get in readers:
        mid_max = max(get(s) for s in middle)
        last_max = max(get(s) for s in last)
        allowed = mid_max + max(RSS_SLACK * mid_max, RSS_SLACK_BYTES)
        first = get(samples[0])
        trend = slope_per_hour(middle + last, get)
        out.append(Check(
            f"{label} levelled off", last_max <= allowed,
            f"first {mib(first)} MiB, max middle third {mib(mid_max)} MiB, max last third "
            f"{mib(last_max)} MiB (allowed {mib(allowed)}); trend over the last two thirds "
            f"{trend / 2**20:+.1f} MiB/h"))
    tolerance = wal_tolerance(run.wal_slack)
    limit = MAX_DB_BYTES + tolerance
    worst = max(samples, key=lambda s: s.db_bytes)
    main_max = max(s.db_bytes - s.wal_bytes for s in samples)
    wal_max = max(s.wal_bytes for s in samples)
    over = sum(1 for s in samples if s.db_bytes > limit)
    mid_max = max(s.db_bytes for s in middle)
    last_max = max(s.db_bytes for s in last)
    allowed = max(mid_max + RSS_SLACK * mid_max, MAX_DB_BYTES + tolerance)
    pruned = samples[-1].pruned
    first_prune = next((s.t for s in samples if s.pruned), None)
    out.append(Check(
        "database never above the cap", worst.db_bytes <= limit and run.final_bytes <= limit,
        f"max {mib(worst.db_bytes)} MiB at {worst.t:.0f}s (of it -wal {mib(worst.wal_bytes)}),"
        f" at the end {mib(run.final_bytes)} MiB; allowed: cap {mib(MAX_DB_BYTES)} MiB + "
        f"{mib(tolerance)} MiB for the -wal = {mib(limit)} MiB; above it in {over} of "
        f"{len(samples)} samples; main file alone up to {mib(main_max)} MiB, -wal alone up "
        f"to {mib(wal_max)} MiB ({wal_max // run.page_size:,} pages of "
        f"{run.page_size:,} B)"))
    when = f"first at {first_prune:.0f}s" if first_prune is not None else "never"
    if first_prune is None:
        when += (f": the cap was not reached in {run.length:.0f}s (a pass every "
                 f"{RETENTION_INTERVAL_S:g}s prunes once the main file is over the cap; at "
                 "the default traffic that takes about 4 minutes)")
    out.append(Check(
        "database size levelled off (retention pruned)",
        last_max <= allowed and pruned > 0 and first_prune is not None
        and first_prune < 2 * run.length / 3,
        f"max middle third {mib(mid_max)} MiB, last third {mib(last_max)} MiB; "
        f"{pruned:,} connections pruned in {samples[-1].prunes} passes ({when})"))
    missing = run.leak_kernel - run.leak_in_db
    out.append(Check(
        "leaked connections all open in the database", bool(run.leak_kernel) and not missing,
        "not checked: the run did not reach its end" if not run.leak_checked else
        f"the leaker opened {run.leak_opened} and holds {len(run.leak_kernel)} (kernel), "
        f"{len(run.leak_in_db)} of them open in the database ({run.leak_attributed} "
        f"attributed to its pid), {len(missing)} missing ({len(run.leak_closed_in_db)} stored "
        f"as closed); ss: {'?' if run.ss_established is None else run.ss_established} "
        f"established to the port in all"))
    max_lag = max(s.lag for s in samples)
    out.append(Check("agent never stalled", max_lag <= MAX_LAG_S,
                     f"largest lag of the stored totals {max_lag:.1f}s (allowed "
                     f"{MAX_LAG_S:g}s); {samples[-1].packets:,} packets, "
                     f"{samples[-1].drops:,} dropped by the kernel"))
    stop = f"{run.stop_s:.1f}s" if run.stop_s is not None else "did not exit"
    out.append(Check("agent stopped by SIGINT, exit 0",
                     run.exit_status == 0 and run.stop_s is not None
                     and run.stop_s <= STOP_LIMIT_S,
                     f"exit status {run.exit_status} after {stop} (allowed {STOP_LIMIT_S:g}s)"))
    out.append(Check("run length", run.length >= run.asked - 1.0,
                     f"{run.length:.0f}s of {run.asked:.0f}s asked, {len(samples)} samples"))
    return out


# -- the table -------------------------------------------------------------------------------

COLUMNS = [("time", 6), ("capture MiB", 11), ("worker MiB", 10), ("DB MiB", 7),
           ("-wal", 5), ("open", 6), ("closed", 7), ("pruned", 7), ("packets", 11),
           ("RPC/s", 6), ("conn/s", 6), ("leaked", 6), ("agent CPU", 9)]


def header() -> str:
    return "  ".join(name.rjust(width) for name, width in COLUMNS)


def row(s: Sample, prev: Sample | None) -> str:
    """One line of the table; the rates are over the time since ``prev`` (none on the
    first line)."""
    rates = ["-", "-", "-"]
    if prev is not None and s.t > prev.t:
        dt = s.t - prev.t
        rates = [f"{(s.rpcs - prev.rpcs) / dt:,.0f}", f"{(s.churned - prev.churned) / dt:.0f}",
                 f"{(s.agent_cpu - prev.agent_cpu) / dt:.0%}"]
    cells = [f"{s.t:.0f}s", mib(s.capture_rss), mib(s.worker_rss), mib(s.db_bytes),
             mib(s.wal_bytes), f"{s.open:,}", f"{s.closed:,}", f"{s.pruned:,}",
             f"{s.packets:,}", rates[0], rates[1], f"{s.leaked}", rates[2]]
    return "  ".join(c.rjust(w) for c, (_name, w) in zip(cells, COLUMNS, strict=True))


# -- the run ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.db = tmp / "longrun.db"
        self.log = open(tmp / "peers.log", "w")  # noqa: SIM115 - closed in close()
        self.agent_log = tmp / "agent.log"
        self.peers: list[Peer] = []
        self.server: Peer | None = None
        self.leaker: Peer | None = None
        self.agent: subprocess.Popen[str] | None = None
        self.run = Run(asked=args.minutes * 60, wal_slack=args.wal_slack)
        self.lifetime = args.minutes * 60 + 300  # every child's own bound

    def close(self) -> None:
        """Stop whatever still runs: the agent first (while the traffic still flows), then
        the clients, then the server; then what the database holds at the end."""
        try:
            if self.agent is not None and self.agent.poll() is None:
                self.stop_agent()
        finally:
            for peer in reversed(self.peers):
                peer.stop()
            self.log.close()
        self.read_final()

    def stop_agent(self) -> None:
        """SIGINT, and how long until it exits (killed after STOP_WAIT_S)."""
        assert self.agent is not None
        run = self.run
        started = time.monotonic()
        with suppress(ProcessLookupError):
            self.agent.send_signal(signal.SIGINT)
        try:
            run.exit_status = self.agent.wait(STOP_WAIT_S)
            run.stop_s = time.monotonic() - started
        except subprocess.TimeoutExpired:
            run.notes.append(f"the agent did not exit within {STOP_WAIT_S:g}s of SIGINT: "
                             "killed")
            self.agent.kill()
            with suppress(subprocess.TimeoutExpired):
                self.agent.wait(10)
        if run.exit_status not in (0, None):
            run.notes.append("the agent's last words:\n" + tail(self.agent_log))

    def read_final(self) -> None:
        run = self.run
        if not self.db.exists():
            return
        run.final_bytes = file_size(self.db) + file_size(Path(f"{self.db}-wal"))
        try:
            run.final = read_db(self.db)
            con = sqlite3.connect(self.db.as_uri() + "?mode=ro", uri=True, timeout=5)
            try:
                run.page_size = con.execute("PRAGMA page_size").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error as exc:
            run.notes.append(f"the database could not be read at the end: {exc}")

    def client(self, name: str, role: str, port: int, *extra: str) -> Peer:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--target",
               f"127.0.0.1:{port}", "--lifetime", str(self.lifetime), *extra]
        peer = Peer(name, cmd, self.log)
        self.peers.append(peer)
        return peer

    def start_server(self) -> int:
        self.server = Peer("grpcio server", [sys.executable, str(SERVER), "0",
                                             "--max-lifetime", str(self.lifetime)], self.log)
        self.peers.append(self.server)
        ready = self.server.wait_started()
        if not ready.startswith("READY "):
            raise RuntimeError(f"the grpcio server said {ready!r}")
        return int(ready.split()[1])

    def start_agent(self, port: int) -> tuple[psutil.Process, psutil.Process | None]:
        cmd = [sys.executable, "-m", "cli.main", "capture", "--port", str(port), "--iface",
               "lo", "--db", str(self.db), "--max-db-size", MAX_DB_SIZE, "--retain", RETAIN,
               "-q", "--duration", f"{int(self.lifetime)}s"]
        with open(self.agent_log, "w") as err:
            self.agent = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                          stdout=err, stderr=err, text=True,
                                          start_new_session=True)
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                raise RuntimeError(f"the agent exited with status {self.agent.returncode}:\n"
                                   + tail(self.agent_log))
            with suppress(sqlite3.Error):
                if self.db.exists() and read_db(self.db)["status"] == "running":
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("the agent did not start within "
                               f"{START_WAIT_S:g}s:\n{tail(self.agent_log)}")
        capture = psutil.Process(self.agent.pid)
        children = capture.children()
        if len(children) != 1:
            self.run.notes.append(f"the capture process has {len(children)} children; the "
                                  "first is taken as the store worker")
        time.sleep(1.0)  # the packet socket opens beside the store worker's start
        return capture, children[0] if children else None

    def main(self) -> None:
        args = self.args
        try:
            from tracer import __version__, build_kind

            which = f"tracer {__version__} ({build_kind()} core)"
        except ImportError as exc:  # a stale compiled core: the agent will say so too
            which = f"tracer (not importable: {str(exc)[:100]}...)"
        print(f"long-run benchmark: {which}, {os.cpu_count()} CPUs, {args.minutes:g} min; "
              f"agent --iface lo --max-db-size {MAX_DB_SIZE} --retain {RETAIN}; traffic: a "
              f"grpcio server, {args.pools} pooled clients ({args.rpc_rate:,} RPC/s asked), "
              f"{args.churn_rate:g} new connections/s closed after one call, a leaked one "
              f"every {args.leak_interval:g}s", flush=True)
        port = self.start_server()
        capture, worker = self.start_agent(port)
        per_pool = args.rpc_rate / max(args.pools, 1)
        clients = [self.client(f"pool {i}", "pool", port, "--rate", f"{per_pool:g}")
                   for i in range(args.pools)]
        churn = self.client("churn", "churn", port, "--rate", f"{args.churn_rate:g}")
        self.leaker = self.client("leaker", "leak", port, "--interval",
                                  f"{args.leak_interval:g}")
        pools = list(clients)
        clients += [churn, self.leaker]
        for peer in clients:
            peer.wait_started()
        peers_procs = [psutil.Process(p.proc.pid) for p in self.peers]
        agent_procs = [capture] + ([worker] if worker else [])
        groups = {"capture process": [capture], "store worker": agent_procs[1:],
                  "grpcio server": peers_procs[:1], "pooled clients": peers_procs[1:1 + len(pools)],
                  "churn": peers_procs[1 + len(pools):2 + len(pools)],
                  "leaker": peers_procs[2 + len(pools):]}
        cpu_before = {name: cpu_of(procs) for name, procs in groups.items()}
        began = time.monotonic()
        length = args.minutes * 60
        print(header(), flush=True)
        shown: Sample | None = None
        next_at = began
        while True:
            now = time.monotonic()
            if self.agent is not None and self.agent.poll() is not None:
                raise RuntimeError(f"the agent exited during the run (status "
                                   f"{self.agent.returncode}) at {now - began:.0f}s:\n"
                                   + tail(self.agent_log))
            dead = [p.name for p in self.peers if p.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited during the run:\n"
                                   + tail(self.tmp / "peers.log"))
            sample = self.sample(now - began, capture, worker, agent_procs, churn)
            self.run.samples.append(sample)
            if shown is None or sample.t - shown.t >= PRINT_EVERY_S - 0.5 or sample.t >= length:
                print(row(sample, shown), flush=True)
                shown = sample
            if sample.t >= length:
                break
            next_at += args.sample
            time.sleep(max(0.0, min(next_at, began + length) - time.monotonic()))
        self.run.length = time.monotonic() - began
        self.run.cpu = {name: (cpu_of(procs) - cpu_before[name]) / self.run.length
                        for name, procs in groups.items()}
        self.finish(port)

    def sample(self, t: float, capture: psutil.Process, worker: psutil.Process | None,
               agent_procs: list[psutil.Process], churn: Peer) -> Sample:
        wall = time.time()
        try:
            got = read_db(self.db)
        except sqlite3.Error as exc:  # a reader is never blocked for long; say it if it was
            if not self.run.samples:
                raise
            self.run.notes.append(f"the database could not be read at {t:.0f}s ({exc}): that "
                                  "sample repeats the one before")
            prev = self.run.samples[-1]
            got = {"open": prev.open, "closed": prev.closed, "pruned": prev.pruned,
                   "prunes": prev.prunes, "packets": prev.packets, "drops": prev.drops,
                   "last_ts": wall - prev.lag}
        wal = file_size(Path(f"{self.db}-wal"))
        assert self.leaker is not None
        return Sample(
            t=t, capture_rss=rss_of(capture), worker_rss=rss_of(worker),
            db_bytes=file_size(self.db) + wal, wal_bytes=wal, open=got["open"],
            closed=got["closed"], pruned=got["pruned"], prunes=got["prunes"],
            packets=got["packets"], drops=got["drops"],
            lag=wall - got["last_ts"] if got["last_ts"] else 0.0,
            rpcs=sum(p.rpcs for p in self.peers), errors=sum(p.errors for p in self.peers),
            churned=churn.connections, leaked=self.leaker.connections,
            agent_cpu=cpu_of(agent_procs))

    def finish(self, port: int) -> None:
        run = self.run
        assert self.leaker is not None and self.agent is not None
        # The leaker's connections, from the kernel; each opened at least STORE_DELAY_S ago
        # by the time the database is read.
        run.leak_kernel = kernel_ports(self.leaker.proc.pid, port)
        run.leak_opened = self.leaker.connections
        run.ss_established = ss_count(port)
        time.sleep(STORE_DELAY_S)
        run.leak_in_db, run.leak_closed_in_db, run.leak_attributed = leaks_in_db(
            self.db, port, run.leak_kernel, self.leaker.proc.pid)
        run.leak_checked = True
        self.stop_agent()  # while the traffic still flows


def report(run: Run, args: argparse.Namespace) -> int:
    samples = run.samples
    if not samples:
        print("longrun: no sample taken")
        return 1
    last = samples[-1]
    length = max(run.length, 1e-9)
    print(f"traffic: {last.rpcs / length:,.0f} RPC/s from all clients over {length:.0f}s "
          f"({last.rpcs:,} RPCs, "
          f"{last.errors:,} failed; {args.rpc_rate:,} asked from {args.pools} pooled clients), "
          f"{last.churned / length:.1f} new connections/s closed after one call "
          f"({last.churned:,}), {last.leaked} leaked and held open")
    if run.cpu:
        print(f"CPU ({os.cpu_count()} CPUs), share of one core: "
              + ", ".join(f"{name} {cores:.0%}" for name, cores in run.cpu.items()))
    final = run.final
    if final:
        print(f"at the end: {final['open']:,} open and {final['closed']:,} closed connections "
              f"in the database, {final['pruned']:,} pruned in {final['prunes']} passes "
              f"(closed + pruned = {final['closed'] + final['pruned']:,}; the churning client "
              f"made {last.churned:,}), {final['packets']:,} packets, {final['drops']:,} "
              f"dropped; capture {final['status']}")
    ok = True
    for c in checks(run):
        ok &= c.ok
        print(f"{'ok  ' if c.ok else 'FAIL'}  {c.what}: {c.numbers}")
    for note in run.notes:
        print(f"note: {note}")
    print(f"longrun verdict: {'bounded' if ok else 'NOT bounded (see FAIL above)'}")
    return 0 if ok else 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0,
                    help="how long the traffic runs (default 10; lower to try it out)")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--pools", type=int, default=4, help="pooled clients")
    ap.add_argument("--rpc-rate", type=int, default=2000,
                    help="RPC/s asked of the pooled clients together (0: as fast as they go)")
    ap.add_argument("--churn-rate", type=float, default=40.0,
                    help="new connections per second, each closed after its call")
    ap.add_argument("--leak-interval", type=float, default=2.0,
                    help="seconds between two leaked connections")
    ap.add_argument("--wal-slack", type=float, default=0.10,
                    help="share of the cap the database (file + -wal) may exceed it by, "
                         "for the write-ahead log between checkpoints (default 0.10)")
    # The traffic roles (this file run by itself).
    ap.add_argument("--role", choices=("pool", "churn", "leak"), help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    ap.add_argument("--lifetime", type=float, default=900.0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.role:
        return role_main(args)
    if os.geteuid() != 0:
        print("longrun: skipped (the live agent needs root for its packet socket)")
        return 0

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds: the children are stopped

    signal.signal(signal.SIGTERM, on_term)
    with tempfile.TemporaryDirectory(prefix="trlongrun-") as tmp:
        bench = Bench(args, Path(tmp))
        status = 0
        try:
            bench.main()
        except KeyboardInterrupt:
            bench.run.notes.append("interrupted: the verdict covers what ran before")
            status = 130
        except (RuntimeError, OSError, sqlite3.Error, psutil.Error) as exc:
            print(f"longrun failed: {exc}", flush=True)
            status = 1
        finally:
            bench.close()
        if not bench.run.length and bench.run.samples:
            bench.run.length = bench.run.samples[-1].t
        verdict = report(bench.run, args)
    return status or verdict


if __name__ == "__main__":
    sys.exit(main())
