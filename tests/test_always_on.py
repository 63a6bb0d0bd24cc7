"""The agent as operators run it: for days, as root, with light steady traffic, stopped
by signals and kill -9, on a full disk, two runs at once, after an interrupted run.

Live tests need root (AF_PACKET) and real grpcio peers (tests/peers); file tests need
nothing but the command line. Every wait has a deadline; every process started goes
through ``rt.started_processes()`` and is stopped however the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import live_support as ls
import psutil
import pytest
import realtraffic_support as rt
from support import (
    DEMO_CAPTURE,
    FULL,
    REPO,
    free_port,
    poll,
    tmpfs,
    tracer,
    tracer_command,
    wait_for,
)

DEMO_PORT = 50151


_need_root = ls.need_root
_processes = ls.processes


def _pool(processes: rt.Processes, port: int, interval: float = 0.03) -> rt.Process:
    """One pooled grpcio channel calling every ``interval`` seconds: light steady traffic,
    no new connections."""
    return processes.start("pool", [*rt.grpcio_peer("client"), "pool", "--target",
                                    f"127.0.0.1:{port}", "--count", "3000", "--interval",
                                    str(interval), "--max-lifetime", "90"])


def _wait_capture_status(db: Path, timeout: float = 15.0) -> dict[str, Any]:
    """The newest capture row once it is no longer running."""
    rows = wait_for(lambda: ls.try_query(db, "SELECT * FROM captures ORDER BY id DESC LIMIT 1"),
                    "the capture is no longer running",
                    until=lambda rows: rows and rows[0]["status"] != "running", timeout=timeout)
    assert rows is not None
    return rows[0]


# -- deadlines under steady light traffic --------------------------------------------------


def test_duration_is_kept_under_steady_light_traffic(tmp_path: Path) -> None:
    """An RPC every 30 ms on one connection (the packet count never reaches a batch):
    --duration 5s ends within a second of the 5."""
    _need_root()
    with _processes() as processes:
        port = ls.start_server(processes)
        _pool(processes, port)
        time.sleep(1.0)
        agent = ls.Agent(processes, tmp_path / "d.db", port, "--iface", "lo", "--duration", "5s")
        agent.wait_ready()
        ready = time.monotonic()
        code = agent.wait_exit(timeout=30)
        took = time.monotonic() - ready
        launch = time.monotonic() - agent.started
    assert code == 0, agent.output()
    assert took < 6.0, f"--duration 5s ended {took:.1f}s after the agent was ready"
    print(f"--duration 5s: {took:.2f}s after ready, {launch:.2f}s after launch")
    [conn] = ls.query(agent.db, "SELECT streams, is_open FROM connections")
    assert conn["is_open"] == 1 and conn["streams"] >= 50, conn


def test_sigint_and_sigterm_stop_within_a_second(tmp_path: Path) -> None:
    _need_root()
    with _processes() as processes:
        port = ls.start_server(processes)
        _pool(processes, port)
        for sig in (signal.SIGINT, signal.SIGTERM):
            agent = ls.Agent(processes, tmp_path / f"s{sig}.db", port, "--iface", "lo",
                             name=f"agent-{sig}")
            agent.wait_ready()
            time.sleep(2.0)
            sent = time.monotonic()
            os.kill(agent.pid, sig)
            code = agent.wait_exit(timeout=30)
            took = time.monotonic() - sent
            assert code == 0, agent.output()
            assert took < 1.0, f"{signal.Signals(sig).name} took {took:.2f}s to stop it"
            print(f"{signal.Signals(sig).name}: stopped in {took:.3f}s")
            assert ls.capture_row(agent.db)["status"] == "complete"


def test_kill_9_loses_at_most_the_last_second(tmp_path: Path) -> None:
    """Ten connections leaked under steady traffic, the agent killed hard a second later:
    the database has all ten (its store worker finishes the capture as interrupted)."""
    _need_root()
    with _processes() as processes:
        port = ls.start_server(processes)
        _pool(processes, port)
        agent = ls.Agent(processes, tmp_path / "k.db", port, "--iface", "lo")
        agent.wait_ready()
        leak = ls.start_peer(processes, rt.PeerSpec("leak", "grpcio", "leak", 10),
                             f"127.0.0.1:{port}")
        rt.wait_done([leak])
        leaked = ls.wait_client_ports(leak.popen.pid, port, 10)
        time.sleep(1.0)
        os.kill(agent.pid, signal.SIGKILL)
        row = _wait_capture_status(agent.db)
        stored = {r["orig_p"] for r in ls.query(
            agent.db, "SELECT orig_p FROM connections WHERE is_open = 1")}
    assert row["status"] == "interrupted", row
    assert leaked <= stored, f"lost {sorted(leaked - stored)} of {sorted(leaked)}"
    data = ls.report(agent.db)
    assert [p["status"] for p in data["capture"]["partial"]] == ["interrupted"]
    for c in data["clients"]:
        assert (c["oldest_open_s"] or 0) >= 0 and (c["idle_s"] or {"min": 0})["min"] >= 0


def test_status_line_counts_sleeping_connections() -> None:
    """200 idle leaked connections asleep in the flow table are 200 open connections."""
    from tracer.agent.live import status_line
    from tracer.pipeline import Analyzer

    analyzer = Analyzer(frozenset([9090]), FULL.replace(sleep_after=1.0))
    analyzer.feed(iter(_handshakes(200, t0=1000.0)), 1 << 20)
    analyzer.table.tick(1000.5)
    analyzer.table.tick(1100.0)  # a sweep: idle for 100 s, asleep
    assert analyzer.table.asleep_count == 200
    line = status_line(analyzer, 0.0, 0, 0)
    assert "200 open connections from 1 client address" in line, line


def _handshakes(n: int, t0: float) -> list[tuple[float, int, bytes]]:
    """``n`` TCP handshakes from 10.0.0.2 to 10.0.0.1:9090, as raw IPv4 packets."""
    from tracer.decode import LINKTYPE_RAW

    out = []
    for i in range(n):
        sport = 20000 + i
        for k, (src, dst, sp, dp, flags, seq, ack) in enumerate((
            ("10.0.0.2", "10.0.0.1", sport, 9090, 0x02, 1000, 0),
            ("10.0.0.1", "10.0.0.2", 9090, sport, 0x12, 5000, 1001),
            ("10.0.0.2", "10.0.0.1", sport, 9090, 0x10, 1001, 5001),
        )):
            out.append((t0 + i * 0.001 + k * 0.0001, LINKTYPE_RAW,
                        _ipv4_tcp(src, dst, sp, dp, flags, seq, ack)))
    return out


def _ipv4_tcp(src: str, dst: str, sport: int, dport: int, flags: int, seq: int,
              ack: int) -> bytes:
    import socket

    tcp = struct.pack(">HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + tcp


# -- --user: a folder the user cannot write ---------------------------------------------


def test_user_who_cannot_write_the_database_folder_exits_4(tmp_path: Path) -> None:
    ls.need_nobody()
    folder = tmp_path / "root-only"
    folder.mkdir(mode=0o755)
    proc = tracer("capture", "--port", str(free_port()), "--iface", "lo", "--duration", "2s",
                  "--user", ls.NOBODY, "--db", str(folder / "t.db"), check=False)
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"--user {ls.NOBODY} cannot write in {folder}" in proc.stderr, proc.stderr


# -- file reads: signals, kill -9, two at once, time order ---------------------------------


def _big_capture(path: Path, copies: int) -> Path:
    """The demo capture's packets ``copies`` times over, each copy later in time and on
    other client ports: a file whose read takes a few seconds, made in about one."""
    from tracer.sources.pcapfile import CaptureReader

    with CaptureReader.open(str(DEMO_CAPTURE)) as reader:
        packets = list(reader)
    first, last = packets[0][0], packets[-1][0]
    span = last - first + 1.0
    linktype = packets[0][1]
    record = struct.Struct("<IIII")
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, linktype))
        for n in range(copies):
            chunk = []
            for ts, _lt, frame in packets:
                frame = _shift_client_port(frame, n)
                t = ts + n * span
                sec = int(t)
                chunk.append(record.pack(sec, int((t - sec) * 1e6), len(frame), len(frame)))
                chunk.append(frame)
            f.write(b"".join(chunk))
    return path


def _shift_client_port(frame: bytes, n: int) -> bytes:
    """The frame (Ethernet, IPv4, TCP) with its client port moved by ``n``."""
    if n == 0 or len(frame) < 14 + 20 + 4 or frame[12:14] != b"\x08\x00":
        return frame
    at = 14 + (frame[14] & 0x0F) * 4
    sport, dport = struct.unpack_from(">HH", frame, at)
    if dport == DEMO_PORT:
        return frame[:at] + struct.pack(">H", (sport + n * 7) % 50000 + 10000) + frame[at + 2:]
    if sport == DEMO_PORT:
        return (frame[:at + 2] + struct.pack(">H", (dport + n * 7) % 50000 + 10000)
                + frame[at + 4:])
    return frame


@pytest.fixture(scope="module")
def big_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _big_capture(tmp_path_factory.mktemp("big") / "big.pcap", 800)


def _start_read(processes: rt.Processes, capture: Path, db: Path, *args: str,
                name: str = "read") -> rt.Process:
    return processes.start(name, [*tracer_command(), "capture", "--read", str(capture),
                                  "--port", str(DEMO_PORT), "--db", str(db), *args])


def _wait_running(db: Path, timeout: float = 15.0) -> None:
    """Until the read has stored its first batch."""
    wait_for(lambda: ls.try_query(db, "SELECT id FROM captures WHERE status = 'running'"
                                      " AND packets > 0"),
             "the read stored a batch", timeout=timeout, interval=0.02)


def test_sigterm_stops_a_file_read_cleanly(tmp_path: Path, big_capture: Path) -> None:
    db = tmp_path / "t.db"
    with _processes() as processes:
        read = _start_read(processes, big_capture, db, "-j", "2")
        _wait_running(db)
        os.kill(read.popen.pid, signal.SIGTERM)
        code = read.popen.wait(30)
        read._reader.join(5)
    assert code == 128 + signal.SIGTERM, read.output()
    assert "interrupted: what was read so far is stored" in read.output()
    row = ls.capture_row(db)
    assert row["status"] == "interrupted" and row["packets"] > 0, row
    assert ls.query(db, "SELECT COUNT(*) AS n FROM connections")[0]["n"] > 0


def test_sigterm_stops_a_read_from_a_pipe(tmp_path: Path) -> None:
    """Standard input that stays open and silent: the signal still gets it out."""
    db = tmp_path / "p.db"
    argv = [*tracer_command(), "capture", "--read", "-", "--port", str(DEMO_PORT), "--db",
            str(db)]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, cwd=REPO) as proc:
        assert proc.stdin is not None
        proc.stdin.write(DEMO_CAPTURE.read_bytes()[:20000])
        proc.stdin.flush()
        _wait_running_row(db)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("a read from a silent pipe ignored SIGTERM") from None
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert ls.capture_row(db)["status"] == "interrupted"


def _wait_running_row(db: Path, timeout: float = 15.0) -> None:
    wait_for(lambda: ls.try_query(db, "SELECT id FROM captures WHERE status = 'running'"),
             "the read started", timeout=timeout, interval=0.02)


def test_kill_9_of_a_file_read_takes_its_workers_along(tmp_path: Path,
                                                         big_capture: Path) -> None:
    db = tmp_path / "k.db"
    with _processes() as processes:
        read = _start_read(processes, big_capture, db, "-j", "3")
        _wait_running(db)
        workers = psutil.Process(read.popen.pid).children(recursive=True)
        assert len([w for w in workers if "tracer" in " ".join(w.cmdline())
                    or "cli.main" in " ".join(w.cmdline())]) >= 2, workers
        os.kill(read.popen.pid, signal.SIGKILL)
        killed = time.monotonic()
        alive = _running(workers, timeout=5.0)
        took = time.monotonic() - killed
    assert not alive, f"workers still running after kill -9 of their parent: {alive}"
    assert took < 1.0, f"the workers outlived their parent by {took:.2f}s"
    data = json.loads(tracer("report", "--db", str(db), "--format", "json").stdout)
    [partial] = data["capture"]["partial"]
    assert partial["status"] == "unfinished" and "is gone" in partial["reason"], partial
    assert data["capture"]["sources"] == [str(big_capture)]
    for c in data["clients"]:
        assert (c["oldest_open_s"] or 0) >= 0
        assert c["idle_s"] is None or c["idle_s"]["min"] >= 0
    text = tracer("report", "--db", str(db)).stdout
    assert "never finished: its process" in text and "-1" not in text.split("\n\n")[1]


def _running(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``procs`` still running after up to ``timeout`` seconds (a zombie waiting
    to be reaped runs no more)."""
    def running() -> list[psutil.Process]:
        alive = []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        return alive

    return poll(running, until=lambda alive: not alive, timeout=timeout, interval=0.01)


