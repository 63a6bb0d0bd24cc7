"""gRPC servers on Unix sockets (`tracer capture --unix PATH`): the unix_diag parser on
crafted bytes (malformed ones counted, never a crash), the poll tracker, and the live agent
against a real grpcio server on a Unix socket path and on an abstract name, with grpcio and
grpc-js clients (leaking, pooled, closing, one connected before the agent started), alone
and beside a TCP --port."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import live_support as ls
import metrics_support as ms
import pytest
import realtraffic_support as rt
from hypothesis import given, settings
from hypothesis import strategies as st
from support import free_port, poll, tracer

from tracer.agent.unixwatch import poll_interval
from tracer.attribution.unixdiag import (
    UNIX_DIAG_ICONS,
    UNIX_DIAG_NAME,
    UNIX_DIAG_PEER,
    UNIX_DIAG_RQLEN,
    UNIX_DIAG_UID,
    UNIX_DIAG_VFS,
    UNIX_ESTABLISHED,
    UNIX_LISTEN,
    Malformed,
    Targets,
    UnixDiag,
    connections_of,
    display_name,
    file_key,
    parse_dump,
    parse_unix_message,
    raw_name,
    scan_dump,
)
from tracer.unixconns import Listed, UnixConnections

# -- crafted unix_diag messages ----------------------------------------------------------


def attr(kind: int, body: bytes) -> bytes:
    length = 4 + len(body)
    return struct.pack("=HH", length, kind) + body + b"\0" * ((-length) % 4)


def message(inode: int, state: int = UNIX_ESTABLISHED, *attrs: bytes,
            family: int = socket.AF_UNIX) -> bytes:
    return struct.pack("=BBBBIII", family, socket.SOCK_STREAM, state, 0, inode, 7, 0) + \
        b"".join(attrs)


def netlink(seq: int, *bodies: bytes) -> bytes:
    out = b""
    for body in bodies:
        out += struct.pack("=IHHII", 16 + len(body), 20, 2, seq, 0) + body
    return out + struct.pack("=IHHII", 20, 3, 2, seq, 0) + b"\0\0\0\0"


def test_a_full_message_reads_every_attribute() -> None:
    body = message(41, UNIX_LISTEN, attr(UNIX_DIAG_NAME, b"/run/x.sock"),
                   attr(UNIX_DIAG_VFS, struct.pack("=II", 99, 5 << 20)),
                   attr(UNIX_DIAG_PEER, struct.pack("=I", 0)),
                   attr(UNIX_DIAG_ICONS, struct.pack("=3I", 50, 51, 52)),
                   attr(UNIX_DIAG_RQLEN, struct.pack("=II", 3, 128)),
                   attr(UNIX_DIAG_UID, struct.pack("=I", 1000)),
                   attr(6, b"\x01"))  # UNIX_DIAG_SHUTDOWN: passed over
    s = parse_unix_message(body, 0, len(body))
    assert (s.inode, s.state, s.name, s.vfs, s.icons, s.rqueue, s.wqueue, s.uid, s.cookie) == \
        (41, UNIX_LISTEN, "/run/x.sock", (5 << 20, 99), (50, 51, 52), 3, 128, 1000, 7)


def test_an_abstract_name_is_written_with_an_at_sign() -> None:
    body = message(3, UNIX_ESTABLISHED, attr(UNIX_DIAG_NAME, b"\0containerd-shim\xff"))
    assert parse_unix_message(body, 0, len(body)).name == "@containerd-shim\\xff"
    assert display_name("unix-abstract:foo") == "@foo" == display_name("@foo")
    assert display_name("unix:/run/a.sock") == "/run/a.sock"


@pytest.mark.parametrize(("body", "reason"), [
    (message(1)[:10], "unix_diag_short_message"),
    (message(1, UNIX_ESTABLISHED, family=socket.AF_INET), "unix_diag_wrong_family"),
    (message(1) + struct.pack("=HH", 2, UNIX_DIAG_PEER), "unix_diag_bad_attribute_length"),
    (message(1) + struct.pack("=HH", 40, UNIX_DIAG_PEER) + b"\0" * 4,
     "unix_diag_bad_attribute_length"),
    (message(1) + attr(UNIX_DIAG_PEER, b"\1\2"), "unix_diag_short_attribute"),
    (message(1) + attr(UNIX_DIAG_RQLEN, b"\1\2\3\4"), "unix_diag_short_attribute"),
    (message(1) + attr(UNIX_DIAG_NAME, b""), "unix_diag_bad_name"),
    (message(1) + attr(UNIX_DIAG_NAME, b"x" * 200), "unix_diag_bad_name"),
    (message(1) + attr(UNIX_DIAG_ICONS, b"\1\2\3\4\5"), "unix_diag_bad_icons"),
])
def test_malformed_messages_say_why(body: bytes, reason: str) -> None:
    with pytest.raises(Malformed) as caught:
        parse_unix_message(body, 0, len(body))
    assert caught.value.reason == reason


def test_a_dump_keeps_ours_and_the_unnamed_and_counts_the_malformed() -> None:
    keep = Targets(names=frozenset({"@srv"}))
    data = netlink(9,
                   message(10, UNIX_LISTEN, attr(UNIX_DIAG_NAME, b"\0srv")),
                   message(11, UNIX_ESTABLISHED, attr(UNIX_DIAG_NAME, b"\0srv"),
                           attr(UNIX_DIAG_PEER, struct.pack("=I", 12)),
                           attr(UNIX_DIAG_RQLEN, struct.pack("=II", 5, 0))),
                   message(12, UNIX_ESTABLISHED, attr(UNIX_DIAG_PEER, struct.pack("=I", 11)),
                           attr(UNIX_DIAG_UID, struct.pack("=I", 33))),
                   message(13, UNIX_ESTABLISHED, attr(UNIX_DIAG_NAME, b"/other")),
                   message(14)[:12])
    result, done = parse_dump([data], 9, keep)
    assert done and result.listed == 5
    assert sorted(s.inode for s in result.sockets) == [10, 11, 12]
    assert result.malformed == {"unix_diag_short_message": 1}
    conns = connections_of(result.sockets, keep)
    assert list(conns) == [11]
    server, client = conns[11]
    assert client is not None and client.uid == 33 and server.rqueue == 5
    # A netlink length pointing past the chunk: counted, the chunk given up, no crash.
    broken = struct.pack("=IHHII", 4000, 20, 2, 9, 0) + message(15)
    result, done = parse_dump([broken], 9, keep)
    assert not done and result.malformed == {"unix_diag_bad_netlink_length": 1}


def test_the_poll_scan_keeps_only_ours_and_their_peers_and_counts_the_malformed() -> None:
    """scan_dump (the poll's path) finds what parse_dump and connections_of find, from
    the same bytes: the connection of ours with its client's queue and uid, the listener
    whole, an unrelated named socket and an unnamed non-peer left out, the malformed
    counted with the same reasons."""
    data = netlink(9,
                   message(10, UNIX_LISTEN, attr(UNIX_DIAG_NAME, b"\0srv"),
                           attr(UNIX_DIAG_RQLEN, struct.pack("=II", 2, 64))),
                   message(12, UNIX_ESTABLISHED, attr(UNIX_DIAG_PEER, struct.pack("=I", 11)),
                           attr(UNIX_DIAG_RQLEN, struct.pack("=II", 7, 0)),
                           attr(UNIX_DIAG_UID, struct.pack("=I", 33))),
                   message(11, UNIX_ESTABLISHED, attr(UNIX_DIAG_NAME, b"\0srv"),
                           attr(UNIX_DIAG_PEER, struct.pack("=I", 12)),
                           attr(UNIX_DIAG_RQLEN, struct.pack("=II", 5, 0))),
                   message(13, UNIX_ESTABLISHED, attr(UNIX_DIAG_NAME, b"/other"),
                           attr(UNIX_DIAG_PEER, struct.pack("=I", 14))),
                   message(14, UNIX_ESTABLISHED, attr(UNIX_DIAG_PEER, struct.pack("=I", 13))),
                   message(15, UNIX_ESTABLISHED, attr(UNIX_DIAG_NAME, b"\0srv"),
                           attr(UNIX_DIAG_PEER, b"\1\2")),
                   message(16) + struct.pack("=HH", 2, UNIX_DIAG_PEER),
                   message(17)[:12])
    snap = scan_dump([data], 9, {raw_name("@srv"): 0}, {})
    assert snap.done and snap.listed == 8
    assert snap.conns == [(11, 12, 5, 7, 33, 0)]
    assert [(s.inode, s.rqueue, s.wqueue, t) for s, t in snap.listeners] == [(10, 2, 64, 0)]
    assert snap.malformed == {"unix_diag_short_attribute": 1,
                              "unix_diag_bad_attribute_length": 1,
                              "unix_diag_short_message": 1}
    # By the socket file (a relative bind's name matches nothing), and another seq ignored.
    by_file = netlink(3, message(20, UNIX_ESTABLISHED, attr(UNIX_DIAG_NAME, b"s.sock"),
                                 attr(UNIX_DIAG_VFS, struct.pack("=II", 99, 5 << 20))))
    assert scan_dump([by_file], 3, {}, {file_key(5 << 20, 99): 0}).conns == \
        [(20, 0, 0, -1, -1, 0)]
    assert scan_dump([by_file], 4, {}, {file_key(5 << 20, 99): 0}).listed == 0


def test_the_interval_is_stretched_to_keep_polls_under_five_percent_of_a_core() -> None:
    assert poll_interval(0.002) == 0.5 == poll_interval(0.025)
    assert poll_interval(0.052) == 1.1  # 52 ms each: 4.7% of a core
    assert poll_interval(3.0) == 10.0  # never more than MAX_INTERVAL apart


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 300))
def test_any_bytes_parse_or_say_why(data: bytes, cut: int) -> None:
    """Whatever the bytes, a message is read or Malformed says why; a dump of them only
    counts (never raises)."""
    try:
        parse_unix_message(data, 0, min(cut, len(data)))
    except Malformed as exc:
        assert exc.reason.startswith("unix_diag_")
    framed = struct.pack("=IHHII", 16 + len(data), 20, 2, 1, 0) + data
    result, _done = parse_dump([framed[:cut + 16]], 1, Targets(names=frozenset({"@a"})))
    assert result.listed <= 1
    assert scan_dump([framed[:cut + 16]], 1, {b"\0a": 0}, {}).listed <= 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.binary(max_size=24)), max_size=6),
       st.integers(0, 40))
def test_mutated_attributes_parse_or_say_why(attrs: list[tuple[int, bytes]], cut: int) -> None:
    body = message(5, UNIX_ESTABLISHED, *(attr(k, b) for k, b in attrs))
    end = max(0, len(body) - cut)
    try:
        s = parse_unix_message(body, 0, end)
    except Malformed as exc:
        assert exc.reason.startswith("unix_diag_")
    else:
        assert s.inode == 5


# -- the poll tracker --------------------------------------------------------------------


LABELS = ["/run/s.sock"]


def seen(server: int, client: int, queue: int = 0) -> Listed:
    return (server, client, queue, 0, 1000, 0)


def test_polls_make_pre_existing_new_and_closed_connections() -> None:
    table = UnixConnections()
    first, new = table.poll(100.0, [seen(1, 2)], LABELS)
    assert len(new) == 1 and first[0]["mid_stream"] == 1 and first[0]["conn_state"] == "OTH"
    records, new = table.poll(100.5, [seen(1, 2), seen(3, 4)], LABELS)
    assert [r["ts"] for r in records] == [100.5] and records[0]["mid_stream"] == 0
    assert records[0]["orig_h"] == "unix:/run/s.sock" and records[0]["orig_p"] == 4
    assert records[0]["protocol"] == "unix" and records[0]["streams"] == 0
    assert records[0]["last_activity_ts"] is None  # never seen, never guessed
    records, _ = table.poll(101.0, [seen(1, 2, queue=40)], LABELS)
    closed = [r for r in records if r["close_ts"] is not None]
    assert [(r["orig_p"], r["close_ts"], r["is_open"]) for r in closed] == [(4, 101.0, 0)]
    moved = [r for r in records if r["close_ts"] is None]
    assert moved[0]["unix"]["queue_max"] == 40 and moved[0]["unix"]["queue_changes"] == 1
    # The accepted socket's inode back for another client: the old connection closed.
    records, new = table.poll(101.5, [seen(1, 9)], LABELS)
    assert len(new) == 1 and {r["orig_p"]: r["is_open"] for r in records} == {2: 0, 9: 1}
    end = table.finish(102.0)
    assert [(r["orig_p"], r["end_reason"], r["is_open"]) for r in end] == \
        [(9, "open_at_end", 1)]


def test_the_table_is_bounded() -> None:
    table = UnixConnections(max_tracked=2)
    table.poll(1.0, [seen(i, i + 100) for i in range(5)], LABELS)
    assert len(table.open) == 2 and table.not_followed == 3


def test_a_real_dump_on_this_kernel_names_both_ends(tmp_path: Path) -> None:
    """The kernel's facts the design rests on: the accepted socket carries the listener's
    name (as bound, relative or not) and its peer is the client's socket, which has none;
    the match by the socket file's device and inode holds for a relative bind."""
    path = tmp_path / "s.sock"
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        server = socket.socket(socket.AF_UNIX)
        server.bind("s.sock")
    finally:
        os.chdir(here)
    server.listen(4)
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    accepted, _ = server.accept()
    from tracer.agent.unixwatch import resolve

    diag = UnixDiag()
    try:
        target = resolve((str(path),))[0]
        conns = connections_of(diag.dump(target.targets).sockets, target.targets)
    finally:
        diag.close()
    ours = os.fstat(accepted.fileno()).st_ino
    assert ours in conns
    srv, cli = conns[ours]
    assert srv.name == "s.sock" and srv.peer == os.fstat(client.fileno()).st_ino
    assert cli is not None and cli.name is None and cli.peer == ours
    diag = UnixDiag()
    try:
        snap = diag.snapshot({}, {file_key(*next(iter(target.targets.files))): 0})
    finally:
        diag.close()
    assert [c[:2] for c in snap.conns] == [(ours, srv.peer)] and snap.conns[0][4] == cli.uid
    assert [s.inode for s, _ in snap.listeners] == [os.fstat(server.fileno()).st_ino]
    for s in (client, accepted, server):
        s.close()


# -- live: a real grpcio server on a Unix socket ---------------------------------------------

DURATION = 14.0


def start_unix_server(processes: rt.Processes, bind: str, name: str = "server") -> None:
    proc = processes.start(name, [*rt.grpcio_peer("server"), "0", "--bind", bind,
                                  "--max-lifetime", "120"])
    proc.wait_for("READY", time.monotonic() + rt.READY_TIMEOUT_S)


def grpcio(processes: rt.Processes, mode: str, target: str, count: int,
           interval: float = 0.4) -> rt.Process:
    """A tests/peers grpcio client; a leaker dials one channel every ``interval`` (as a
    client that dials per call does), never closing them."""
    pace = ["--pace", str(interval)] if mode == "leak" else []
    return processes.start(f"grpcio-{mode}", [*rt.grpcio_peer("client"), mode, "--target",
                                              target, "--count", str(count), "--interval",
                                              str(interval), *pace, "--max-lifetime", "90"])


def agent(processes: rt.Processes, db: Path, *args: str) -> rt.Process:
    return processes.start("agent", [*ls.tracer_command(), "capture", "--db", str(db),
                                     "--duration", f"{DURATION}s", *args])


def clients_by_pid(db: Path) -> dict[int, dict[str, Any]]:
    data = json.loads(tracer("report", "--db", str(db), "--format", "json").stdout)
    return {c["pid"]: c for c in data["clients"] if c["pid"] is not None}


def wait_agent(proc: rt.Process) -> None:
    code = proc.popen.wait(DURATION + ls.AGENT_EXIT_TIMEOUT_S)
    proc._reader.join(5.0)
    assert code == 0, proc.output()


def wait_ready(db: Path, proc: rt.Process) -> None:
    def ready() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"the agent exited early:\n{proc.output()}")
        return bool(ls.try_query(db, "SELECT id FROM captures WHERE kind = 'live'"))

    ls.wait_for(ready, "the agent was ready", timeout=ls.AGENT_READY_TIMEOUT_S)


