"""The freeze explained: a server out of file descriptors, its accept queue, the preface
timeouts, and the process that holds the descriptors.

What was measured here (grpcio 1.85 server, kernel 6.18) and what the live test rests on:
- grpcio listens with a backlog of net.core.somaxconn (4096 here): sock_diag reports the
  listener's accept queue now in idiag_rqueue and that maximum in idiag_wqueue;
  /proc/net/tcp6 shows the same accept queue in rx_queue (tx_queue is 0: the maximum is
  not there).
- A server at its RLIMIT_NOFILE (prlimit --nofile=64:64) logs "File descriptor limit
  reached. Retrying." every second and accepts nothing; the kernel still completes each
  new handshake into the accept queue, where the client's preface waits unread. A grpcio
  client with a 1 s connection timeout logs "connection attempt timed out before
  receiving SETTINGS frame"; each failed call left one or two connections in the queue
  (grpcio tries again once within the call), which stay there (CLOSE-WAIT) after the
  client gave up: 3 calls, 5 or 6 waiting of 4096.
- With a small backlog (somaxconn 8 in a network namespace) the queue holds 9 (one more
  than its maximum); then the kernel drops new SYNs (TcpExtListenOverflows): the clients
  stay in SYN-SENT and fail with "connect() timed out".

The live test needs root (capture), util-linux prlimit and the grpcio peers; about 15 s.
The other tests (parsers, the explanation from crafted samples) need neither.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import tracer, wait_for

from store.queries import server_health, timeline
from store.retention import prune
from store.schema import open_database
from store.server import HEARTBEAT_S, ServerSampleWriter
from store.writer import CaptureWriter
from tracer.attribution.server import (
    Listener,
    ListenerDiag,
    ServerReader,
    ServerSample,
    parse_limits,
    parse_listeners,
    stopped_state,
)

FD_LIMIT = 64  # the server's RLIMIT_NOFILE in the live test
DIALS = 3
AGENT_MAX_S = 40  # the agent's --duration: a bound; the test stops it when it has seen enough
T0 = 1_800_000_000.0  # crafted samples' times


# -- parsers ---------------------------------------------------------------------------

LIMITS = """Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max processes             63428                63428                processes
Max open files            1024                 524288               files
Max locked memory         8388608              8388608              bytes
"""


def test_parse_limits() -> None:
    assert parse_limits(LIMITS) == (1024, 524288)
    unlimited = LIMITS.replace("1024                 524288", "unlimited            unlimited")
    assert parse_limits(unlimited) == (None, None)
    assert parse_limits("Limit  Soft Limit  Hard Limit  Units\n") is None
    with open("/proc/self/limits") as f:
        assert parse_limits(f.read()) == resource.getrlimit(resource.RLIMIT_NOFILE)


TCP6 = """  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:91A7 00000000000000000000000000000000:0000 0A 00000000:00000006 00:00000000 00000000     0        0 607121 1 0000000019d1827c 100 0 0 10 0
   1: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000002 00:00000000 00000000     0        0 607122 1 0000000019d1827c 100 0 0 10 0
  57: 0000000000000000FFFF00000100007F:91A7 0000000000000000FFFF00000100007F:89FE 01 00000000:00000009 00:00000000 00000000     0        0 611423 1 00000000b1ca8be0 20 4 23 15 -1
"""  # noqa: E501 - /proc/net/tcp6 as the kernel writes it
TCP4 = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:91A7 00000000:0000 0A 00000000:00000081 00:00000000 00000000     0        0 5001 1 0000000000000000 100 0 0 10 0
"""  # noqa: E501 - /proc/net/tcp as the kernel writes it


def test_parse_listen_queue_from_proc_net_tcp() -> None:
    """A LISTEN line's rx_queue is its accept queue; its maximum is not in the table."""
    [v6] = parse_listeners(TCP6, True, 7, frozenset({0x91A7}))
    assert v6 == Listener("::", 0x91A7, 607121, 7, 6, None)  # the ESTABLISHED one is not
    [v4] = parse_listeners(TCP4, False, 7, frozenset({0x91A7}))
    assert (v4.address, v4.queue, v4.queue_max, v4.inode) == ("127.0.0.1", 0x81, None, 5001)
    assert parse_listeners(TCP6, True, 7, frozenset({1})) == []


