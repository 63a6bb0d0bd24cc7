"""grpc-go, the third independent gRPC implementation: real processes, the live agent.

The peers (tests/peers/go, built by `make go-peers` offline from Debian's golang-go and
golang-google-grpc-dev) are a grpc-go Greeter server and a client that leaks, pools or
closes its ClientConns. grpc-go dials a leaked ClientConn again by itself whenever the
server closes its connection (max connection age): the process keeps holding its idle
connections while every close is the server's. That leaker must still be named, and the
pooled and closing clients beside it must not be.

Each test starts its own server, `tracer capture --iface lo` (live_support.Agent) and
client processes, and judges `tracer report --format json` against the kernel (the pids
of the clients, the sockets each holds). Needs root and the built peers; about 30 s.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import live_support as ls
import pytest
import realtraffic_support as rt
from support import in_background, skip_if

pytestmark = [pytest.mark.live]

# (a): the server closes every connection after 2 s (grpc-go: up to 10% later), so each
# leaked ClientConn is dialled again about 6 times in the capture.
CHURN_DURATION_S = 15.0
MAX_CONNECTION_AGE = "2s"
LEAK = rt.PeerSpec("grpcgo-leak", "grpc-go", "leak", 50)
# RPCs every 0.3 s for about 9 s: the pool works through several of the server's closes.
POOL = rt.PeerSpec("grpcgo-pool", "grpc-go", "pool", 30)
POOL_INTERVAL_S = "0.3"
CLOSE = rt.PeerSpec("grpcgo-close", "grpc-go", "close", 5)
# The kernel's count is compared with the samples this close to the capture's end.
END_WINDOW_S = 0.25
# (b): one implementation against the other, a pooled client each.
CROSS_DURATION_S = 5.0
CROSS_RPCS = 8


def _need_peers() -> None:
    ls.need_root()
    skip_if(rt.grpcgo_unavailable_reason())


def _start_client(processes: rt.Processes, peer: rt.PeerSpec, target: str,
                  *options: str) -> rt.Process:
    return processes.start(peer.name, [*peer.argv(target), *options, "--max-lifetime", "90"])


def _entry(report: dict[str, Any], pid: int) -> dict[str, Any] | None:
    entries = [c for c in report["clients"] if c["pid"] == pid]
    assert len(entries) <= 1, entries
    return entries[0] if entries else None


class PortWatch:
    """The kernel's count of one process's established connections to the server port,
    sampled (wall clock, count) by ``sample`` on a thread of its own."""

    def __init__(self, pid: int, server_port: int) -> None:
        self.pid, self.server_port = pid, server_port
        self.samples: list[tuple[float, int]] = []

    def sample(self, stop: threading.Event) -> None:
        while not stop.is_set():
            before = time.time()
            count = len(ls.client_ports(self.pid, self.server_port))
            self.samples.append(((before + time.time()) / 2, count))
            stop.wait(0.005)

    def around(self, ts: float, window: float) -> list[int]:
        return [n for t, n in self.samples if abs(t - ts) <= window]


@dataclass
class ChurnRun:
    db: Path
    exit_code: int
    agent_output: str
    pids: dict[str, int]  # peer name -> pid
    leaker_at_end: list[int]  # the kernel's counts of the leaker's connections at the end
    leaker_samples: int  # how many samples were taken in all
    leaker_off: int  # of them, how many were not LEAK.count
    report: dict[str, Any]
    outputs: dict[str, str]


@pytest.fixture(scope="module")
def churn(tmp_path_factory: pytest.TempPathFactory) -> ChurnRun:
    """(a) A grpc-go server with --max-connection-age 2s; a grpc-go leaker (50
    ClientConns, one RPC each), a pooled client and a closing client; captured live."""
    _need_peers()
    db = tmp_path_factory.mktemp("grpcgo") / "churn.db"
    with ls.processes() as processes:
        port = ls.start_grpcgo_server(processes, "--max-connection-age", MAX_CONNECTION_AGE)
        target = f"127.0.0.1:{port}"
        agent = ls.Agent(processes, db, port, "--iface", "lo",
                         "--duration", f"{CHURN_DURATION_S}s")
        agent.wait_ready()
        clients = {
            LEAK.name: _start_client(processes, LEAK, target),
            POOL.name: _start_client(processes, POOL, target, "--interval", POOL_INTERVAL_S),
            CLOSE.name: _start_client(processes, CLOSE, target),
        }
        rt.wait_done(list(clients.values()))
        pids = {name: proc.popen.pid for name, proc in clients.items()}
        ls.wait_client_ports(pids[LEAK.name], port, LEAK.count)
        watch = PortWatch(pids[LEAK.name], port)
        with in_background(watch.sample, f"ports-{watch.pid}"):
            agent.require_time_left(CHURN_DURATION_S)
            code = agent.wait_exit()
        outputs = {proc.name: proc.output() for proc in processes.started}
    report = ls.report(db)
    end = report["capture"]["last_ts"]
    return ChurnRun(db, code, agent.output(), pids, watch.around(end, END_WINDOW_S),
                    len(watch.samples), sum(n != LEAK.count for _, n in watch.samples),
                    report, outputs)


def test_churn_agent_exits_cleanly(churn: ChurnRun) -> None:
    assert churn.exit_code == 0, churn.agent_output
    cap = ls.capture_row(churn.db)
    assert (cap["status"], cap["drops"]) == ("complete", 0), cap


def test_grpcgo_leaker_is_a_leak_whoever_closes_its_connections(churn: ChurnRun) -> None:
    """The leaker never closes a connection of its own accord: the server ends each one
    after 2 s and grpc-go dials it again. It is a leak, and the only one."""
    pid = churn.pids[LEAK.name]
    flagged = [c for c in churn.report["clients"] if c["verdict"] in ("leak", "suspect")]
    assert [c["pid"] for c in flagged] == [pid], churn.report["clients"]
    leaker = flagged[0]
    assert leaker["verdict"] == "leak", leaker
    assert leaker["process"] and "grpcgo-client leak" in leaker["process"], leaker
    assert leaker["client"] == "127.0.0.1", leaker
    # Every ClientConn made its RPC on its first connection; the server's closes made it
    # dial again (several rounds of LEAK.count in the capture), the redials carry none.
    assert leaker["methods"] == {rt.METHOD: LEAK.count}, leaker
    assert leaker["opened"] >= 3 * LEAK.count, leaker
    assert leaker["closed_by"]["goaway"] + leaker["closed_by"]["server_fin"] >= \
        2 * LEAK.count, leaker


def test_grpcgo_leakers_open_connections_are_the_kernels(churn: ChurnRun) -> None:
    """The report's open count is what the kernel showed the leaker holding when the
    capture ended (sampled within END_WINDOW_S of it: a redial may be in flight)."""
    leaker = _entry(churn.report, churn.pids[LEAK.name])
    assert leaker is not None, churn.report["clients"]
    assert churn.leaker_at_end, (churn.leaker_samples, churn.report["capture"])
    assert leaker["open"] in churn.leaker_at_end, (leaker, churn.leaker_at_end)
    assert abs(leaker["open"] - LEAK.count) <= 2, leaker


def test_grpcgo_pool_and_closer_are_ok(churn: ChurnRun) -> None:
    pool = _entry(churn.report, churn.pids[POOL.name])
    assert pool is not None, churn.report["clients"]
    assert pool["verdict"] == "ok", pool
    assert pool["methods"] == {rt.METHOD: POOL.rpcs}, pool
    assert pool["open"] == 1, pool
    # The closer's connections last a few milliseconds: some or all are gone before a
    # scan finds their owner, and count under the address alone. Nothing of it is
    # flagged either way.
    closer = _entry(churn.report, churn.pids[CLOSE.name])
    if closer is not None:
        assert (closer["verdict"], closer["open"]) == ("ok", 0), closer
    unattributed = [c for c in churn.report["clients"] if c["pid"] is None]
    assert all(c["verdict"] == "ok" and c["open"] == 0 for c in unattributed), unattributed
    closed = (closer["opened"] if closer else 0) + sum(c["opened"] for c in unattributed)
    assert closed == CLOSE.count, (closer, unattributed)


# -- (b) grpc-go against grpcio, grpcio against grpc-go ---------------------------------


@pytest.mark.parametrize("server_impl", ["grpcio", "grpc-go"])
def test_cross_implementation_pools_are_ok(tmp_path: Path, server_impl: str) -> None:
    """A grpc-go pooled client against the grpcio server, and a grpcio pooled client
    against the grpc-go server: RPCs decoded (HPACK from grpc-go's encoder, and grpcio's
    against grpc-go's decoder), one long-lived connection, ok."""
    _need_peers()
    client_impl: rt.Impl = "grpc-go" if server_impl == "grpcio" else "grpcio"
    peer = rt.PeerSpec(f"{client_impl}-pool", client_impl, "pool", CROSS_RPCS)
    db = tmp_path / "cross.db"
    with ls.processes() as processes:
        if server_impl == "grpcio":
            port = ls.start_server(processes)
        else:
            port = ls.start_grpcgo_server(processes)
        agent = ls.Agent(processes, db, port, "--iface", "lo",
                         "--duration", f"{CROSS_DURATION_S}s")
        agent.wait_ready()
        client = ls.start_peer(processes, peer, f"127.0.0.1:{port}")
        rt.wait_done([client])
        pid = client.popen.pid
        ls.wait_client_ports(pid, port, 1)
        agent.require_time_left(CROSS_DURATION_S)
        assert agent.wait_exit() == 0, agent.output()
    report = ls.report(db)
    assert len(report["clients"]) == 1, report["clients"]
    c = _entry(report, pid)
    assert c is not None, report["clients"]
    assert (c["verdict"], c["opened"], c["open"], c["closed"]) == ("ok", 1, 1, 0), c
    assert c["methods"] == {rt.METHOD: CROSS_RPCS}, c
    program = "grpcgo-client pool" if client_impl == "grpc-go" else "grpcio_client.py pool"
    assert c["process"] and program in c["process"], c
