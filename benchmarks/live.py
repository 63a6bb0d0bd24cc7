"""`make bench`, live part: the live agent (`tracer capture --iface`) on replayed and real traffic.

Three measurements (issue 3), each with its target:
1. rate: the largest packet rate the agent follows with no kernel drop, and the CPU it
   takes there (target >= 100,000 packets/s on one core); with attribution (the default)
   and with --no-attribution;
2. memory: resident memory per open connection with 50,000 leaked connections open, right
   after they arrived and once they are idle and asleep (target <= 1 KB), with a breakdown
   from an analyzer run in this process;
3. attribution latency on loopback, with 2,000 unrelated sockets open on the host (target:
   attributed within 1 s).

Method: tcpreplay sends generated traffic (benchmarks/gen_capture.py) at a fixed --pps
and a bounded --limit into one end of a veth pair (this kernel has no dummy driver) and a
fresh agent captures the other end, where packets arrive as from a NIC; a rate is
followed when captures.drops is 0, the socket received every packet sent and the agent
never lagged more than MAX_BACKLOG_S (status lines), and CPU is the agent's process tree
(psutil) from the replay's start until it is idle, over the replay's duration. The rate
found is run three times in all; one clean in fewer than two gives way to a lower one, and
CPU is the median of the clean runs (other work on the host makes single runs noisy). The
verdict also needs the target rate itself to take at most one core. Memory is the RSS
growth of the capture process (which tracks the connections; the store worker's growth is
shown beside it) over the open connections after replaying 50,000 leaked connections, and again
once its sweep has put them to sleep (tracer/sleep.py), with a tracemalloc and
per-object breakdown of an in-process Analyzer fed the same packets. Attribution runs the
agent on `lo` next to 2,000 held loopback sockets while grpcio clients (cli/demo_peers.py)
open connections, and reads attributed_ts - ts from the database.

Progress goes to stderr; stdout gets one table (measurement, result, target, verdict) and a
few notes. About four minutes (at most five); --quick (shorter steps, no repeats, no idle
memory) about one and a half.

Needs root (packet sockets, `ip link`), iproute2 and tcpreplay (`make bench` installs it);
without them the affected parts say why they are skipped. Every child process and replay
is bounded in time and count, and the veth pair is deleted at the end, also on error or
SIGINT/SIGTERM (a pair left by a run killed hard is removed by the next run).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import stop_process

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
PORT = 9090
SEND_IF, CAPTURE_IF = "trbench0", "trbench1"  # the veth pair: tcpreplay -> agent
TRACER = Path(sys.executable).with_name("tracer")

FIRST_RATE = 100_000
MAX_RATE = 400_000
TARGET_RATE = 100_000
MAX_BACKLOG_S = 1.0
MAX_CONFIRM_RUNS = 5  # runs per configuration, after the search, to confirm the rate found
AGENT_LIMIT_S = 180  # --duration of every agent run: a bound, they are stopped earlier
LEAK_CONNECTIONS = 50_000
LEAK_VERSION = 1  # bump when leak_capture() changes what it writes
LEAK_RATE = 50_000  # every packet of a new connection: heavier than the rate capture
TARGET_BYTES = 1024
SLEEP_WAIT_S = 85.0  # tracer sweeps every 60 s and puts connections idle 30 s to sleep
# (sooner under a burst: tracer/options.py, crowd)
HELD_CONNECTIONS = 1_000  # two sockets each
TARGET_SOCKETS = 2 * HELD_CONNECTIONS
TARGET_LATENCY_S = 1.0
CLIENT_SECONDS = 5.0
RATE_TARGET = f">= {TARGET_RATE:,} pps, 0 drops, <= 1 core"
MEMORY_TARGET = f"<= {TARGET_BYTES:,} B"
LATENCY_TARGET = f"<= {TARGET_LATENCY_S:g} s, >= {TARGET_SOCKETS:,} sockets open"

# What a part of the benchmark may fail with; it is then reported as failed, and the
# other parts still run.
FAILURES = (RuntimeError, OSError, subprocess.SubprocessError, sqlite3.Error)

STATUS_RE = re.compile(r"^([\d,]+) packets \(([\d,]+)/s\), ([\d,]+) open connections?")


@dataclass(frozen=True)
class Plan:
    """How much each measurement does."""

    step_seconds: float = 5.0  # traffic replayed per rate step (less when the capture is shorter)
    max_steps: int = 6  # rate search steps per configuration
    repeats: int = 3  # runs at the rate found, the search's own included
    idle: bool = True  # memory once the connections sleep, and the in-process probes


QUICK = Plan(step_seconds=2.0, max_steps=4, repeats=1, idle=False)


@dataclass
class Row:
    """One line of the table printed at the end."""

    what: str
    result: str
    target: str
    verdict: str  # met, MISSED or ERROR


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def failed(what: str, target: str, exc: BaseException) -> Row:
    """The row of a part that failed: the first and last line of the error (the whole of it
    goes to stderr)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [repr(exc)]
    progress(f"{what} failed:\n{exc}")
    text = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"
    return Row(what, f"failed: {text[:150]}", target, "ERROR")


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def nice(rate: float) -> int:
    """Round a rate down to a number a person reads at a glance."""
    unit = 5_000 if rate >= 20_000 else 500 if rate >= 2_000 else 100
    return max(unit, int(rate // unit) * unit)


def krate(rate: float) -> str:
    return f"{rate / 1000:g}k" if rate >= 1000 else f"{rate:.0f}"


def pct(fraction: float) -> str:
    return f"{fraction:.0%}"


# -- processes ----------------------------------------------------------------------------


def tree(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        with suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


def rss(procs: list[psutil.Process]) -> dict[int, int]:
    out = {}
    for p in procs:
        with suppress(psutil.Error):
            out[p.pid] = p.memory_info().rss
    return out


@dataclass
class Status:
    at: float  # time.perf_counter() when the line arrived
    packets: int
    open: int  # open connections awake in the agent (asleep ones are not counted)


class Agent:
    """One `tracer capture` run, live, with its status lines read as they come."""

    def __init__(self, db: Path, iface: str, port: int, *extra: str) -> None:
        cmd = [str(TRACER), "capture", "--iface", iface, "--port", str(port), "--db", str(db),
               "--duration", f"{AGENT_LIMIT_S}s", *extra]
        self.db = db
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.statuses: list[Status] = []
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.lines.append(line)
            m = STATUS_RE.match(line)
            if m:
                self.statuses.append(Status(time.perf_counter(), _int(m[1]), _int(m[3])))
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until its first status line: the packet socket is open and the loop runs."""
        if not self._ready.wait(timeout) or not self.statuses or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("the agent did not start:\n" + "\n".join(self.lines[-10:]))

    def processes(self) -> list[psutil.Process]:
        return tree(self.proc.pid)

    def wait_idle(self, timeout: float = 30.0, quiet_s: float = 0.3) -> float:
        """Until the whole tree used under 5% of a core over ``quiet_s``; returns when."""
        procs = self.processes()
        deadline = time.perf_counter() + timeout
        before = sum(cpu_seconds(procs).values())
        while time.perf_counter() < deadline:
            time.sleep(quiet_s)
            now = sum(cpu_seconds(procs).values())
            if now - before < 0.05 * quiet_s:
                return time.perf_counter() - quiet_s
            before = now
        return time.perf_counter()

    def stop(self) -> str:
        stop_process(self.proc, signal.SIGINT, timeout=120)
        self._reader.join(10)
        return "\n".join(self.lines)

    def capture_row(self) -> dict[str, int]:
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            row = db.execute(
                "SELECT id, packets, drops, connections, open_at_end FROM captures"
                " ORDER BY id DESC LIMIT 1").fetchone()
            if row is None:
                raise RuntimeError("the agent wrote no capture row:\n"
                                   + "\n".join(self.lines[-10:]))
            cid, packets, drops, conns, open_at_end = row
            received = db.execute(
                "SELECT value FROM capture_stats WHERE capture_id = ? AND name ="
                " 'kernel.received'", [cid]).fetchone()
        finally:
            db.close()
        return {"id": cid, "packets": packets or 0, "drops": drops or 0,
                "connections": conns or 0, "open_at_end": open_at_end or 0,
                "received": received[0] if received else 0}


# -- the veth pair and the replays ---------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], check=False, capture_output=True, text=True,
                          timeout=10)
    if check and proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@contextmanager
def veth_pair() -> Iterator[None]:
    _ip("link", "del", SEND_IF, check=False)  # left over by a run killed hard
    try:
        _ip("link", "add", SEND_IF, "type", "veth", "peer", "name", CAPTURE_IF)
        for name in (SEND_IF, CAPTURE_IF):
            with suppress(OSError):  # no IPv6 chatter (router solicitations) on the pair
                Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
            _ip("link", "set", name, "up")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "LOWER_UP" not in _ip("link", "show",
                                                                      CAPTURE_IF).stdout:
            time.sleep(0.05)
        yield
    finally:
        _ip("link", "del", SEND_IF, check=False)


@dataclass
class Replay:
    sent: int
    seconds: float
    pps: float
    cpu: float  # tcpreplay's CPU seconds


def replay(path: Path, pps: int, limit: int) -> Replay:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        ["tcpreplay", "-q", "-i", SEND_IF, f"--pps={pps}", f"--limit={limit}", str(path)],
        check=False, capture_output=True, text=True, timeout=limit / pps * 3 + 30,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = proc.stdout + proc.stderr
    m = re.search(r"Actual: (\d+) packets \(\d+ bytes\) sent in ([\d.]+) seconds", out)
    if proc.returncode or not m:
        raise RuntimeError(f"tcpreplay failed ({proc.returncode}):\n{out.strip()}")
    rated = re.search(r"Rated: [\d.]+ Bps, [\d.]+ Mbps, ([\d.]+) pps", out)
    sent, seconds = int(m[1]), float(m[2])
    return Replay(sent, seconds, float(rated[1]) if rated else sent / seconds,
                  after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)


# -- 1. rate ------------------------------------------------------------------------------


@dataclass
class Step:
    rate: int
    replay: Replay
    received: int
    drops: int
    processed: int
    connections: int  # connections the agent stored
    backlog_s: float  # the agent's largest lag behind the sender, in seconds of traffic
    cpu_tree: float  # cores: CPU seconds per second of replayed traffic
    cpu_capture: float
    wall: float  # seconds the whole step took (agent start to stop)

    @property
    def clean(self) -> bool:
        return (self.drops == 0 and self.received >= self.replay.sent
                and self.backlog_s <= MAX_BACKLOG_S)

    @property
    def capture_us_per_packet(self) -> float:
        """CPU of the capture process per packet it handled, in microseconds: what the
        rate on a core of its own would be, less sensitive to other work on the host."""
        return self.cpu_capture * self.replay.seconds / max(self.processed, 1) * 1e6

    @property
    def followed(self) -> float:
        """Packets per second the agent handled while the sender ran."""
        return (self.processed if self.clean else self.received - self.drops) / max(
            self.replay.seconds + self.backlog_s, 1e-9)

    def short(self) -> str:
        if self.clean:
            return f"{krate(self.rate)} ok"
        why = []
        if self.drops:
            why.append(f"{self.drops / max(self.received, 1):.0%} dropped")
        if self.received < self.replay.sent:
            why.append(f"{self.replay.sent - self.received:,} never reached the socket")
        if self.backlog_s > MAX_BACKLOG_S:
            why.append(f"{self.backlog_s:.1f}s behind")
        return f"{krate(self.rate)} " + ", ".join(why)


def backlog(statuses: list[Status], start: float, pps: float, sent: int) -> float:
    """Largest lag of the agent behind the sender, from the status lines of the replay."""
    worst = 0.0
    for s in statuses:
        if s.at < start:
            continue
        expected = min(sent, (s.at - start) * pps)
        worst = max(worst, (expected - s.packets) / pps)
    return worst


def run_step(capture: Path, rate: int, limit: int, attribution: bool) -> Step:
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trbench-") as tmp:
        agent = Agent(Path(tmp) / "live.db", CAPTURE_IF, PORT,
                      *([] if attribution else ["--no-attribution"]))
        try:
            agent.wait_ready()
            procs = agent.processes()
            capture_pid = agent.proc.pid
            cpu_before = cpu_seconds(procs)
            started = time.perf_counter()
            rep = replay(capture, rate, limit)
            agent.wait_idle()
            cpu_after = cpu_seconds(procs)
        finally:
            agent.stop()
        row = agent.capture_row()
    spent = {pid: cpu_after.get(pid, 0.0) - cpu_before.get(pid, 0.0) for pid in cpu_before}
    seconds = max(rep.seconds, 1e-9)
    step = Step(
        rate=rate, replay=rep, received=row["received"], drops=row["drops"],
        processed=row["packets"], connections=row["connections"],
        backlog_s=max(0.0, backlog(agent.statuses, started, rep.pps, rep.sent)),
        cpu_tree=sum(spent.values()) / seconds,
        cpu_capture=spent.get(capture_pid, 0.0) / seconds,
        wall=time.perf_counter() - began,
    )
    cpu = f", CPU {pct(step.cpu_tree)} of one core" if step.clean else ""
    progress(f"  {step.short()}: {rep.sent:,} sent{cpu} ({step.wall:.0f}s)")
    return step


def search(capture: Path, packets: int, attribution: bool, plan: Plan) -> list[Step]:
    """Every step tried to find the highest followed rate (see the module docstring): from
    FIRST_RATE up by half while followed, or down to 90% of what a failed run handled;
    then halving the interval between the best followed and the lowest failed rate."""
    steps: list[Step] = []
    best: Step | None = None
    worst: Step | None = None  # the lowest rate that failed
    rate = FIRST_RATE
    while len(steps) < plan.max_steps:
        limit = min(packets, int(rate * plan.step_seconds))
        step = run_step(capture, rate, limit, attribution)
        steps.append(step)
        if step.clean:
            if best is None or rate > best.rate:
                best = step
        elif worst is None or rate < worst.rate:
            worst = step
        if worst is None:  # climbing
            if rate >= MAX_RATE or packets / rate < 1.5:
                break
            rate = min(MAX_RATE, nice(rate * 1.5))
        elif best is None:  # descending
            rate = nice(min(0.9 * worst.followed, 0.5 * worst.rate))
        else:
            if worst.rate - best.rate <= max(0.1 * best.rate, 1_000):
                break
            # Toward what the failed run handled, when that is a better guess than halfway.
            top = min(worst.rate, max(best.rate, worst.followed) * 1.1)
            rate = nice((best.rate + top) / 2)
            if not best.rate < rate < worst.rate:
                break
        if any(s.rate == rate for s in steps):
            break
    return steps


@dataclass
class RateResult:
    label: str
    steps: list[Step]  # the search
    confirmations: list[tuple[int, int, int]] = field(default_factory=list)  # rate, clean, runs
    runs: list[Step] = field(default_factory=list)  # at the rate confirmed, the search's included

    @property
    def rate(self) -> int | None:
        return self.runs[0].rate if self.runs else None

    @property
    def clean_runs(self) -> int:
        return sum(s.clean for s in self.runs)

    def median(self, value: Callable[[Step], float]) -> float:
        """Median over the clean runs at the rate confirmed."""
        return statistics.median(value(s) for s in self.runs if s.clean)

    @property
    def cpu_at_target(self) -> float | None:
        """CPU (cores) of the clean runs at TARGET_RATE (the search starts there)."""
        at = [s.cpu_tree for s in self.steps + self.runs if s.rate == TARGET_RATE and s.clean]
        return statistics.median(at) if at else None

    @property
    def met(self) -> bool:
        """The target rate followed on one core: the rate confirmed is at least the target
        and the target rate took at most one core."""
        cpu = self.cpu_at_target
        return (self.rate is not None and self.rate >= TARGET_RATE and cpu is not None
                and cpu <= 1.0)


def measure_rate(capture: Path, packets: int, attribution: bool, plan: Plan) -> RateResult:
    """Search, then confirm the best rate: run it until plan.repeats runs, rejected as soon
    as most of them cannot be clean any more; a rejected rate gives way to the best clean
    rate of the search at most 90% of it. At most MAX_CONFIRM_RUNS runs more in all."""
    label = "with attribution" if attribution else "--no-attribution"
    progress(f"rate, {label}: searching, {plan.step_seconds:g}s of traffic per step")
    result = RateResult(label, search(capture, packets, attribution, plan))
    candidates = sorted({s.rate for s in result.steps if s.clean}, reverse=True)
    extra = 0
    while candidates:
        rate = candidates.pop(0)
        runs = [s for s in result.steps if s.rate == rate]
        if len(runs) < plan.repeats:
            progress(f"rate, {label}: confirming {krate(rate)}, {plan.repeats} runs in all")
        while (len(runs) < plan.repeats and extra < MAX_CONFIRM_RUNS
               and sum(not s.clean for s in runs) <= plan.repeats // 2):
            runs.append(run_step(capture, rate, min(packets, int(rate * plan.step_seconds)),
                                 attribution))
            extra += 1
        clean = sum(s.clean for s in runs)
        result.confirmations.append((rate, clean, len(runs)))
        if 2 * clean > len(runs):
            result.runs = runs
            break
        candidates = [c for c in candidates if c <= 0.9 * rate]
    return result


def rate_row(r: RateResult) -> Row:
    what = f"rate, {r.label}"
    target = RATE_TARGET
    if r.rate is None:
        return Row(what, "no rate followed without drops in most runs", target, "MISSED")
    drops = ", ".join(f"{s.drops:,}" for s in r.runs)
    runs = f"{r.clean_runs} of {len(r.runs)} runs clean" if len(r.runs) > 1 else "1 run"
    at_target = r.cpu_at_target
    also = (f" ({krate(TARGET_RATE)}: {pct(at_target)})"
            if at_target is not None and r.rate != TARGET_RATE else "")
    return Row(what, f"{r.rate:,} pps; CPU {pct(r.median(lambda s: s.cpu_tree))} of one "
                     f"core{also}; drops {drops} ({runs})", target, verdict(r.met))


def rate_notes(r: RateResult) -> list[str]:
    out = [f"rate, {r.label}: search (pps) " + ", ".join(s.short() for s in r.steps)]
    if any(runs > 1 for _rate, _clean, runs in r.confirmations):
        out[0] += "; confirmed " + ", ".join(
            f"{krate(rate)} clean in {clean} of {runs}" for rate, clean, runs in r.confirmations)
    if r.runs:
        clean = [s for s in r.runs if s.clean]
        tree_cpu = r.median(lambda s: s.cpu_tree)
        capture_cpu = r.median(lambda s: s.cpu_capture)
        which = ("medians of " + ", ".join(pct(s.cpu_tree) for s in clean) if len(clean) > 1
                 else "one run")
        new = r.median(lambda s: s.connections / max(s.replay.seconds, 1e-9))
        sender = r.median(lambda s: s.replay.cpu / max(s.replay.seconds, 1e-9))
        out.append(f"    at {krate(r.runs[0].rate)} ({new:,.0f} new connections/s): CPU "
                   f"{pct(tree_cpu)} of one core ({which}): capture process "
                   f"{pct(capture_cpu)} ({r.median(lambda s: s.capture_us_per_packet):.1f} "
                   f"us per packet), store worker {pct(tree_cpu - capture_cpu)}; "
                   f"tcpreplay itself {pct(sender)}")
        short = [s for s in r.runs if s.replay.pps < 0.97 * s.rate]
        if short:
            out.append("    tcpreplay fell short of --pps: " + ", ".join(
                f"{krate(s.rate)} asked, {s.replay.pps:,.0f} sent" for s in short))
    return out


# -- 2. memory ------------------------------------------------------------------------------


@dataclass
class MemoryRun:
    replay: Replay
    drops: int
    received: int
    processed: int
    open: int  # connections open when the agent stopped (captures.open_at_end)
    before: dict[str, int]  # RSS by process ("capture", "worker") once the agent is ready
    after: dict[str, int]  # ... once it handled the replay
    asleep: dict[str, int] | None  # ... once its sweep put the idle connections to sleep
    awake: int | None  # open connections still awake then (status line)
    asleep_after_s: float  # seconds from the replay's end to the ``asleep`` sample

    def per_connection(self, sample: dict[str, int], which: str | None = None) -> float:
        keys = [which] if which else list(sample)
        return sum(sample[k] - self.before[k] for k in keys) / max(self.open, 1)


def wait_asleep(agent: Agent, since: float, open_now: int) -> int | None:
    """Until the agent's status line shows (almost) no open connection awake, the sweep
    having put the idle ones to sleep; bounded by SLEEP_WAIT_S. The awake count then."""
    deadline = since + SLEEP_WAIT_S
    while time.perf_counter() < deadline and agent.proc.poll() is None:
        time.sleep(1.0)
        last = agent.statuses[-1] if agent.statuses else None
        if last is not None and last.at > since and last.open <= open_now // 100:
            return last.open
    return agent.statuses[-1].open if agent.statuses else None


def memory_run(leaks: Path, packets: int, plan: Plan) -> MemoryRun:
    """The agent's RSS growth for the leaked connections: right after they arrived, and
    once tracer has put the idle ones to sleep (idle 30 s at a sweep, every 60 s;
    idle 1 s, checked every second, while more than 4,096 are awake)."""
    progress(f"memory: replaying {LEAK_CONNECTIONS:,} leaked connections ({packets:,} packets "
             f"at {krate(LEAK_RATE)}/s)" + (", then waiting until they sleep" if plan.idle
                                            else ""))
    with tempfile.TemporaryDirectory(prefix="trbench-") as tmp:
        agent = Agent(Path(tmp) / "mem.db", CAPTURE_IF, PORT, "--no-attribution")
        asleep: dict[str, int] | None = None
        awake: int | None = None
        try:
            agent.wait_ready()
            procs = agent.processes()
            pid = agent.proc.pid

            def sample() -> dict[str, int]:
                got = rss(procs)
                return {"capture": got.get(pid, 0),
                        "worker": sum(v for k, v in got.items() if k != pid)}

            before = sample()
            rep = replay(leaks, LEAK_RATE, packets)
            agent.wait_idle()
            after = sample()
            arrived = time.perf_counter()
            if plan.idle:
                open_now = agent.statuses[-1].open if agent.statuses else 0
                awake = wait_asleep(agent, arrived, open_now)
                asleep = sample()
            asleep_after = time.perf_counter() - arrived
        finally:
            agent.stop()
        row = agent.capture_row()
    return MemoryRun(rep, row["drops"], row["received"], row["packets"], row["open_at_end"],
                     before, after, asleep, awake, asleep_after)


def memory_rows(run: MemoryRun) -> list[Row]:
    """The verdict is on the capture process, the one that tracks the connections; the
    store worker holds no state per connection (it writes rows), and its growth, the
    batches of the arrival burst, is shown beside it."""
    target = MEMORY_TARGET
    lost = ""
    if run.drops or run.received < run.replay.sent or run.processed < run.replay.sent:
        lost = (f"; {run.replay.sent:,} sent, {run.received:,} received, {run.drops:,} "
                f"dropped, {run.processed:,} processed")

    def result(sample: dict[str, int], extra: str) -> tuple[str, float]:
        tracked = run.per_connection(sample, "capture")
        text = (f"{tracked:,.0f} B per open connection in the capture process; with the "
                f"store worker {run.per_connection(sample):,.0f} B ({extra})")
        return text, tracked

    growth = sum(run.after.values()) - sum(run.before.values())
    text, tracked = result(run.after, f"RSS +{growth / 2**20:,.0f} MiB")
    rows = [Row(f"memory, {run.open:,} open, just arrived", text + lost, target,
                verdict(tracked <= TARGET_BYTES and not lost))]
    if run.asleep is not None:
        sleeping = (f"{run.open - run.awake:,} asleep" if run.awake is not None
                    else "sleep not seen")
        text, tracked = result(run.asleep, f"{sleeping}, {run.asleep_after_s:.0f}s later")
        rows.append(Row(f"memory, {run.open:,} open, idle", text, target,
                        verdict(tracked <= TARGET_BYTES and not lost)))
    return rows


def memory_notes(run: MemoryRun) -> list[str]:
    def split(sample: dict[str, int]) -> str:
        return (f"capture process {run.per_connection(sample, 'capture'):,.0f} B + store "
                f"worker {run.per_connection(sample, 'worker'):,.0f} B")

    line = (f"memory, live agent (--no-attribution), per open connection: just arrived "
            f"{split(run.after)}")
    if run.asleep is not None:
        line += f"; idle {split(run.asleep)}"
    return [line]


PROBE = r"""
import json, sys
import psutil
from tracer.agent.control import quiet_cycle_collector
from tracer.pipeline import Analyzer
from tracer.sources.pcapfile import CaptureReader

quiet_cycle_collector()  # as the live agent
me = psutil.Process()
analyzer = Analyzer(frozenset({int(sys.argv[2])}))
before = me.memory_info().rss
with CaptureReader.open(sys.argv[1], digest=False) as reader:
    packets = iter(reader)
    while analyzer.feed(packets, 50_000) == 50_000:
        analyzer.drain()
analyzer.drain()
table = analyzer.table
print(json.dumps({"rss": me.memory_info().rss - before, "open": table.tracked,
                  "asleep": table.asleep_count}))
"""


def slow_arrival_rss(leaks: Path) -> dict[str, int]:
    """RSS growth of an Analyzer in a fresh process fed the leak capture at its own
    timestamps: 100 new connections a second for 500 s, each idle after its RPC, so they
    fall asleep as the next ones arrive (the way leaks build up), without the live agent."""
    import json

    out = subprocess.run([sys.executable, "-c", PROBE, str(leaks), str(PORT)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
    return dict(json.loads(out.stdout))


# -- captures ---------------------------------------------------------------------------


def rate_capture() -> Path:
    """The capture of benchmarks/run.py (generated once, cached)."""
    sys.path.insert(0, str(HERE))
    from run import ensure_capture

    return ensure_capture(12000, 900.0, 1)


def count_packets(path: Path) -> int:
    from tracer.sources.pcapfile import CaptureReader

    with CaptureReader.open(str(path), digest=False) as reader:
        for _ in reader:
            pass
        return reader.info.packets


def leak_capture(connections: int) -> Path:
    """``connections`` gRPC connections that each do a handshake, the HTTP/2 preface and
    settings and one RPC (with a BDP ping), then stay open and silent: one after another,
    from three client hosts, cached like the rate capture."""
    generator = HERE / "gen_capture.py"
    tag = hashlib.sha256(generator.read_bytes() + bytes([LEAK_VERSION])).hexdigest()[:10]
    path = CACHE / f"leaks-{connections}c-{tag}.pcap"
    if path.exists():
        return path
    CACHE.mkdir(exist_ok=True)
    for old in CACHE.glob("leaks-*.pcap"):
        old.unlink()
    progress(f"generating {path.name} ...")
    sys.path.insert(0, str(HERE))
    import random

    import gen_capture

    rng = random.Random(3)

    def packets() -> Iterator[tuple[float, bytes]]:
        t0 = 1_790_000_000.0
        for i in range(connections):
            ip = bytes([10, 1, 0, 1 + i // 20_000])
            port = 30_000 + i % 20_000
            yield from gen_capture.conversation(
                "leaked", ip, port, t0 + i * 0.01, t0 + connections * 0.01 + 60, rng)

    tmp = path.with_suffix(".tmp")
    gen_capture.write_pcap(str(tmp), packets())
    tmp.rename(path)
    return path


# -- memory breakdown in this process -----------------------------------------------------

COMPONENTS = {"Connection", "Endpoint", "Http2Observer", "Direction", "HpackDirection",
              "DynamicTable", "TableState", "Sleeper"}
BREAKDOWN_CONNECTIONS = 10_000  # tracemalloc slows the analyzer down about 10x


@dataclass
class Breakdown:
    open: int
    asleep: int
    traced: float  # tracemalloc: bytes per open connection
    parts: dict[str, float]  # bytes per open connection, by the component that holds them


def _measure(analyzer: Any, base: int) -> Breakdown:
    """What the analyzer's open connections hold: tracemalloc's total, and sys.getsizeof
    of every object reachable from each connection, charged to the nearest component on
    the way (a string in a Direction is the Direction's); objects reached from several
    connections (shared HPACK states, interned texts) are counted once."""
    import tracemalloc

    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - base
    table = analyzer.table
    flows = table._flows
    asleep = table._sleepers._by_key  # a measurement of the table's own layout
    outbox = table.outbox
    shared = (analyzer, table, analyzer.h2, outbox, outbox.events, outbox.anomalies,
              outbox.finished, analyzer.h2.memo, analyzer.stats, flows, asleep,
              table._sleepers._shared)
    seen = {id(x) for x in shared}
    stack: list[tuple[object, str]] = []
    awake = 0
    for entry in flows.values():
        if entry[1] is entry[0].orig:
            stack.append((entry[0], "Connection"))
            awake += 1
    # Asleep (tracer.sleep.Sleeper): packed numbers and a references tuple, that tuple
    # shared by the sleepers that hold the same references (counted once).
    stack.extend((entry, "Sleeper") for entry in asleep.values())
    n = max(awake + len(asleep), 1)
    sizes: dict[str, float] = {}
    while stack:
        obj, owner = stack.pop()
        if id(obj) in seen or isinstance(obj, type) or type(obj).__name__ in (
                "module", "function", "builtin_function_or_method"):
            continue
        seen.add(id(obj))
        name = type(obj).__name__
        if name in COMPONENTS:
            owner = name
        sizes[owner] = sizes.get(owner, 0) + sys.getsizeof(obj)
        stack.extend((ref, owner) for ref in gc.get_referents(obj))
    table_bytes = sys.getsizeof(flows) + sys.getsizeof(asleep)
    for key, value in [*flows.items(), *asleep.items()]:
        for obj in (key, value):
            if id(obj) not in seen:
                seen.add(id(obj))
                table_bytes += sys.getsizeof(obj)
    sizes["flow table"] = table_bytes
    return Breakdown(awake + len(asleep), len(asleep), traced / n,
                     {k: v / n for k, v in sizes.items()})


def breakdown(path: Path, packets: int, rate: int) -> tuple[Breakdown, Breakdown]:
    """Feed the first BREAKDOWN_CONNECTIONS connections of ``path`` to an Analyzer as the
    live agent does (stamped at ``rate`` packets/s, as read); measure right after, and
    again once they have been idle for two minutes (a sweep has run)."""
    import tracemalloc

    from tracer.pipeline import Analyzer
    from tracer.sources.pcapfile import CaptureReader

    limit = packets * BREAKDOWN_CONNECTIONS // LEAK_CONNECTIONS
    t0 = 1_800_000_000.0

    def restamped(reader: CaptureReader) -> Iterator[tuple[float, int, bytes]]:
        for i, (_ts, linktype, frame) in enumerate(reader):
            if i >= limit:
                return
            yield t0 + i / rate, linktype, frame

    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        analyzer = Analyzer(frozenset({PORT}))
        with CaptureReader.open(str(path), digest=False) as reader:
            stream = restamped(reader)
            while analyzer.feed(stream, 50_000) == 50_000:
                analyzer.drain()
        analyzer.drain()
        fresh = _measure(analyzer, base)
        analyzer.table.tick(t0 + limit / rate + 120.0)
        analyzer.drain()
        idle = _measure(analyzer, base)
    finally:
        tracemalloc.stop()
    return fresh, idle


def probe_notes(leaks: Path, packets: int) -> list[str]:
    """The analyzer alone: connections arriving slowly, and what one connection holds."""
    progress("memory: the analyzer alone (slow arrival; tracemalloc breakdown)")
    slow = slow_arrival_rss(leaks)
    per = slow["rss"] / max(slow["open"], 1)
    out = [(f"    analyzer alone in a fresh process, the same connections arriving 100/s "
            f"(they sleep as the next arrive): RSS +{per:,.0f} B per open connection "
            f"({slow['open']:,} open, {slow['asleep']:,} asleep)")]
    moments = ("just arrived", "idle 2 min")
    for when, b in zip(moments, breakdown(leaks, packets, LEAK_RATE), strict=True):
        top = sorted(b.parts.items(), key=lambda kv: -kv[1])
        out.append(f"    in-process analyzer, {b.open:,} connections {when} ({b.asleep:,} "
                   f"asleep): live heap (tracemalloc) {b.traced:,.0f} B per connection: "
                   + ", ".join(f"{k} {v:,.0f}" for k, v in top if v >= 1))
    return out


# -- 3. attribution latency -------------------------------------------------------------------

HOLDER = r"""
import resource, socket, sys
n = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (2 * n + 64, 2 * n + 64))
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(n)
clients = [socket.create_connection(listener.getsockname()) for _ in range(n)]
servers = [listener.accept()[0] for _ in range(n)]
print(listener.getsockname()[1], flush=True)
sys.stdin.read()  # until the benchmark closes our stdin or stops us
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _started(proc: subprocess.Popen[str], what: str, timeout: float = 30.0) -> str:
    """The first line a helper prints, which says it is ready."""
    stdout = proc.stdout
    assert stdout is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0].strip():
        raise RuntimeError(f"{what} did not start")
    return box[0].strip()


@dataclass
class AttributionRun:
    counts: dict[str, int]  # connections by attribution verdict, and attributed by client
    latencies: list[float]  # attributed_ts - ts of the attributed connections, seconds
    sockets: int  # TCP sockets on the host while the clients ran
    established: int


def attribution_latency() -> AttributionRun:
    progress(f"attribution: {HELD_CONNECTIONS:,} held loopback connections, grpcio clients "
             f"for {CLIENT_SECONDS:g}s")
    port = free_port()
    py = sys.executable
    children: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="trbench-") as tmp:
        try:
            holder = subprocess.Popen([py, "-c", HOLDER, str(HELD_CONNECTIONS)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            children.append(holder)
            _started(holder, "the socket holder")
            server = subprocess.Popen([py, "-m", "cli.demo_peers", "server", str(port)],
                                      cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      text=True)
            children.append(server)
            _started(server, "the grpcio server")
            held = psutil.net_connections("tcp")
            agent = Agent(Path(tmp) / "attr.db", "lo", port)
            try:
                agent.wait_ready()
                clients = [
                    subprocess.Popen(
                        [py, "-m", "cli.demo_peers", mode, f"127.0.0.1:{port}",
                         "--interval", interval, "--lifetime", str(CLIENT_SECONDS)],
                        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, text=True)
                    for mode, interval in (("leak", "0.02"), ("close", "0.05"))
                ]
                children.extend(clients)
                for c in clients:
                    c.wait(CLIENT_SECONDS + 30)
                time.sleep(1.5)
            finally:
                agent.stop()
            db = sqlite3.connect(f"file:{agent.db}?mode=ro", uri=True)
            try:
                counts = dict(db.execute(
                    "SELECT COALESCE(attribution, 'none'), COUNT(*) FROM connections"
                    " WHERE NOT from_snapshot GROUP BY 1").fetchall())
                latencies = [r[0] for r in db.execute(
                    "SELECT attributed_ts - ts FROM connections WHERE attribution = 'local'"
                    " AND NOT from_snapshot")]
                for mode in ("leak", "close"):  # attributed, by client
                    counts[f"{mode} client"] = db.execute(
                        "SELECT COUNT(*) FROM connections c JOIN processes p ON"
                        " p.pid = c.pid AND p.start_time = c.process_start WHERE"
                        " c.attribution = 'local' AND p.cmdline LIKE ?",
                        [f"%demo_peers {mode} %"]).fetchone()[0]
            finally:
                db.close()
        finally:
            for child in reversed(children):
                stop_process(child)
    return AttributionRun(counts, latencies, len(held),
                          sum(1 for c in held if c.status == psutil.CONN_ESTABLISHED))


def attribution_row(run: AttributionRun) -> Row:
    what = "attribution latency"
    target = LATENCY_TARGET
    seen = sum(v for k, v in run.counts.items() if not k.endswith(" client"))
    sockets = f"{run.sockets:,} TCP sockets open"
    if not run.latencies:
        return Row(what, f"none attributed of {seen} connections; {sockets}", target, "MISSED")
    worst = max(run.latencies)
    return Row(what, f"median {statistics.median(run.latencies) * 1000:.1f} ms, max "
                     f"{worst * 1000:.1f} ms ({len(run.latencies)} of {seen} connections); "
                     f"{sockets}", target,
               verdict(worst <= TARGET_LATENCY_S and run.sockets >= TARGET_SOCKETS))


def attribution_notes(run: AttributionRun) -> list[str]:
    verdicts = ", ".join(f"{k} {v}" for k, v in sorted(run.counts.items())
                         if not k.endswith(" client"))
    p99 = f"{percentile(run.latencies, 0.99) * 1000:.1f} ms" if run.latencies else "-"
    return [(f"attribution on lo ({run.established:,} established sockets): verdicts "
             f"{verdicts}; attributed to the leak client {run.counts.get('leak client', 0)},"
             f" to the close client {run.counts.get('close client', 0)}; latency p99 {p99}")]


# -- main ------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    cells = [("MEASUREMENT", "RESULT", "TARGET", "VERDICT")]
    cells += [(r.what, r.result, r.target, r.verdict) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    for c in cells:
        print("  ".join(text.ljust(w) for text, w in zip(c[:3], widths, strict=True))
              + "  " + c[3])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--skip", action="append", default=[],
                    choices=["rate", "memory", "attribution"])
    ap.add_argument("--quick", action="store_true",
                    help="2 s rate steps, no repeats, memory right after arrival only")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else Plan()

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds: the veth pair and the children go

    signal.signal(signal.SIGTERM, on_term)
    if os.geteuid() != 0:
        print("live agent: skipped (needs root for packet sockets and `ip link`)")
        return 0
    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    notes: list[str] = []
    skip = set(args.skip)
    missing = [tool for tool in ("tcpreplay", "ip") if shutil.which(tool) is None]
    if missing and not {"rate", "memory"} <= skip:
        notes.append(f"rate and memory skipped: {', '.join(missing)} not installed (Debian "
                     "packages tcpreplay, iproute2)")
        skip |= {"rate", "memory"}
    status = 0
    try:
        if not {"rate", "memory"} <= skip:
            run_replays(skip, plan, rows, notes)
        if "attribution" not in skip:
            try:
                run = attribution_latency()
                rows.append(attribution_row(run))
                notes.extend(attribution_notes(run))
            except FAILURES as exc:
                rows.append(failed("attribution latency", LATENCY_TARGET, exc))
    except KeyboardInterrupt:
        notes.append("interrupted: the table holds what was measured before")
        status = 130
    from tracer import __version__, build_kind

    print(f"live agent benchmark: tracer {__version__} ({build_kind()} core), "
          f"{os.cpu_count()} CPUs, {time.perf_counter() - began:.0f}s; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other work on the "
          "host makes rates and CPU noisy)")
    print_table(rows)
    for note in notes:
        print(note)
    return status


def run_replays(skip: set[str], plan: Plan, rows: list[Row], notes: list[str]) -> None:
    """The parts that replay traffic through the veth pair: rate, then memory."""
    capture = rate_capture()
    leaks = leak_capture(LEAK_CONNECTIONS) if "memory" not in skip else None
    with veth_pair():
        if "rate" not in skip:
            packets = count_packets(capture)
            for attribution in (False, True):
                try:
                    r = measure_rate(capture, packets, attribution, plan)
                except FAILURES as exc:
                    label = "with attribution" if attribution else "--no-attribution"
                    rows.append(failed(f"rate, {label}", RATE_TARGET, exc))
                    continue
                rows.append(rate_row(r))
                notes.extend(rate_notes(r))
        leak_packets = count_packets(leaks) if leaks is not None else 0
        if leaks is not None:
            try:
                run = memory_run(leaks, leak_packets, plan)
            except FAILURES as exc:
                rows.append(failed(f"memory, {LEAK_CONNECTIONS:,} open", MEMORY_TARGET, exc))
            else:
                rows.extend(memory_rows(run))
                notes.extend(memory_notes(run))
    if leaks is not None and plan.idle:
        try:
            notes.extend(probe_notes(leaks, leak_packets))
        except FAILURES as exc:
            progress(f"memory probes failed:\n{exc}")
            last = (str(exc).strip().splitlines() or [repr(exc)])[-1]
            notes.append(f"    memory probes failed: {last}")


if __name__ == "__main__":
    sys.exit(main())
