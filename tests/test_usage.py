"""What a tcpdump user types, and the mistakes a new user makes: each answered with one
clear line and an exit status that says what went wrong, nothing half-done left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import DEMO_CAPTURE, tracer

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