def accepted(path: str) -> int:
    """Connections the kernel lists as accepted on the Unix socket ``path`` now."""
    from tracer.agent.unixwatch import resolve

    target = resolve((path,))[0]
    diag = UnixDiag()
    try:
        return len(connections_of(diag.dump(target.targets).sockets, target.targets))
    finally:
        diag.close()


@pytest.fixture
def sock_dir() -> Any:
    with tempfile.TemporaryDirectory(prefix="tracer-unix-") as folder:
        yield Path(folder)


LEAKS, JS_LEAKS = 7, 6  # the grpcio and the grpc-js leakers' channels


@dataclass
class UnixRun:
    """The live scenario on a Unix socket, run once for the tests below."""

    path: Path
    db: Path
    output: str  # the agent's
    by_pid: dict[int, dict[str, Any]]  # the report's clients, right after the agent ended
    samples: ms.Samples | None  # the agent's /metrics once the leakers were done
    early: rt.Process  # a pool connected before the agent started
    leak: rt.Process
    pool: rt.Process
    close: rt.Process
    js_leak: rt.Process | None  # None when grpc-js cannot run (js_missing says why)
    js_pool: rt.Process | None
    js_missing: str | None


def _metrics_settled(s: ms.Samples | None, want: dict[int, int]) -> bool:
    return s is not None and all(
        ms.of_pid(s, "tracer_client_open_connections", pid) == n for pid, n in want.items())


