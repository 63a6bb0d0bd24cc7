"""Attribution of short calls: the share of ~10 ms connections the live agent names the
right process for, in this network namespace and in another one (issue 9, item 6).

A client process makes --calls calls one after another, each on a connection of its own
that lives about --hold-ms milliseconds, and exits:
- ``raw``: a plain TCP socket connects, sends the HTTP/2 client preface and an empty
  SETTINGS frame, waits --hold-ms and closes;
- ``grpcio``: a grpcio channel with its own subchannel pool
  (``grpc.use_local_subchannel_pool=1``: a connection per channel) makes one RPC, waits
  what is left of --hold-ms since the dial, and is closed.
The server is tests/peers/grpcio_server.py in this namespace. The client runs here (to
127.0.0.1, agent on ``lo``) or in a network namespace joined by a veth pair (tests/netns.py;
agent on the root end of the veth). A fresh `tracer capture` follows each run; once the
client is done and the agent had time to settle (--settle seconds), it is stopped with
SIGTERM and its database is read: every connection from the client's address is either
attributed to the client's pid (right), to another pid (wrong: must be 0), counted
``closed_before_attribution``, or something else. Where the connection rows carry detail
on an unattributed connection (the socket's uid, cgroup, namespace), those are counted too.

The CPU the store worker (the agent's process that attributes) and the capture process
used between the client's start and the agent's stop is shown, as seconds and as a share
of one core over that window.

Usage: benchmarks/attribution.py [--calls 200] [--hold-ms 10] [--client raw|grpcio|both]
                                 [--where here|netns|both] [--repeat 1] [--json]

Needs root (packet capture, `ip netns`); without `ip netns` the namespace runs are skipped
with the reason. About 10 s a run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = ROOT / "tests" / "peers"
TRACER = Path(sys.executable).with_name("tracer")
READY_TIMEOUT_S = 20.0
CLIENT_TIMEOUT_S = 120.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
LEAK_HELD = 2000  # connections the background leaker holds at most


# -- the client (run as a child: `attribution.py client ...`) ----------------------------


def client_raw(host: str, port: int, calls: int, hold: float) -> None:
    for _ in range(calls):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.connect((host, port))
            s.sendall(PREFACE + EMPTY_SETTINGS)
            time.sleep(hold)
        finally:
            s.close()


def client_grpcio(host: str, port: int, calls: int, hold: float) -> None:
    import grpc

    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0)]
    for i in range(calls):
        started = time.monotonic()
        with grpc.insecure_channel(f"{host}:{port}", options=options) as channel:
            name = f"short-{i}".encode()
            reply = channel.unary_unary("/helloworld.Greeter/SayHello")(
                b"\x0a" + bytes([len(name)]) + name, timeout=5.0)
            if b"Hello" not in reply:
                raise SystemExit(f"unexpected reply {reply!r}")
            left = hold - (time.monotonic() - started)
            if left > 0:
                time.sleep(left)


def background_leak(host: str, port: int, rate: float, source: str) -> None:
    """Connections from ``source`` opened at ``rate`` a second, each sending the preface
    and then held open (up to LEAK_HELD, then the oldest is closed), until SIGTERM."""
    held: list[socket.socket] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    next_at = time.monotonic()
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((source, 0))
        s.connect((host, port))
        s.sendall(PREFACE + EMPTY_SETTINGS)
        held.append(s)
        if len(held) > LEAK_HELD:
            held.pop(0).close()
        next_at += 1.0 / rate
        time.sleep(max(0.0, next_at - time.monotonic()))


def client_main(argv: Sequence[str]) -> int:
    if argv[0] == "leak":
        _kind, host, port, rate, source = argv
        background_leak(host, int(port), float(rate), source)
        return 0
    kind, host, port, calls, hold = argv
    run = client_raw if kind == "raw" else client_grpcio
    run(host, int(port), int(calls), float(hold))
    return 0


# -- the run ----------------------------------------------------------------------------


@dataclass
class Result:
    where: str
    client: str
    calls: int
    background: float = 0.0  # connections a second a second process opened meanwhile
    connections: int = 0
    right: int = 0
    wrong: int = 0
    closed_before: int = 0
    other: int = 0
    detail: dict[str, int] = field(default_factory=dict)  # unattributed rows with it
    worker_cpu_s: float = 0.0
    capture_cpu_s: float = 0.0
    window_s: float = 0.0
    client_s: float = 0.0

    @property
    def share(self) -> float:
        return self.right / self.calls if self.calls else 0.0


class Processes:
    """Children started here, each in its own session, stopped (by pid) at the end."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, text=True,
                                start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    group = Processes()
    try:
        yield group
    finally:
        group.stop_all()


