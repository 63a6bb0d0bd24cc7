"""The live agent under test: `tracer capture` started as a process, its database read back.

Builds on realtraffic_support.py (processes in their own session with a parent-death
signal, stopped by process group; the grpcio and grpc-js peers), support.py (running the
tracer command line, waiting with a deadline) and netns.py (client hosts in network
namespaces). What is added here:
starting the agent and knowing when it listens, reading its database while it runs,
the client sockets each peer process holds (the ground truth attribution is checked
against), and running a command as another user.

Every wait has a deadline; every process goes through ``rt.started_processes()`` so it
is stopped however a test ends.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
import realtraffic_support as rt
import support
from support import in_background, skip_if, tracer, tracer_command, wait_for

AGENT_READY_TIMEOUT_S = 15.0  # the agent's packet sockets are open, its database exists
AGENT_EXIT_TIMEOUT_S = 20.0  # the agent ends after its --duration, or after a signal
CONDITION_TIMEOUT_S = 10.0  # the database shows what the traffic made
NOBODY = "nobody"


def need_root() -> None:
    """Skip the test, saying why, where live capture cannot run."""
    support.need_root("live capture (AF_PACKET)")
    if shutil.which("setpriv") is None:
        pytest.skip("util-linux setpriv is not installed")


def need_nobody() -> None:
    """Skip the test, saying why, where tracer cannot run live as user nobody."""
    need_root()
    skip_if(nobody_unavailable_reason())


@contextlib.contextmanager
def processes() -> Iterator[rt.Processes]:
    """Processes stopped when the block ends, and a check that nothing outlived them."""
    with rt.nothing_left_behind(), rt.started_processes() as group:
        yield group


@contextlib.contextmanager
def nobody_dir(prefix: str = "tracer-nobody-") -> Iterator[Path]:
    """A fresh folder user nobody can write (pytest's tmp_path is root's, 0700), removed
    afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        entry = pwd.getpwnam(NOBODY)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def nobody_group() -> str:
    """The primary group of user nobody (nogroup on Debian, nobody elsewhere)."""
    import grp

    return grp.getgrgid(pwd.getpwnam(NOBODY).pw_gid).gr_name


def as_nobody(argv: Sequence[str]) -> list[str]:
    """``argv`` run as user nobody, without root's supplementary groups."""
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={nobody_group()}", "--clear-groups",
            "--", *argv]


@functools.cache
def nobody_unavailable_reason() -> str | None:
    """Why tracer cannot run as user nobody here (the virtualenv or the sources not
    readable by it), or None."""
    try:
        pwd.getpwnam(NOBODY)
    except KeyError:
        return "there is no user nobody"
    probe = subprocess.run(
        as_nobody([*tracer_command(), "--version"]), check=False, capture_output=True,
        text=True, cwd="/", timeout=30, stdin=subprocess.DEVNULL,
    )
    if probe.returncode != 0:
        return (f"tracer does not run as user nobody (is {Path(sys.executable).parent.parent}"
                f" readable by it?): {probe.stderr.strip()[-300:]}")
    return None


def nobody_can_read(path: str | Path) -> bool:
    return subprocess.run(as_nobody(["test", "-r", str(path)]), check=False,
                          timeout=10).returncode == 0


def stdlib_hidden_from_nobody() -> str | None:
    """The standard library file an agent needs after dropping root to nobody, when nobody
    cannot read it (an interpreter under /root, say); else None."""
    import multiprocessing.connection

    path = multiprocessing.connection.__file__
    return None if path is None or nobody_can_read(path) else path


# What `tracer capture --user` imports after it dropped root (found by running it with an
# interpreter nobody cannot read); imported beforehand, the agent runs as nobody anyway.
LATE_IMPORTS = ("glob", "importlib.metadata", "multiprocessing.connection",
                "multiprocessing.popen_fork", "multiprocessing.sharedctypes",
                "multiprocessing.synchronize", "psutil")


def preloaded_tracer_command() -> list[str]:
    """`tracer` with LATE_IMPORTS done first, as root."""
    return [sys.executable, "-c",
            f"import {', '.join(LATE_IMPORTS)}; from cli.main import main; main()"]


def start_server(processes: rt.Processes, *options: str, name: str = "server") -> int:
    """A grpcio Greeter server on 0.0.0.0:free port in this namespace, started with
    ``options`` (``--tls-cert PEM --tls-key PEM``, say); its port."""
    return rt.ready_port(processes.start(name, [*rt.grpcio_peer("server"), "0",
                                                "--max-lifetime", "120", *options]))


def start_grpcgo_server(processes: rt.Processes, *options: str,
                        name: str = "grpcgo-server") -> int:
    """A grpc-go Greeter server (tests/peers/go) on 0.0.0.0:free port, started with
    ``options`` (``--max-connection-age 2s``, say); its port."""
    return rt.ready_port(processes.start(name, [str(rt.GRPCGO_SERVER), "0", "--max-lifetime",
                                                "120", *options]))


def start_peer(processes: rt.Processes, peer: rt.PeerSpec, target: str,
               prefix: Sequence[str] = ()) -> rt.Process:
    """A tests/peers client; ``prefix`` runs it elsewhere (``ip netns exec NS``) or as
    someone else (``as_nobody``)."""
    argv = [*peer.argv(target), "--max-lifetime", "90"]
    return processes.start(peer.name, [*prefix, *argv])