def test_stopped_state() -> None:
    assert stopped_state("812 (flint lockd) T 1 812 812 0 -1") is True
    assert stopped_state("812 (a) b) S 1 812 812 0 -1") is False
    with open("/proc/self/stat") as f:
        assert stopped_state(f.read()) is False


def test_listen_queue_of_a_real_socket() -> None:
    """sock_diag and /proc agree on a listener's accept queue; sock_diag also gives its
    maximum (the backlog); the reader finds this process holding it."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        port = server.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            diag = ListenerDiag()
            try:
                [entry] = diag.listeners(frozenset({port}))
            finally:
                diag.close()
            assert (entry.address, entry.port, entry.queue, entry.queue_max) == \
                ("127.0.0.1", port, 3, 5)
            with open("/proc/self/net/tcp") as f:
                [from_proc] = parse_listeners(f.read(), False, entry.netns, frozenset({port}))
            assert (from_proc.inode, from_proc.queue, from_proc.queue_max) == \
                (entry.inode, 3, None)
            reader = ServerReader(frozenset({port}))
            try:
                [sample] = reader.read()
                again = reader.read()  # the holder is cached, checked with one readlink
                started = time.perf_counter()
                for _ in range(20):
                    reader.read()
                per_read = (time.perf_counter() - started) / 20
            finally:
                reader.close()
            assert sample.pid == os.getpid() and sample.listener.queue == 3, sample
            assert sample.fd_limit == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            assert sample.fds is not None and sample.fds >= 5 and not sample.stopped
            assert again[0].pid == os.getpid()
            assert per_read < 0.02, f"a read took {per_read * 1e3:.1f} ms"
        finally:
            for c in clients:
                c.close()


# -- the explanation, from crafted samples ----------------------------------------------


def _sample(queue: int, fds: int | None, *, queue_max: int | None = 4096,
            fd_limit: int | None = 64, pid: int | None = 812, inode: int = 9,
            stopped: bool = False) -> ServerSample:
    return ServerSample(Listener("::", 9090, inode, 1, queue, queue_max), pid,
                        T0 - 1000 if pid is not None else None,
                        "flintlockd" if pid is not None else None,
                        "flintlockd --port 9090" if pid is not None else None,
                        fds, fd_limit, stopped)


def _database(tmp_path: Path, timeline_of: list[tuple[float, ServerSample]],
              leaked: int = 0, timeouts: int = 0, end: float = T0 + 60) -> Any:
    """A database with one live capture [T0, end], the server samples given, ``leaked``
    idle connections from pid 4321 opened at T0+1, and ``timeouts`` connections from pid
    5555 that sent their preface at T0+30 and never got the server's SETTINGS."""
    db = open_database(str(tmp_path / "crafted.db"))
    writer = CaptureWriter.start(db, kind="live", ports=[9090], interface="lo")
    samples = ServerSampleWriter(db, writer.capture_id)
    for ts, sample in timeline_of:
        samples.add(ts, [sample])
    samples.flush()
    rows = [(f"L{i}", T0 + 1, "127.0.0.1", 40000 + i, 4321, None, None) for i in range(leaked)]
    rows += [(f"D{i}", T0 + 30 + i, "127.0.0.1", 50000 + i, 5555, T0 + 30.01 + i, T0 + 31 + i)
             for i in range(timeouts)]
    with db.conn:
        for uid, ts, host, port, pid, preface, close in rows:
            db.conn.execute(
                "INSERT INTO connections (uid, capture_id, ts, syn_ts, orig_h, orig_p, resp_h,"
                " resp_p, pid, process_start, preface_ts, close_ts, is_open, mid_stream,"
                " streams) VALUES (?, ?, ?, ?, ?, ?, '127.0.0.1', 9090, ?, ?, ?, ?, ?, 0, 1)",
                [uid, writer.capture_id, ts, ts, host, port, pid, 1.0, preface, close,
                 int(close is None)])
        db.conn.execute("INSERT INTO processes (pid, start_time, comm, cmdline) VALUES"
                        " (4321, 1.0, 'leaky', 'leaky --dial-per-call')")
    writer.update_progress(packets=1, segments=1, first_ts=T0, last_ts=end, drops=0)
    return db


