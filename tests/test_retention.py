"""Retention (store/retention.py, `tracer prune`, `tracer capture --retain/--max-db-size`):
old closed connections go, open ones never, the report's totals and verdicts stay what
they were, and the file really shrinks.

The database is built to the second (store_support.record): over one day, pid 700
leaks a connection every ten minutes (never closed), pid 800 runs a pool of three
long-lived connections and dials-and-closes a connection every minute, and 10.0.0.9
dials and closes every ten minutes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from store_support import T0, record, stored
from support import tracer

from store.queries import report
from store.retention import Retention, database_bytes, prune
from store.schema import open_database
from store.writer import CaptureWriter
from tracer.agent.messages import Batch, Totals
from tracer.agent.store_worker import StoreSettings, StoreWorker

DAY = 86400.0


def _rows() -> list[dict[str, Any]]:
    rows = []
    for k in range(144):  # every ten minutes
        t = 600.0 * k
        rows.append(_owned(record(f"Cleak{k:03}", t + 5, ("10.0.0.7", 20000 + k), close=None,
                                  preface=t + 5.001, settings=t + 5.002), 700))
        rows.append(record(f"Cip{k:03}", t + 7, ("10.0.0.9", 30000 + k), close=t + 8,
                           preface=t + 7.001, settings=t + 7.002))
    for k in range(1440):  # every minute
        t = 60.0 * k
        rows.append(_owned(record(f"Cdial{k:04}", t + 10, ("10.0.0.8", 10000 + k % 10000),
                                  close=t + 11, preface=t + 10.001, settings=t + 10.002), 800))
    for k in range(3):
        pool = _owned(record(f"Cpool{k}", 1.0 + k, ("10.0.0.8", 9000 + k), close=None,
                             preface=1.001 + k, settings=1.002 + k), 800)
        pool["streams"] = 5000
        pool["methods"] = {"/pkg.Svc/Get": 5000}
        rows.append(pool)
    for r in rows:  # the data runs to the end of the day
        if r["is_open"]:
            r["end_ts"] = T0 + DAY
    return rows


def _owned(r: dict[str, Any], pid: int) -> dict[str, Any]:
    r["pid"], r["process_start"] = pid, 1.0
    return r


def _build(path: Path) -> None:
    rows = _rows()
    db = stored(path, rows, first_ts=T0, last_ts=T0 + DAY, packets=1)
    with db.conn:  # attribution is written apart from the rows, as a live capture does
        for r in rows:
            if r.get("pid"):
                db.conn.execute("UPDATE connections SET pid = ?, process_start = 1.0"
                                " WHERE uid = ?", [r["pid"], r["uid"]])
    db.conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "day.db"
    _build(path)
    return path


def _by_client(data: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    return {c["pid"] or c["client"]: c for c in data["clients"]}


def _count(path: Path, sql: str) -> int:
    db = open_database(str(path), readonly=True)
    try:
        return int(db.execute(sql).fetchone()[0])
    finally:
        db.conn.close()


SUMMARY_KEYS = ("opened", "closed", "open", "closed_by", "health_checks", "rpcs", "methods",
                "verdict")


def test_age_keeps_open_connections_and_every_client_total(db_path: Path) -> None:
    db = open_database(str(db_path))
    before = _by_client(report(db, cache=False))
    out = prune(db, older_than_s=6 * 3600.0)
    after_data = report(db, cache=False)
    db.conn.close()
    after = _by_client(after_data)
    # Everything closed more than six hours before the end of the data went...
    assert out.connections == 1080 + 108
    assert _count(db_path, "SELECT COUNT(*) FROM connections WHERE is_open = 0") == 360 + 36
    assert _count(db_path, f"SELECT COUNT(*) FROM connections WHERE is_open = 0"
                           f" AND end_ts < {T0 + 18 * 3600 - 1}") == 0
    # ...no open one did...
    assert _count(db_path, "SELECT COUNT(*) FROM connections WHERE is_open = 1") == 144 + 3
    # ...and nobody's totals or verdict changed: the pool is still a pool, not a leak.
    for key, c in before.items():
        for field in SUMMARY_KEYS:
            assert after[key][field] == c[field], (key, field)
    assert after[800]["verdict"] == "ok" and after[700]["verdict"] == "leak"
    capture = after_data["capture"]
    assert capture["retained_from"] == pytest.approx(T0 + 18 * 3600.0)
    assert capture["pruned_connections"] == out.connections


def test_the_text_report_says_from_when_the_data_is_retained(db_path: Path) -> None:
    tracer("prune", "--db", str(db_path), "--older-than", "6h")
    text = tracer("report", "--db", str(db_path)).stdout
    assert "retained from " in text and "1,188 older closed connections were pruned" in text


def test_a_window_inside_the_retained_data_is_unchanged(db_path: Path) -> None:
    since = T0 + 20 * 3600.0
    db = open_database(str(db_path))
    before = report(db, since=since)
    prune(db, older_than_s=3600.0 * 6)
    after = report(db, since=since)
    db.conn.close()
    assert after["clients"] == before["clients"]


def test_size_limit_shrinks_the_file_oldest_first(db_path: Path) -> None:
    db = open_database(str(db_path))
    full = database_bytes(db)
    oldest_open = db.execute("SELECT MIN(ts) FROM connections WHERE is_open = 1").fetchone()[0]
    limit = full // 2
    out = prune(db, max_bytes=limit)
    db.conn.close()
    size = os.stat(db_path).st_size + _wal(db_path)
    assert size <= limit, (size, limit)
    assert out.bytes_after <= limit and out.connections > 0
    # The oldest closed ones went; every open one stayed.
    assert _count(db_path, "SELECT COUNT(*) FROM connections WHERE is_open = 1") == 147
    kept_from = _count(db_path, "SELECT MIN(end_ts) FROM connections WHERE is_open = 0")
    assert kept_from >= (out.cutoff_ts or 0) - 1
    assert _count(db_path, "SELECT MIN(ts) FROM connections WHERE is_open = 1") == int(oldest_open)


def _wal(path: Path) -> int:
    wal = Path(str(path) + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_open_connections_alone_over_the_limit_are_kept_and_said(db_path: Path) -> None:
    out = tracer("prune", "--db", str(db_path), "--max-db-size", "64K").stdout
    assert "what is left is open connections" in out, out
    assert _count(db_path, "SELECT COUNT(*) FROM connections WHERE is_open = 1") == 147
    assert _count(db_path, "SELECT COUNT(*) FROM connections WHERE is_open = 0") == 0
    data = json.loads(tracer("report", "--db", str(db_path), "--format", "json").stdout)
    assert _by_client(data)[800]["verdict"] == "ok"


def test_prune_needs_a_limit(db_path: Path) -> None:
    proc = tracer("prune", "--db", str(db_path), check=False)
    assert proc.returncode == 2 and "give --older-than, --max-db-size or both" in proc.stderr


def test_a_database_without_incremental_vacuum_is_converted_once(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    _build(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("VACUUM")
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    out = tracer("prune", "--db", str(path), "--older-than", "6h").stdout
    assert "rewrote the database once" in out
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    conn.close()


def test_the_store_worker_applies_retention_on_time(tmp_path: Path) -> None:
    """The live agent's store worker prunes on its own schedule, whether batches come or
    not (a quiet port still gets its retention)."""
    path = tmp_path / "live.db"
    db = open_database(str(path))
    writer = CaptureWriter.start(db, kind="live", ports=[9090])
    retention = Retention(older_than_s=60.0, interval_s=0.2)
    worker = StoreWorker(writer, StoreSettings(db_path=str(path), ports=frozenset([9090]),
                                               interface="lo", attribution=False,
                                               retention=retention))
    old = [record(f"Cold{k}", float(k), ("10.0.0.8", 10000 + k), close=k + 1.0,
                  preface=k + 0.001, settings=k + 0.002) for k in range(50)]
    keep = record("Ckeep", 0.0, ("10.0.0.7", 9999), close=None, preface=0.001, settings=0.002)
    worker.batch(Batch([*old, keep], [], [], Totals(packets=1, first_ts=T0,
                                                     last_ts=T0 + 3600.0)))
    deadline = time.monotonic() + 5.0
    while worker.pruned < 50 and time.monotonic() < deadline:
        time.sleep(worker.due())
    assert worker.pruned == 50
    summary = worker.close()
    assert summary.pruned == 50 and summary.stats["retention.pruned_connections"] == 50
    db.conn.close()
    assert _count(path, "SELECT COUNT(*) FROM connections") == 1
