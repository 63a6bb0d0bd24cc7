"""`tracer merge`: a server host's database joined with its client hosts' databases.

Crafted databases (written through the store's writer) for the rules: the 4-tuple and
overlapping lifetimes within the clock skew, a reused port resolved by the closest open
time, idempotence, local attribution never overwritten, the per-client totals and the
stored report after a merge, and the errors. Then two network namespaces as two hosts
(a third without a merged agent), each with its own live agent, real grpcio peers.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import live_support as ls
import netns
import pytest
import realtraffic_support as rt
from store_support import T0, record, stored
from support import skip_if, tracer

from store import aggregates
from store.merge import merge_client
from store.queries import report, report_fingerprint, stored_report
from store.schema import open_database
from store.stored_report import store_report
from store.writer import CaptureWriter
from tracer.attribution.sockets import ProcessInfo

HOST_B = "10.0.2.2"
HOST_C = "10.0.3.3"
LEAKER = ProcessInfo(pid=4242, start_time=T0 - 500.0, ppid=1, user="app", comm="python",
                     cmdline="python leaky.py", exe="/usr/bin/python3", container=None, pod=None)
POOLER = ProcessInfo(pid=4343, start_time=T0 - 900.0, ppid=1, user="app", comm="python",
                     cmdline="python pooled.py", exe="/usr/bin/python3", container="c0ffee",
                     pod=None)


def _conn(uid: str, ts: float, ip: str, port: int, *, close: float | None = None,
          streams: int = 1, shift: float = 0.0) -> dict[str, Any]:
    r = record(uid, ts + shift, (ip, port), close=None if close is None else close + shift,
               preface=ts + shift + 0.01, settings=ts + shift + 0.02)
    r["streams"] = r["trailers"] = streams
    r["methods"] = {"/pkg.Svc/Get": streams}
    if close is not None:
        r["end_ts"] = T0 + close + shift
    return r


def _scenario(shift: float = 0.0) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                           dict[str, ProcessInfo]]:
    """The server's records, host B's records of the same connections on a clock
    ``shift`` seconds ahead, and who owns each of B's."""
    server, client, owners = [], [], {}
    for i in range(6):  # the leaker: one connection per call, never closed
        server.append(_conn(f"S{i}", 10.0 + i, HOST_B, 40000 + i))
        client.append(_conn(f"B{i}", 10.0 + i, HOST_B, 40000 + i, shift=shift))
        owners[f"B{i}"] = LEAKER
    server.append(_conn("Spool", 5.0, HOST_B, 41000, streams=40))  # the pool
    client.append(_conn("Bpool", 5.0, HOST_B, 41000, streams=40, shift=shift))
    owners["Bpool"] = POOLER
    for i in range(4):  # the pooler's closed connections: per-client totals
        server.append(_conn(f"Sc{i}", 20.0 + i, HOST_B, 42000 + i, close=20.5 + i))
        client.append(_conn(f"Bc{i}", 20.0 + i, HOST_B, 42000 + i, close=20.5 + i, shift=shift))
        owners[f"Bc{i}"] = POOLER
    for i in range(3):  # host C has no agent merged: stays an address
        server.append(_conn(f"SC{i}", 12.0 + i, HOST_C, 43000 + i))
    return server, client, owners


def _write(path: Path, rows: list[dict[str, Any]], owners: dict[str, ProcessInfo] | None = None,
           *, remote: bool = False, host: str | None = None) -> None:
    db = stored(path, rows, first_ts=T0, last_ts=T0 + 60.0, packets=len(rows) * 10,
                kind="file" if host is None else "live", host=host)
    writer = CaptureWriter(db, 1)
    if owners is not None:
        writer.attribute([(uid, "local", info, T0, None) for uid, info in owners.items()])
    if remote:
        writer.attribute([(r["uid"], "remote", None, T0, None) for r in rows])
    db.conn.close()


def _make(tmp_path: Path, shift: float = 0.0, host: str | None = None) -> tuple[Path, Path]:
    server, client, owners = _scenario(shift)
    a, b = tmp_path / "server.db", tmp_path / "host-b.db"
    _write(a, server, remote=True)
    _write(b, client, owners, host=host)
    return a, b


def _merge(*args: str | Path, check: bool = True) -> Any:
    return tracer("merge", *args, check=check)