def test_fds_at_limit_and_connections_waiting_explain_the_preface_timeouts(
        tmp_path: Path) -> None:
    steps = [(T0 + i, _sample(0, 10 + i)) for i in range(5)]
    steps += [(T0 + 5 + i, _sample(0, 64)) for i in range(25)]  # at the limit from T0+5
    steps += [(T0 + 30 + i, _sample(min(1 + i, 6), 64)) for i in range(31)]  # queue from +30
    db = _database(tmp_path, steps, leaked=54, timeouts=2)
    s = server_health(db, preface_timeout=0.8)
    assert s["preface_timeouts"] == 2
    proc = s["process"]
    assert (proc["pid"], proc["comm"], proc["fd_limit"], proc["fds_max"]) == \
        (812, "flintlockd", 64, 64)
    assert proc["at_limit_since"] == T0 + 5 and proc["at_limit_until"] is None
    queue = s["accept_queue"]
    assert (queue["limit"], queue["max"], queue["last"]) == (4096, 6, 6)
    assert queue["waiting_since"] == T0 + 30 and queue["full_since"] is None
    stall = s["stall"]
    assert (stall["why"], stall["since"], stall["until"], stall["preface_timeouts"]) == \
        ("fd_limit", T0 + 30, None, 2)
    assert stall["top_client"] == {"client": "pid 4321", "pid": 4321, "process": "leaky",
                                   "open": 54}
    text = s["explanation"]
    assert text.startswith("server pid 812 (flintlockd) holds 64 of 64 file descriptors "
                           "since "), text
    assert "accept queue up to 6 waiting (backlog 4,096) since" in text, text
    assert "new connections are not accepted (no descriptor left to accept them with)" in text
    assert "that is the preface timeout (2 of 2 in this window)" in text, text
    assert text.endswith("pid 4321 (leaky) holds 54 of them (its open connections to the "
                         "server)"), text
    # Before the queue filled, there was no stall to speak of.
    early = server_health(db, preface_timeout=0.8, until=T0 + 20)
    assert early["stall"] is None and "not accepted" not in early["explanation"]
    assert "holds 64 of 64 file descriptors" in early["explanation"]
    # A window that starts within: the state there comes from the row before it, and it
    # held from the window's start "at least".
    late = server_health(db, preface_timeout=0.8, since=T0 + 40.5)
    assert late["process"]["at_limit_since"] == T0 + 40.5, late["process"]
    assert late["process"]["at_limit_at_first_sample"] is True
    assert "holds 64 of 64 file descriptors since at least " in late["explanation"]


def test_full_accept_queue(tmp_path: Path) -> None:
    steps = [(T0 + i, _sample(min(i, 9), 64, queue_max=8)) for i in range(20)]
    db = _database(tmp_path, steps)
    s = server_health(db, preface_timeout=0.8)
    queue = s["accept_queue"]
    assert (queue["max"], queue["limit"], queue["full_since"], queue["full_until"]) == \
        (9, 8, T0 + 8, None)
    assert "accept queue full, 9 of 8 since" in s["explanation"], s["explanation"]
    assert "the kernel drops new SYNs" in s["explanation"]


def test_neither_limit_nor_queue(tmp_path: Path) -> None:
    """A healthy server: what was seen, no cause claimed."""
    steps = [(T0 + i, _sample(0, 100 + (i % 3), fd_limit=1024)) for i in range(60)]
    db = _database(tmp_path, steps, timeouts=2)
    s = server_health(db, preface_timeout=0.8)
    assert s["stall"] is None and s["process"]["at_limit_since"] is None
    text = s["explanation"]
    assert text.startswith("server pid 812 (flintlockd) holds at most 102 of 1,024 file "
                           "descriptors; accept queue empty at every sample"), text
    assert "not accepted" not in text and "2 preface timeouts have another cause" in text


