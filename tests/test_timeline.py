"""`tracer timeline`: open connections per client per bucket, worked out by hand.

Ten minutes, one-minute buckets. pid 700 leaks: a connection at 5 s past every minute,
never closed. pid 800 closes: a connection at 10 s past every minute, closed 5 s later.
10.0.0.9 holds one pooled connection all along. At 300 s a dial gets no server SETTINGS
and gives up at 320 s (a preface timeout at 320 s), and the server sends a GOAWAY at
430 s. Preface latency is 1 ms, except 50 ms for the leaker's connection at 485 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from store_support import T0, record, stored
from support import REPO, tracer

from store.queries import timeline
from store.schema import open_database

MINUTES = 10
LEAKER = "/srv/orders/.venv/bin/python -m orders.worker --shard 3"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "timeline.db"
    rows = [record("Cpool", 1.0, ("10.0.0.9", 30000), close=None, preface=1.002,
                   settings=1.003)]
    for k in range(MINUTES):
        t = 60.0 * k
        slow = 0.05 if k == 8 else 0.001
        rows.append(record(f"Cleak{k}", t + 5, ("10.0.0.7", 40000 + k), close=None,
                           preface=t + 5.002, settings=t + 5.002 + slow))
        rows.append(record(f"Cclose{k}", t + 10, ("10.0.0.8", 41000 + k), close=t + 15,
                           preface=t + 10.002, settings=t + 10.003))
    rows.append(record("Cstuck", 300.0, ("10.0.0.8", 42000), close=320.0, preface=300.002,
                       settings=None))
    db = stored(path, rows, first_ts=T0, last_ts=T0 + 600.0, packets=100)
    with db.conn:
        db.conn.execute("UPDATE connections SET pid = 700, process_start = 1.0"
                        " WHERE uid LIKE 'Cleak%'")
        db.conn.execute("UPDATE connections SET pid = 800, process_start = 1.0"
                        " WHERE uid LIKE 'Cclose%' OR uid = 'Cstuck'")
        for pid, cmdline in ((700, LEAKER), (800, "/usr/bin/python3 closer.py")):
            db.conn.execute("INSERT INTO processes (pid, start_time, comm, cmdline)"
                            " VALUES (?, 1.0, 'python3', ?)", [pid, cmdline])
        db.conn.execute("INSERT INTO events (capture_id, uid, n, ts, name, dir, code)"
                        " VALUES (1, 'Cpool', 9, ?, 'goaway', 'resp', 0)", [T0 + 430.0])
    db.conn.close()
    return path


def test_open_connections_per_client_per_bucket(db_path: Path) -> None:
    data = timeline(open_database(str(db_path)), bucket=60.0, preface_timeout=20.0)
    assert data["start"] == T0 and len(data["times"]) == 11  # 0..600 inclusive
    assert data["times"][0] == T0 + 60.0  # each value is at the bucket's end
    series = {c["label"]: c["open"] for c in data["clients"]}
    # the climbing line first, named by stable keys beside its label
    assert data["clients"][0] == {"label": "pid 700", "pid": 700, "process_start": 1.0,
                                  "address": None, "host": None, "process": LEAKER,
                                  "open": series["pid 700"]}
    assert [c["pid"] for c in data["clients"][1:]] == [None, 800]
    assert data["clients"][1]["address"] == "10.0.0.9"
    assert series["pid 700"][:MINUTES] == list(range(1, MINUTES + 1))
    assert series["10.0.0.9"] == [1] * 11
    # the closer's connections close within their minute; the stuck dial is open at the
    # end of no minute either (300..320)
    assert series["pid 800"] == [0] * 11
    m = data["markers"]
    assert m["preface_timeouts"] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert m["goaways_server"] == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    assert m["preface_p50_ms"][0] == pytest.approx(1.0)
    assert m["preface_p99_ms"][8] == pytest.approx(50.0)
    assert m["preface_p50_ms"][8] == pytest.approx(1.0)
    assert m["preface_p50_ms"][10] is None  # nothing started in the last bucket


def test_client_filter_and_window(db_path: Path) -> None:
    db = open_database(str(db_path))
    only = timeline(db, bucket=60.0, client="700")
    assert [c["label"] for c in only["clients"]] == ["pid 700"]
    late = timeline(db, bucket=120.0, since=T0 + 240.0)
    # connections opened before the window are carried in: 4 leaked by 240 s
    assert late["clients"][0]["pid"] == 700
    assert late["clients"][0]["open"][0] == 6  # 4 carried + 2 in 240..360


def test_text_table_and_json(db_path: Path) -> None:
    out = tracer("timeline", "--db", str(db_path), "--bucket", "1m").stdout.splitlines()
    assert out[0].split()[:4] == ["TIME", "(UTC)", "pid", "700"]
    assert "PREFACE TIMEOUTS" in out[0] and "PREFACE p50/p99 ms" in out[0]
    [row6] = [line for line in out if line.startswith("2026-09-21 14:19:20")]  # T0 + 6 min
    assert row6.split()[2:6] == ["6", "1", "0", "1"], row6  # pid 700, pool, 800, a timeout
    # under the table, which command each process column is (paths cut to their last part)
    assert "  pid 700: python -m orders.worker --shard 3" in out
    assert "  pid 800: python3 closer.py" in out
    data = json.loads(tracer("timeline", "--db", str(db_path), "--format", "json").stdout)
    assert data["clients"][0]["pid"] == 700 and data["clients"][0]["open"][9] == 10
    csv_header = tracer("timeline", "--db", str(db_path), "--format", "csv").stdout.split()[0]
    assert csv_header.startswith("time,pid_700,10.0.0.9,pid_800,preface_timeouts,")


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"),
                                          (".html", b"<!doctype html>")])
def test_plots(db_path: Path, tmp_path: Path, suffix: str, magic: bytes) -> None:
    target = tmp_path / f"plot{suffix}"
    tracer("timeline", "--db", str(db_path), "--plot", str(target))
    body = target.read_bytes()
    assert body.startswith(magic) and len(body) > 5000
    if suffix != ".png":
        text = body.decode().replace("- -", "--")  # as it is kept in an XML comment
        # each line names its process by what tells it apart
        assert "pid 700 python -m orders.worker --shard 3 (max 10)" in text
        assert "10.0.0.9 (max 1)" in text and "preface timeouts" in text
        assert "preface latency (ms)" in text


def test_bad_options(db_path: Path) -> None:
    bad = tracer("timeline", "--db", str(db_path), "--plot", "x.gif", check=False)
    assert bad.returncode == 2 and ".png, .svg or .html" in bad.stderr


@pytest.mark.parametrize("timeout,expected", [("5s", 1), ("30s", 0)])
def test_preface_timeout_option_agrees_with_the_report(db_path: Path, timeout: str,
                                                      expected: int) -> None:
    """The stuck dial gave up after 20 s: a timeout under a 5 s limit, none under 30 s; the
    timeline counts what the report counts with the same --preface-timeout."""
    data = json.loads(tracer("timeline", "--db", str(db_path), "--format", "json",
                             "--preface-timeout", timeout).stdout)
    report = json.loads(tracer("report", "--db", str(db_path), "--format", "json",
                               "--preface-timeout", timeout).stdout)
    assert sum(data["markers"]["preface_timeouts"]) == expected
    assert report["server"]["preface_timeouts"] == expected


def test_plot_without_matplotlib_says_what_to_install(db_path: Path, tmp_path: Path) -> None:
    """matplotlib is an extra (the agent does not need it): without it --plot fails at once
    with one line saying what to install, and draws nothing."""
    hide = ("import sys; sys.modules['matplotlib'] = None; sys.argv[0] = 'tracer'; "
            "from cli.main import main; main()")
    target = tmp_path / "plot.png"
    proc = subprocess.run([sys.executable, "-c", hide, "timeline", "--db", str(db_path),
                           "--plot", str(target)], cwd=REPO, capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 1, proc
    assert "--plot needs matplotlib" in proc.stderr and "grpc-conntrace[plot]" in proc.stderr
    assert proc.stdout == "" and not target.exists()