def _json_merge(*args: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_merge(*args, "--format", "json").stdout)
    return data


def _clients(path: Path) -> dict[Any, dict[str, Any]]:
    data = json.loads(tracer("report", "--db", path, "--format", "json").stdout)
    return {c["pid"] if c["pid"] is not None else c["client"]: c for c in data["clients"]}


def test_the_report_names_the_remote_processes_and_flags_only_the_leaker(
        tmp_path: Path) -> None:
    a, b = _make(tmp_path, shift=0.7)
    before = _clients(a)
    assert set(before) == {HOST_B, HOST_C} and before[HOST_B]["verdict"] == "leak"
    out = _merge(a, b).stdout
    assert "11 matched now (2 processes; clock offset host-b - server +0.700s" in out, out
    assert "3 no client connection from that address" in out and f"{HOST_C}: 3" in out, out
    clients = _clients(a)
    assert set(clients) == {4242, 4343, HOST_C}, clients
    leak, pool, other = clients[4242], clients[4343], clients[HOST_C]
    assert (leak["process"], leak["host"], leak["verdict"], leak["open"]) == \
        ("python leaky.py", "host-b", "leak", 6), leak
    assert (pool["process"], pool["host"], pool["verdict"], pool["container"]) == \
        ("python pooled.py", "host-b", "ok", "c0ffee"), pool
    assert (pool["opened"], pool["closed"], pool["open"]) == (5, 4, 1), pool
    assert other["pid"] is None and other["open"] == 3 and "host" not in other, other
    table = tracer("report", "--db", a).stdout
    assert "4242 on host-b  python leaky.py" in table, table
    timeline = json.loads(tracer("timeline", "--db", a, "--format", "json").stdout)
    assert {(c["label"], c["host"], c["process"]) for c in timeline["clients"]} == {
        ("pid 4242 on host-b", "host-b", "python leaky.py"),
        ("pid 4343 on host-b", "host-b", "python pooled.py"), (HOST_C, None, None)}
    rows = json.loads(tracer("connections", "--db", a, "--format", "json").stdout)
    assert {r["uid"]: r.get("host") for r in rows if r["orig_h"] == HOST_B} == \
        dict.fromkeys(["S0", "S1", "S2", "S3", "S4", "S5", "Spool", "Sc0", "Sc1", "Sc2",
                       "Sc3"], "host-b")


def test_the_per_client_totals_and_the_stored_report_follow_a_merge(tmp_path: Path) -> None:
    a, b = _make(tmp_path)
    db = open_database(str(a))
    store_report(db)
    old = report_fingerprint(db, 20.0)
    assert stored_report(db, old) is not None
    db.close()
    _merge(a, b)
    db = open_database(str(a), readonly=True)
    try:
        fast = report(db, cache=False)
        slow = report(db, cache=False, totals=False)
        assert json.dumps(fast) == json.dumps(slow)
        assert report_fingerprint(db, 20.0) != old
        kept = stored_report(db, report_fingerprint(db, 20.0))  # stored again by the merge
        assert kept is not None and {c["pid"] for c in kept["clients"]} == {4242, 4343, None}
        totals = dict(db.execute("SELECT pid, rows FROM client_closed WHERE rows > 0").fetchall())
        assert totals == {4343: 4}, totals  # the closed ones moved to the remote process
    finally:
        db.close()


@pytest.mark.parametrize(("shift", "skew", "matched"), [
    (1.5, "2s", 11), (-1.5, "2s", 11), (5.0, "2s", 7), (5.0, "6s", 11)])
def test_clock_skew_within_the_tolerance_matches(tmp_path: Path, shift: float, skew: str,
                                                 matched: int) -> None:
    """B's clock ``shift`` seconds off. Open connections overlap whatever the skew; the
    short closed ones (0.5 s) only within --max-skew, else address seen, no overlap."""
    a, b = _make(tmp_path, shift)
    r = _json_merge(a, b, "--max-skew", skew)["clients"][0]
    assert r["matched"] == matched, r
    unmatched = {k.split(" (")[0]: v for k, v in r["unmatched"].items()}
    assert unmatched == {"no client connection from that address": 3,
                         **({"address seen, no overlapping lifetime": 11 - matched}
                            if matched < 11 else {})}, r
    assert r["clock_offset_s"] == pytest.approx(shift, abs=1e-6)