def client_ports(pid: int, server_port: int) -> set[int]:
    """Local ports of the established connections process ``pid`` holds to
    ``server_port``: the kernel's word on which connections are that process's.

    Read from the process's own network namespace (/proc/PID/net/tcp*, which psutil
    does not do) and its file descriptors."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            lines = f.read().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            if state == "01" and inode in inodes and int(remote.rsplit(":", 1)[1], 16) \
                    == server_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def wait_client_ports(pid: int, server_port: int, count: int,
                      timeout: float = rt.SOCKETS_TIMEOUT_S) -> set[int]:
    """The client ports of ``pid`` once it holds exactly ``count`` of them."""
    return wait_for(lambda: client_ports(pid, server_port),
                    f"pid {pid} holds {count} connections to port {server_port}",
                    until=lambda ports: len(ports) == count, timeout=timeout,
                    error=rt.PeerFailed)


# -- the database ----------------------------------------------------------------------


def query(db: Path, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows of ``sql`` as dicts; the agent may be writing (WAL: readers never block it)."""
    conn = sqlite3.connect(str(db), timeout=5.0)
    try:
        cur = conn.execute(sql, list(params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        conn.close()


def try_query(db: Path, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]] | None:
    """``query``, or None while the database or its tables do not exist yet."""
    if not db.exists():
        return None
    try:
        return query(db, sql, params)
    except sqlite3.OperationalError:
        return None


def report(db: Path) -> dict[str, Any]:
    import json

    data: dict[str, Any] = json.loads(tracer("report", "--db", str(db), "--format", "json").stdout)
    return data


# -- the agent -------------------------------------------------------------------------


class Agent:
    """`tracer capture` on a live interface, as a process of its own session."""

    def __init__(self, processes: rt.Processes, db: Path, port: int, *args: str,
                 prefix: Sequence[str] = (), name: str = "agent",
                 command: Sequence[str] | None = None) -> None:
        self.db = db
        self.port = port
        argv = [*prefix, *(command or tracer_command()), "capture", "--port", str(port),
                "--db", str(db), *args]
        self.proc = processes.start(name, argv)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.popen.pid

    def output(self) -> str:
        return self.proc.output()

    def fail(self, message: str) -> rt.PeerFailed:
        return rt.PeerFailed(f"{message}\nagent output:\n{self.output()}")

    def wait_ready(self, timeout: float = AGENT_READY_TIMEOUT_S) -> None:
        """Until the agent's capture row exists: its store worker runs, and so its packet
        sockets are open (they are opened first) and queue what comes from now on."""
        def ready() -> bool:
            if try_query(self.db, "SELECT id FROM captures WHERE kind = 'live'"):
                return True
            if self.proc.popen.poll() is not None:
                raise self.fail(f"the agent exited ({self.proc.popen.returncode}) before "
                                "it was ready")
            return False

        wait_for(ready, "the agent was ready", timeout=timeout, error=self.fail)

    def require_time_left(self, duration: float, margin: float = 1.0) -> float:
        """Fail clearly when the agent's --duration (started at its launch, so this
        underestimates what is left) ends within ``margin`` seconds: what the test waited
        for came too late for the agent to record it."""
        left = duration - (time.monotonic() - self.started)
        if left < margin or self.proc.popen.poll() is not None:
            raise self.fail(f"the traffic was ready only {left:.1f}s before the end of the "
                            f"agent's {duration}s: the test's --duration is too short here")
        return left

    def wait_exit(self, timeout: float = AGENT_EXIT_TIMEOUT_S) -> int:
        try:
            code = self.proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self.fail(f"the agent did not exit within {timeout:.0f}s") from None
        self.proc._reader.join(5.0)  # all of its output
        return code

    def wait_for_rows(self, sql: str, params: Sequence[Any], predicate: Any,
                      what: str, timeout: float = CONDITION_TIMEOUT_S) -> list[dict[str, Any]]:
        """Poll ``sql`` until ``predicate(rows)`` holds; the rows."""
        def sample() -> tuple[bool, list[dict[str, Any]] | None]:
            rows = try_query(self.db, sql, params)
            if rows is not None and predicate(rows):
                return True, rows
            if self.proc.popen.poll() is not None:
                raise self.fail(f"the agent exited before {what}; last rows: {rows}")
            return False, rows

        _, rows = wait_for(sample, what, until=lambda got: got[0], timeout=timeout,
                           interval=0.1, error=self.fail)
        assert rows is not None
        return rows

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def connections(db: Path) -> list[dict[str, Any]]:
    return query(db, "SELECT * FROM connections ORDER BY ts, uid")


def capture_row(db: Path) -> dict[str, Any]:
    rows = query(db, "SELECT * FROM captures ORDER BY id DESC LIMIT 1")
    assert rows, f"no capture recorded in {db}"
    return rows[0]


# -- traffic ---------------------------------------------------------------------------


@contextlib.contextmanager
def tcp_sink(port: int) -> Iterator[None]:
    """A plain TCP server on 127.0.0.1:``port`` that reads and discards everything."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    srv.settimeout(0.2)

    def serve(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(0.2)
            with conn:
                while not stop.is_set():
                    try:
                        if not conn.recv(1 << 20):
                            break
                    except TimeoutError:
                        continue
                    except OSError:
                        break

    with contextlib.closing(srv), in_background(serve, f"sink-{port}"):
        yield


def flood(port: int, total_bytes: int, timeout: float = 10.0) -> None:
    """Send ``total_bytes`` to 127.0.0.1:``port`` as fast as loopback takes them."""
    chunk = b"\0" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        sent = 0
        while sent < total_bytes:
            s.sendall(chunk)
            sent += len(chunk)
