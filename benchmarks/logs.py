"""Speed and memory of `tracer logs add`: a million mixed log lines parsed and stored.

Generates (deterministic, in a temporary directory, written as it goes: bounded memory) a
log of --lines lines as one service's stderr would hold them when several libraries write
to it: grpc-go through klog, zap JSON, logrus logfmt, in random order, with ``ip:port``
addresses in most lines and a few indented continuation lines (kept unparsed, with their
reason). Then runs the real command line on it, `tracer logs add FILE --db DB`, into a
fresh database each time: wall time of the whole command (start-up included), lines per
second end to end, and the peak resident memory of the process and its part workers
(run.PeakRss).
Reports the median of --repeat runs. Target (issue 4): >= 100,000 lines/s.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PeakRss

START = 1732442400.0  # 2024-11-24T10:00:00Z
KLOG_FILES = ("clientconn.go", "http2_client.go", "controlbuf.go", "server.go")
MESSAGES = (
    ("grpc: addrConn.createTransport failed to connect to {{Addr: \"{a}\"}}: failed to "
     "receive server preface within timeout"),
    "transport: closing: connection error: desc = \"error reading from server: EOF\" {a}",
    "Subchannel Connectivity change to READY for {a}",
    "dialing {a} for /inventory.Inventory/Lookup",
    "rpc error: code = Unavailable desc = connection refused {a} -> {b}",
    "request served in 2.1ms",
)


SERVERS = ("10.0.0.5:9090", "10.0.0.6:9090", "[fd00::5]:9090", "10.0.0.7:50051")
PIDS = (4321, 4388, 5120, 77)


def _address(rng: random.Random) -> str:
    """A server address (few), or a client's: one of 500 hosts, any ephemeral port."""
    if rng.random() < 0.5:
        return rng.choice(SERVERS)
    host = rng.randrange(500)
    if host < 25:
        return f"[fd00::1:{host:x}]:{rng.randrange(32768, 61000)}"
    return f"10.1.{host // 250}.{host % 250 + 1}:{rng.randrange(32768, 61000)}"


def generate(path: Path, lines: int, seed: int = 4) -> int:
    """Write ``lines`` lines to ``path``; returns its size in bytes."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        batch: list[str] = []
        ts = START
        for _ in range(lines):
            ts += rng.expovariate(1000.0)
            message = rng.choice(MESSAGES).format(a=_address(rng), b=_address(rng))
            kind = rng.random()
            if kind < 0.35:
                t = time.gmtime(ts)
                micro = int((ts % 1) * 1e6)
                batch.append(
                    f"{rng.choice('IIIWE')}{t.tm_mon:02d}{t.tm_mday:02d} "
                    f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{micro:06d}    4321 "
                    f"{rng.choice(KLOG_FILES)}:{rng.randrange(1, 2000)}] {message}")
            elif kind < 0.70:
                level = rng.choice(("info", "info", "warn", "error"))
                batch.append(
                    f'{{"level":"{level}","ts":{ts:.6f},"logger":"grpc","caller":'
                    f'"client/dial.go:88","msg":"{message.replace(chr(34), "")}",'
                    f'"pid":{rng.choice(PIDS)}}}')
            elif kind < 0.995:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
                level = rng.choice(("info", "debug", "warning", "error"))
                text = message.replace('"', "'")
                batch.append(f'time="{stamp}.{int((ts % 1) * 1e3):03d}Z" level={level} '
                             f'msg="{text}" component=dialer')
            else:
                batch.append(f"\tat grpc.dial({_address(rng)})")
            if len(batch) >= 10000:
                out.write("\n".join(batch) + "\n")
                batch.clear()
        if batch:
            out.write("\n".join(batch) + "\n")
    return path.stat().st_size


def run_add(log: Path, tmp: Path) -> tuple[float, int, str]:
    """One `tracer logs add` into a fresh database: (seconds, peak RSS, its summary)."""
    db = tmp / "bench.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    tracer = Path(sys.executable).with_name("tracer")
    cmd = [str(tracer), "logs", "add", str(log), "--db", str(db), "--tz", "UTC",
           "--year", "2024"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = PeakRss(proc.pid)
    _out, err = proc.communicate()
    elapsed = time.perf_counter() - started
    peak = rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"tracer logs add failed ({proc.returncode}):\n{err}")
    return elapsed, peak, err.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="tracer logs add benchmark")
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tracer-logs-bench-") as tmp_name:
        tmp = Path(tmp_name)
        log = tmp / "mixed.log"
        size = generate(log, args.lines, args.seed)
        print(f"log: {args.lines:,} mixed lines (klog, zap JSON, logrus logfmt), "
              f"{size / 1e6:.0f} MB; {os.cpu_count()} CPUs")
        runs = [run_add(log, tmp) for _ in range(args.repeat)]
        wall = statistics.median(r[0] for r in runs)
        peak = max(r[1] for r in runs)
        print(f"tracer logs add: {wall:.2f} s median of {args.repeat} "
              f"({', '.join(f'{r[0]:.2f}' for r in runs)}), {args.lines / wall:,.0f} lines/s "
              f"end to end, peak RSS {peak / 1e6:.0f} MB")
        print("    last run said: " + " / ".join(runs[-1][2].splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