def test_a_reused_port_takes_the_closest_open_time_and_is_counted(tmp_path: Path) -> None:
    """One 4-tuple used twice on each side, a second apart: with 2 s of tolerance each
    server record overlaps both client records; each takes its own."""
    port = 45000
    server = [_conn("S1", 10.0, HOST_B, port, close=10.4), _conn("S2", 11.0, HOST_B, port,
                                                                  close=11.4)]
    client = [_conn("B1", 10.0, HOST_B, port, close=10.4, shift=0.05),
              _conn("B2", 11.0, HOST_B, port, close=11.4, shift=0.05)]
    other = ProcessInfo(pid=5151, start_time=T0 - 10.0, ppid=1, user="app", comm="curl",
                        cmdline="grpcurl", exe=None, container=None, pod=None)
    a, b = tmp_path / "server.db", tmp_path / "b.db"
    _write(a, server, remote=True)
    _write(b, client, {"B1": LEAKER, "B2": other})
    r = _json_merge(a, b)["clients"][0]
    assert (r["matched"], r["ambiguous"]) == (2, 2), r
    got = {row["uid"]: (row["peer_uid"], row["pid"], row["ambiguous"])
           for row in ls.query(a, "SELECT * FROM merged_clients")}
    assert got == {"S1": ("B1", 4242, 1), "S2": ("B2", 5151, 1)}, got


def test_merging_twice_changes_nothing_and_says_so(tmp_path: Path) -> None:
    a, b = _make(tmp_path)
    _merge(a, b)
    first = ls.query(a, "SELECT * FROM merged_clients ORDER BY uid")
    report_before = tracer("report", "--db", a, "--format", "json").stdout
    out = _merge(a, b).stdout
    assert "0 matched now" in out and "11 matched by an earlier merge of host-b.db" in out, out
    assert "nothing changed" in out, out
    assert ls.query(a, "SELECT * FROM merged_clients ORDER BY uid") == first
    assert tracer("report", "--db", a, "--format", "json").stdout == report_before


def test_local_attribution_is_never_overwritten(tmp_path: Path) -> None:
    server, client, owners = _scenario()
    a, b = tmp_path / "server.db", tmp_path / "b.db"
    mine = ProcessInfo(pid=77, start_time=T0 - 5.0, ppid=1, user="root", comm="local",
                       cmdline="local client", exe=None, container=None, pod=None)
    _write(a, server, {"S0": mine})
    _write(b, client, owners)
    _merge(a, b, "--name", "host-b")
    rows = {r["uid"]: r for r in ls.query(a, "SELECT uid, pid, attribution FROM connections")}
    assert (rows["S0"]["pid"], rows["S0"]["attribution"]) == (77, "local")
    assert (rows["S1"]["pid"], rows["S1"]["attribution"]) == (4242, "merged")
    assert not ls.query(a, "SELECT 1 FROM merged_clients WHERE uid = 'S0'")


def test_a_merged_row_goes_with_its_connection(tmp_path: Path) -> None:
    a, b = _make(tmp_path)
    _merge(a, b)
    db = open_database(str(a))
    with db.conn:
        db.execute("DELETE FROM connections WHERE uid IN ('S0', 'Sc0')")
    db.close()
    assert len(ls.query(a, "SELECT uid FROM merged_clients")) == 9