@pytest.fixture(scope="module")
def unix_run() -> Iterator[UnixRun]:
    """A real grpcio server on a Unix socket path; grpcio clients (a pool connected before
    the agent, a leaker, a pool, a closer) and grpc-js ones (a leaker, a pool) when node
    and @grpc/grpc-js are there; the agent run with --metrics, scraped once the clients
    are done (while it runs), then the report."""
    ls.need_root()
    with tempfile.TemporaryDirectory(prefix="tracer-unix-") as folder:
        sock_dir = Path(folder)
        path = sock_dir / "s.sock"
        target = f"unix:{path}"
        db = sock_dir / "t.db"
        js = rt.grpcjs_unavailable_reason()
        metrics_port = free_port()
        js_leak = js_pool = None
        with ls.processes() as procs:
            start_unix_server(procs, target)
            before = grpcio(procs, "pool", target, 200, interval=0.3)  # connected first
            ls.wait_for(lambda: accepted(str(path)) >= 1, "the early pool connected",
                        timeout=10)
            capture = agent(procs, db, "--unix", str(path),
                            "--metrics", f"127.0.0.1:{metrics_port}")
            wait_ready(db, capture)
            time.sleep(1.0)  # the first poll: the early pool is pre-existing
            leak = grpcio(procs, "leak", target, LEAKS, interval=0.6)
            pool = grpcio(procs, "pool", target, 20, interval=0.3)
            close = grpcio(procs, "close", target, 6, interval=0.6)
            clients = [leak, pool, close]
            if js is None:
                # Each leaked client its own connection (grpcjs_client.js: a local
                # subchannel pool), one every 0.7 s: growing across polls.
                js_leak = procs.start("grpcjs-leak", [
                    *rt.PeerSpec("grpcjs-leak", "grpc-js", "leak", JS_LEAKS).argv(target),
                    "--pace", "0.7", "--max-lifetime", "90"])
                js_pool = procs.start("grpcjs-pool", [
                    *rt.PeerSpec("grpcjs-pool", "grpc-js", "pool", 20).argv(target),
                    "--max-lifetime", "90"])
                clients += [js_leak, js_pool]
            rt.wait_done(clients, timeout=DURATION - 3)
            want = {leak.popen.pid: LEAKS}
            if js_leak is not None:
                want[js_leak.popen.pid] = JS_LEAKS
            # Bounded by the agent's run: it ends DURATION after it started.
            samples = poll(lambda: ms.scrape(metrics_port),
                           until=lambda s: _metrics_settled(s, want), timeout=4.0,
                           interval=0.25)
            wait_agent(capture)
            by_pid = clients_by_pid(db)
            out = capture.output()
        # The processes are ended (no test may leave one behind); their pids, the
        # database and what was scraped stay for the tests.
        yield UnixRun(path, db, out, by_pid, samples, before, leak, pool, close,
                      js_leak, js_pool, js)


