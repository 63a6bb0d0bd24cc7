"""What a tcpdump user types, and the mistakes a new user makes: each answered with one
clear line and an exit status that says what went wrong, nothing half-done left behind."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
from support import DEMO_CAPTURE, tracer, tracer_command

PORT = "50151"  # the demo capture's server port


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("usage") / "tracer.db"
    tracer("capture", "-r", DEMO_CAPTURE, "--port", PORT, "--db", db, "-q")
    return db


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_a_read_file_that_cannot_be_opened_is_bad_usage_and_writes_nothing(
        tmp_path: Path, what: str) -> None:
    path = tmp_path / "nonexistent.pcap" if what == "missing" else tmp_path
    db = tmp_path / "tracer.db"
    run = tracer("capture", "-r", path, "--port", PORT, "--db", db, check=False)
    assert run.returncode == 2
    assert "Invalid value for --read" in run.stderr
    assert "read 1 file" not in run.stderr  # no success summary before the error
    assert not db.exists()  # no empty capture left in a database


def test_tcpdump_short_options_are_there() -> None:
    text = tracer("capture", "--help").stdout
    for short, long in (("-r", "--read"), ("-i", "--iface"), ("-w", "--write"),
                        ("-c", "--count")):
        assert f"{short}, {long}" in text


def test_report_for_a_client_that_is_not_there(demo_db: Path) -> None:
    bad = tracer("report", "--db", demo_db, "--client", "nosuch", check=False)
    assert bad.returncode == 2
    assert "'nosuch' is neither an IP address nor a process id" in bad.stderr
    absent = tracer("report", "--db", demo_db, "--client", "10.9.9.9", check=False)
    assert absent.returncode == 1
    assert f"error: no connection from client 10.9.9.9 in {demo_db}" in absent.stderr
    present = tracer("report", "--db", demo_db, "--client", "10.151.3.2")
    assert "10.151.3.2" in present.stdout and "leak" in present.stdout
    bracketed = tracer("report", "--db", demo_db, "--client", "[10.151.3.2]")
    assert bracketed.stdout == present.stdout


def test_connections_by_pid_and_window(demo_db: Path) -> None:
    # the demo capture is a file: nothing attributed, so a pid matches nothing
    none = tracer("connections", "--db", demo_db, "--pid", "4242")
    assert none.stdout.strip() == "no connections match"
    clash = tracer("connections", "--db", demo_db, "--pid", "4242", "--client", "10.0.0.1",
                   check=False)
    assert clash.returncode == 2 and "ask for different clients" in clash.stderr
    late = tracer("connections", "--db", demo_db, "--since", "-1s", "--format", "csv").stdout
    every = tracer("connections", "--db", demo_db, "--format", "csv").stdout
    assert 1 < len(late.splitlines()) < len(every.splitlines())


def _tcpdump_count(path: Path, expression: str) -> int:
    out = subprocess.run(["tcpdump", "-n", "-r", str(path), expression], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return len(out.splitlines())


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_filter_expression_on_files_keeps_what_tcpdump_keeps(tmp_path: Path,
                                                               jobs: str) -> None:
    db = tmp_path / "tracer.db"
    run = tracer("capture", "-r", DEMO_CAPTURE, "--port", PORT, "--db", db, "-j", jobs,
                 "host", "10.151.3.2")
    kept = _tcpdump_count(DEMO_CAPTURE, f"host 10.151.3.2 and tcp port {PORT}")
    left_out = _tcpdump_count(DEMO_CAPTURE, "") - _tcpdump_count(DEMO_CAPTURE,
                                                                  "host 10.151.3.2")
    assert f"({kept:,} TCP segments on port {PORT}, 0 other, {left_out:,} left out by " \
           "--filter)" in run.stderr
    rows = json.loads(tracer("connections", "--db", db, "--format", "json").stdout)
    assert rows and {r["orig_h"] for r in rows} == {"10.151.3.2"}
    # the same as --filter, and as reading everything then asking for that client
    other = tmp_path / "other.db"
    tracer("capture", "-r", DEMO_CAPTURE, "--port", PORT, "--db", other, "-q")
    every = json.loads(tracer("connections", "--db", other, "--client", "10.151.3.2",
                              "--format", "json").stdout)
    assert [r["uid"] for r in rows] == [r["uid"] for r in every]


def test_a_filter_that_cannot_compile_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    db = tmp_path / "tracer.db"
    bad = tracer("capture", "-r", DEMO_CAPTURE, "--port", PORT, "--db", db, "--filter",
                 "hots 1", check=False)
    assert bad.returncode == 2 and "Invalid value for --filter: 'hots 1'" in bad.stderr
    assert not db.exists()
    both = tracer("capture", "-r", DEMO_CAPTURE, "--port", PORT, "--db", db, "--filter",
                  "tcp", "host", "10.0.0.1", check=False)
    assert both.returncode == 2 and "either as --filter or as trailing words" in both.stderr


def test_a_filter_for_another_link_layer_says_so(tmp_path: Path) -> None:
    # the demo capture is raw IP: an Ethernet address cannot be matched there
    db = tmp_path / "tracer.db"
    run = tracer("capture", "-r", DEMO_CAPTURE, "--port", PORT, "--db", db,
                 "ether", "host", "00:11:22:33:44:55", check=False)
    assert run.returncode == 2
    assert "ethernet addresses supported only on" in run.stderr
    assert "(for link type 101: its records are left out)" in run.stderr


def in_terminal(args: list[str], columns: int, *, stderr_too: bool = False) -> str:
    """``tracer ARGS`` with its output (and with ``stderr_too`` its standard error, where
    the progress line goes) on a pseudo-terminal ``columns`` wide: what a user at an
    80-column terminal sees."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([*tracer_command(), *args], stdout=slave,
                            stderr=slave if stderr_too else subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other end is closed
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    return b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.mark.parametrize("command", [["report"], ["connections"], ["connections", "--open"]])
def test_tables_fit_an_80_column_terminal(demo_db: Path, command: list[str]) -> None:
    narrow = in_terminal([*command, "--db", str(demo_db)], 80)
    assert max(len(line) for line in narrow.splitlines()) <= 80, narrow
    assert "--wide shows every column" in narrow
    wide = in_terminal([*command, "--db", str(demo_db), "--wide"], 80)
    piped = tracer(*command, "--db", demo_db).stdout  # not a terminal: every column
    assert wide == piped and max(len(line) for line in wide.splitlines()) > 80
    header = next(line for line in narrow.splitlines()
                  if line.startswith("CLIENT " if command == ["report"] else "ts "))
    for kept in (["CLIENT", "OPEN", "VERDICT", "REASON"] if command == ["report"]
                 else ["ts", "orig", "state"]):
        assert kept in header.split()
    # a cell is never cut mid-word: what is cut ends with …
    if command == ["report"]:
        leak = next(line for line in narrow.splitlines() if " leak " in line)
        assert leak.endswith("…") and not leak.endswith(" …")


