"""`tracer correlate` and the report's log evidence on a database built to the second.

A server at 10.0.0.1:9090; pid 700 (a leaker) holds connections open from t=0; pid 4321
dials at t=100 and gets no server SETTINGS (closed at t=120, the client's 20 s preface
timeout); a remote client 10.0.0.9 has one healthy connection. Its log says so at t=120.
Every expectation below is worked out by hand from that timeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from store_support import SERVER, T0, record, stored
from support import tracer

from store.correlate import (
    DEFAULT_PATTERN,
    EPISODE_GAP_S,
    PatternError,
    compile_pattern,
    correlate,
    log_evidence,
)
from store.schema import open_database

PREFACE_TIMEOUT_LINE = ("transport: failed to receive server preface within timeout "
                        "(dialing 10.0.0.1:9090)")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "corr.db"
    rows = [record(f"Cleak{i}", float(i), ("10.0.0.7", 40000 + i), close=None,
                   preface=i + 0.002, settings=i + 0.003) for i in range(50)]
    rows.append(record("Cstuck", 100.0, ("10.0.0.7", 50000), close=120.0, preface=100.002,
                       settings=None))
    rows.append(record("Cremote", 10.0, ("10.0.0.9", 33333), close=150.0, preface=10.002,
                       settings=10.012))
    db = stored(path, rows, first_ts=T0, last_ts=T0 + 200.0, packets=1000)
    with db.conn:
        db.conn.executemany(
            "INSERT INTO processes (pid, start_time, comm, cmdline) VALUES (?, ?, ?, ?)",
            [(700, T0 - 1000.0, "leaker", "leaker --all"),
             (4321, T0 - 500.0, "dialer", "dialer --once"),
             # pid 4321 reused by another program later: lines after it started are its
             (4321, T0 + 180.0, "other", "other")])
        db.conn.execute("UPDATE connections SET pid = 700, process_start = ?"
                        " WHERE uid LIKE 'Cleak%'", [T0 - 1000.0])
        db.conn.execute("UPDATE connections SET pid = 4321, process_start = ?"
                        " WHERE uid = 'Cstuck'", [T0 - 500.0])
        db.conn.execute(
            "INSERT INTO log_sources (id, name, path, format, added_ts, lines, parsed,"
            " unparsed, first_ts, last_ts) VALUES (1, 'dialer.log', 'dialer.log', 'klog',"
            " ?, 6, 5, 1, ?, ?)", [T0, T0 + 120.0, T0 + 400.0])
        lines = [
            (1, 1, T0 + 120.0, "warn", 4321, None, PREFACE_TIMEOUT_LINE, None),
            (2, 2, T0 + 121.0, "info", 4321, None, "retrying in 1s", None),
            (3, 3, T0 + 125.0, "warn", 4321, None, PREFACE_TIMEOUT_LINE, None),
            # a later episode: more than EPISODE_GAP_S after, and past the capture's end
            (4, 4, T0 + 400.0, "error", 4321, None, PREFACE_TIMEOUT_LINE, None),
            # a remote client's line without a pid, naming its own socket
            (5, 5, T0 + 149.0, "error", None, None,
             ("rpc error: code = Unavailable desc = connection reset by peer "
             "local=10.0.0.9:33333"), None),
            (6, 6, None, None, None, None, "garbled failed to receive server preface",
             "no_format"),
        ]
        db.conn.executemany(
            "INSERT INTO log_lines (id, source_id, line_no, ts, level, pid, process, message,"
            " reason) VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)", lines)
        db.conn.executemany(
            "INSERT INTO log_addresses (line_id, ip, port) VALUES (?, ?, ?)",
            [(1, *SERVER), (3, *SERVER), (4, *SERVER), (5, "10.0.0.9", 33333)])
    db.conn.close()
    return path


def test_each_line_gets_its_process_connections_and_the_server_state(db_path: Path) -> None:
    db = open_database(str(db_path))
    data = correlate(db, window=5.0)
    # lines 1, 3, 4 (preface), 5 (connection reset); line 2 does not match; line 6 has no
    # time and is only counted
    assert data["matched"] == 4 and data["matched_untimed"] == 1
    first = data["lines"][0]
    assert first["ts"] == T0 + 120.0 and first["pid"] == 4321 and first["process"] == "dialer"
    assert first["match"].startswith("failed to receive server preface")
    [stuck] = [c for c in first["connections"] if c["uid"] == "Cstuck"]
    assert "same pid" in stuck["why"] and "server address" in stuck["why"]
    assert stuck["at_line"] == "closed 0.0s before (client_fin), no server preface after 20.0s"
    server = first["server"]
    # at t=120: the 50 leaked connections and the remote one; Cstuck closed at 120 exactly
    assert server["open_connections"] == 51
    assert server["top_clients"][0] == {"client": "pid 700 leaker", "open": 50}
    assert server["waiting_for_server_preface"] == 0
    # at t=110 the stuck connection was still waiting
    at_110 = correlate(db, window=5.0, until=T0 + 120.0)["lines"][0]["server"]
    assert at_110["open_connections"] == 51
    mid = correlate(db, pattern="(?i)preface", window=5.0, pid=4321)
    assert [line["ts"] - T0 for line in mid["lines"]] == [120.0, 125.0, 400.0]
    assert mid["lines"][2]["server"]["in_capture"] is False


def test_waiting_for_preface_and_client_address(db_path: Path) -> None:
    db = open_database(str(db_path))
    # A line at t=110 written by someone else: the server state shows the stuck dial.
    with db.conn:
        db.conn.execute(
            "INSERT INTO log_lines (id, source_id, line_no, ts, level, pid, process, message)"
            " VALUES (7, 1, 7, ?, 'warn', 999, 'probe', 'probe: Deadline Exceeded')",
            [T0 + 110.0])
    [line] = correlate(db, pattern="probe", window=1.0)["lines"]
    assert line["connections"] == []
    assert line["server"]["waiting_for_server_preface"] == 1
    assert line["server"]["longest_wait_s"] == pytest.approx(9.998, abs=1e-6)
    assert line["server"]["open_connections"] == 52
    assert line["server"]["preface_latency_ms"]["samples"] == 0  # no preface in 109..111
    # The remote client's line names its own socket: exactly its connection.
    [remote] = correlate(db, pattern="reset by peer", window=1.0)["lines"]
    assert [c["uid"] for c in remote["connections"]] == ["Cremote"]
    assert remote["connections"][0]["why"] == ["client address"]
    assert remote["addresses"] == ["10.0.0.9:33333"]


def test_pid_reuse_names_the_process_of_the_moment(db_path: Path) -> None:
    db = open_database(str(db_path))
    late = [line for line in correlate(db, pattern="preface")["lines"]
            if line["ts"] == T0 + 400.0]
    assert late[0]["process"] == "other"


def test_log_evidence_episodes_and_text(db_path: Path) -> None:
    db = open_database(str(db_path))
    evidence = log_evidence(db, preface_timeout=20.0)
    # pid 4321: lines at 120 and 125 (one episode), 400 (a new one, > EPISODE_GAP_S later);
    # the remote line (no pid) is an episode of its log; the largest first, then by time
    assert EPISODE_GAP_S < 400.0 - 125.0
    assert [(e["pid"], e["lines"]) for e in evidence] == [(4321, 2), (None, 1), (4321, 1)]
    main = evidence[0]
    assert main["preface_timeouts_nearby"] == 1
    assert main["text"].startswith(
        "2 'failed to receive server preface within timeout' lines "
        "from pid 4321 (dialer) between ")
    assert "while the server held 51 open connections (50 from pid 700 leaker)" in main["text"]
    assert evidence[2]["text"].endswith("outside the captured time")
    assert evidence[1]["text"].startswith(
        "1 'connection reset by peer' line from log dialer.log at ")
    report = json.loads(tracer("report", "--db", str(db_path), "--format", "json").stdout)
    assert report["log_evidence"] == json.loads(json.dumps(evidence))
    table = tracer("report", "--db", str(db_path)).stdout
    assert "log evidence" in table and main["text"] in table


def test_cli_table_json_and_errors(db_path: Path) -> None:
    out = tracer("correlate", "--db", str(db_path), "--window", "5s").stdout
    assert "4 matching log line(s), 1 more without a time (not lined up)" in out
    assert "Cstuck" in out and "no server preface after 20.0s" in out
    assert "server then: 51 open (50 pid 700 leaker" in out
    data = json.loads(tracer("correlate", "--db", str(db_path), "--format", "json",
                             "--limit", "1").stdout)
    assert data["matched"] == 4 and len(data["lines"]) == 1
    csv = tracer("correlate", "--db", str(db_path), "--format", "csv").stdout
    assert csv.splitlines()[0].startswith("TS,SOURCE,PID")
    bad = tracer("correlate", "--db", str(db_path), "--pattern", "(", check=False)
    assert bad.returncode == 2 and "not a regular expression" in bad.stderr
    with pytest.raises(PatternError):
        compile_pattern("[")


def test_default_pattern_names_the_most_specific_phrase(db_path: Path) -> None:
    db = open_database(str(db_path))
    with db.conn:
        db.conn.execute(
            "INSERT INTO log_lines (id, source_id, line_no, ts, level, pid, message) VALUES"
            " (8, 1, 8, ?, 'error', 77, 'UNAVAILABLE: failed to connect to all addresses;"
            " last error: connection attempt timed out before receiving SETTINGS frame')",
            [T0 + 50.0])
    [line] = correlate(db, pid=77)["lines"]
    assert line["match"] == "timed out before receiving SETTINGS frame"
    # a pattern of one's own: the leftmost match
    [line] = correlate(db, pattern="(?i)unavailable|settings", pid=77)["lines"]
    assert line["match"] == "UNAVAILABLE"


@pytest.mark.parametrize("text", [
    "transport: authentication handshake failed: failed to receive server preface within timeout",
    "connection attempt timed out before receiving SETTINGS frame",
    "4 DEADLINE_EXCEEDED: Deadline exceeded after 1.500s",
    "SayHello failed: UNAVAILABLE: failed to connect to all addresses",
    "Failed to connect before the deadline",
    "14 UNAVAILABLE: No connection established. Last error: connect ECONNREFUSED",
    "dial tcp 10.0.0.1:9090: connect: connection refused",
    "accept tcp [::]:9090: accept4: too many open files",
])
def test_default_pattern_knows_the_words_of_grpc_clients(text: str) -> None:
    assert compile_pattern(DEFAULT_PATTERN).search(text)


@pytest.mark.parametrize("text", ["served 12 RPCs", "connection established to 10.0.0.1:9090",
                                  "GET /healthz 200"])
def test_default_pattern_ignores_ordinary_lines(text: str) -> None:
    assert not compile_pattern(DEFAULT_PATTERN).search(text)


def test_preface_timeout_runs_from_the_dial(db_path: Path) -> None:
    """Cstuck dialled at t=100, sent its preface at 100.002 and gave up at 120 without the
    server's SETTINGS: exactly grpc-go's 20 s dial timeout, counted from its SYN."""
    from store.queries import server_health

    db = open_database(str(db_path))
    assert server_health(db, preface_timeout=20.0)["preface_timeouts"] == 1
    assert server_health(db, preface_timeout=20.5)["preface_timeouts"] == 0
    [moment] = server_health(db, preface_timeout=20.0)["preface_timeout_moments"]
    assert moment["ts"] == T0 + 120.0 and moment["pid"] == 4321
    assert moment["top_clients"] == {"pid 700": 50, "10.0.0.9": 1}


@pytest.fixture
def late_start(tmp_path: Path) -> Path:
    """The agent started at T0+100 on a server that already held three connections of
    pid 700 (from its socket table: picked up mid-stream, one of them in use); the
    client's log has an error five seconds before the start and a grpc-go INFO line
    "transport is closing" (printed at every normal close) after it."""
    path = tmp_path / "late.db"
    rows = []
    for i in range(3):
        r = record(f"Cold{i}", 100.0, ("10.0.0.7", 41000 + i), close=None, preface=None,
                   settings=None)
        r.update(syn_ts=None, established_ts=None, mid_stream=1, from_snapshot=1,
                 streams=124 if i == 0 else 0, history="")
        rows.append(r)
    db = stored(path, rows, first_ts=T0 + 100.0, last_ts=T0 + 200.0, packets=10,
                elapsed_s=100.0, kind="live")
    with db.conn:
        db.conn.execute("INSERT INTO processes (pid, start_time, comm, cmdline)"
                        " VALUES (700, ?, 'pool', 'pool')", [T0 - 1000.0])
        db.conn.execute("UPDATE connections SET pid = 700, process_start = ?", [T0 - 1000.0])
        db.conn.execute(
            "INSERT INTO log_sources (id, name, path, format, added_ts, lines, parsed,"
            " unparsed, first_ts, last_ts) VALUES (1, 'pool.log', 'pool.log', 'klog', ?, 2,"
            " 2, 0, ?, ?)", [T0, T0 + 95.0, T0 + 150.0])
        db.conn.executemany(
            "INSERT INTO log_lines (id, source_id, line_no, ts, level, pid, process, message,"
            " reason) VALUES (?, 1, ?, ?, ?, 700, NULL, ?, NULL)",
            [(1, 1, T0 + 95.0, "error", ("rpc error: code = DeadlineExceeded desc = "
                                          "context deadline exceeded")),
             (2, 2, T0 + 150.0, "info", ("[transport] transport: loopyWriter exiting "
                                         "with error: transport is closing"))])
    db.conn.close()
    return path


def test_a_line_before_the_capture_says_what_its_start_found(late_start: Path) -> None:
    data = correlate(open_database(str(late_start), readonly=True), window=5.0)
    assert data["matched"] == 1  # the INFO "transport is closing" is a normal close
    [line] = data["lines"]
    server = line["server"]
    assert server["capture_began_after_s"] == 5.0
    assert server["open_at_capture_start"] == 3
    assert server["top_clients_at_capture_start"] == [{"client": "pid 700 pool", "open": 3}]
    situations = {c["uid"]: c["at_line"] for c in line["connections"]}
    assert situations["Cold0"] == ("open when the capture began 5.0s after (opened then "
                                   "or before: not seen)")
    text = tracer("correlate", "--db", str(late_start)).stdout
    assert "before the capture (it began 5.0s later): its start found 3 open (3 pid 700 " \
           "pool), opened before it" in text, text


def test_a_connection_from_the_socket_table_is_not_called_preface_less(
        late_start: Path) -> None:
    data = correlate(open_database(str(late_start), readonly=True), window=60.0,
                     pattern="transport is closing")
    [line] = data["lines"]  # asked for by name, the INFO line is taken
    situations = {c["uid"]: c["at_line"] for c in line["connections"]}
    assert situations["Cold0"] == ("open 50.0s, open before the capture (in the socket "
                                   "table at its start), 124 RPCs seen")
    assert all("no HTTP/2 preface" not in s for s in situations.values())