@pytest.mark.live
def test_unix_socket_leaker_is_named_and_nobody_else(unix_run: UnixRun) -> None:
    run, db, path, by_pid, out = unix_run, unix_run.db, unix_run.path, unix_run.by_pid, \
        unix_run.output
    leak = run.leak
    assert "Unix sockets:" in out, out
    # The status line of a Unix-only run: its connections and clients, no packet counts.
    statuses = re.findall(r"^(\d+) open Unix-socket connections? from (\d+) client "
                          r"process(?:es)?[^\n]*, rows written \d+$", out, re.M)
    assert statuses, out
    assert "packets (" not in out
    # At least the leakers' and the early pool's, and as many processes.
    least = LEAKS + 1 + (JS_LEAKS if run.js_leak else 0)
    assert max(int(n) for n, _ in statuses) >= least, statuses
    assert max(int(p) for _, p in statuses) >= (4 if run.js_leak else 3), statuses
    leaker = by_pid[leak.popen.pid]
    assert (leaker["verdict"], leaker["opened"], leaker["open"], leaker["closed"]) == \
        ("leak", LEAKS, LEAKS, 0), leaker["reason"]
    assert leaker["rpcs"] is None and leaker["rpcs_per_connection"] is None
    assert "not visible on a Unix socket" in leaker["reason"]
    leakers = [p.popen.pid for p in (leak, run.js_leak) if p is not None]
    for proc in (run.early, run.pool, run.close, run.js_pool):
        if proc is None:
            continue
        entry = by_pid.get(proc.popen.pid)
        if proc is run.close and entry is None:
            continue  # its calls opened and closed between two polls: never seen
        assert entry is not None, (proc.name, by_pid)
        assert entry["verdict"] == "ok", entry
    early = by_pid[run.early.popen.pid]
    assert early["pre_existing"] == 1 and early["open"] == 1 and early["oldest_open_before_capture"]
    flagged = [c for c in by_pid.values() if c["verdict"] != "ok"]
    assert sorted(c["pid"] for c in flagged) == sorted(leakers), flagged
    table = tracer("report", "--db", str(db)).stdout
    assert "n/a (unix)" in table and "not visible without packets" in table
    conns = tracer("connections", "--db", str(db), "--format", "json").stdout
    assert '"protocol": "unix"' in conns
    # The timeline: the leaker's open series climbs to its 7, under its pid.
    timeline = json.loads(tracer("timeline", "--db", str(db), "--bucket", "2s",
                                 "--format", "json").stdout)
    mine = [c for c in timeline["clients"] if c.get("pid") == leak.popen.pid]
    assert len(mine) == 1, timeline
    series = mine[0]["open"]
    assert series == sorted(series) and series[-1] == LEAKS and series[0] < LEAKS, series
    # correlate: a log line of the leaker's pid finds its Unix connections.
    log = db.parent / "client.log"
    when = time.strftime("%b %d %H:%M:%S", time.localtime(time.time() - 3))
    log.write_text(f"{when} host leaker[{leak.popen.pid}]: failed to receive server "
                   "preface within timeout\n")
    tracer("logs", "add", str(log), "--db", str(db))
    corr = json.loads(tracer("correlate", "--db", str(db), "--format", "json").stdout)
    assert corr["matched"] == 1, corr
    found = [c for m in corr["lines"] for c in m["connections"]]
    assert found and all(c["orig_h"] == f"unix:{path}" for c in found), corr
    # prune: closed Unix rows go with their unix_sockets rows, open ones stay.
    tracer("prune", "--db", str(db), "--older-than", "0s")
    orphans = ls.try_query(db, "SELECT COUNT(*) AS n FROM unix_sockets WHERE uid NOT IN "
                               "(SELECT uid FROM connections)")
    assert orphans == [{"n": 0}], orphans
    assert ls.try_query(db, "SELECT COUNT(*) AS n FROM connections WHERE protocol = 'unix' "
                            "AND close_ts IS NOT NULL") == [{"n": 0}]
    assert clients_by_pid(db)[leak.popen.pid]["open"] == LEAKS