def test_a_second_file_read_waits_for_the_first(tmp_path: Path, big_capture: Path) -> None:
    db = tmp_path / "w.db"
    with _processes() as processes:
        first = _start_read(processes, big_capture, db, "-j", "1", name="first")
        _wait_running(db)
        second = _start_read(processes, DEMO_CAPTURE, db, name="second")
        second.wait_for(f"{db} is being written by capture 1 (a file read, pid "
                        f"{first.popen.pid}", time.monotonic() + 20)
        assert first.popen.wait(120) == 0, first.output()
        assert second.popen.wait(60) == 0, second.output()
    rows = ls.query(db, "SELECT id, status FROM captures ORDER BY id")
    assert [r["status"] for r in rows] == ["complete", "complete"], rows


def _pcap(path: Path, packets: list[tuple[float, bytes]]) -> Path:
    records = [struct.pack("<IIII", int(ts), round((ts % 1) * 1e6), len(frame), len(frame))
               + frame for ts, frame in packets]
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 101))  # raw IP
        f.writelines(records)
    return path


def test_rotated_files_are_read_in_time_order(tmp_path: Path) -> None:
    """A glob's order (dump1 dump10 dump2): read in the time of their first packets, one
    connection across two files stays one connection."""
    packets = [(ts, frame) for ts, _lt, frame in _handshakes(30, t0=1000.0)]
    parts = [_pcap(tmp_path / f"dump{n}", packets[i:i + 30]) for n, i in
             ((1, 0), (2, 30), (10, 60))]
    # A connection whose handshake spans dump2 and dump10: its SYN-ACK and ACK come later.
    given = [str(parts[0]), str(parts[2]), str(parts[1])]
    db = tmp_path / "o.db"
    reads = [arg for p in given for arg in ("--read", p)]
    proc = tracer("capture", "--port", "9090", "--db", str(db), *reads, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "read in the time order of their first packets" in proc.stderr
    rows = ls.query(db, "SELECT conn_state, history FROM connections")
    assert len(rows) == 30 and all(r["history"] == "ShA" for r in rows), rows


# -- a full disk -------------------------------------------------------------------------


def test_disk_full_during_a_file_read(tmp_path: Path, big_capture: Path) -> None:
    with tmpfs(tmp_path / "small", "3m") as mount:
        db = mount / "t.db"
        proc = tracer("capture", "--read", str(big_capture), "--port", str(DEMO_PORT),
                      "--db", str(db), "-j", "1", check=False)
        assert proc.returncode == 5, proc.stderr
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, proc.stderr
        assert errors[0].startswith(f"error: disk full: no space left for the database {db}")
        assert "committed before are kept" in errors[0], errors[0]
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        status, = conn.execute("SELECT status FROM captures").fetchone()
        kept, = conn.execute("SELECT COUNT(*) FROM connections").fetchone()
        conn.close()
        assert status in ("failed", "running"), status
        assert kept > 0
        report = tracer("report", "--db", str(db), check=False)
        assert report.returncode == 0, report.stderr


def test_disk_full_while_capturing_live(tmp_path: Path) -> None:
    """The store worker cannot write: the agent says so in one line and exits 5."""
    _need_root()
    with tmpfs(tmp_path / "small", "4m") as mount, _processes() as processes:
        port = ls.start_server(processes)
        db = mount / "live.db"
        agent = ls.Agent(processes, db, port, "--iface", "lo", "--events", "all")
        agent.wait_ready()
        _fill(mount, keep=48 << 10)
        _pool(processes, port, interval=0.005)
        code = agent.wait_exit(timeout=60)
        out = agent.output()
    assert code == 5, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: disk full"), out


def _fill(folder: Path, keep: int) -> None:
    """Take all the space of ``folder``'s filesystem but ``keep`` bytes."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize - keep
    with open(folder / "filler", "wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * max(free, 0))
