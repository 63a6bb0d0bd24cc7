"""`tracer capture --metrics` and `--metrics-file`: the live agent's Prometheus metrics,
scraped from a real agent on loopback watching real grpcio clients (tests/peers): a
leaker (a channel per call, never closed), a pooled client and one that closes each
channel. The kernel's socket table is the ground truth for what each process holds.

Two agents watch the same server at once: one with the default --metrics-top and a
--metrics-file, one with --metrics-top 1 (the leaker shown, the rest summed in "other").
The exporter's state is also driven directly (MetricsState) for what a live run cannot
show on demand: "other" never goes down when clients change places.

Needs root (AF_PACKET). About 20 s.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import live_support as ls
import metrics_support as ms
import pytest
import realtraffic_support as rt
from support import free_port, tracer, wait_for

from tracer.agent.metrics import MetricsSettings, MetricsState, closed_by

pytestmark = [pytest.mark.live, pytest.mark.slow]

LEAKS, POOL_RPCS, CLOSES = 6, 12, 4
SCRAPE_WAIT_S = 15.0
DURATION_S = 60


@dataclass
class Run:
    port: int  # the gRPC server's
    metrics_port: int  # the default agent's /metrics
    top1_port: int  # the --metrics-top 1 agent's
    textfile: Path
    agent: ls.Agent
    leaker: rt.Process
    pool: rt.Process
    closer: rt.Process


def _peer(processes: rt.Processes, mode: rt.Mode, count: int, port: int) -> rt.Process:
    return ls.start_peer(processes, rt.PeerSpec(f"grpcio-{mode}", "grpcio", mode, count),
                         f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    ls.need_root()
    work = tmp_path_factory.mktemp("metrics")
    with ls.processes() as processes:
        port = ls.start_server(processes)
        metrics_port, top1_port = free_port(), free_port()
        textfile = work / "tracer.prom"
        agent = ls.Agent(processes, work / "a.db", port, "--iface", "lo", "--duration",
                         str(DURATION_S), "-q", "--metrics", f"127.0.0.1:{metrics_port}",
                         "--metrics-file", str(textfile))
        top1 = ls.Agent(processes, work / "b.db", port, "--iface", "lo", "--duration",
                        str(DURATION_S), "-q", "--metrics", f"127.0.0.1:{top1_port}",
                        "--metrics-top", "1", name="agent-top1")
        agent.wait_ready()
        top1.wait_ready()
        leaker = _peer(processes, "leak", LEAKS, port)
        pool = _peer(processes, "pool", POOL_RPCS, port)
        closer = _peer(processes, "close", CLOSES, port)
        rt.wait_done([leaker, pool, closer])
        ls.wait_client_ports(leaker.popen.pid, port, LEAKS)
        ls.wait_client_ports(pool.popen.pid, port, 1)
        yield Run(port, metrics_port, top1_port, textfile, agent, leaker, pool, closer)


def _until(port: int, what: str, check: Any, agent: ls.Agent) -> ms.Samples:
    """Scrape until ``check(samples)`` holds (SCRAPE_WAIT_S at most)."""
    def sample() -> ms.Samples | None:
        if agent.proc.popen.poll() is not None:
            raise agent.fail("the agent exited")
        return ms.scrape(port)

    got = wait_for(sample, what, until=lambda s: s is not None and check(s),
                   timeout=SCRAPE_WAIT_S, interval=0.25, error=agent.fail)
    assert got is not None
    return got


def test_each_client_process_is_a_series_with_its_exact_counts(run: Run) -> None:
    leak, pool, close = run.leaker.popen.pid, run.pool.popen.pid, run.closer.popen.pid

    unknown = {"pid": "", "process": "", "client": "127.0.0.1"}

    def closes(s: ms.Samples, **labels: Any) -> float:
        return ms.value(s, "tracer_client_connections_closed_total", **labels) or 0.0

    def closer_series(s: ms.Samples, name: str, **extra: Any) -> float:
        return ms.of_pid(s, name, close, **extra) or 0.0

    def settled(s: ms.Samples) -> bool:
        # A call of a few ms can be closed before attribution finds its owner: the
        # agent counts it for its address only (pid ""), as the database does.
        closed = closer_series(s, "tracer_client_connections_closed_total",
                               closed_by="client") + closes(s, **unknown, closed_by="client")
        return (ms.of_pid(s, "tracer_client_open_connections", leak) == LEAKS
                and ms.of_pid(s, "tracer_client_rpcs_total", pool) == POOL_RPCS
                and closed == CLOSES)

    s = _until(run.metrics_port, "the three clients' series are complete", settled, run.agent)
    named = ls.query(run.agent.db, "SELECT COUNT(*) AS n FROM connections WHERE pid = ?",
                     [close])[0]["n"]
    assert closer_series(s, "tracer_client_connections_opened_total") == named
    assert closer_series(s, "tracer_client_connections_closed_total",
                         closed_by="client") == named
    assert closes(s, **unknown, closed_by="client") == CLOSES - named
    assert ms.of_pid(s, "tracer_client_connections_opened_total", leak) == LEAKS
    assert ms.of_pid(s, "tracer_client_rpcs_total", leak) == LEAKS  # one RPC each
    assert ms.of_pid(s, "tracer_client_open_connections", pool) == 1
    assert ms.of_pid(s, "tracer_client_connections_opened_total", pool) == 1
    assert closer_series(s, "tracer_client_open_connections") == 0
    for who in ("server", "reset", "unknown"):
        assert closer_series(s, "tracer_client_connections_closed_total", closed_by=who) == 0
        assert closes(s, **unknown, closed_by=who) == 0, who
    age = ms.of_pid(s, "tracer_client_oldest_open_connection_age_seconds", leak)
    assert age is not None and 0 < age < DURATION_S, age
    # Idle means no stream for 60 s (the default): these are younger than that.
    assert ms.of_pid(s, "tracer_client_idle_open_connections", leak) == 0
    labels = ms.names(s, "tracer_client_open_connections")
    assert {"pid": str(leak), "process": labels[0]["process"], "client": "127.0.0.1"} in labels
    assert {"pid": "other", "process": "other", "client": "other"} in labels
    assert all(set(ls_) == {"pid", "process", "client"} for ls_ in labels)


def test_the_agent_describes_itself_and_the_local_server(run: Run) -> None:
    s = _until(run.metrics_port, "packets were counted",
               lambda s: (ms.value(s, "tracer_agent_packets_total") or 0) > 0, run.agent)
    assert (ms.value(s, "tracer_agent_rows_written_total") or 0) > 0
    assert ms.value(s, "tracer_agent_kernel_drops_total") == 0
    assert (ms.value(s, "tracer_agent_database_size_bytes") or 0) > 0
    for process in ("capture", "store"):
        rss = ms.value(s, "tracer_agent_resident_memory_bytes", process=process)
        assert rss is not None and 10 << 20 < rss < 2 << 30, (process, rss)
    info = [ls_ for ls_ in ms.names(s, "tracer_agent_info")]
    assert len(info) == 1 and info[0]["port"] == str(run.port) and info[0]["version"], info
    assert ms.value(s, "tracer_server_preface_timeouts_total") == 0
    # The grpcio server runs here: its descriptors and accept queue are sampled.
    fds = [ls_ for ls_ in ms.names(s, "tracer_server_open_fds")]
    assert len(fds) == 1 and fds[0]["port"] == str(run.port), fds
    server_pid = int(fds[0]["pid"])
    assert len(os.listdir(f"/proc/{server_pid}/fd")) > 0
    assert (ms.value(s, "tracer_server_max_fds", pid=server_pid, port=run.port) or 0) > 0
    assert ms.value(s, "tracer_server_accept_queue_length", port=run.port) is not None
    assert (ms.value(s, "tracer_server_accept_queue_limit", port=run.port) or 0) > 0
    # Only tracer_* families: no process or platform collectors mixed in.
    assert all(name.startswith("tracer_") for name, _ in s), sorted({n for n, _ in s})


def test_top_1_shows_the_leaker_and_sums_the_rest_in_other(run: Run) -> None:
    leak = run.leaker.popen.pid
    other = {"pid": "other", "process": "other", "client": "other"}

    def settled(s: ms.Samples) -> bool:
        return (ms.of_pid(s, "tracer_client_open_connections", leak) == LEAKS
                and ms.value(s, "tracer_client_connections_opened_total", **other)
                == 1 + CLOSES)

    s = _until(run.top1_port, "the leaker shown, the others in other", settled, run.agent)
    shown = ms.names(s, "tracer_client_open_connections")
    assert sorted(ls_["pid"] for ls_ in shown) == sorted([str(leak), "other"]), shown
    assert ms.value(s, "tracer_client_open_connections", **other) == 1  # the pool's
    assert ms.value(s, "tracer_client_rpcs_total", **other) == POOL_RPCS + CLOSES
    assert ms.value(s, "tracer_client_connections_closed_total", **other,
                    closed_by="client") == CLOSES


def test_the_textfile_is_written_whole_and_replaced_atomically(run: Run) -> None:
    leak = run.leaker.popen.pid
    wait_for(lambda: run.textfile.exists() and ms.of_pid(
        ms.parse(run.textfile.read_text()), "tracer_client_open_connections", leak) == LEAKS,
        "the textfile shows the leaker", timeout=SCRAPE_WAIT_S, interval=0.25)
    assert stat.S_IMODE(run.textfile.stat().st_mode) == 0o644
    inode = run.textfile.stat().st_ino
    # Read while the agent rewrites it (every 5 s): always whole, never half written.
    deadline = time.monotonic() + 6.0
    reads = 0
    while time.monotonic() < deadline:
        text = run.textfile.read_text()
        assert text.rstrip().endswith(f'tracer_agent_info{{port="{run.port}",'
                                      f'version="0.1.0"}} 1.0'), text[-200:]
        assert ms.value(ms.parse(text), "tracer_agent_info", port=run.port,
                        version="0.1.0") == 1
        reads += 1
        time.sleep(0.02)
    assert reads > 50
    assert run.textfile.stat().st_ino != inode, "not replaced (by a rename) in 6 s"
    assert [p.name for p in run.textfile.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_a_client_closing_counts_as_closed_by_the_client(run: Run) -> None:
    """Runs after the others (it stops the leaker)."""
    leak = run.leaker.popen.pid
    run.leaker.stop()

    def settled(s: ms.Samples) -> bool:
        return ms.of_pid(s, "tracer_client_connections_closed_total", leak,
                         closed_by="client") == LEAKS

    s = _until(run.metrics_port, "the leaker's closes are counted", settled, run.agent)
    assert ms.of_pid(s, "tracer_client_open_connections", leak) == 0
    assert ms.of_pid(s, "tracer_client_connections_opened_total", leak) == LEAKS


# -- refusals ----------------------------------------------------------------------------


def test_a_port_in_use_stops_the_capture_before_it_starts(tmp_path: Path) -> None:
    ls.need_root()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        done = tracer("capture", "--port", "9", "--iface", "lo", "--db", tmp_path / "t.db",
                      "--duration", "5s", "--metrics", f"127.0.0.1:{busy}", check=False)
    assert done.returncode == 4, done
    assert f"--metrics 127.0.0.1:{busy}: cannot listen: the port is in use" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "t.db").exists()


@pytest.mark.parametrize(("address", "code", "says"), [
    ("127.0.0.1", 2, "is not HOST:PORT"),
    ("127.0.0.1:99999", 2, "is not HOST:PORT"),
    ("203.0.113.7:9464", 4, "cannot listen: no interface has that address"),
    ("no-such-host.invalid:9464", 4, "--metrics no-such-host.invalid:9464:"),
])
def test_a_bad_metrics_address_is_a_clear_error(tmp_path: Path, address: str, code: int,
                                                says: str) -> None:
    ls.need_root()
    done = tracer("capture", "--port", "9", "--iface", "lo", "--db", tmp_path / "t.db",
                  "--duration", "5s", "--metrics", address, check=False)
    assert done.returncode == code, done
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_planted_symlink_as_metrics_file_is_refused(tmp_path: Path) -> None:
    ls.need_root()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "tracer.prom"
    link.symlink_to(victim)
    done = tracer("capture", "--port", "9", "--iface", "lo", "--db", tmp_path / "t.db",
                  "--duration", "5s", "--metrics-file", link, check=False)
    assert done.returncode == 4, done
    assert f"--metrics-file {link} is a symbolic link: refused" in done.stderr, done.stderr
    assert victim.read_text() == "precious\n" and link.is_symlink()


def test_metrics_with_read_are_refused(tmp_path: Path) -> None:
    done = tracer("capture", "--read", tmp_path / "none.pcap", "--port", "9", "--metrics",
                  "127.0.0.1:9464", check=False)
    assert done.returncode == 2, done
    assert "--metrics and --metrics-file are for live capture" in done.stderr, done.stderr


# -- the state itself --------------------------------------------------------------------


class _Process:
    def __init__(self, pid: int) -> None:
        self.pid, self.comm, self.exe = pid, f"proc{pid}", None


def _record(uid: str, *, ts: float, end: str | None = None, streams: int = 1,
            close_kind: str | None = None, orig_h: str = "10.0.0.1") -> dict[str, Any]:
    return {"uid": uid, "ts": ts, "syn_ts": ts, "orig_h": orig_h, "end_reason": end,
            "streams": streams, "close_kind": close_kind, "last_activity_ts": ts,
            "preface_ts": ts, "server_settings_ts": ts, "goaway_ts": None}


def _counters(state: MetricsState) -> dict[tuple[str, ...], float]:
    out = {}
    for family in state.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return out  # type: ignore[return-value]


def test_counters_never_go_down_when_clients_change_places() -> None:
    """Client A leads, then B overtakes it (A leaves the top 1 for "other"), then A leads
    again: every counter series only grows, what A opened while hidden went to "other"
    (so rate() summed over the series is the true rate), and A's own series, shown again,
    is its true total."""
    state = MetricsState(MetricsSettings(top=1), frozenset({9090}))
    now = time.time()
    seen: dict[tuple[str, ...], float] = {}
    opened = 0

    def scrape() -> None:
        got = _counters(state)
        for key, v in got.items():
            assert v >= seen.get(key, 0.0), (key, v, seen[key])
        seen.update(got)

    def open_(pid: int, n: int) -> None:
        nonlocal opened
        for i in range(n):
            uid = f"{pid}-{opened}-{i}"
            state.settled([(uid, "local", _Process(pid))])
            state.records([_record(uid, ts=now)])
        opened += n

    open_(1, 3)
    scrape()
    open_(2, 5)  # B overtakes A: A's next opens go to "other"
    scrape()
    open_(1, 1)
    scrape()
    open_(1, 3)  # A leads again
    scrape()
    opened_total = "tracer_client_connections_opened_total"
    assert seen[(opened_total, ("client", "10.0.0.1"), ("pid", "1"), ("process", "proc1"))] \
        == 7 and opened == 12
    assert seen[(opened_total, ("client", "10.0.0.1"), ("pid", "2"), ("process", "proc2"))] == 5
    assert seen[(opened_total, ("client", "other"), ("pid", "other"), ("process", "other"))] == 1


def test_who_closed_a_connection() -> None:
    assert closed_by({"close_kind": "client_fin"}) == "client"
    assert closed_by({"close_kind": "server_fin"}) == "server"
    assert closed_by({"close_kind": "server_rst"}) == "reset"
    assert closed_by({"close_kind": "client_fin", "goaway_ts": 5.0, "close_ts": 6.0,
                      "goaway_sender": "resp"}) == "server"
    assert closed_by({"close_kind": None}) == "unknown"  # expired, evicted


def test_a_unix_socket_connection_is_never_counted_idle() -> None:
    """A Unix-socket row carries no activity (no packets: last_activity_ts is null): it
    is open, and old, but never idle, however long it has been open; a TCP connection as
    old with no activity since its dial is idle."""
    state = MetricsState(MetricsSettings(idle_s=60.0), frozenset({9090}))
    old = time.time() - 600
    unix = {**_record("u1", ts=old, orig_h="unix:/run/api.sock"), "protocol": "unix",
            "syn_ts": None, "last_activity_ts": None, "streams": 0, "preface_ts": None,
            "server_settings_ts": None}
    state.settled([("u1", "local", _Process(1)), ("t1", "local", _Process(2))])
    state.records([unix, _record("t1", ts=old)])
    samples = {(s.name, s.labels["pid"]): s.value for f in state.collect() for s in f.samples
               if s.name.startswith("tracer_client_") and "closed_by" not in s.labels}
    assert samples[("tracer_client_open_connections", "1")] == 1
    assert samples[("tracer_client_idle_open_connections", "1")] == 0
    assert samples[("tracer_client_oldest_open_connection_age_seconds", "1")] >= 600
    assert samples[("tracer_client_idle_open_connections", "2")] == 1