@pytest.mark.live
def test_a_grpcjs_leaker_on_a_unix_socket_is_named_with_its_exact_counts(
        unix_run: UnixRun) -> None:
    """grpc-js's leaked clients, each with its own connection, paced: a leak under its
    pid beside grpcio's, with exactly its count open (the flagged list is checked above)."""
    if unix_run.js_leak is None:
        pytest.skip(f"no grpc-js leaker: {unix_run.js_missing}")
    entry = unix_run.by_pid[unix_run.js_leak.popen.pid]
    assert (entry["verdict"], entry["opened"], entry["open"], entry["closed"]) == \
        ("leak", JS_LEAKS, JS_LEAKS, 0), entry["reason"]
    assert entry["client"] == f"unix:{unix_run.path}" and entry["rpcs"] is None
    assert "grpcjs_client.js leak" in entry["process"], entry
    assert unix_run.js_pool is not None
    assert unix_run.by_pid[unix_run.js_pool.popen.pid]["open"] == 1


@pytest.mark.live
def test_metrics_serve_unix_connections_under_the_client_pid(unix_run: UnixRun) -> None:
    """--metrics beside --unix: each leaker's open and opened counts, exact, under its
    pid and the socket's client address; the early pool's one; the closer holds none."""
    s = unix_run.samples
    assert s is not None, "the agent's /metrics never answered"
    client = f"unix:{unix_run.path}"
    leakers = [(unix_run.leak, LEAKS)]
    if unix_run.js_leak is not None:
        leakers.append((unix_run.js_leak, JS_LEAKS))
    for proc, n in leakers:
        pid = proc.popen.pid
        assert ms.of_pid(s, "tracer_client_open_connections", pid, client=client) == n, \
            (proc.name, ms.names(s, "tracer_client_open_connections"))
        assert ms.of_pid(s, "tracer_client_connections_opened_total", pid) == n
        assert sum(ms.of_pid(s, "tracer_client_connections_closed_total", pid,
                             closed_by=who) or 0
                   for who in ("client", "server", "reset", "unknown")) == 0
        assert ms.of_pid(s, "tracer_client_idle_open_connections", pid) == 0
        age = ms.of_pid(s, "tracer_client_oldest_open_connection_age_seconds", pid)
        assert age is not None and 0 < age < DURATION, age
    assert ms.of_pid(s, "tracer_client_open_connections", unix_run.early.popen.pid) == 1
    assert ms.of_pid(s, "tracer_client_open_connections", unix_run.close.popen.pid) in (None, 0)
    # RPCs are not visible on a Unix socket: none counted for the leaker, never guessed.
    assert not ms.of_pid(s, "tracer_client_rpcs_total", unix_run.leak.popen.pid)


