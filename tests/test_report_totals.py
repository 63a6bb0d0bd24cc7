"""The report from the clients' totals (store.aggregates, m015_client_aggregates) is the
report computed row by row: on varied data (attributed and not, TLS, health checks,
connections open before the capture, resets, GOAWAYs, refusals, slow prefaces), after
live rewrites, attribution, direct updates and deletes, retention pruning, with
--since and --client, and on a database written before the totals existed (upgraded, or
read as it is)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from store_support import T0, record

from store import aggregates
from store.queries import report
from store.retention import prune
from store.schema import open_database
from store.writer import Attribution, CaptureWriter
from tracer.attribution.sockets import ProcessInfo

SPAN = 3600.0
CLOSES = ("client_fin", "server_fin", "client_rst", "server_rst", "reused")


def _connection(rng: random.Random, k: int) -> dict[str, Any]:
    ip = f"10.0.{rng.randrange(3)}.{rng.randrange(1, 6)}"
    ts = rng.uniform(-100.0, SPAN)
    closed = rng.random() < 0.6
    close = ts + rng.choice((0.0, 0.5, rng.uniform(0, 900))) if closed else None
    r = record(f"C{k:06}", ts, (ip, 10000 + k), close=close,
               preface=ts + 0.01 if rng.random() < 0.85 else None,
               settings=rng.choice((ts + 0.02, ts + 25.0, ts + 1.5, None)))
    r["close_kind"] = rng.choice(CLOSES) if closed else None
    r["end_ts"] = T0 + max(ts + 1.0, close if close is not None else SPAN)
    r["is_open"] = int(not closed)
    if closed and rng.random() < 0.05:
        r["close_ts"] = None  # a close without its time (a dropped FIN's row)
    if closed and rng.random() < 0.1:
        r["close_ts"] = T0 + 60.0 * rng.randrange(int(SPAN // 60))  # on a minute's edge
    r["protocol"] = rng.choice(("h2c", "h2c", "tls", None))
    r["tls_records_orig"] = rng.choice((0, 3, 12, 40)) if r["protocol"] == "tls" else 0
    r["mid_stream"] = int(rng.random() < 0.15)
    r["from_snapshot"] = r["mid_stream"]
    r["streams"] = rng.choice((0, 0, 1, 2, 5, 300))
    r["trailers"] = rng.choice((0, r["streams"]))
    r["rst_streams"] = rng.choice((0, 1))
    r["orig_bytes"] = rng.choice((0, 100))
    r["resp_bytes"] = rng.choice((0, 100))
    r["last_activity_ts"] = rng.choice((None, T0 + ts + 1.0))
    r["conn_state"] = rng.choice(("SF", "S1", "REJ", "RSTOS0", "OTH"))
    if rng.random() < 0.2:
        r["goaway_ts"] = T0 + ts + rng.uniform(0, 1000)
        r["goaway_sender"] = rng.choice(("orig", "resp"))
    if r["streams"] == 0 and rng.random() < 0.5:
        r["preface_ts"] = None  # a health check, when closed
    methods = rng.sample(["/a.S/Get", "/a.S/Put", "/b.T/Watch", "unknown (pre-existing)"],
                         rng.randrange(3))
    r["methods"] = {m: rng.randrange(0, 4) for m in methods}
    return r


def _process(pid: int) -> ProcessInfo:
    return ProcessInfo(pid=pid, start_time=T0 - 1000.0 - pid, ppid=1, user="svc",
                       comm=f"client{pid}", cmdline=f"/usr/bin/client{pid}", exe=None,
                       container=None, pod=None, netns=None)


def _build(path: Path, seed: int, n: int = 400) -> None:
    """A capture written as a live one writes: batches, open rows written again as they
    change and close, attribution after the rows, then a second capture."""
    rng = random.Random(seed)
    db = open_database(str(path))
    writer = CaptureWriter.start(db, kind="live", ports=[9090])
    rows = [_connection(rng, k) for k in range(n)]
    for start in range(0, n, 97):
        writer.write(rows[start:start + 97], [], [])
    # Some open ones are written again, changed (a live capture's next flush): closed
    # now, or still open with more RPCs and other methods.
    for r in rng.sample([r for r in rows if r["is_open"]], 40):
        r = dict(r)
        if rng.random() < 0.5:
            r.update(is_open=0, close_kind=rng.choice(CLOSES), close_ts=r["ts"] + 30.0,
                     end_reason="closed")
        r["streams"] += 1
        r["methods"] = {"/a.S/Get": 7, "/c.U/New": 1}
        writer.write([r], [], [])
    pids = [4000 + p for p in range(6)]
    verdicts: list[Attribution] = [(r["uid"], "socket", _process(rng.choice(pids)), r["ts"], None)
                for r in rng.sample(rows, n // 2)]
    writer.attribute(verdicts)
    writer.finish(status="complete", error=None, first_ts=T0, last_ts=T0 + SPAN, packets=n,
                  segments=n, connections=n, open_at_end=0, anomaly_counts={}, drops=0,
                  elapsed_s=1.0, stats={})
    with db.conn:  # what others write directly: a method's count, a row gone, a re-attribution
        db.conn.execute("UPDATE conn_methods SET count = count + 2 WHERE uid IN"
                        " (SELECT uid FROM connections WHERE is_open = 0 LIMIT 5)")
        db.conn.execute("DELETE FROM conn_methods WHERE uid IN"
                        " (SELECT uid FROM connections WHERE is_open = 0 LIMIT 3 OFFSET 10)")
        db.conn.execute("DELETE FROM connections WHERE uid IN"
                        " (SELECT uid FROM connections WHERE is_open = 0 LIMIT 4 OFFSET 20)")
        db.conn.execute("UPDATE connections SET pid = 4001, process_start = ? WHERE uid IN"
                        " (SELECT uid FROM connections LIMIT 30 OFFSET 50)",
                        [T0 - 1000.0 - 4001])
    second = CaptureWriter.start(db, kind="file", ports=[9090])
    second.write([_connection(rng, n + k) for k in range(50)], [], [])
    second.finish(status="complete", error=None, first_ts=T0, last_ts=T0 + SPAN, packets=1,
                  segments=1, connections=50, open_at_end=0, anomaly_counts={}, drops=0,
                  elapsed_s=1.0, stats={})
    db.conn.close()


def _windows(db_path: Path) -> list[dict[str, Any]]:
    db = open_database(str(db_path), readonly=True)
    try:
        edges = [r[0] for r in db.execute(
            "SELECT close_ts FROM connections WHERE close_ts IS NOT NULL ORDER BY uid"
            " LIMIT 3 OFFSET 7")]
        pid = db.execute("SELECT pid FROM connections WHERE pid IS NOT NULL LIMIT 1").fetchone()
    finally:
        db.conn.close()
    out: list[dict[str, Any]] = [{}, {"preface_timeout": 0.5}, {"preface_timeout": 1.0}]
    for since in (T0 - 1e6, T0 + 60.0 * 20, T0 + 60.0 * 20 - 1e-7, T0 + 1234.567,
                  T0 + SPAN - 600.0, T0 + 1e6, *edges):
        out.append({"since": since})
    out.append({"client": "10.0.1.3"})
    out.append({"client": str(pid[0])})
    out.append({"client": "10.0.2.2", "since": T0 + 1800.0})
    out.append({"client": str(pid[0]), "since": T0 + 900.0})
    out.append({"since": T0 + 100.0, "until": T0 + 2000.0})
    return out


def assert_same_reports(db_path: Path) -> None:
    db = open_database(str(db_path), readonly=True)
    try:
        assert aggregates.present(db)
        for args in _windows(db_path):
            fast = report(db, cache=False, **args)
            slow = report(db, cache=False, totals=False, **args)
            assert json.dumps(fast) == json.dumps(slow), args
    finally:
        db.conn.close()


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_totals_give_the_report_computed_row_by_row(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "t.db"
    _build(path, seed)
    assert_same_reports(path)


def test_the_totals_are_what_the_fast_report_reads(tmp_path: Path) -> None:
    """A wrong total changes the fast report (and not the row-by-row one): the fast
    path is the one under test above."""
    path = tmp_path / "t.db"
    _build(path, 5)
    db = open_database(str(path))
    with db.conn:
        db.execute(f"UPDATE {aggregates.TOTALS} SET opened = opened + 1000")
    fast = report(db, cache=False)
    slow = report(db, cache=False, totals=False)
    assert sum(c["opened"] for c in fast["clients"]) == \
        sum(c["opened"] for c in slow["clients"]) + 1000 * len(list(db.execute(
            f"SELECT 1 FROM {aggregates.TOTALS} WHERE rows > 0")))


def test_totals_stay_right_after_pruning(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    _build(path, 6, n=600)
    db = open_database(str(path))
    out = prune(db, older_than_s=1800.0, budget_s=60.0)
    assert out.connections > 0
    empty = sum(db.execute(f"SELECT COUNT(*) FROM {t} WHERE rows = 0").fetchone()[0]
                for t in aggregates.TABLES)
    assert empty == 0  # what the pruned connections alone held went with them
    out = prune(db, max_bytes=db.execute("PRAGMA page_count").fetchone()[0] * 4096 // 2,
                budget_s=60.0)
    db.conn.close()
    assert_same_reports(path)


def _as_written_before(path: Path) -> None:
    """The database as a tracer without m015_client_aggregates left it."""
    db = open_database(str(path))
    with db.conn:
        for name in aggregates.TRIGGERS:
            db.execute(f"DROP TRIGGER {name}")
        for name in aggregates.TABLES:
            db.execute(f"DROP TABLE {name}")
        for name in aggregates.INDEXES:
            db.execute(f"DROP INDEX {name}")
        db.execute("DELETE FROM _sqlite_migrations WHERE name = 'm015_client_aggregates'")
    db.conn.close()


def test_an_older_database_is_read_as_it_is_and_upgraded_with_its_totals(
        tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    _build(path, 7)
    expected = {json.dumps(a): None for a in _windows(path)}
    db = open_database(str(path), readonly=True)
    before = [report(db, cache=False, **json.loads(a)) for a in expected]
    db.conn.close()
    _as_written_before(path)
    db = open_database(str(path), readonly=True)  # a reader never upgrades: the slow way
    assert not aggregates.present(db)
    assert [report(db, cache=False, **json.loads(a)) for a in expected] == before
    db.conn.close()
    open_database(str(path)).conn.close()  # a writer upgrades it: the totals are filled
    assert_same_reports(path)
    db = open_database(str(path), readonly=True)
    assert [report(db, cache=False, **json.loads(a)) for a in expected] == before
    db.conn.close()


def test_a_rebuilt_connections_table_without_the_triggers_is_read_the_slow_way(
        tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    _build(path, 8)
    db = open_database(str(path))
    with db.conn:
        db.execute("DROP TRIGGER client_closed_insert")
        db.execute("DELETE FROM connections WHERE is_open = 0 AND rowid % 3 = 0")
    assert not aggregates.present(db)
    assert json.dumps(report(db, cache=False)) == json.dumps(report(db, cache=False,
                                                                     totals=False))
    db.conn.close()