def start_server(group: Processes) -> int:
    proc = group.start([sys.executable, "-u", str(PEERS / "grpcio_server.py"), "0",
                        "--max-lifetime", "300"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY "):
            return int(line.split()[1])
        if not line and proc.poll() is not None:
            break
    raise SystemExit("the grpcio server did not start")


def _query(db: Path, sql: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(str(db), timeout=5.0)
    try:
        cur = conn.execute(sql)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        conn.close()


def _wait_ready(agent: subprocess.Popen[str], db: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if db.exists():
            with contextlib.suppress(sqlite3.Error):
                if _query(db, "SELECT id FROM captures WHERE kind = 'live'"):
                    return
        if agent.poll() is not None:
            raise SystemExit(f"the agent exited ({agent.returncode}) before it was ready")
        time.sleep(0.05)
    raise SystemExit("the agent was not ready in time")


def _cpu(pid: int) -> tuple[float, float]:
    """(capture process, store worker) CPU seconds so far."""
    import psutil

    try:
        agent = psutil.Process(pid)
        main = sum(agent.cpu_times()[:2])
        workers = agent.children()
        worker = sum(sum(w.cpu_times()[:2]) for w in workers)
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    return main, worker


# Columns of the connections table that give detail on an unattributed connection, where
# the agent writes them (absent from older agents).
DETAIL_COLUMNS = ("client_uid", "client_cgroup", "client_netns", "client_container")


def run_once(where: str, kind: str, calls: int, hold: float, settle: float,
             host: Any | None, background: float = 0.0,
             tracer: Sequence[str] = (str(TRACER),)) -> Result:
    with tempfile.TemporaryDirectory(prefix="tracer-attr-bench-") as tmp, \
            processes() as group:
        db = Path(tmp) / "attr.db"
        port = start_server(group)
        iface = "lo" if host is None else host.root_if
        target = "127.0.0.1" if host is None else host.gateway
        client_ip = "127.0.0.1" if host is None else host.ip
        agent = group.start([*tracer, "capture", "--port", str(port), "--iface", iface,
                             "--db", str(db), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_ready(agent, db)
        time.sleep(0.3)  # the agent's first look at the host's namespaces
        prefix = [] if host is None else host.command([])
        if background:
            # From another address of the client's host, so that its rows are told apart.
            source = "127.0.0.2" if host is None else _second_address(host)
            group.start([*prefix, sys.executable, str(Path(__file__).resolve()), "client",
                         "leak", target, str(port), str(background), source])
            time.sleep(1.0)
        cpu0, t0 = _cpu(agent.pid), time.monotonic()
        client = group.start([*prefix, sys.executable, str(Path(__file__).resolve()),
                              "client", kind, target, str(port), str(calls), str(hold)])
        try:
            code = client.wait(CLIENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SystemExit("the client did not finish in time") from None
        client_s = time.monotonic() - t0
        if code != 0:
            raise SystemExit(f"the client failed (exit status {code})")
        time.sleep(settle)
        cpu1, t1 = _cpu(agent.pid), time.monotonic()
        agent.send_signal(signal.SIGTERM)
        try:
            _out, err = agent.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
            raise SystemExit("the agent did not stop") from None
        if agent.returncode != 0:
            raise SystemExit(f"the agent failed ({agent.returncode}): {err[-2000:]}")
        rows = _query(db, f"SELECT * FROM connections WHERE resp_p = {port}"
                          f" AND orig_h = '{client_ip}'")
    result = Result(where, kind, calls, background, connections=len(rows),
                    worker_cpu_s=cpu1[1] - cpu0[1], capture_cpu_s=cpu1[0] - cpu0[0],
                    window_s=t1 - t0, client_s=client_s)
    for r in rows:
        if r["pid"] == client.pid:
            result.right += 1
        elif r["pid"] is not None:
            result.wrong += 1
        elif r["attribution"] == "closed_before_attribution":
            result.closed_before += 1
        else:
            result.other += 1
        if r["pid"] is None:
            for column in DETAIL_COLUMNS:
                if r.get(column) is not None:
                    result.detail[column] = result.detail.get(column, 0) + 1
    return result


def _second_address(host: Any) -> str:
    address = host.ip.rsplit(".", 1)[0] + ".3"
    subprocess.run(host.command(["ip", "addr", "replace", f"{address}/24", "dev",
                                 host.client_if]), check=True, timeout=10)
    return address


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        return client_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--hold-ms", type=float, default=10.0)
    parser.add_argument("--client", choices=("raw", "grpcio", "both"), default="both")
    parser.add_argument("--where", choices=("here", "netns", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds the agent runs on after the client is done")
    parser.add_argument("--background", type=float, default=0.0, metavar="RATE",
                        help="meanwhile, another process of the client's host opens RATE "
                             "connections a second and holds them (a busy agent)")
    parser.add_argument("--tracer", default=str(TRACER),
                        help="the command that runs tracer (another build to compare with)")
    parser.add_argument("--json", action="store_true", help="one JSON line per run too")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("attribution of short calls: skipped (needs root for packet capture and "
              "network namespaces)")
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    import netns

    kinds = ["raw", "grpcio"] if args.client == "both" else [args.client]
    places = ["here", "netns"] if args.where == "both" else [args.where]
    results: list[Result] = []
    for where in places:
        if where == "netns":
            reason = netns.unavailable_reason()
            if reason is not None:
                print(f"netns: skipped ({reason})", file=sys.stderr)
                continue
        with contextlib.ExitStack() as stack:
            host = stack.enter_context(netns.hosts(1))[0] if where == "netns" else None
            for kind in kinds:
                for i in range(args.repeat):
                    print(f"{where} {kind} run {i + 1}/{args.repeat} ...", file=sys.stderr)
                    r = run_once(where, kind, args.calls, args.hold_ms / 1000.0, args.settle,
                                 host, args.background, shlex.split(args.tracer))
                    results.append(r)
                    if args.json:
                        print(json.dumps({**asdict(r), "share": r.share}))
    print(f"{'where':6} {'client':7} {'bg/s':>4} {'calls':>5} {'conns':>5} {'right':>6} "
          f"{'share':>6} {'wrong':>5} {'closed':>6} {'other':>5} {'worker cpu':>14} "
          f"{'capture cpu':>14}  detail on unattributed")
    for r in results:
        share = f"{100 * r.share:.0f}%"
        wcpu = f"{r.worker_cpu_s:.2f}s {100 * r.worker_cpu_s / r.window_s:.0f}%"
        ccpu = f"{r.capture_cpu_s:.2f}s {100 * r.capture_cpu_s / r.window_s:.0f}%"
        detail = ", ".join(f"{k} {v}" for k, v in sorted(r.detail.items())) or "-"
        print(f"{r.where:6} {r.client:7} {r.background:>4.0f} {r.calls:>5} {r.connections:>5} "
              f"{r.right:>6} {share:>6} {r.wrong:>5} {r.closed_before:>6} {r.other:>5} {wcpu:>14} "
              f"{ccpu:>14}  {detail}")
    if args.repeat > 1:
        for where in places:
            for kind in kinds:
                shares = [r.share for r in results if (r.where, r.client) == (where, kind)]
                if shares:
                    print(f"median share {where} {kind}: "
                          f"{100 * statistics.median(shares):.0f}%")
    print(f"(cpu: seconds from the client's start to the agent's stop, "
          f"{results[0].window_s if results else 0:.1f}s or so, and the share of one core)")
    return 1 if any(r.wrong for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