@pytest.mark.live
def test_abstract_name_and_beside_a_tcp_port(sock_dir: Path) -> None:
    ls.need_root()
    name = f"tracer-test-{os.getpid()}"
    db = sock_dir / "t.db"
    with ls.processes() as procs:
        start_unix_server(procs, f"unix-abstract:{name}", name="unix-server")
        port = ls.start_server(procs)
        capture = agent(procs, db, "--unix", f"@{name}", "--port", str(port))
        wait_ready(db, capture)
        time.sleep(1.0)
        unix_leak = grpcio(procs, "leak", f"unix-abstract:{name}", 5, interval=0.6)
        tcp_leak = grpcio(procs, "leak", f"127.0.0.1:{port}", 5, interval=0.3)
        pool = grpcio(procs, "pool", f"unix-abstract:{name}", 20, interval=0.3)
        rt.wait_done([unix_leak, tcp_leak, pool], timeout=DURATION - 3)
        wait_agent(capture)
        by_pid = clients_by_pid(db)
    u, t, p = by_pid[unix_leak.popen.pid], by_pid[tcp_leak.popen.pid], by_pid[pool.popen.pid]
    assert (u["verdict"], u["opened"], u["open"], u["client"]) == \
        ("leak", 5, 5, f"unix:@{name}"), u
    assert (t["verdict"], t["opened"], t["open"]) == ("leak", 5, 5), t
    assert t["rpcs"] == 5 and t.get("transport") is None
    assert p["verdict"] == "ok", p