def _totals(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every per-client total with rows, in key order (WITHOUT ROWID: a scan is in key
    order), and the triggers that keep them."""
    conn = sqlite3.connect(path)
    try:
        out = {t: conn.execute(f"SELECT * FROM {t} WHERE rows > 0").fetchall()
               for t in aggregates.TABLES}
        out["triggers"] = conn.execute("SELECT name, sql FROM sqlite_master"
                                       " WHERE type = 'trigger' ORDER BY name").fetchall()
        return out
    finally:
        conn.close()


def _recomputed(path: Path, tmp_path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The totals a full recomputation gives: a copy without them (as a tracer before
    m015_client_aggregates left it), upgraded, which fills them from every row."""
    copy = tmp_path / "recomputed.db"
    source, target = sqlite3.connect(path), sqlite3.connect(copy)
    source.backup(target)
    source.close()
    with target:
        for name in aggregates.TRIGGERS:
            target.execute(f"DROP TRIGGER {name}")
        for name in aggregates.TABLES:
            target.execute(f"DROP TABLE {name}")
        for name in aggregates.INDEXES:
            target.execute(f"DROP INDEX {name}")
        target.execute("DELETE FROM _sqlite_migrations WHERE name = 'm015_client_aggregates'")
    target.close()
    open_database(str(copy)).close()
    try:
        return _totals(copy)
    finally:
        copy.unlink()


def test_the_totals_after_a_merge_are_a_full_recomputation_and_so_after_another(
        tmp_path: Path) -> None:
    """Set-wise, without the per-row triggers: the totals of the connections that moved
    to the remote processes (their methods too), and none left empty behind them."""
    a, b = _make(tmp_path, shift=0.3)
    before = _totals(a)
    assert before == _recomputed(a, tmp_path)
    _merge(a, b)
    after = _totals(a)
    assert after != before and after == _recomputed(a, tmp_path)
    assert after["triggers"] == before["triggers"]
    by_pid = {row[0]: row[3] for row in after[aggregates.TOTALS]}  # pid -> rows
    assert by_pid == {4343: 4}, after[aggregates.TOTALS]  # the pooler's 4 closed ones
    methods = {(row[0], row[3]): row[5] for row in after[aggregates.METHODS]}
    assert methods == {(4343, "/pkg.Svc/Get"): 4}, methods  # pid, method -> RPCs
    empty = ls.query(a, " UNION ALL ".join(f"SELECT rows FROM {t} WHERE rows = 0"
                                           for t in aggregates.TABLES))
    assert not empty, empty
    _merge(a, b)  # nothing to do: the same totals
    assert _totals(a) == after


@pytest.mark.parametrize(("batch", "transactions"), [(None, 1), (5, 3)])
def test_the_matches_are_written_a_statement_each_in_one_transaction(
        tmp_path: Path, batch: int | None, transactions: int) -> None:
    """Every match in one statement per table, in one write transaction; beside a live
    capture (``batch``: 5 of the 11 at a time here) one per batch."""
    a, b = _make(tmp_path)
    server, client = open_database(str(a)), open_database(str(b), readonly=True)
    statements: list[str] = []
    server.conn.set_trace_callback(statements.append)
    try:
        assert merge_client(server, client, host="host-b", source=b.name,
                            batch=batch).matched == 11
    finally:
        server.conn.set_trace_callback(None)
        server.close()
        client.close()

    def count(prefix: str) -> int:
        return sum(1 for sql in statements if sql.lstrip().startswith(prefix))

    assert count("BEGIN IMMEDIATE") == transactions
    assert count("UPDATE connections SET pid") == transactions
    assert count("INSERT INTO merged_clients") == transactions
    assert count("DROP TRIGGER client_closed_update_old") == transactions
    assert _totals(a) == _recomputed(a, tmp_path)


def _dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@pytest.mark.parametrize(("action", "table", "column"), [
    (sqlite3.SQLITE_INSERT, "merged_clients", None),  # first write of the transaction
    (sqlite3.SQLITE_UPDATE, "connections", "pid"),  # the triggers dropped, totals moved
    (sqlite3.SQLITE_CREATE_TRIGGER, "client_closed_update_new", "connections"),  # one back
    (sqlite3.SQLITE_DELETE, aggregates.METHOD_MINUTES, None),  # the last statement
], ids=["merged-clients", "update", "second-trigger", "last-statement"])
def test_a_merge_that_fails_halfway_leaves_the_database_as_it_was(
        tmp_path: Path, action: int, table: str, column: str | None) -> None:
    """SQLite refuses one of the merge's statements (its authorizer: as a full disk or an
    I/O error would, at a chosen point); everything before it in the transaction is
    undone, the triggers included. Then the same merge does it all."""
    a, b = _make(tmp_path)
    was = _dump(a)
    server, client = open_database(str(a)), open_database(str(b), readonly=True)
    refused = []

    def authorize(code: int, arg1: str | None, arg2: str | None, _db: str | None,
                  _trigger: str | None) -> int:
        if code == action and arg1 == table and (column is None or arg2 == column):
            refused.append(arg1)
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    server.conn.set_authorizer(authorize)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
            merge_client(server, client, host="host-b", source=b.name)
    finally:
        server.conn.set_authorizer(None)
    assert refused == [table]
    assert not server.conn.in_transaction
    server.close()
    assert _dump(a) == was
    server = open_database(str(a))
    try:
        assert merge_client(server, client, host="host-b", source=b.name).matched == 11
    finally:
        server.close()
        client.close()
    assert _totals(a) == _recomputed(a, tmp_path)


def test_an_interrupted_merge_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    """Interrupted (sqlite3_interrupt, what Ctrl-C does) in the middle of the update of the
    connections, the per-row triggers dropped: rolled back whole."""
    a, b = _make(tmp_path)
    was = _dump(a)
    server, client = open_database(str(a)), open_database(str(b), readonly=True)
    state = {"armed": False, "fired": 0}

    def trace(sql: str) -> None:
        state["armed"] = state["armed"] or sql.startswith("UPDATE connections SET pid")

    def progress() -> int:
        if state["armed"] and not state["fired"]:
            state["fired"] += 1
            return 1
        return 0

    server.conn.set_trace_callback(trace)
    server.conn.set_progress_handler(progress, 1)
    try:
        with pytest.raises(sqlite3.OperationalError, match="interrupted"):
            merge_client(server, client, host="host-b", source=b.name)
    finally:
        server.conn.set_progress_handler(None, 1)
        server.conn.set_trace_callback(None)
        server.close()
        client.close()
    assert state["fired"] == 1
    assert _dump(a) == was


def test_a_client_host_is_named_by_the_host_its_agent_recorded(tmp_path: Path) -> None:
    a, b = _make(tmp_path, host="build-7")
    out = _merge(a, b).stdout
    assert f"{b} (build-7): 11 connections" in out, out
    assert "4242 on build-7  python leaky.py" in tracer("report", "--db", a).stdout
    got = ls.query(a, "SELECT DISTINCT host FROM merged_clients")
    assert got == [{"host": "build-7"}], got


def test_a_client_host_without_one_recorded_host_is_named_by_its_file(tmp_path: Path) -> None:
    """Two hosts recorded (a database carried from one host to another), none (file
    reads only), or a database of a tracer before m020_capture_host: the file's name,
    and why; --name before all."""
    a, b = _make(tmp_path, host="build-7")
    db = open_database(str(b))
    with db.conn:
        db.execute("INSERT INTO captures (kind, started_at, status, ports, host) VALUES"
                   " ('live', '2026-01-01T00:00:00+00:00', 'complete', '9090', 'build-8')")
    db.close()
    r = _json_merge(a, b)["clients"][0]
    assert (r["host"], r["host_from"]) == \
        ("host-b", "file name: it records 2 hosts (build-7, build-8)"), r
    assert "(host-b, by its file name: it records 2 hosts (build-7, build-8))" in \
        _merge(a, b).stdout
    (tmp_path / "older").mkdir()
    a, b = _make(tmp_path / "older")
    conn = sqlite3.connect(b)
    with conn:
        conn.execute("ALTER TABLE captures DROP COLUMN host")
        conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'm020_capture_host'")
    conn.close()
    r = _json_merge(a, b)["clients"][0]
    assert (r["host"], r["host_from"], r["matched"]) == \
        ("host-b", "file name: no host recorded in it", 11), r
    (tmp_path / "named").mkdir()
    a, b = _make(tmp_path / "named", host="build-7")
    r = _json_merge(a, b, "--name", "edge-1")["clients"][0]
    assert (r["host"], r["host_from"]) == ("edge-1", "--name"), r


def test_errors_are_clear(tmp_path: Path) -> None:
    a, b = _make(tmp_path)
    plain = tmp_path / "plain.db"
    conn = sqlite3.connect(plain)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    cases = [
        ((a, plain), "is not a tracer database"),
        ((a, a), "is given twice"),
        ((a, b, b), "is given twice"),
        ((tmp_path / "missing.db", b), "no database at"),
        ((a, b, "--name", "x", "--name", "y"), "2 names for 1 client database"),
        ((a, b, "--max-skew", "soon"), "--max-skew"),
    ]
    for args, message in cases:
        done = _merge(*args, check=False)
        assert done.returncode in (1, 2) and message in done.stderr, (args, done.stderr)
    assert not (tmp_path / "missing.db").exists()
    newer = tmp_path / "newer.db"
    newer.write_bytes(b.read_bytes())
    conn = sqlite3.connect(newer)
    conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at)"
                 " VALUES ('tracer', 'm999_from_the_future', '2030-01-01')")
    conn.commit()
    conn.close()
    done = _merge(a, newer, check=False)
    assert done.returncode == 1 and "newer tracer" in done.stderr, done.stderr
    assert not ls.query(a, "SELECT 1 FROM merged_clients")  # nothing written by a failure