@pytest.mark.parametrize("columns", [80, 50])
def test_the_timeline_fits_the_terminal(demo_db: Path, columns: int) -> None:
    """Columns on the right go first, then the last clients' columns are summed into OTHERS;
    a line says what was left out. --wide, like a pipe, shows everything."""
    args = ["timeline", "--db", str(demo_db), "--bucket", "5s"]
    narrow = in_terminal(args, columns)
    lines = narrow.splitlines()
    assert max(len(line) for line in lines) <= columns, narrow
    assert "--wide shows every column" in narrow and "GOAWAY" in narrow
    header = lines[0].split("  ")
    assert header[0] == "TIME (UTC)" and "PREFACE TIMEOUTS" in lines[0]
    piped = tracer(*args).stdout
    assert in_terminal([*args, "--wide"], columns) == piped
    # the same numbers: the leaker's column, or the sum of the clients folded into OTHERS
    assert lines[1].split()[2] == ("8" if columns == 80 else "9")
    assert piped.splitlines()[1].split()[2:5] == ["8", "1", "0"]
    if columns == 50:
        assert "3 client columns (summed in OTHERS)" in " ".join(lines)


def test_process_names_keep_what_tells_them_apart() -> None:
    from cli.output import process_label

    assert process_label("/srv/app/.venv/bin/python -m orders.worker --shard 3") == \
        "python -m orders.worker --shard 3"
    assert process_label("/usr/bin/node /srv/billing/index.js") == "node index.js"
    assert process_label(None) is None


def test_csv_carries_numbers_in_base_units(demo_db: Path) -> None:
    import csv
    import io

    report = list(csv.DictReader(io.StringIO(
        tracer("report", "--db", demo_db, "--format", "csv").stdout)))
    leak = next(r for r in report if r["verdict"] == "leak")
    assert float(leak["oldest_open_s"]) > 8 and float(leak["idle_min_s"]) >= 0
    assert int(leak["open"]) == 18 and float(leak["open_growth_per_min"]) > 0
    assert all(re.fullmatch(r"[a-z_]+", k) for k in report[0])
    timeline = list(csv.reader(io.StringIO(
        tracer("timeline", "--db", demo_db, "--format", "csv", "--bucket", "2s").stdout)))
    header, rows = timeline[0], timeline[1:]
    assert header[0] == "time" and "preface_p50_ms" in header and "preface_p99_ms" in header
    for row in rows:
        assert all(cell == "" or re.fullmatch(r"-?[0-9.]+", cell) for cell in row), row
    assert float(rows[0][0]) > 1.7e9  # epoch seconds under a header that says so


def test_the_progress_line_says_mb_rate_and_eta_then_what_comes_next() -> None:
    import io

    from cli.output import ProgressLine

    now = [100.0]
    out = io.StringIO()
    line = ProgressLine(out, clock=lambda: now[0])
    now[0] = 102.0
    line.update(50_000_000, 200_000_000, 500_000)
    drawn = out.getvalue().split("\r\033[K")[-1]
    assert drawn == "reading  50.0/200.0 MB   25%  250,000 packets/s  ETA 0:06"
    now[0] = 102.05
    line.update(60_000_000, 200_000_000, 600_000)  # within 0.1 s: not redrawn
    assert out.getvalue().count("\r\033[K") == 1
    line.say("read; storing the totals and the report...")
    assert out.getvalue().endswith("read; storing the totals and the report...")
    line.close()
    assert out.getvalue().endswith("\r\033[K")


def test_a_file_read_on_a_terminal_shows_progress_and_the_last_step(tmp_path: Path) -> None:
    text = in_terminal(["capture", "-r", str(DEMO_CAPTURE), "--port", PORT, "--db",
                        str(tmp_path / "t.db")], 80, stderr_too=True)
    assert re.search(r"reading  0\.\d/0\.\d MB  100%  [\d,]+ packets/s  ETA 0:00", text), text
    assert "read; storing the totals and the report..." in text
    assert "37 connections" in text
