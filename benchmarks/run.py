"""`make bench`: speed and memory of `tracer capture --read`, with tshark as the yardstick.

Generates (once, cached in benchmarks/.cache/) a realistic gRPC capture with
benchmarks/gen_capture.py, then runs the real command line on it:
- `tracer capture --read FILE --port 9090` into a fresh SQLite database, with the default
  workers and with one worker: wall time of the whole command (start-up included),
  packets per second, and the peak resident memory of the whole process tree (workers
  included, summed), sampled every 100 ms;
- where tshark is installed, `tshark -r FILE -d tcp.port==9090,http2 -T fields ...` (the
  same HTTP/2 dissection, output discarded) on the same file in the same run, and the
  ratio.
Each measurement is the median of --repeat runs. Targets (issue 2): >= 400,000 packets/s
end to end, >= 10x tshark, peak RSS <= 150 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
PORT = 9090


def ensure_capture(connections: int, duration: float, seed: int) -> Path:
    generator = HERE / "gen_capture.py"
    tag = hashlib.sha256(generator.read_bytes()).hexdigest()[:10]
    path = CACHE / f"bench-{connections}c-{int(duration)}s-{seed}-{tag}.pcap"
    if not path.exists():
        CACHE.mkdir(exist_ok=True)
        for old in CACHE.glob("bench-*.pcap"):
            old.unlink()
        print(f"generating {path.name} ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, str(generator), str(path), "--connections", str(connections),
             "--duration", str(duration), "--seed", str(seed)],
            check=True,
        )
    return path


def count_packets(path: Path) -> int:
    from tracer.sources.pcapfile import CaptureReader

    with CaptureReader.open(str(path)) as reader:
        for _ in reader:
            pass
        return reader.info.packets


class PeakRss:
    """Peak of the summed RSS of a process and all its descendants."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):  # gone since the listing
                        total += p.memory_info().rss
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            time.sleep(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def database_size(db: Path) -> tuple[int, int, int]:
    """(bytes on disk, with the write-ahead log; connections; RPCs) of a database."""
    import sqlite3

    size = sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        connections, rpcs = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(streams), 0) FROM connections").fetchone()
    finally:
        conn.close()
    return size, connections, rpcs


# Issue 8's disk target: at most this much database per connection, plus per RPC.
DB_BYTES_PER_CONNECTION = 800
DB_BYTES_PER_RPC = 8


def stop_process(proc: subprocess.Popen[str], sig: int = signal.SIGTERM,
                 timeout: float = 30.0) -> None:
    """Signal one child we started (by its pid) and reap it; kill it if it lingers."""
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def run_tracer(capture: Path, jobs: int | None,
               sizes: list[tuple[int, int, int]] | None = None) -> tuple[float, int, str]:
    tracer = Path(sys.executable).with_name("tracer")
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        cmd = [str(tracer), "capture", "--read", str(capture), "--port", str(PORT),
               "--db", str(db)]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        rss = PeakRss(proc.pid)
        _out, err = proc.communicate()
        elapsed = time.perf_counter() - started
        peak = rss.stop()
        if proc.returncode != 0:
            raise SystemExit(f"tracer failed ({proc.returncode}):\n{err}")
        if sizes is not None:
            sizes.append(database_size(db))
        return elapsed, peak, err.strip()


def run_tshark(capture: Path) -> float:
    cmd = ["tshark", "-n", "-r", str(capture), "-d", f"tcp.port=={PORT},http2", "-T", "fields",
           "-e", "tcp.stream", "-e", "http2.type", "-e", "http2.header.name",
           "-e", "http2.goaway.error"]
    started = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="tracer capture benchmark")
    ap.add_argument("--connections", type=int, default=12000)
    ap.add_argument("--duration", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-tshark", action="store_true")
    args = ap.parse_args(argv)

    from tracer import __version__, build_kind

    capture = ensure_capture(args.connections, args.duration, args.seed)
    packets = count_packets(capture)
    size_mb = capture.stat().st_size / 1e6
    print(f"tracer {__version__} ({build_kind()} core), {os.cpu_count()} CPUs")
    print(f"capture: {capture.name}: {packets:,} packets, {args.connections:,} connections, "
          f"{size_mb:.0f} MB")
    results: dict[str, float] = {}
    sizes: list[tuple[int, int, int]] = []
    for label, jobs in (("default workers", None), ("one worker", 1)):
        runs = [run_tracer(capture, jobs, sizes) for _ in range(args.repeat)]
        wall = statistics.median(r[0] for r in runs)
        peak = max(r[1] for r in runs)
        results[label] = wall
        print(f"tracer capture --read ({label}): {wall:.2f} s median of {args.repeat}, "
              f"{packets / wall:,.0f} packets/s end to end, peak RSS {peak / 1e6:.0f} MB "
              f"(process tree)")
        print(f"    last run said: {runs[-1][2].splitlines()[0]}")
    size, connections, rpcs = sizes[-1]
    budget = DB_BYTES_PER_CONNECTION * connections + DB_BYTES_PER_RPC * rpcs
    print(f"database: {size / 1e6:.1f} MB for {connections:,} connections and {rpcs:,} RPCs: "
          f"{size / connections:,.0f} bytes per connection all in; target at most "
          f"{DB_BYTES_PER_CONNECTION} per connection + {DB_BYTES_PER_RPC} per RPC = "
          f"{budget / 1e6:.1f} MB: {'met' if size <= budget else 'MISSED'}")
    if args.no_tshark or not shutil.which("tshark"):
        print("tshark: not installed, no comparison (Debian package tshark)")
        return 0
    tshark = statistics.median(run_tshark(capture) for _ in range(max(1, args.repeat - 1)))
    print(f"tshark -d tcp.port=={PORT},http2 on the same file: {tshark:.2f} s, "
          f"{packets / tshark:,.0f} packets/s")
    for label, wall in results.items():
        print(f"    tracer ({label}) is {tshark / wall:.1f}x tshark")
    return 0


if __name__ == "__main__":
    sys.exit(main())