# -- two hosts: network namespaces, each with its own agent ------------------------------

LIVE_DURATION_S = 90.0  # the agents' --duration: ended by SIGTERM once the traffic is in


def _named(host: str) -> list[str]:
    """Run the rest of a command line under the host name ``host`` (a UTS namespace of
    its own: namespaces of the network kind share the machine's name)."""
    return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host]


def test_two_hosts_the_server_report_names_the_remote_leaker(tmp_path: Path) -> None:
    """Namespace A (the server host: a grpcio server, its agent writing A.db) joined by a
    veth pair to B (a leaking grpcio client, a channel per call never closed, and a pooled
    one, with B's agent capturing on its end of the link), by another to C (a client
    whose host's database is not merged) and by a third to R, a router: D, behind it, has
    its own leaking client and agent (D.db), and R rewrites the source of D's packets to
    its own address (masquerade), so A sees R's address where D sees its own. A's agent
    runs --no-attribution: on one machine it would find B's namespace and name B's
    processes itself, which two real hosts cannot; without it, every client is an
    address to A, as a remote one is. B's and D's agents run under host names of their
    own (host-b, host-d), which they record and the merge names the hosts by."""
    ls.need_root()
    skip_if(netns.nat_unavailable_reason())
    leak = rt.PeerSpec("grpcio-leak-b", "grpcio", "leak", 6)
    pool = rt.PeerSpec("grpcio-pool-b", "grpcio", "pool", 12)
    close = rt.PeerSpec("grpcio-close-c", "grpcio", "close", 3)
    natted = rt.PeerSpec("grpcio-leak-d", "grpcio", "leak", 3)
    a_db, b_db, d_db = tmp_path / "A.db", tmp_path / "B.db", tmp_path / "D.db"
    with rt.nothing_left_behind(), netns.linked(3) as (server_ns, (b, c, router)), \
            netns.behind_nat(router, [b.octet, c.octet]) as d, \
            rt.started_processes() as processes:
        on_a = ["ip", "netns", "exec", server_ns]
        port = rt.ready_port(processes.start("server", [
            *on_a, *rt.grpcio_peer("server"), "0", "--max-lifetime", "120"]))
        agents = {
            "a": ls.Agent(processes, a_db, port, "--no-attribution", "--duration",
                          f"{LIVE_DURATION_S:g}s", prefix=on_a, name="agent-a"),
            "b": ls.Agent(processes, b_db, port, "--iface", b.client_if, "--duration",
                          f"{LIVE_DURATION_S:g}s", prefix=b.command(_named("host-b")),
                          name="agent-b"),
            "d": ls.Agent(processes, d_db, port, "--iface", d.host.client_if, "--duration",
                          f"{LIVE_DURATION_S:g}s", prefix=d.host.command(_named("host-d")),
                          name="agent-d"),
        }
        for agent in agents.values():
            agent.wait_ready()
        leaker = ls.start_peer(processes, leak, f"{b.gateway}:{port}", prefix=b.command([]))
        pooler = ls.start_peer(processes, pool, f"{b.gateway}:{port}", prefix=b.command([]))
        closer = ls.start_peer(processes, close, f"{c.gateway}:{port}", prefix=c.command([]))
        behind = ls.start_peer(processes, natted, f"{d.server}:{port}",
                               prefix=d.host.command([]))
        rt.wait_done([leaker, pooler, closer, behind])
        ls.wait_client_ports(leaker.popen.pid, port, leak.count)
        d_ports = ls.wait_client_ports(behind.popen.pid, port, natted.count)
        agents["b"].wait_for_rows(
            "SELECT pid FROM connections WHERE attribution = 'local'", [],
            lambda rows: len(rows) == leak.count + 1,
            "B's agent attributed the leaker's and the pooler's connections")
        agents["d"].wait_for_rows(
            "SELECT pid FROM connections WHERE attribution = 'local'", [],
            lambda rows: len(rows) == natted.count, "D's agent attributed its leaker's")
        agents["a"].wait_for_rows(
            "SELECT uid FROM connections", [],
            lambda rows: len(rows) == leak.count + 1 + close.count + natted.count,
            "A's agent recorded every connection")
        agents["a"].wait_for_rows("SELECT uid FROM connections WHERE is_open = 0", [],
                                  lambda rows: len(rows) == close.count,
                                  "A's agent saw C's connections closed")
        for agent in agents.values():
            agent.require_time_left(LIVE_DURATION_S)
            os.kill(agent.pid, signal.SIGTERM)
        for agent in agents.values():
            assert agent.wait_exit() == 0, agent.output()
        leaker_pid, pooler_pid, behind_pid = leaker.popen.pid, pooler.popen.pid, \
            behind.popen.pid
    hosts = {db.name: [r["host"] for r in ls.query(db, "SELECT host FROM captures")]
             for db in (b_db, d_db)}
    assert hosts == {"B.db": ["host-b"], "D.db": ["host-d"]}, hosts
    # The NAT seen from both ends: D's records are from D's address, A's from R's, on the
    # same ports (masquerade keeps them where it can), so only the address tells them apart.
    seen_d = ls.query(d_db, "SELECT orig_h, orig_p, pid FROM connections")
    assert {(r["orig_h"], r["pid"]) for r in seen_d} == {(d.host.ip, behind_pid)}, seen_d
    seen_a = ls.query(a_db, "SELECT orig_p FROM connections WHERE orig_h = ?", [d.seen_as])
    assert len(seen_a) == natted.count, seen_a
    out = _merge(a_db, b_db, d_db).stdout
    assert "B.db (host-b): 7 connections; of the server's 13 unattributed, 7 matched now " \
           "(2 processes" in out, out
    assert "D.db (host-d): 3 connections; of the server's 6 unattributed, 0 matched now" \
        in out, out
    assert "6 no client connection from that address (NAT, or a host whose database is " \
           "not merged)" in out, out
    assert f"{c.ip}: 3 (no client connection from that address)" in out, out
    assert f"{d.seen_as}: 3 (no client connection from that address)" in out, out
    clients = _clients(a_db)
    assert set(clients) == {leaker_pid, pooler_pid, c.ip, d.seen_as}, clients
    named_leak, named_pool, other = clients[leaker_pid], clients[pooler_pid], clients[c.ip]
    assert (named_leak["host"], named_leak["client"], named_leak["verdict"],
            named_leak["open"]) == ("host-b", b.ip, "leak", leak.count), named_leak
    assert "grpcio_client.py leak" in named_leak["process"], named_leak
    assert (named_pool["host"], named_pool["verdict"], named_pool["open"]) == \
        ("host-b", "ok", 1), named_pool
    assert "grpcio_client.py pool" in named_pool["process"], named_pool
    assert (other["pid"], other["opened"], other["closed"], other["verdict"]) == \
        (None, close.count, close.count, "ok"), other
    router_seen = clients[d.seen_as]
    assert (router_seen["pid"], router_seen["process"], router_seen["open"]) == \
        (None, None, natted.count) and "host" not in router_seen, router_seen
    # Never a wrong pid: only B's two processes were named, only on B's connections.
    named = ls.query(a_db, "SELECT orig_h, pid, attribution FROM connections"
                           " WHERE pid IS NOT NULL")
    assert {(r["orig_h"], r["pid"], r["attribution"]) for r in named} == \
        {(b.ip, leaker_pid, "merged"), (b.ip, pooler_pid, "merged")}, named
    assert not ls.query(a_db, "SELECT 1 FROM merged_clients WHERE host = 'host-d'")
    assert {r["orig_p"] for r in seen_a} == set(d_ports)  # masquerade kept D's ports
    table = tracer("report", "--db", a_db).stdout
    assert f"{leaker_pid} on host-b" in table, table
    print(out, table, sep="\n")  # shown with pytest -s: what a person sees