def test_stopped_server(tmp_path: Path) -> None:
    steps = [(T0 + i, _sample(i // 2, 20, stopped=i >= 2)) for i in range(20)]
    s = server_health(_database(tmp_path, steps), preface_timeout=0.8)
    assert s["stall"]["why"] == "stopped", s["stall"]
    assert "stopped (SIGSTOP) since" in s["explanation"]
    assert "new connections are not accepted (the process is stopped)" in s["explanation"]


def test_server_not_on_this_host_says_nothing(tmp_path: Path) -> None:
    db = _database(tmp_path, [], leaked=5, timeouts=2)
    s = server_health(db, preface_timeout=0.8)
    assert s["preface_timeouts"] == 2
    assert (s["process"], s["accept_queue"], s["stall"], s["explanation"]) == \
        (None, None, None, None)
    assert timeline(db, bucket=10.0)["server"] is None
    # A database from before the samples existed (the reader never migrates).
    with db.conn:
        db.conn.execute("DROP TABLE server_samples")
        db.conn.execute("DROP TABLE server_processes")
    assert server_health(db, preface_timeout=0.8)["explanation"] is None
    assert timeline(db, bucket=10.0)["server"] is None


def test_listener_nobody_holds(tmp_path: Path) -> None:
    steps = [(T0 + i, _sample(2, None, pid=None, fd_limit=None)) for i in range(5)]
    s = server_health(_database(tmp_path, steps), preface_timeout=0.8)
    assert s["process"] is None and s["accept_queue"]["max"] == 2
    assert s["explanation"].startswith("server listener [::]:9090 (no process found holding it)")


def test_samples_are_stored_when_something_changes(tmp_path: Path) -> None:
    db = open_database(str(tmp_path / "d.db"))
    writer = CaptureWriter.start(db, kind="live", ports=[9090])
    samples = ServerSampleWriter(db, writer.capture_id)
    for i in range(120):  # two minutes of a steady server: a row, then heartbeats
        samples.add(T0 + i, [_sample(0, 500 + i % 5, fd_limit=1024)])
    steady = samples.rows
    assert steady == 1 + int(119 // HEARTBEAT_S), steady
    samples.add(T0 + 120, [_sample(1, 500, fd_limit=1024)])  # the queue moved: a row
    samples.add(T0 + 121, [_sample(1, 530, fd_limit=1024)])  # fds by >= 1% of the limit
    assert samples.rows == steady + 2
    samples.add(T0 + 122, [_sample(1, 531, fd_limit=1024)])
    assert samples.rows == steady + 2
    samples.flush()  # the capture ends: its last state
    assert samples.rows == steady + 3
    samples.add(T0 + 130, [])  # the listener is gone
    assert db.execute("SELECT COUNT(*) FROM server_samples").fetchone()[0] == steady + 3
    # Retention drops samples older than its cutoff.
    writer.update_progress(packets=0, segments=0, first_ts=T0, last_ts=T0 + 130, drops=0)
    prune(db, older_than_s=70.0)
    left = [r[0] for r in db.execute("SELECT ts FROM server_samples ORDER BY ts")]
    assert left and min(left) >= T0 + 60, left


def test_timeline_series(tmp_path: Path) -> None:
    steps = [(T0 + i, _sample(3 if i >= 40 else 0, 30 + i if i < 34 else 64))
             for i in range(60)]
    data = timeline(_database(tmp_path, steps), bucket=10.0)
    server = data["server"]
    assert server["pid"] == 812
    assert server["fds"][:6] == [39, 49, 59, 64, 64, 64], server["fds"]
    assert server["fd_limit"][:6] == [64] * 6
    assert server["accept_queue"][:6] == [0, 0, 0, 0, 3, 3], server["accept_queue"]
    assert server["accept_queue_max"][0] == 4096


# -- live: a grpcio server out of descriptors --------------------------------------------


@dataclass
class Freeze:
    server_pid: int
    leaker_pid: int
    leaked: int
    db: Path
    dial_log: str
    report: dict[str, Any]
    text: str
    timeline: dict[str, Any]
    somaxconn: int


@pytest.fixture(scope="module")
def freeze(tmp_path_factory: pytest.TempPathFactory) -> Freeze:
    import live_support as ls
    import realtraffic_support as rt

    ls.need_root()
    if shutil.which("prlimit") is None:
        pytest.skip("util-linux prlimit is not installed")
    work = tmp_path_factory.mktemp("freeze")
    db, dial_log = work / "freeze.db", work / "dialer.log"
    with ls.processes() as processes:
        server = processes.start("server", [
            "prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", *rt.grpcio_peer("server"), "0",
            "--max-lifetime", "60"])
        port = rt.ready_port(server)
        server_pid = server.popen.pid  # setpriv and prlimit exec the server: one pid
        with open(f"/proc/{server_pid}/limits") as f:
            assert parse_limits(f.read()) == (FD_LIMIT, FD_LIMIT)
        # Exactly enough connections to take every descriptor the server has left: one
        # more would wait in the accept queue and the leaker's RPC on it would fail.
        leaked = FD_LIMIT - len(os.listdir(f"/proc/{server_pid}/fd"))
        target = f"127.0.0.1:{port}"
        agent = ls.Agent(processes, db, port, "--iface", "lo", "--duration", f"{AGENT_MAX_S}s")
        agent.wait_ready()
        leaker = processes.start("leaker", [*rt.grpcio_peer("client"), "leak", "--target",
                                            target, "--count", str(leaked),
                                            "--max-lifetime", "60"])
        leaker.wait_for("DONE", time.monotonic() + rt.CLIENTS_TIMEOUT_S)
        wait_for(lambda: len(os.listdir(f"/proc/{server_pid}/fd")) == FD_LIMIT,
                 "the server holds all its descriptors", timeout=10.0)
        dialer = processes.start("dialer", [
            *rt.grpcio_peer("client"), "dial", "--target", target,
            "--count", str(DIALS), "--interval", "0.3", "--connect-timeout", "1",
            "--log", str(dial_log), "--max-lifetime", "0"])
        dialer.wait_for("DONE", time.monotonic() + rt.CLIENTS_TIMEOUT_S)
        dialer.popen.wait(rt.STOP_TIMEOUT_S)  # --max-lifetime 0: it ends, closing its sockets
        # The agent has sampled the queue holding all the dialer's connections. A row is
        # written only when something changed, so wait for the first such row, then for
        # one more sample (kept pending, and written when the capture ends).
        agent.wait_for_rows(
            "SELECT MAX(queue) AS q FROM server_samples WHERE queue >= ? AND fds >= fd_limit",
            [DIALS], lambda rows: rows and rows[0]["q"] is not None,
            "the agent sampled the waiting connections")
        time.sleep(1.5)  # SERVER_SAMPLE_INTERVAL is 1 s
        agent.require_time_left(AGENT_MAX_S)
        os.kill(agent.pid, signal.SIGINT)
        assert agent.wait_exit() == 0, agent.output()
        leaker_pid = leaker.popen.pid
    report = json.loads(tracer("report", "--db", str(db), "--format", "json",
                               "--preface-timeout", "0.8").stdout)
    text = tracer("report", "--db", str(db), "--preface-timeout", "0.8").stdout
    series = json.loads(tracer("timeline", "--db", str(db), "--bucket", "2s",
                               "--format", "json").stdout)
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    return Freeze(server_pid, leaker_pid, leaked, db, dial_log.read_text(), report, text,
                  series, somaxconn)


@pytest.mark.live
def test_freeze_report_names_the_leaker_and_explains_the_server(freeze: Freeze) -> None:
    data = freeze.report
    # The leaker comes first, and only the leaker is flagged: the dialer's last
    # connections, never accepted, may still be open at the end, but the server never
    # answered them (victims, not left behind).
    leak = data["clients"][0]
    assert (leak["pid"], leak["verdict"], leak["open"]) == \
        (freeze.leaker_pid, "leak", freeze.leaked), data["clients"]
    assert all(c["verdict"] == "ok" for c in data["clients"][1:]), data["clients"]
    # The dialer's clients saw what the issue describes, in grpcio's words.
    assert freeze.dial_log.count("timed out before receiving SETTINGS frame") == DIALS
    s = data["server"]
    assert s["preface_timeouts"] >= DIALS, s
    proc = s["process"]
    assert proc["pid"] == freeze.server_pid, proc
    assert (proc["fd_limit"], proc["fds_max"]) == (FD_LIMIT, FD_LIMIT), proc
    assert proc["at_limit_since"] is not None and "grpcio_server.py" in proc["cmdline"]
    queue = s["accept_queue"]
    # grpcio listens with the kernel's somaxconn as its backlog: never full here.
    assert queue["limit"] == freeze.somaxconn, queue
    assert queue["max"] >= DIALS and queue["waiting_since"] is not None, queue
    assert queue["full_since"] is None, queue
    stall = s["stall"]
    assert stall["why"] == "fd_limit" and stall["preface_timeouts"] >= DIALS, stall
    assert stall["top_client"]["pid"] == freeze.leaker_pid, stall
    assert stall["top_client"]["open"] == freeze.leaked, stall
    text = s["explanation"]
    assert text.startswith(f"server pid {freeze.server_pid} (python") and \
        f"holds {FD_LIMIT} of {FD_LIMIT} file descriptors since" in text, text
    assert f"accept queue up to {queue['max']} waiting (backlog {freeze.somaxconn:,})" in text
    assert "new connections are not accepted (no descriptor left to accept them with), so " \
        "no SETTINGS comes back: that is the preface timeout" in text, text
    assert f"pid {freeze.leaker_pid} (python" in text and \
        f"holds {freeze.leaked} of them" in text, text
    # The text report says it after the clients table, within 100 columns.
    why = freeze.text[freeze.text.index("  why: "):]
    assert f"server pid {freeze.server_pid}" in why, freeze.text
    facts = freeze.text[freeze.text.index(f"  server pid {freeze.server_pid}: "):]
    assert f"    file descriptors: up to {FD_LIMIT} of {FD_LIMIT}; at the limit" in facts
    assert f"    accept queue [::]:{queue['port']}: up to {queue['max']} waiting of " \
        f"{freeze.somaxconn:,}; not empty" in facts, facts
    assert all(len(line) <= 100 for line in facts.splitlines()), facts


@pytest.mark.live
def test_freeze_timeline_has_the_server_series(freeze: Freeze, tmp_path: Path) -> None:
    server = freeze.timeline["server"]
    assert server["pid"] == freeze.server_pid, server
    assert max(v or 0 for v in server["fds"]) == FD_LIMIT
    assert {v for v in server["fd_limit"] if v is not None} == {FD_LIMIT}
    assert max(v or 0 for v in server["accept_queue"]) >= DIALS
    pytest.importorskip("matplotlib")
    plot = tmp_path / "freeze.png"
    tracer("timeline", "--db", str(freeze.db), "--bucket", "2s", "--plot", str(plot))
    assert plot.stat().st_size > 10_000


@pytest.mark.live
def test_the_freeze_demo_reruns_the_readme_session(tmp_path: Path) -> None:
    """`tracer demo --freeze` is the README's "Diagnosing a freeze" session, made from what
    ships with tracer (cli.demo_peers): its report names the leaker alone, finds the server
    out of descriptors, and lines the dialers' logs (one JSON, one logfmt) up with it."""
    import live_support as ls

    ls.need_root()
    db = tmp_path / "freeze.db"
    run = tracer("demo", "--freeze", "--duration", "20s", "--db", db, timeout=120)
    assert "demo --freeze: found it: pid" in run.stdout, run.stdout
    assert "$ tracer report --db" in run.stdout and "\n  why: server pid" in run.stdout
    data = json.loads(tracer("report", "--db", db, "--format", "json",
                             "--preface-timeout", "2s").stdout)
    [leak] = [c for c in data["clients"] if c["verdict"] == "leak"]
    assert "cli.demo_peers leak" in leak["process"] and leak["closed"] == 0, leak
    s = data["server"]
    assert s["stall"]["why"] == "fd_limit" and s["stall"]["top_client"]["pid"] == leak["pid"]
    assert "--max-fds 64" in s["process"]["cmdline"]
    assert (s["process"]["fd_limit"], s["process"]["fds_max"]) == (64, 64)
    dialers = {c["pid"] for c in data["clients"] if "cli.demo_peers dial" in (c["process"] or "")}
    evidence = data["log_evidence"]
    assert len(dialers) == 2 and {e["pid"] for e in evidence} == dialers, evidence
    logs = json.loads(tracer("logs", "list", "--db", db, "--format", "json").stdout)
    assert sorted(source["format"] for source in logs) == ["json", "logfmt"], logs
