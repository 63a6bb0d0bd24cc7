"""`make bench`, merge part: `tracer merge` of two databases of 100,000 connections each.

Builds (once, cached in benchmarks/.cache/) a server host's database of --connections
connections from --clients remote client addresses (attribution 'remote', as the agent
records a client on another host) and the client hosts' database of the same
connections seen from the client side, on a clock --shift seconds ahead, each attributed
to one of a few processes per address (as the agent records them); ports are reused
over the hour (the same 4-tuple at different times). Both are written through the
store's own writer. Then, --repeat times on a fresh copy of the server's database:
`tracer merge SERVER.db CLIENT.db` (the real command line, with its report refresh),
and the merge alone in this process (the copy, the indexed join and the writes,
without the report refresh). Prints the medians.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
T0 = 1_790_000_000.0
SPAN_S = 3600.0
BATCH = 50_000
PROCESSES_PER_CLIENT = 4


def _rows(connections: int, clients: int, seed: int, shift: float) -> list[dict[str, object]]:
    from tracer.record import RECORD_FIELDS

    rng = random.Random(seed)
    base = dict.fromkeys(RECORD_FIELDS)
    rows = []
    for i in range(connections):
        c = i % clients
        ts = T0 + rng.random() * SPAN_S
        closed = rng.random() < 0.9
        r = dict(base)
        r.update(
            uid=f"C{i:020x}", ts=ts + shift, syn_ts=ts + shift, established_ts=ts + shift,
            end_ts=ts + shift + 5, duration=5.0, ip_version=4,
            orig_h=f"10.{c // 250}.{c % 250}.2", orig_p=20000 + i % 40000,
            resp_h="10.0.0.1", resp_p=9090, conn_state="SF" if closed else "S1",
            history="ShADadFf", orig_pkts=10, orig_bytes=400, resp_pkts=8, resp_bytes=300,
            missed_bytes=0, syn_retries=0, retransmits=0, keepalives=0, zero_windows=0,
            mid_stream=0, from_snapshot=0, is_open=0 if closed else 1,
            close_kind="client_fin" if closed else None,
            close_ts=ts + shift + 5 if closed else None,
            end_reason="closed" if closed else "open_at_end", last_activity_ts=ts + shift,
            events_dropped=0, protocol="h2c", preface_ts=ts + shift + 0.002,
            server_settings_ts=ts + shift + 0.003, streams=1, first_method="/svc.A/Get",
            pings_orig=0, pings_resp=0, goaways=0, rst_streams=0, trailers=1, grpc_errors=0,
            data_frames=2, window_updates=0, h2c_upgrade=0, methods={"/svc.A/Get": 1},
            grpc_statuses={},
        )
        rows.append(r)
    return rows


def build(path: Path, connections: int, clients: int, seed: int, *, client_side: bool,
          shift: float) -> None:
    sys.path.insert(0, str(REPO))
    from store.schema import open_database
    from store.writer import CaptureWriter
    from tracer.attribution.sockets import ProcessInfo

    tmp = Path(str(path) + ".tmp")
    for p in (tmp, Path(str(tmp) + "-wal"), Path(str(tmp) + "-shm")):
        p.unlink(missing_ok=True)
    db = open_database(str(tmp))
    writer = CaptureWriter.start(db, kind="live", ports=[9090])
    rows = _rows(connections, clients, seed, shift if client_side else 0.0)
    for i in range(0, len(rows), BATCH):
        writer.write(rows[i:i + BATCH], [], [])
    writer.finish(status="complete", error=None, first_ts=T0, last_ts=T0 + SPAN_S,
                  packets=connections * 18, segments=connections * 18,
                  connections=connections, open_at_end=sum(int(r["is_open"]) for r in rows),
                  anomaly_counts={}, drops=0, elapsed_s=SPAN_S, stats={})
    verdicts = []
    for i, r in enumerate(rows):
        if client_side:
            k = (i // clients) % PROCESSES_PER_CLIENT
            pid = 1000 + (i % clients) * PROCESSES_PER_CLIENT + k
            info = ProcessInfo(pid=pid, start_time=T0 - 100.0 - pid, ppid=1, user="svc",
                               comm=f"client{k}", cmdline=f"/usr/bin/client{k} --id {pid}",
                               exe=f"/usr/bin/client{k}", container=None, pod=None)
            verdicts.append((str(r["uid"]), "local", info, T0, None))
        else:
            verdicts.append((str(r["uid"]), "remote", None, T0, None))
    writer.attribute(verdicts)
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.conn.close()
    tmp.rename(path)


def ensure(connections: int, clients: int, seed: int, shift: float) -> tuple[Path, Path]:
    tag = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]
    paths = []
    for side in ("server", "client"):
        path = CACHE / f"merge-{side}-{connections}c-{clients}k-{seed}-{tag}.db"
        if not path.exists():
            CACHE.mkdir(exist_ok=True)
            for old in CACHE.glob(f"merge-{side}-*.db*"):
                old.unlink()
            print(f"building {path.name} (once) ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            build(path, connections, clients, seed, client_side=side == "client", shift=shift)
            print(f"  built in {time.monotonic() - started:.0f} s", file=sys.stderr)
        paths.append(path)
    return paths[0], paths[1]


def fresh_copy(server: Path, run: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(run) + suffix).unlink(missing_ok=True)
    shutil.copyfile(server, run)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=250)
    ap.add_argument("--shift", type=float, default=0.4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    server, client = ensure(args.connections, args.clients, args.seed, args.shift)
    run = CACHE / "merge-run.db"
    sys.path.insert(0, str(REPO))
    from store.merge import merge_client
    from store.schema import open_database

    cli, alone, last = [], [], ""
    for _ in range(args.repeat):
        fresh_copy(server, run)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cli.main", "merge", str(run), str(client),
                               "--name", "client-hosts"], cwd=REPO, capture_output=True,
                              text=True, check=False, timeout=600)
        cli.append(time.perf_counter() - started)
        if proc.returncode != 0:
            raise SystemExit(f"tracer merge failed: {proc.stderr}")
        last = proc.stdout
        fresh_copy(server, run)
        db = open_database(str(run))
        reader = open_database(str(client), readonly=True)
        started = time.perf_counter()
        result = merge_client(db, reader, host="client-hosts", source=client.name)
        alone.append(time.perf_counter() - started)
        reader.close()
        db.close()
        if result.matched != args.connections:
            raise SystemExit(f"matched {result.matched} of {args.connections}")
    print(last.rstrip())
    print(f"server {args.connections:,} connections, client {args.connections:,}; "
          f"{result.processes:,} processes, {result.ambiguous:,} ambiguous")
    print(f"{'tracer merge (with the report refresh)':<44} {statistics.median(cli):>7.2f}s  "
          + " ".join(f"{r:.2f}" for r in cli))
    print(f"{'merge alone (copy, join, writes)':<44} {statistics.median(alone):>7.2f}s  "
          + " ".join(f"{r:.2f}" for r in alone))
    for suffix in ("", "-wal", "-shm"):
        Path(str(run) + suffix).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
