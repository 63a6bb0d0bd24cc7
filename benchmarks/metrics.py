"""The Prometheus exporter's costs (tracer.agent.metrics): a scrape with --clients client
processes in its state, and keeping that state as the store worker does, per batch.

The state is fed as the store worker feeds it: each client process (a pid of its own,
an address of its own) has --conns connections, each announced by attribution's verdict
and then by its record in a batch of --batch records (open connections that moved, as
the capture process sends them every half second); a share of them (--closing) closes in
a later batch. Then --scrapes scrapes are timed (the collector and prometheus_client's
text exposition, what /metrics serves, without the HTTP round trip), with the default
--metrics-top 20 and with --top.

Usage: benchmarks/metrics.py [--clients 1000] [--conns 5] [--batch 500] [--scrapes 50]
                             [--top 20] [--json]

No root, no network: about 10 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import generate_latest

from tracer.agent.metrics import MetricsSettings, MetricsState, registry_for


class _Process:
    __slots__ = ("comm", "exe", "pid")

    def __init__(self, pid: int) -> None:
        self.pid, self.comm, self.exe = pid, f"client-{pid % 97}", None


def _record(uid: str, orig_h: str, ts: float, streams: int, is_open: bool) -> dict[str, Any]:
    return {"uid": uid, "ts": ts, "syn_ts": ts, "orig_h": orig_h,
            "end_reason": None if is_open else "closed", "is_open": int(is_open),
            "streams": streams, "close_kind": None if is_open else "client_fin",
            "last_activity_ts": ts, "preface_ts": ts, "server_settings_ts": ts + 0.001,
            "goaway_ts": None, "close_ts": None if is_open else ts + 1.0}


def build(clients: int, conns: int, batch: int, top: int, closing: float
          ) -> tuple[MetricsState, list[float]]:
    """A state fed with ``clients`` processes of ``conns`` connections each; the time each
    batch took (verdicts and records), in seconds."""
    state = MetricsState(MetricsSettings(top=top), frozenset({9090}))
    now = time.time() - 3600
    todo = [(pid, f"10.{pid // 65536}.{pid // 256 % 256}.{pid % 256}", i)
            for pid in range(1000, 1000 + clients) for i in range(conns)]
    costs = []
    for start in range(0, len(todo), batch):
        part = todo[start:start + batch]
        t0 = time.perf_counter()
        state.settled((f"{pid}-{i}", "local", _Process(pid)) for pid, _h, i in part)
        state.records([_record(f"{pid}-{i}", h, now, 1, True) for pid, h, i in part])
        costs.append(time.perf_counter() - t0)
    # A share of every client's connections close (their last record), a batch at a time.
    closed = [(pid, h, i) for pid, h, i in todo if i < conns * closing]
    for start in range(0, len(closed), batch):
        part = closed[start:start + batch]
        t0 = time.perf_counter()
        state.records([_record(f"{pid}-{i}", h, now, 2, False) for pid, h, i in part])
        costs.append(time.perf_counter() - t0)
    return state, costs


def time_scrapes(state: MetricsState, scrapes: int) -> tuple[list[float], int]:
    registry = registry_for(state)
    times = []
    size = 0
    for _ in range(scrapes):
        t0 = time.perf_counter()
        size = len(generate_latest(registry))
        times.append(time.perf_counter() - t0)
    return times, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--conns", type=int, default=5, help="connections per client process")
    ap.add_argument("--batch", type=int, default=500, help="records per batch")
    ap.add_argument("--closing", type=float, default=0.4,
                    help="share of each client's connections that close")
    ap.add_argument("--scrapes", type=int, default=50)
    ap.add_argument("--top", type=int, default=1000, help="a second run with this --metrics-top")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = []
    for top in sorted({20, args.top}):
        state, costs = build(args.clients, args.conns, args.batch, top, args.closing)
        times, size = time_scrapes(state, args.scrapes)
        open_now = len(state.conns)
        per_record = sum(costs) / (args.clients * args.conns * (1 + args.closing))
        results.append({
            "clients": args.clients, "connections_open": open_now, "top": top,
            "scrape_median_ms": round(statistics.median(times) * 1000, 2),
            "scrape_max_ms": round(max(times) * 1000, 2), "exposition_bytes": size,
            "batch_median_ms": round(statistics.median(costs) * 1000, 2),
            "batch_records": args.batch, "per_record_us": round(per_record * 1e6, 2)})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(f"{r['clients']:,} client processes, {r['connections_open']:,} open connections, "
              f"--metrics-top {r['top']}: scrape median {r['scrape_median_ms']} ms (max "
              f"{r['scrape_max_ms']} ms, {r['exposition_bytes']:,} bytes); a batch of "
              f"{r['batch_records']} records {r['batch_median_ms']} ms (median), "
              f"{r['per_record_us']} us per record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
