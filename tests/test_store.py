"""The store across runs: re-imports do not duplicate, rotated files join up, the database
file is private, the schema migrates, and a database from something else says so."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap
from support import tracer

PORT = 9090
CLIENT = "10.9.0.2"
SERVER = "10.9.0.1"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(ts: float, sport: int, seq: int, ack: int, flags: str, payload: bytes = b"",
          from_client: bool = True) -> Ether:
    src, dst = (CLIENT, SERVER) if from_client else (SERVER, CLIENT)
    sp, dp = (sport, PORT) if from_client else (PORT, sport)
    pkt = Ether() / IP(src=src, dst=dst) / TCP(sport=sp, dport=dp, seq=seq, ack=ack,
                                              flags=flags) / payload
    pkt.time = ts
    return pkt


def settings_frame() -> bytes:
    return b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def conversation(sport: int, t0: float, close: bool) -> list[Ether]:
    """Handshake, preface + SETTINGS both ways, 3 PINGs spread over time, maybe FIN/FIN."""
    c, s = 1000, 5000
    pkts = [frame(t0, sport, c, 0, "S"),
            frame(t0 + 0.001, sport, s, c + 1, "SA", from_client=False),
            frame(t0 + 0.002, sport, c + 1, s + 1, "A")]
    c += 1
    s += 1
    data = PREFACE + settings_frame()
    pkts.append(frame(t0 + 0.003, sport, c, s, "PA", data))
    c += len(data)
    pkts.append(frame(t0 + 0.004, sport, s, c, "PA", settings_frame(), False))
    s += 9
    for i in range(3):
        ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + bytes([i]) * 8
        pkts.append(frame(t0 + 1 + i, sport, c, s, "PA", ping))
        c += len(ping)
        pkts.append(frame(t0 + 1.001 + i, sport, s, c, "A", b"", False))
    if close:
        pkts.append(frame(t0 + 5, sport, c, s, "FA"))
        pkts.append(frame(t0 + 5.001, sport, s, c + 1, "FA", b"", False))
        pkts.append(frame(t0 + 5.002, sport, c + 1, s + 1, "A"))
    return pkts


def client_report(db: Path) -> dict[str, object]:
    report = json.loads(tracer("report", "--db", str(db), "--format", "json").stdout)
    [client] = report["clients"]
    return client


def test_reimporting_a_file_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "a.pcap"
    wrpcap(str(path), conversation(40000, 100.0, close=False))
    db = tmp_path / "t.db"
    tracer("capture", "-q", "--read", str(path), "--port", str(PORT), "--db", str(db),
           "--events", "all")
    second = tracer("capture", "--read", str(path), "--port", str(PORT), "--db", str(db),
                    "--events", "all")
    assert "replaced earlier import" in second.stderr
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM captures").fetchone()[0] == 1
    assert con.execute("SELECT COUNT(*) FROM connections").fetchone()[0] == 1
    assert con.execute("SELECT COUNT(*) FROM events WHERE name = 'ping'").fetchone()[0] == 3


@pytest.mark.parametrize("close", [False, True], ids=["open", "closed-in-second-file"])
def test_rotated_files_read_one_run_at_a_time_join_up(tmp_path: Path, close: bool) -> None:
    """A connection that spans two rotated files is one connection, whether the files are
    read in one run or in two."""
    pkts = conversation(40001, 100.0, close=close)
    cut = 8  # after the handshake, the preface exchange and the first PING
    first, second = tmp_path / "part1.pcap", tmp_path / "part2.pcap"
    wrpcap(str(first), pkts[:cut])
    wrpcap(str(second), pkts[cut:])
    together, apart = tmp_path / "together.db", tmp_path / "apart.db"
    tracer("capture", "-q", "--read", str(first), "--read", str(second), "--port", str(PORT),
           "--db", str(together))
    tracer("capture", "-q", "--read", str(first), "--port", str(PORT), "--db", str(apart))
    tracer("capture", "-q", "--read", str(second), "--port", str(PORT), "--db", str(apart))
    one, two = client_report(together), client_report(apart)
    for key in ("opened", "closed", "open", "closed_by", "health_checks", "verdict"):
        assert one[key] == two[key], key
    assert two["opened"] == 1
    con = sqlite3.connect(apart)
    [(state, pkts_orig, pkts_resp, missed, pings)] = con.execute(
        "SELECT conn_state, orig_pkts, resp_pkts, missed_bytes, pings_orig FROM connections"
    ).fetchall()
    expected = sqlite3.connect(together).execute(
        "SELECT conn_state, orig_pkts, resp_pkts, missed_bytes, pings_orig FROM connections"
    ).fetchall()
    assert [(state, pkts_orig, pkts_resp, missed, pings)] == expected
    # The events of the second half moved to the joined connection.
    uids = {u for (u,) in con.execute("SELECT DISTINCT uid FROM events")}
    assert len(uids) == 1


def test_a_new_connection_on_the_same_ports_is_not_joined(tmp_path: Path) -> None:
    """Sequence numbers far from where the old connection stopped: another connection."""
    old = conversation(40002, 100.0, close=False)
    later = [frame(200.0, 40002, 3_000_000_000, 9_000, "PA",
                   b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"x" * 8)]
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    wrpcap(str(a), old)
    wrpcap(str(b), later)
    db = tmp_path / "t.db"
    tracer("capture", "-q", "--read", str(a), "--port", str(PORT), "--db", str(db))
    tracer("capture", "-q", "--read", str(b), "--port", str(PORT), "--db", str(db))
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM connections").fetchone()[0] == 2


def test_database_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "a.pcap"
    wrpcap(str(path), conversation(40003, 100.0, close=True))
    db = tmp_path / "t.db"
    tracer("capture", "-q", "--read", str(path), "--port", str(PORT), "--db", str(db))
    for f in [db, *tmp_path.glob("t.db-*")]:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f


def test_not_a_tracer_database(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE connections (x)")
    con.commit()
    proc = tracer("report", "--db", str(db), check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert str(db) in proc.stderr


def test_report_without_a_database_says_how_to_make_one(tmp_path: Path) -> None:
    proc = tracer("report", "--db", str(tmp_path / "missing.db"), check=False)
    assert proc.returncode != 0
    assert "tracer capture --read" in proc.stderr
    assert not (tmp_path / "missing.db").exists()


def test_migrations_are_recorded(tmp_path: Path) -> None:
    from store.schema import migrations, open_database

    db = open_database(str(tmp_path / "m.db"))
    applied = [m.name for m in migrations.applied(db)]
    assert applied == [m.name for m in migrations._migrations]
    # Opening again applies nothing new.
    db.close()
    db = open_database(str(tmp_path / "m.db"))
    assert [m.name for m in migrations.applied(db)] == applied


def _with_rpcs(sport: int, t0: float) -> list[Ether]:
    """A conversation whose client opens three streams (HEADERS with a literal :path)."""
    pkts = conversation(sport, t0, close=True)
    fin = pkts[-3:]
    pkts = pkts[:-3]
    c = fin[0][TCP].seq
    s = fin[1][TCP].seq
    path = b"/pkg.Svc/Get"
    block = b"\x04" + bytes([len(path)]) + path  # :path, literal without indexing
    for k, sid in enumerate((1, 3, 5)):
        headers = len(block).to_bytes(3, "big") + b"\x01\x04" + sid.to_bytes(4, "big") + block
        pkts.append(frame(t0 + 4 + k * 0.1, sport, c, s, "PA", headers))
        c += len(headers)
    pkts.append(frame(t0 + 5, sport, c, s, "FA"))
    pkts.append(frame(t0 + 5.001, sport, s, c + 1, "FA", b"", False))
    pkts.append(frame(t0 + 5.002, sport, c + 1, s + 1, "A"))
    return pkts


@pytest.mark.parametrize("events", ["control", "all"])
def test_rpcs_are_counted_per_connection_and_stored_one_row_each_only_on_request(
        tmp_path: Path, events: str) -> None:
    path = tmp_path / "rpcs.pcap"
    wrpcap(str(path), _with_rpcs(40010, 100.0))
    db = tmp_path / "r.db"
    tracer("capture", "-q", "--read", str(path), "--port", str(PORT), "--db", str(db),
           "--events", events)
    con = sqlite3.connect(db)
    [(streams, first, last, fin_orig, fin_resp)] = con.execute(
        "SELECT streams, first_rpc_ts, last_rpc_ts, orig_fin_ts, resp_fin_ts FROM connections"
    ).fetchall()
    assert streams == 3
    assert (first, last) == (pytest.approx(104.0), pytest.approx(104.2))
    assert (fin_orig, fin_resp) == (pytest.approx(105.0), pytest.approx(105.001))
    assert con.execute("SELECT method, count FROM conn_methods").fetchall() == [
        ("/pkg.Svc/Get", 3)]
    per_rpc = con.execute(
        "SELECT COUNT(*) FROM events WHERE name IN ('request', 'ping')").fetchone()[0]
    assert per_rpc == (0 if events == "control" else 3 + 3)
    # FIN and RST are columns now; the timeline view still lists them among the events.
    assert con.execute("SELECT COUNT(*) FROM events WHERE name = 'fin'").fetchone()[0] == 0
    assert con.execute("SELECT dir FROM timeline WHERE name = 'fin' ORDER BY ts").fetchall() \
        == [("orig",), ("resp",)]
