"""Diagnosis scenarios with real processes: who must be flagged, and who must never be.

Each scenario runs a grpcio server and clients (python -m cli.demo_peers) on loopback,
captures them live with attribution, and reads the report as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import realtraffic_support as rt
from support import REPO, free_port, need_root, skip_if, tracer, tracer_command

pytestmark = [pytest.mark.live]

need_root("live capture")


def peer(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli.demo_peers", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def server_factory() -> Iterator[object]:
    started: list[subprocess.Popen[str]] = []

    def start(*options: str) -> int:
        port = free_port()
        args = ["server", str(port)]
        for o in options:
            args += ["--option", o]
        proc = peer(*args)
        started.append(proc)
        assert proc.stdout is not None
        assert "READY" in proc.stdout.readline()
        return port

    yield start
    for proc in started:
        stop(proc)


def capture(port: int, db: Path, seconds: float, clients: list[list[str]]) -> dict[int, str]:
    """Run the agent for ``seconds`` while ``clients`` run; return pid -> mode."""
    agent = subprocess.Popen(
        [*tracer_command(), "capture", "--port", str(port), "--iface", "lo", "--db", str(db),
         "--duration", f"{seconds}s", "-q"], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    procs = [peer(*c) for c in clients]
    try:
        agent.wait(timeout=seconds + 30)
    finally:
        for p in procs:
            stop(p)
        stop(agent)
    assert agent.returncode == 0, agent.stderr.read() if agent.stderr else ""
    return {p.pid: c[0] for p, c in zip(procs, clients, strict=True)}


def test_recycled_and_pinging_connections_are_not_leaks(server_factory, tmp_path: Path) -> None:
    """A server with max-connection-age (GOAWAY churn) and clients with keepalive PINGs:
    connections come and go and ping all the time; nobody leaks and nobody is flagged."""
    port = server_factory("grpc.max_connection_age_ms=1500",
                          "grpc.max_connection_age_grace_ms=500",
                          "grpc.keepalive_permit_without_calls=1",
                          "grpc.http2.min_ping_interval_without_data_ms=500")
    target = f"127.0.0.1:{port}"
    keepalive = ["--option", "grpc.keepalive_time_ms=1000",
                 "--option", "grpc.keepalive_permit_without_calls=1",
                 "--option", "grpc.http2.max_pings_without_data=0"]
    db = tmp_path / "recycle.db"
    pids = capture(port, db, 9.0, [
        ["pool", target, "--interval", "0.3", *keepalive],
        ["pool", target, "--interval", "0.5"],
        ["close", target, "--interval", "0.5"],
    ])
    data = json.loads(tracer("report", "--db", str(db), "--format", "json").stdout)
    flagged = [c for c in data["clients"] if c["verdict"] != "ok"]
    assert flagged == [], flagged
    pooled = [c for c in data["clients"] if pids.get(c["pid"]) == "pool"]
    assert len(pooled) == 2
    # The server recycled the pooled clients' connections with GOAWAYs, and they carried on.
    assert sum(c["closed_by"]["goaway"] for c in pooled) >= 2, pooled
    assert data["server"]["goaways"]["server"] >= 2
    assert all(c["open"] <= 1 for c in pooled)
    con_pings = json.loads(tracer("connections", "--db", str(db), "--format", "json").stdout)
    assert sum(r["pings_orig"] for r in con_pings) >= 3  # keepalives seen


def test_leaker_among_pooled_closing_and_health_checks(server_factory, tmp_path: Path) -> None:
    """Only the leaking process is a leak; the pool, the closer and TCP health checks
    (connect, no HTTP/2, close) are not, and the health checks are counted as such."""
    port = server_factory()
    target = f"127.0.0.1:{port}"
    db = tmp_path / "mix.db"
    pids = capture(port, db, 7.0, [["leak", target, "--interval", "0.3"],
                                   ["pool", target, "--interval", "0.3"],
                                   ["close", target, "--interval", "0.3"],
                                   ["check", target, "--interval", "0.5", "--lifetime", "2.6"]])
    data = json.loads(tracer("report", "--db", str(db), "--format", "json").stdout)
    leaks = [c for c in data["clients"] if c["verdict"] == "leak"]
    assert [pids.get(c["pid"]) for c in leaks] == ["leak"], leaks
    assert all(c["verdict"] == "ok" for c in data["clients"] if c not in leaks)
    [checker] = [c for c in data["clients"] if pids.get(c["pid"]) == "check"]
    assert checker["health_checks"] >= 1 and checker["opened"] == 0, checker
    # A check lasts a millisecond: some are gone before a scan finds their socket, and
    # count under the address instead (attribution = closed_before_attribution).
    unattributed = [c for c in data["clients"] if c["pid"] is None]
    assert checker["health_checks"] + sum(c["health_checks"] for c in unattributed) >= 4, \
        data["clients"]
    # --fail-on-leak makes it an exit status.
    assert tracer("report", "--db", str(db), "--fail-on-leak", check=False).returncode == 1


def test_stopped_server_preface_timeouts_lined_up_with_client_logs(server_factory,
                                                                    tmp_path: Path) -> None:
    """The server process is SIGSTOPped: the kernel still completes handshakes, clients send
    their preface and get no SETTINGS. A grpcio client (1 s connection timeout) and a
    @grpc/grpc-js client (1.5 s deadline) dial and log the failures in their library's own
    words. The report finds the preface timeouts, and `tracer correlate` lines every log
    line up with a connection of the same process that never got the server's preface."""
    skip_if(rt.grpcjs_unavailable_reason())
    port = server_factory()
    target = f"127.0.0.1:{port}"
    db = tmp_path / "stopped.db"
    py_log, js_log = tmp_path / "dialer-py.log", tmp_path / "dialer-js.log"
    server_pid = _listener_pid(port)
    agent = subprocess.Popen(
        [*tracer_command(), "capture", "--port", str(port), "--iface", "lo", "--db", str(db),
         "--duration", "9s", "-q"], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    clients: list[subprocess.Popen[str]] = []
    try:
        time.sleep(1.0)
        os.kill(server_pid, signal.SIGSTOP)
        clients = [
            subprocess.Popen([sys.executable, str(rt.PEERS_DIR / "grpcio_client.py"), "dial",
                              "--target", target, "--count", "3", "--interval", "0.3",
                              "--connect-timeout", "1", "--log", str(py_log),
                              "--max-lifetime", "0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True),
            subprocess.Popen(["node", str(rt.PEERS_DIR / "grpcjs_client.js"), "dial",
                              "--target", target, "--count", "3", "--interval", "0.3",
                              "--deadline", "1.5", "--log", str(js_log),
                              "--max-lifetime", "0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True),
        ]
        for c in clients:
            c.wait(timeout=30)
        agent.wait(timeout=40)
    finally:
        os.kill(server_pid, signal.SIGCONT)
        for c in clients:
            stop(c)
        stop(agent)
    assert agent.returncode == 0, agent.stderr.read() if agent.stderr else ""
    pids = {clients[0].pid: "grpcio", clients[1].pid: "grpc-js"}

    data = json.loads(tracer("report", "--db", str(db), "--format", "json",
                             "--preface-timeout", "0.8").stdout)
    server = data["server"]
    assert server["preface_timeouts"] >= 6, server
    by_pid = {c["pid"]: c for c in data["clients"] if c["pid"] in pids}
    assert set(by_pid) == set(pids), data["clients"]
    assert all(c["verdict"] == "ok" for c in by_pid.values()), by_pid  # they closed theirs
    moments = server["preface_timeout_moments"]
    assert moments and {m["pid"] for m in moments} <= set(pids), moments

    # The clients' own log lines, lined up with those connections.
    added = tracer("logs", "add", str(py_log), str(js_log), "--db", str(db))
    assert "6" in added.stdout + added.stderr, added
    corr = json.loads(tracer("correlate", "--db", str(db), "--window", "3s",
                             "--format", "json").stdout)
    assert corr["matched"] == 6, corr
    # Each client's failure, named by the words its library uses.
    words = {"grpcio": "timed out before receiving SETTINGS frame",
             "grpc-js": "deadline exceeded"}
    for line in corr["lines"]:
        kind = pids[line["pid"]]
        assert line["match"].lower().replace("_", " ") == words[kind].lower(), line
        own = [c for c in line["connections"] if "same pid" in c["why"]]
        assert own, line
        # The connection that failed: its preface sent, no server SETTINGS, closed by the
        # client within a second or two before the line was written.
        assert any("no server preface" in c["at_line"] and c["preface_ts"] is not None
                   and c["server_settings_ts"] is None and c["pid"] == line["pid"]
                   for c in own), own
    evidence = json.loads(tracer("report", "--db", str(db), "--format", "json",
                                 "--preface-timeout", "0.8").stdout)["log_evidence"]
    assert {e["pid"] for e in evidence} == set(pids), evidence
    assert all(e["lines"] == 3 and e["preface_timeouts_nearby"] >= 1 for e in evidence), evidence
    table = tracer("report", "--db", str(db), "--preface-timeout", "0.8").stdout
    assert "log evidence" in table and "3 '" in table, table


def _listener_pid(port: int) -> int:
    """The pid listening on 127.0.0.1:port (the fixture's server)."""
    import psutil

    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    raise AssertionError(f"nobody listens on port {port}")
