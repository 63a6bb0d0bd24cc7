"""The schema against its history: the declared columns (tracer.record.COLUMNS), the frozen
migrations, and the databases earlier releases made (tests/data, from
tests/data/make_history.py) upgraded to exactly what a fresh database is."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from store.queries import connections, report
from store.schema import StoreError, migrations, open_database, open_database_readonly
from tracer.pipeline import Analyzer
from tracer.record import COLUMNS, RECORD_EXTRAS, RECORD_FIELDS, WRITTEN_COLUMNS, continued_record
from tracer.sources.pcapfile import CaptureReader

try:
    from crafted import cases, harness  # tests/ on sys.path (no tests/__init__.py)
except ImportError:  # pragma: no cover - tests/ became a package
    from tests.crafted import cases, harness

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
FIRST_RELEASE = DATA / "first-release.sql"
HISTORY = sorted((DATA / "schema-history").glob("*.sql"))
# The tables the first release made, and what each is keyed by.
FIRST_TABLES = {"captures": "id", "capture_sources": "capture_id, n",
                "capture_stats": "capture_id, name", "connections": "uid",
                "conn_methods": "uid, method", "events": "uid, n", "anomalies": "id"}
_PY_TYPES: dict[str, type] = {"INTEGER": int, "REAL": float, "TEXT": str}


def load(dump: Path, path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(dump.read_text())
    conn.close()
    return path


def schema(path: Path) -> dict[str, Any]:
    """Everything that makes a schema, column order aside (an added column comes last):
    each table's columns with type, NOT NULL, default and key, its foreign keys and
    whether it has a rowid; each index, view and trigger with its SQL."""
    conn = sqlite3.connect(path)
    try:
        out: dict[str, Any] = {}
        for kind, name, sql in conn.execute(
                "SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall():
            if kind == "table":
                out[f"table {name}"] = (
                    sorted((r[1], r[2].upper(), r[3], r[4], r[5])
                           for r in conn.execute(f"PRAGMA table_info({name})")),
                    sorted(tuple(r[2:5]) for r in conn.execute(
                        f"PRAGMA foreign_key_list({name})")),
                    "WITHOUT ROWID" in " ".join(sql.upper().split()),
                )
            else:
                out[f"{kind} {name}"] = " ".join(sql.split()) if sql else None
        return out
    finally:
        conn.close()


def fresh(tmp_path: Path) -> Path:
    path = tmp_path / "fresh.db"
    open_database(str(path)).close()
    return path


def applied(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return sorted(r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations"))
    finally:
        conn.close()


def tracer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=120)


def test_a_fresh_database_has_exactly_the_declared_columns(tmp_path: Path) -> None:
    conn = sqlite3.connect(fresh(tmp_path))
    found = {r[1]: (r[2], r[4]) for r in conn.execute("PRAGMA table_info(connections)")}
    conn.close()
    assert found == {c.name: (c.sql, c.default) for c in COLUMNS}


def test_each_migration_adds_the_columns_declared_for_it() -> None:
    names = [m.name for m in migrations._migrations]
    assert {c.since for c in COLUMNS} <= set(names)
    for i, name in enumerate(names):
        db = sqlite_utils.Database(memory=True)
        migrations.apply(db, stop_before=names[i + 1] if i + 1 < len(names) else None)
        done = set(names[:i + 1])
        found = {r[1] for r in db.execute("PRAGMA table_info(connections)").fetchall()}
        assert found == {c.name for c in COLUMNS if c.since in done}, f"after {name}"
        db.close()


def test_the_declared_columns_are_what_the_writer_and_the_merge_use() -> None:
    assert len({c.name for c in COLUMNS}) == len(COLUMNS)
    assert all(c.sql in _PY_TYPES for c in COLUMNS)
    assert WRITTEN_COLUMNS == RECORD_FIELDS + ("capture_id",)
    assert {c.merge for c in COLUMNS} <= {"kept", "sum", "first", "last", "newer", "goaway",
                                          "min", "max", "computed"}


def _demo_records() -> list[dict[str, Any]]:
    """The records of the demo capture."""
    analyzer = Analyzer(frozenset({50151}))
    with CaptureReader.open(str(REPO / "cli" / "demo-capture.pcapng")) as reader:
        packets = iter(reader)
        while analyzer.feed(packets, 10000):
            pass
    analyzer.finish()
    records: list[dict[str, Any]] = analyzer.drain().records
    return records


def test_every_record_has_the_declared_columns_with_their_types(tmp_path: Path) -> None:
    records = _demo_records()
    for name in cases.CASES:
        case = cases.build(name)
        path = tmp_path / f"{name}.pcap"
        harness.write_pcap(case, path)
        records += harness.analyze(case, path)[0]
    assert len(records) > 80
    columns = [c for c in COLUMNS if c.name in RECORD_FIELDS]
    seen_null = set()
    for rec in records:
        assert set(rec) == set(RECORD_FIELDS) | set(RECORD_EXTRAS)
        for c in columns:
            value = rec[c.name]
            if value is None:
                assert c.nullable, f"{c.name} is None in {rec['uid']}"
                seen_null.add(c.name)
            else:
                assert type(value) is _PY_TYPES[c.sql], (c.name, value)
    # The nullable columns are None somewhere (so the check above can fail): all but those
    # these captures always know.
    always_known = {c.name for c in columns if c.nullable} - seen_null
    assert always_known <= {"orig_seq_first", "orig_seq_next", "resp_seq_first",
                            "resp_seq_next", "last_activity_ts", "end_reason", "protocol",
                            "close_kind", "close_ts", "syn_ts", "synack_ts", "established_ts",
                            "preface_ts", "client_settings_ts", "server_settings_ts",
                            "client_settings", "server_settings", "client_settings_ack_ts",
                            "server_settings_ack_ts", "first_method", "authority",
                            "user_agent", "first_rpc_ts", "last_rpc_ts"}, always_known


def test_a_continuation_sets_every_column_its_merge_rule_names() -> None:
    records = _demo_records()
    old = next(r for r in records if r["is_open"])
    # The continuation saw a GOAWAY: only then are the goaway columns its own.
    new = dict(old, uid="continued", mid_stream=1, orig_seq_first=old["orig_seq_next"],
               resp_seq_first=old["resp_seq_next"], goaways=1)
    merged = continued_record(old, new)
    assert merged is not None
    assert set(merged) == {c.name for c in COLUMNS
                           if c.name in RECORD_FIELDS and c.merge != "kept"}


@pytest.mark.parametrize("dump", [FIRST_RELEASE, *HISTORY], ids=lambda p: p.stem)
def test_a_database_of_an_earlier_release_upgrades_to_a_fresh_ones_schema(
        tmp_path: Path, dump: Path) -> None:
    old = load(dump, tmp_path / "old.db")
    open_database(str(old)).close()
    assert schema(old) == schema(fresh(tmp_path))
    assert applied(old) == sorted(m.name for m in migrations._migrations)
    # Once upgraded, there is nothing more to do, and a reader reads it.
    before = schema(old)
    open_database(str(old)).close()
    assert schema(old) == before
    db = open_database_readonly(str(old))
    connections(db)
    report(db, cache=False)
    db.close()


@pytest.mark.parametrize("dump", [FIRST_RELEASE, *HISTORY], ids=lambda p: p.stem)
def test_a_reader_of_an_earlier_releases_database_reads_it_or_says_to_upgrade(
        tmp_path: Path, dump: Path) -> None:
    old = load(dump, tmp_path / "old.db")
    digest = hashlib.sha256(old.read_bytes()).hexdigest()
    try:
        db = open_database_readonly(str(old))
    except StoreError as exc:
        assert "written by an older tracer" in str(exc) and "tracer capture" in str(exc)
    else:
        # What it lacks, readers can do without: every query works.
        present = {r[1] for r in db.execute("PRAGMA table_info(connections)").fetchall()}
        assert {c.name for c in COLUMNS if c.since == "m014_unmigrated_columns"} <= present
        connections(db)
        report(db, cache=False)
        db.close()
    assert hashlib.sha256(old.read_bytes()).hexdigest() == digest


def test_a_reader_names_the_columns_a_database_lacks(tmp_path: Path) -> None:
    # d31cd60 made it, the last release before this one upgraded it: every migration
    # recorded but m014, and no from_snapshot column (an earlier m001 had none).
    old = load(DATA / "schema-history" / "03-d31cd60-then-902ec82.sql", tmp_path / "old.db")
    proc = tracer("report", "--db", str(old))
    assert proc.returncode == 1
    assert "its connections table lacks from_snapshot (added by m014_unmigrated_columns)" \
        in proc.stderr and "tracer capture" in proc.stderr and "Traceback" not in proc.stderr
    # 00189c7 made it, with every column: read as it is, m014 not recorded.
    full = load(DATA / "schema-history" / "05-00189c7-then-902ec82.sql", tmp_path / "full.db")
    assert "m014_unmigrated_columns" not in applied(full)
    proc = tracer("report", "--db", str(full), "--format", "json")
    assert proc.returncode == 0, proc.stderr


def _rows(path: Path, table: str, key: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY {key}")]
    finally:
        conn.close()


def test_the_first_releases_database_upgrades_with_every_row(tmp_path: Path) -> None:
    old = load(FIRST_RELEASE, tmp_path / "first.db")
    before = {table: _rows(old, table, key) for table, key in FIRST_TABLES.items()}
    assert len(before["connections"]) == 12 and len(before["events"]) > 100
    # A reader says it must be upgraded first, and leaves it as it is.
    copy = tmp_path / "archived.db"
    copy.write_bytes(old.read_bytes())
    copy.chmod(0o444)
    proc = tracer("report", "--db", str(copy))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "written by an older tracer" in proc.stderr and "tracer capture" in proc.stderr
    assert copy.read_bytes() == old.read_bytes()

    open_database(str(old)).close()
    assert schema(old) == schema(fresh(tmp_path))
    for table, key in FIRST_TABLES.items():
        after = _rows(old, table, key)
        assert len(after) == len(before[table]), table
        for was, now in zip(before[table], after, strict=True):
            assert {k: now[k] for k in was} == was, table
    # The columns added since are empty, but for the defaults.
    for row in _rows(old, "connections", "uid"):
        assert (row["tls_records_orig"], row["tls_records_resp"]) == (0, 0)
        assert row["from_snapshot"] is None and row["pid"] is None

    proc = tracer("report", "--db", str(old), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    clients = {c["client"]: c for c in json.loads(proc.stdout)["clients"]}
    assert set(clients) == {"10.151.1.2", "10.151.2.2", "10.151.3.2"}
    assert clients["10.151.3.2"]["verdict"] == "leak"
    assert (clients["10.151.3.2"]["opened"], clients["10.151.3.2"]["open"]) == (5, 5)
    assert clients["10.151.2.2"]["verdict"] == "ok"
    proc = tracer("connections", "--db", str(old), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert sorted(r["uid"] for r in rows) == [r["uid"] for r in before["connections"]]
    assert list(rows[0]) == [c.name for c in COLUMNS] + ["goaway_error_name"]
    proc = tracer("connections", "--db", str(old))
    assert proc.returncode == 0, proc.stderr
    assert all(r["uid"] in proc.stdout for r in before["connections"])
