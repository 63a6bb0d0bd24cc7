"""`tracer demo`: a leak found live, end to end, on this machine.

A grpcio server and three client processes on loopback (free ports): one closes its
channels, one keeps one pooled channel, one opens a new channel per call and never closes
it. The live agent captures them with attribution for about 20 seconds, then the report
must name the leaking process (pid and command line) and only it.

Without capture privileges the demo says so and analyses a capture of the same scenario
that ships with the package (recorded with the three clients on three network
namespaces, so that each has its own address: a capture file carries no process ids).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from store.queries import report as build_report
from store.schema import open_database

if TYPE_CHECKING:
    from tracer.agent.live import LiveResult

SHIPPED = Path(__file__).resolve().parent / "demo-capture.pcapng"
SHIPPED_PORT = 50151
MODES = ("close", "pool", "leak")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _peer(*args: str, netns: str | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "cli.demo_peers", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)


@contextlib.contextmanager
def _server(port: int, bind: str = "127.0.0.1",
            max_fds: int | None = None) -> Iterator[subprocess.Popen[str]]:
    proc = _peer("server", str(port), "--bind", bind,
                 *(["--max-fds", str(max_fds)] if max_fds else []))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # READY, or EOF if it failed
        if "READY" not in line:
            raise RuntimeError("the demo's gRPC server did not start")
        yield proc
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def can_capture() -> str | None:
    """Why this process cannot open a packet socket, or None when it can."""
    from tracer.sources.live import CaptureError, LiveCapture

    try:
        LiveCapture(["lo"], frozenset([1])).close()
    except CaptureError as exc:
        return str(exc)
    return None


def run(duration: float, db_path: str | None, echo: Callable[[str], None],
        show_report: Callable[[str], None]) -> int:
    """Run the demo; 0 when the report names exactly the leaking process."""
    reason = can_capture()
    workdir = Path(tempfile.mkdtemp(prefix="tracer-demo-"))
    db = db_path or str(workdir / "demo.db")
    try:
        if reason is not None:
            return _offline(reason, db, echo, show_report)
        return _live(duration, db, echo, show_report)
    finally:
        if db_path is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _live(duration: float, db: str, echo: Callable[[str], None],
          show_report: Callable[[str], None]) -> int:
    port = _free_port()
    echo(f"demo: a grpcio server on 127.0.0.1:{port} and three clients: one closes its "
         "channels, one pools one channel, one leaks a channel per call")
    echo(f"demo: capturing live on lo for {duration:.0f}s with process attribution ...")
    clients: dict[str, subprocess.Popen[str]] = {}
    with _server(port):
        def start_clients() -> None:
            time.sleep(1.0)  # the agent is listening by now
            for mode in MODES:
                clients[mode] = _peer(mode, f"127.0.0.1:{port}", "--interval", "0.5",
                                      "--lifetime", str(duration + 30))

        result = _capture(port, db, duration, start_clients, clients, threading.Event())
    echo(f"demo: {_captured(result)}")
    show_report(db)
    return _judge(db, {mode: proc.pid for mode, proc in clients.items()}, echo)


def _capture(port: int, db: str, duration: float, start_clients: Callable[[], None],
             clients: dict[str, subprocess.Popen[str]], stop: threading.Event) -> LiveResult:
    """``port`` captured live on lo into ``db`` for ``duration`` seconds, while
    ``start_clients`` (in a thread, the agent listening by then) starts the scenario's
    clients into ``clients``; then ``stop`` is set and every client stopped. The capture's
    result (tracer.agent.live.LiveResult)."""
    from tracer.agent.live import LiveSettings, run_live

    starter = threading.Thread(target=start_clients, daemon=True)
    starter.start()
    try:
        return run_live(LiveSettings(ports=frozenset([port]), db_path=db, interfaces=["lo"],
                                     duration=duration), None)
    finally:
        stop.set()
        starter.join()
        for proc in clients.values():
            _stop(proc)


def _captured(result: LiveResult) -> str:
    return (f"{result.packets:,} packets, {result.connections} connections, "
            f"{result.attributed} attributed to their process, kernel drops {result.dropped}")


def _judge(db_path: str, pids: dict[str, int], echo: Callable[[str], None]) -> int:
    db = open_database(db_path)
    data = build_report(db)
    db.close()
    leaks = [c for c in data["clients"] if c["verdict"] == "leak"]
    named = {c.get("pid") for c in leaks}
    if named == {pids["leak"]}:
        [c] = leaks
        echo(f"demo: found it: pid {c['pid']} ({c['process']}) opened {c['opened']} "
             f"connections and closed {c['closed']}; the pooled and closing clients are ok")
        return 0
    echo(f"demo: expected exactly the leaking client (pid {pids['leak']}) to be named, "
         f"got {sorted(p for p in named if p is not None) or 'none'}")
    return 1


def _offline(reason: str, db: str, echo: Callable[[str], None],
             show_report: Callable[[str], None]) -> int:
    from tracer.agent.files import read_files

    echo(f"demo: cannot capture live here: {reason}")
    echo(f"demo: analysing instead a capture of the same scenario recorded earlier and "
         f"shipped with tracer ({SHIPPED.name}); a capture file has no process ids, so "
         "each client shows as its own address")
    if not SHIPPED.exists():
        echo(f"demo: the shipped capture {SHIPPED} is missing from this installation")
        return 1
    read_files([str(SHIPPED)], frozenset([SHIPPED_PORT]), db, jobs=1)
    show_report(db)
    data = build_report(open_database(db))
    leaks = [c["client"] for c in data["clients"] if c["verdict"] == "leak"]
    echo(f"demo (recorded capture): leaking client: {', '.join(leaks) or 'none found'}")
    return 0 if len(leaks) == 1 else 1


FREEZE_FDS = 64  # the server's RLIMIT_NOFILE in the freeze scenario
FREEZE_PREFACE_TIMEOUT = 2.0  # seconds: the dialers' connect timeout, the report's limit
FREEZE_DIALERS = (("orders", "json"), ("billing", "logfmt"))


def freeze(duration: float, db_path: str | None, echo: Callable[[str], None],
           run_cli: Callable[..., None]) -> int:
    """`tracer demo --freeze`: the server stops answering, and why, found live.

    A grpcio server limited to 64 file descriptors, a client that leaks a channel per call,
    a pooled one and a closing one, captured live with process attribution. The leak takes
    the server's last descriptor before half the time is up: the kernel still completes
    new handshakes into the listen queue, the server can no longer accept them. Then two
    more clients dial with a 2 s timeout and log their failures, one as JSON, one as
    logfmt. The logs are added to the database and the report explains the freeze. 0 when
    it names exactly the leaker, counts preface timeouts, and finds the server out of
    descriptors."""
    reason = can_capture()
    if reason is not None:
        echo(f"demo --freeze: the freeze scenario is captured live, which cannot be done "
             f"here: {reason}")
        return 1
    # With --db the session is kept: its logs beside the database, for `tracer logs` later.
    logs = [str(Path(db_path).with_name(f"{Path(db_path).stem}-{name}.log")) if db_path
            else "" for name, _ in FREEZE_DIALERS]
    taken = [log for log in logs if log and os.path.lexists(log)]
    if taken:
        echo(f"demo --freeze: {', '.join(taken)} already exist; the demo writes its clients' "
             "logs there: remove them or give another --db")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tracer-freeze-"))
    db = db_path or str(workdir / "freeze.db")
    logs = [log or str(workdir / f"{name}.log") for log, (name, _) in
            zip(logs, FREEZE_DIALERS, strict=True)]
    port = _free_port()
    target = f"127.0.0.1:{port}"
    freeze_at = duration * 0.45  # the leak has taken every descriptor by then
    leak_interval = max(0.05, (freeze_at - 1.0) / (FREEZE_FDS - 4))
    clients: dict[str, subprocess.Popen[str]] = {}
    stop = threading.Event()
    echo(f"demo --freeze: a grpcio server on {target} limited to {FREEZE_FDS} file "
         f"descriptors; a client leaks a channel every {leak_interval:.2f}s, one pools one "
         "channel, one closes its channels")
    echo(f"demo --freeze: after {freeze_at:.0f}s two more clients dial with a "
         f"{FREEZE_PREFACE_TIMEOUT:.0f}s timeout and log their failures; capturing live on "
         f"lo for {duration:.0f}s ...")
    try:
        with _server(port, max_fds=FREEZE_FDS):
            def start_clients() -> None:
                time.sleep(1.0)  # the agent is listening by now
                life = str(duration + 30)
                clients["leak"] = _peer("leak", target, "--interval", f"{leak_interval:.3f}",
                                        "--lifetime", life)
                for mode in ("pool", "close"):
                    clients[mode] = _peer(mode, target, "--interval", "0.5", "--lifetime", life)
                if stop.wait(max(freeze_at - 1.0, 0.0)):
                    return
                # They stop dialing in time for their last failure to be captured.
                dialing = str(max(duration - freeze_at - FREEZE_PREFACE_TIMEOUT - 1.0, 1.0))
                for (name, fmt), log in zip(FREEZE_DIALERS, logs, strict=True):
                    clients[name] = _peer("dial", target, "--interval", "2", "--lifetime",
                                          dialing, "--connect-timeout",
                                          str(FREEZE_PREFACE_TIMEOUT), "--log", log,
                                          "--log-format", fmt)
                    stop.wait(0.7)  # not in step

            result = _capture(port, db, duration, start_clients, clients, stop)
        echo(f"demo --freeze: {_captured(result)}")
        present = [log for log in logs if Path(log).exists()]
        if present:
            run_cli("logs", "add", *present, "--db", db, "-q")
        run_cli("report", "--db", db, "--preface-timeout", f"{FREEZE_PREFACE_TIMEOUT:g}s")
        code = _judge_freeze(db, clients["leak"].pid, echo)
        if db_path is not None:
            echo(f"demo --freeze: the session is kept in {db} (and the logs in "
                 f"{' and '.join(logs)}); try `tracer timeline --db {db} --bucket 5s`, "
                 f"`tracer correlate --db {db}`, `tracer logs show --db {db}`")
        return code
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _judge_freeze(db_path: str, leaker: int, echo: Callable[[str], None]) -> int:
    db = open_database(db_path)
    data = build_report(db, preface_timeout=FREEZE_PREFACE_TIMEOUT)
    db.close()
    leaks = {c.get("pid") for c in data["clients"] if c["verdict"] == "leak"}
    server = data["server"]
    stall = server.get("stall") or {}
    found = []
    if leaks != {leaker}:
        found.append(f"expected exactly the leaking client (pid {leaker}) to be named, got "
                     f"{sorted(p for p in leaks if p is not None) or 'none'}")
    if not server["preface_timeouts"]:
        found.append("no preface timeout was seen")
    if stall.get("why") != "fd_limit":
        found.append(f"the server was not seen out of descriptors (stall: {stall or 'none'})")
    for problem in found:
        echo(f"demo --freeze: {problem}")
    if found:
        return 1
    echo(f"demo --freeze: found it: pid {leaker} leaks; the server ran out of file "
         f"descriptors and {server['preface_timeouts']} dials timed out waiting for its "
         "preface; nobody else is flagged")
    return 0


def record_shipped(path: str, duration: float, echo: Callable[[str], None]) -> int:
    """Maintainers: record the capture the demo falls back on. Needs root and iproute2:
    each client runs in a network namespace of its own, so each has its own address."""
    from tracer.agent.live import LiveSettings, run_live

    tag = f"trd{os.getpid() % 100000}"
    namespaces: list[str] = []

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, timeout=10)

    try:
        for i, _mode in enumerate(MODES, start=1):
            ns, host, peer = f"{tag}n{i}", f"{tag}h{i}", f"{tag}c{i}"
            ip("netns", "add", ns)
            namespaces.append(ns)
            ip("link", "add", host, "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "netns", ns)
            ip("addr", "add", f"10.151.{i}.1/24", "dev", host)
            ip("link", "set", host, "up")
            ip("netns", "exec", ns, "ip", "addr", "add", f"10.151.{i}.2/24", "dev", peer)
            ip("netns", "exec", ns, "ip", "link", "set", peer, "up")
            ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        clients: list[subprocess.Popen[str]] = []

        def start_clients() -> None:
            time.sleep(1.0)
            for i, mode in enumerate(MODES, start=1):
                clients.append(_peer(mode, f"10.151.{i}.1:{SHIPPED_PORT}", "--interval", "0.5",
                                     "--lifetime", str(duration + 30), netns=f"{tag}n{i}"))

        with _server(SHIPPED_PORT, bind="0.0.0.0"), tempfile.TemporaryDirectory() as tmp:
            starter = threading.Thread(target=start_clients, daemon=True)
            starter.start()
            run_live(LiveSettings(ports=frozenset([SHIPPED_PORT]), db_path=f"{tmp}/r.db",
                                  duration=duration, write_path=path, attribution=False), None)
            starter.join()
            for proc in clients:
                _stop(proc)
        echo(f"recorded {path}")
        return 0
    finally:
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)

