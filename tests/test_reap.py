"""`tracer reap` against a real leak: a grpcio server here, a grpcio client in a network
namespace of its own (another host, on a veth pair) that opens a channel per call and
never closes one, keeping its first connection busy, and the live agent writing the
database. The kernel's socket tables are the ground truth of what was closed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import live_support as live
import netns
import realtraffic_support as rt
from support import DEMO_CAPTURE, skip_if, tracer, wait_for

from tracer.attribution.sockdiag import SockDiag

LEAKED = 8  # connections the leaker opens (its first one stays busy)
REAP = ("--older-than", "1s", "--idle", "3s")
DB_TIMEOUT_S = 15.0


def setup_module() -> None:
    live.need_root()
    skip_if(netns.unavailable_reason())


def server_sockets(port: int) -> set[tuple[str, int]]:
    """The client ends (address, port) of the server's established sockets here."""
    diag = SockDiag()
    try:
        return {s.remote for s in diag.sockets(frozenset({port}))
                if s.state == 1 and s.local[1] == port}
    finally:
        diag.close()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Scene:
    """Server, agent and leaker, running."""

    def __init__(self, procs: rt.Processes, host: netns.Host, db: Path, count: int,
                 busy: bool) -> None:
        self.db = db
        self.host = host
        self.server = procs.start("server", [*rt.grpcio_peer("server"), "0",
                                             "--max-lifetime", "120"])
        self.port = rt.ready_port(self.server)
        # The client "host" runs something before the agent starts, as a host does (the
        # agent then knows its namespace and its address before the first connection).
        procs.start("resident", host.command(["sleep", "110"]))
        self.agent = live.Agent(procs, db, self.port, "--iface", host.root_if,
                                "--duration", "120")
        self.agent.wait_ready()
        argv = [*rt.grpcio_peer("client"), "leak", "--target", f"{host.gateway}:{self.port}",
                "--count", str(count), "--interval", "0.5", "--max-lifetime", "100"]
        self.leaker = procs.start("leaker", [*host.command(argv), *(["--keep-busy"] if busy
                                                                      else [])])
        self.leaker.wait_for("DONE", time.monotonic() + rt.CLIENTS_TIMEOUT_S)
        self.pid = self.leaker.popen.pid
        self.agent.wait_for_rows(
            "SELECT uid FROM connections WHERE is_open = 1 AND pid = ?", [self.pid],
            lambda rows: len(rows) == count, f"{count} open connections of the leaker",
            timeout=DB_TIMEOUT_S)

    def reap(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return tracer("reap", "--db", self.db, "--client", str(self.pid), *REAP, *args,
                      check=check)

    def client_ports(self) -> set[int]:
        return live.client_ports(self.pid, self.port)


def test_reap_closes_the_idle_leaked_connections_and_never_the_busy_one(tmp_path: Path) -> None:
    with live.processes() as procs, netns.hosts(1) as (host,):
        s = Scene(procs, host, tmp_path / "tracer.db", LEAKED, busy=True)
        time.sleep(3.5)  # the leaked ones idle for --idle; the busy one carries an RPC/0.5s
        before = server_sockets(s.port)
        assert len(before) == LEAKED
        ports = s.client_ports()
        assert len(ports) == LEAKED

        listed = json.loads(s.reap("--format", "json").stdout)
        assert listed["stale"] is None and not listed["closing"]
        assert len(listed["candidates"]) == LEAKED - 1
        busy = [e for e in listed["excluded"] if "active within --idle" in e["reason"]]
        assert len(busy) == 1, listed["excluded"]
        busy_port = busy[0]["client_port"]
        assert {c["client_port"] for c in listed["candidates"]} == ports - {busy_port}
        assert all(c["server_socket"] and c["client_socket"] for c in listed["candidates"])
        assert server_sockets(s.port) == before  # a dry run closes nothing
        assert s.client_ports() == ports

        fds = fd_count(s.server.popen.pid)
        started = time.monotonic()
        done = s.reap("--yes")
        took = time.monotonic() - started
        assert f"closed {LEAKED - 1}, already gone 0, failed 0" in done.stdout, done.stdout
        # The kernel: only the busy connection is left, on both ends.
        assert server_sockets(s.port) == {(host.ip, busy_port)}
        wait_for(s.client_ports, "the leaker's channels saw the resets",
                 until=lambda p: p == {busy_port}, timeout=5.0)
        wait_for(lambda: fd_count(s.server.popen.pid), "the server closed its descriptors",
                 until=lambda n: n <= fds - (LEAKED - 1), timeout=5.0)
        print(f"reap --yes of {LEAKED - 1} connections: {took:.2f}s")

        rows = live.query(s.db, "SELECT * FROM reaps ORDER BY id")
        assert [r["result"] for r in rows] == ["closed"] * (LEAKED - 1)
        assert {r["orig_p"] for r in rows} == ports - {busy_port}
        assert all(r["pid"] == s.pid and r["by_uid"] == 0 for r in rows)
        # The agent sees the RSTs; the busy connection goes on working.
        s.agent.wait_for_rows(
            "SELECT uid FROM connections WHERE is_open = 1 AND pid = ?", [s.pid],
            lambda r: len(r) == 1, "the reaped connections closed in the database")
        time.sleep(1.0)
        assert "BUSY FAILED" not in s.leaker.output()

        report = live.report(s.db)
        (client,) = [c for c in report["clients"] if c["pid"] == s.pid]
        assert client["reaped"]["reaped"] == LEAKED - 1
        assert client["reaped"]["closed_seen"] == LEAKED - 1
        assert client["closed_by"]["reaped"] == LEAKED - 1
        assert client["closed_by"]["rst"] == 0
        assert client["verdict"] == "leak", client["reason"]  # a reaped leak was a leak
        assert "closed by `tracer reap`" in client["reason"]
        table = tracer("report", "--db", s.db).stdout
        assert re.search(rf"reaped: pid {s.pid}: {LEAKED - 1} connections closed by "
                         r"`tracer reap` \(root\)", table), table

        # Nothing left to close but the busy one, which stays.
        again = json.loads(s.reap("--yes", "--format", "json").stdout)
        assert again["candidates"] == [] and server_sockets(s.port) == {(host.ip, busy_port)}


def test_reap_without_destroy_prints_ss_lines_that_work_and_refuses_a_stale_view(
        tmp_path: Path) -> None:
    count = 4
    with live.processes() as procs, netns.hosts(1) as (host,):
        s = Scene(procs, host, tmp_path / "tracer.db", count, busy=False)
        time.sleep(3.5)
        before = server_sockets(s.port)
        assert len(before) == count

        # The kernel lacks CONFIG_INET_DIAG_DESTROY (made to answer so at the netlink seam).
        out = s.reap("--yes", "--destroy-errno", "EOPNOTSUPP", check=False)
        assert out.returncode == 7, out
        assert "CONFIG_INET_DIAG_DESTROY" in out.stdout
        lines = [line.strip() for line in out.stdout.splitlines()
                 if line.strip().startswith(("ss -K", "nsenter"))]
        server_lines = [line for line in lines if line.startswith("ss -K")]
        assert len(server_lines) == count and len(lines) == 2 * count, out.stdout
        assert server_sockets(s.port) == before
        rows = live.query(s.db, "SELECT result, error FROM reaps")
        assert [r["result"] for r in rows] == ["unsupported"] * count

        # The agent stops: its view goes stale and --yes is refused, closing nothing.
        s.agent.proc.popen.send_signal(signal.SIGINT)
        assert s.agent.wait_exit() == 0
        refused = s.reap("--yes", check=False)
        assert refused.returncode == 6, refused
        assert "no live capture is writing" in refused.stdout
        assert server_sockets(s.port) == before

        # Each printed filter names exactly its socket to the real ss, and ss -K closes it.
        for line in server_lines:
            argv = line.split()
            listed = subprocess.run(["ss", "-Htn", *argv[2:]], capture_output=True, text=True,
                                    timeout=10, check=True).stdout.splitlines()
            assert len(listed) == 1, (line, listed)
        for line in server_lines:
            subprocess.run(line.split(), capture_output=True, timeout=10, check=True)
        assert server_sockets(s.port) == set()
        wait_for(s.client_ports, "the leaker saw the resets", until=lambda p: not p,
                 timeout=5.0)


def test_reap_of_an_unknown_client_says_so(tmp_db: Path) -> None:
    tracer("capture", "--read", DEMO_CAPTURE,
           "--port", "50151", "--db", tmp_db)
    out = tracer("reap", "--db", tmp_db, "--client", "999999", check=False)
    assert out.returncode == 1
    assert "no connection of process id 999999 in the database" in out.stderr
    assert "10.151.3.2" in out.stderr  # the clients that do have open connections
    out = tracer("reap", "--db", tmp_db, "--client", "10.151.3.2", check=False)
    assert out.returncode == 0, out
    assert "no live capture ever wrote this database" in out.stdout
    assert "18: not in the kernel's socket table" in out.stdout  # a file read: not here
    refused = tracer("reap", "--db", tmp_db, "--client", "10.151.3.2", "--yes", check=False)
    assert refused.returncode == 6 and "refused: nothing closed" in refused.stdout


def _help(*args: Any) -> str:
    return tracer(*args).stdout


def test_reap_help_explains() -> None:
    text = _help("reap", "--help")
    for word in ("SOCK_DESTROY", "--yes", "--older-than", "--idle", "--trust-stale",
                 "tracer reap --client 4321 --yes", "CONFIG_INET_DIAG_DESTROY"):
        assert word in text
    assert "reap" in _help("--help")
