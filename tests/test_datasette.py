"""The views for people browsing the database (Datasette, sqlite3) and the column
descriptions shipped for Datasette: every column of every view described, the views'
numbers equal to what `tracer connections` says."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from support import DEMO_CAPTURE, REPO, tracer

METADATA = REPO / "store" / "datasette-metadata.json"


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("datasette") / "tracer.db"
    tracer("capture", "-r", DEMO_CAPTURE, "--port", "50151", "--db", db, "-q")
    return db


def test_every_view_column_is_described(demo_db: Path) -> None:
    tables = json.loads(METADATA.read_text())["databases"]["tracer"]["tables"]
    conn = sqlite3.connect(demo_db)
    views = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'view'"
                                        " AND name IN ('connection_details', 'client_summary')")]
    assert sorted(views) == ["client_summary", "connection_details"]
    for view in views:
        columns = [r[1] for r in conn.execute(f"PRAGMA table_info({view})")]
        described = tables[view]["columns"]
        assert set(columns) == set(described), view
        assert all(len(text) > 10 for text in described.values())
        assert tables[view]["description"]


def test_the_views_say_what_the_connections_say(demo_db: Path) -> None:
    rows = json.loads(tracer("connections", "--db", demo_db, "--format", "json").stdout)
    conn = sqlite3.connect(demo_db)
    conn.row_factory = sqlite3.Row
    details = {r["uid"]: r for r in conn.execute("SELECT * FROM connection_details")}
    assert set(details) == {r["uid"] for r in rows}
    for r in rows:
        d = details[r["uid"]]
        assert d["opened_ts"] == r["ts"] and d["client_address"] == r["orig_h"]
        assert d["opened"].startswith("2026-11-24T16:53:") and d["opened"].endswith("Z")
        assert (d["closed"] is None) == (r["close_ts"] is None)
    summary = {r["client_address"]: r for r in conn.execute("SELECT * FROM client_summary")}
    for address, s in summary.items():
        mine = [r for r in rows if r["orig_h"] == address]
        assert s["connections"] == len(mine)
        assert s["open"] == sum(r["is_open"] for r in mine)
    assert summary["10.151.3.2"]["open"] == 18  # the demo's leaker