@pytest.mark.live
def test_usage_errors_are_clear(tmp_path: Path) -> None:
    missing = tracer("capture", "--unix", str(tmp_path / "none.sock"), "--db",
                     str(tmp_path / "t.db"), "--duration", "1s", check=False)
    # a usage error, said before anything is printed or opened (as a missing --read file)
    assert missing.returncode == 2 and "Invalid value for --unix" in missing.stderr
    assert "cannot stat" in missing.stderr and "following" not in missing.stderr
    assert not (tmp_path / "t.db").exists()
    not_a_socket = tracer("capture", "--unix", __file__, "--db", str(tmp_path / "t.db"),
                          check=False)
    assert not_a_socket.returncode == 2 and "is not a socket" in not_a_socket.stderr
    neither = tracer("capture", "--db", str(tmp_path / "t.db"), check=False)
    assert neither.returncode == 2 and "--unix" in neither.stderr
    with_read = tracer("capture", "--read", "x.pcap", "--unix", "@a", check=False)
    assert with_read.returncode == 2


@pytest.mark.live
def test_a_frozen_unix_socket_server_is_explained(sock_dir: Path) -> None:
    """A grpcio server on a Unix socket at its RLIMIT_NOFILE (prlimit --nofile=64:64), a
    leaker that takes every descriptor it has left, then three clients that connect and wait
    in the listen queue: the report names the leaker and says the server holds 64 of 64
    descriptors while connections wait to be accepted, from the listener's samples (the
    queue and backlog unix_diag gives for it)."""
    import shutil

    ls.need_root()
    if shutil.which("prlimit") is None:
        pytest.skip("util-linux prlimit is not installed")
    limit = 64
    path = sock_dir / "s.sock"
    target = f"unix:{path}"
    db = sock_dir / "t.db"
    with ls.processes() as procs:
        server = procs.start("server", ["prlimit", f"--nofile={limit}:{limit}",
                                        *rt.grpcio_peer("server"), "0", "--bind", target,
                                        "--max-lifetime", "120"])
        server.wait_for("READY", time.monotonic() + rt.READY_TIMEOUT_S)
        server_pid = server.popen.pid  # prlimit execs the server: one pid
        capture = agent(procs, db, "--unix", str(path))
        wait_ready(db, capture)
        # Exactly the descriptors the server has left: one more would wait in the queue
        # and the leaker's RPC on it would fail.
        leaked = limit - len(os.listdir(f"/proc/{server_pid}/fd"))
        leak = grpcio(procs, "leak", target, leaked, interval=0.1)
        rt.wait_done([leak], timeout=DURATION - 6)
        ls.wait_for(lambda: len(os.listdir(f"/proc/{server_pid}/fd")) == limit,
                    "the server holds all its descriptors", timeout=5.0)
        # Three more clients connect and wait: the kernel holds them in the listen queue
        # (a Unix connect completes there) for a server that cannot accept them.
        waiting = []
        try:
            for _ in range(3):
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(path))
                waiting.append(s)
            ls.wait_for(lambda: ls.try_query(db, "SELECT 1 FROM server_samples WHERE"
                                                 " queue >= 3 AND fds >= fd_limit"),
                        "the agent sampled connections waiting", timeout=DURATION - 2)
        finally:
            for s in waiting:
                s.close()
        wait_agent(capture)
        leaker_pid = leak.popen.pid
    data = json.loads(tracer("report", "--db", str(db), "--format", "json").stdout)
    flagged = {c["pid"]: c for c in data["clients"] if c["verdict"] != "ok"}
    assert list(flagged) == [leaker_pid], data["clients"]
    assert (flagged[leaker_pid]["verdict"], flagged[leaker_pid]["open"]) == ("leak", leaked)
    s = data["server"]
    assert s["process"]["pid"] == server_pid, s["process"]
    assert (s["process"]["fd_limit"], s["process"]["fds_max"]) == (limit, limit), s["process"]
    queue = s["accept_queue"]
    assert queue["address"] == str(path) and queue["port"] == 0, queue
    assert queue["max"] >= 3 and queue["limit"] and queue["waiting_since"], queue
    assert s["stall"]["why"] == "fd_limit", s["stall"]
    text = tracer("report", "--db", str(db)).stdout
    assert f"    accept queue {path}: up to " in text, text
    assert f"holds {limit} of {limit} file descriptors" in text, text
