"""The real-traffic scenario: gRPC peers on their own hosts, a capture, tracer's verdict.

One run (``run_scenario``) starts a grpcio server in the root network namespace, starts a
capture (tcpdump, or scapy's sniffer), runs every client peer in its own network
namespace (``netns.Host``: one IP per client), waits until the clients are done and the
server's socket table shows what they left open, stops the capture, tears everything
down, and only then runs the ``tracer`` command line on the capture file. The tests
assert on what tracer says.

Every process is started in its own session and stopped by its process group id, every
wait has a deadline, and teardown runs however the run ended.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import netns
import psutil
from support import REPO, tracer, wait_for

PEERS_DIR = REPO / "tests" / "peers"
GRPCJS_PACKAGE = PEERS_DIR / "node_modules" / "@grpc" / "grpc-js" / "package.json"
GRPCGO_BIN = PEERS_DIR / "go" / "bin"  # `make go-peers` builds grpcgo-server and -client here
GRPCGO_SERVER = GRPCGO_BIN / "grpcgo-server"
GRPCGO_CLIENT = GRPCGO_BIN / "grpcgo-client"
METHOD = "/helloworld.Greeter/SayHello"

READY_TIMEOUT_S = 15.0  # server up, capture listening
CLIENTS_TIMEOUT_S = 30.0  # every client printed DONE
SOCKETS_TIMEOUT_S = 10.0  # the server's socket table shows what the clients left open
STOP_TIMEOUT_S = 10.0  # a process or the sniffer ends after being asked to
# After the socket table is right the last ACKs are on the wire; leave the capture a
# moment to take them from the kernel before stopping it.
SETTLE_S = 0.3

Impl = Literal["grpcio", "grpc-js", "grpc-go"]
Mode = Literal["leak", "pool", "close"]
Backend = Literal["tcpdump", "scapy"]


@dataclass(frozen=True)
class PeerSpec:
    """One client process: which implementation, what it does, how many times."""

    name: str
    impl: Impl
    mode: Mode
    count: int  # connections for leak/close, RPCs for pool

    @property
    def connections(self) -> int:
        return 1 if self.mode == "pool" else self.count

    @property
    def open_at_end(self) -> int:
        return {"leak": self.count, "pool": 1, "close": 0}[self.mode]

    @property
    def rpcs(self) -> int:
        return self.count

    def argv(self, target: str) -> list[str]:
        if self.impl == "grpcio":
            script = grpcio_peer("client")
        elif self.impl == "grpc-go":
            script = [str(GRPCGO_CLIENT)]
        else:
            script = [shutil.which("node") or "node", str(PEERS_DIR / "grpcjs_client.js")]
        return [*script, self.mode, "--target", target, "--count", str(self.count)]


def grpcio_peer(role: Literal["client", "server"]) -> list[str]:
    """The command of tests/peers/grpcio_ROLE.py, its output unbuffered; its arguments follow."""
    return [sys.executable, "-u", str(PEERS_DIR / f"grpcio_{role}.py")]


# Leakers must open at least 3 connections to reach a "leak" verdict (store/queries.py);
# 6 leaves a margin. The pool client makes RPCs every 0.2 s: 12 of them take ~2.2 s.
PEERS: tuple[PeerSpec, ...] = (
    PeerSpec("grpcio-leak", "grpcio", "leak", 6),
    PeerSpec("grpcio-pool", "grpcio", "pool", 12),
    PeerSpec("grpcio-close", "grpcio", "close", 4),
    PeerSpec("grpcjs-leak", "grpc-js", "leak", 6),
    PeerSpec("grpcjs-pool", "grpc-js", "pool", 12),
    PeerSpec("grpcjs-close", "grpc-js", "close", 4),
)


def grpcjs_unavailable_reason() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed: the grpc-js peers cannot run"
    if not GRPCJS_PACKAGE.exists():
        return "tests/peers/node_modules has no @grpc/grpc-js: run `make node-deps`"
    return None


def grpcgo_unavailable_reason() -> str | None:
    missing = [p.name for p in (GRPCGO_SERVER, GRPCGO_CLIENT) if not os.access(p, os.X_OK)]
    if missing:
        return (f"the grpc-go peers are not built ({', '.join(missing)} missing in "
                "tests/peers/go/bin): run `make go-peers` (Debian's golang-go and "
                "golang-google-grpc-dev)")
    return None


def unavailable_reason(backend: Backend) -> str | None:
    """Why a scenario with this capture backend cannot run here, or None."""
    reason = netns.unavailable_reason()
    if reason is not None:
        return reason
    if backend == "tcpdump" and shutil.which("tcpdump") is None:
        return "tcpdump is not installed"
    return None


class PeerFailed(AssertionError):
    """A process did not do what the scenario needs; the message holds its output."""


@functools.cache
def _orphan_guard() -> list[str]:
    """A command prefix that ends the child with SIGTERM when the test process dies.

    Teardown stops every child, but a test process killed hard (SIGKILL, OOM) runs no
    teardown; util-linux's setpriv sets the parent-death signal, which survives the
    exec of ``ip netns exec`` and of the peer. Without setpriv the peers still end by
    themselves after their --max-lifetime.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    usage = subprocess.run([setpriv, "--help"], check=False, capture_output=True, text=True,
                           timeout=10).stdout
    return [setpriv, "--pdeathsig", "TERM", "--"] if "--pdeathsig" in usage else []


class Process:
    """A child process in its own session whose merged output is collected line by line."""

    def __init__(self, name: str, argv: Sequence[str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            [*_orphan_guard(), *self.argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO,
        )
        self._lines: list[str] = []
        self._changed = threading.Condition()  # an RLock inside: output() works under it
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self._lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self._lines)

    def wait_for(self, prefix: str, deadline: float) -> str:
        """The first output line starting with ``prefix``, waiting until ``deadline``."""
        with self._changed:
            while True:
                for line in self._lines:
                    if line.startswith(prefix):
                        return line
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise PeerFailed(
                        f"{self.name} exited ({self.popen.returncode}) before printing "
                        f"{prefix!r}:\n{self.output()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PeerFailed(
                        f"{self.name} did not print {prefix!r} in time:\n"
                        f"{self.output()}"
                    )
                # Woken by new output; the timeout also notices an exit without output.
                self._changed.wait(min(remaining, 0.2))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Signal the process group, wait, SIGKILL it when it does not end; the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        else:
            # The leader is gone; make sure nothing it forked survives it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self._reader.join(timeout)
        return self.popen.returncode


def ready_port(server: Process) -> int:
    """The port a tests/peers server listens on, once it said so (its READY line)."""
    return int(server.wait_for("READY ", time.monotonic() + READY_TIMEOUT_S).split()[1])


class Processes:
    """The processes of one run; see ``started_processes()`` for their end."""

    def __init__(self) -> None:
        self.started: list[Process] = []

    def start(self, name: str, argv: Sequence[str]) -> Process:
        proc = Process(name, argv)
        self.started.append(proc)
        return proc


@contextlib.contextmanager
def started_processes() -> Iterator[Processes]:
    """A ``Processes`` whose members are all stopped, newest first, when the block ends."""
    group = Processes()
    try:
        yield group
    finally:
        for proc in reversed(group.started):
            proc.stop()


def wait_done(procs: Sequence[Process], timeout: float = CLIENTS_TIMEOUT_S) -> None:
    """Until every one of ``procs`` printed DONE (its work), within ``timeout`` in all."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait_for("DONE", deadline)


class Capture(Protocol):
    """Writes the packets of the scenario to a capture file between start and stop."""

    path: Path

    def start(self) -> None: ...

    def stop(self) -> str:
        """Stop and write the file; a one-line summary for failure messages."""
        ...

    def abort(self) -> None:
        """Stop if still running, keeping quiet: the teardown path."""
        ...


class TcpdumpCapture:
    """tcpdump on every interface: Linux cooked (SLL/SLL2) frames, as users record them."""

    def __init__(self, path: Path, port: int, processes: Processes) -> None:
        self.path = path
        self.port = port
        self.processes = processes
        self.proc: Process | None = None

    def start(self) -> None:
        # --immediate-mode with -U: every packet reaches the file as it arrives. Without
        # it packets wait in the kernel ring for up to a second and whatever is there at
        # SIGINT is lost, uncounted (measured: ~45 of 500). Immediate mode uses a ring of
        # snaplen-sized slots, about 8 of them in the default 2 MiB, so the start-up
        # burst overflowed it (8-62 of 500 dropped): -B 32768 (KiB) makes room.
        # -Z root: Debian's tcpdump otherwise drops to the tcpdump user, who cannot write
        # into pytest's 0700 temporary directory.
        self.proc = self.processes.start("tcpdump", [
            "tcpdump", "-i", "any", "-n", "-U", "--immediate-mode", "-B", "32768", "-Z", "root",
            "-w", str(self.path), "tcp", "port", str(self.port),
        ])
        self.proc.wait_for("tcpdump: listening on", time.monotonic() + READY_TIMEOUT_S)

    def stop(self) -> str:
        assert self.proc is not None
        code = self.proc.stop(signal.SIGINT)
        summary = " ".join(
            line for line in self.proc.output().splitlines() if "packets" in line
        )
        if code != 0:
            raise PeerFailed(f"tcpdump exited with {code}:\n{self.proc.output()}")
        return summary

    def lost(self) -> int | None:
        """Packets the filter accepted that never reached the file, from tcpdump's summary.

        "received by filter" minus "captured" covers both the kernel's ring-buffer drops
        and packets still in the ring when tcpdump stopped (which no counter reports).
        """
        assert self.proc is not None
        numbers = {}
        for line in self.proc.output().splitlines():
            words = line.split(maxsplit=1)
            if len(words) == 2 and words[0].isdigit():
                numbers[words[1]] = int(words[0])
        try:
            return numbers["packets received by filter"] - numbers["packets captured"]
        except KeyError:
            return None

    def abort(self) -> None:
        if self.proc is not None:
            self.proc.stop(signal.SIGINT)


class ScapyCapture:
    """scapy's sniffer on the root-side veth ends: Ethernet frames, no tcpdump, no libpcap.

    Unfiltered on purpose: the veth links carry only the scenario's traffic plus a
    little IPv6 neighbour discovery, which tracer has to skip anyway.
    """

    def __init__(self, path: Path, interfaces: Sequence[str]) -> None:
        self.path = path
        self.interfaces = list(interfaces)
        self.sniffer: Any = None

    def start(self) -> None:
        from scapy.all import AsyncSniffer

        started = threading.Event()
        self.sniffer = AsyncSniffer(iface=self.interfaces, store=True,
                                    started_callback=started.set)
        self.sniffer.start()
        if not started.wait(READY_TIMEOUT_S):
            error = self.sniffer.exception
            self.sniffer = None
            raise PeerFailed(f"scapy's sniffer did not start: {error!r}")

    def _halt(self) -> list[Any]:
        sniffer, self.sniffer = self.sniffer, None
        if sniffer is None:
            return []
        if sniffer.running:
            sniffer.stop(join=False)
        sniffer.join(STOP_TIMEOUT_S)  # re-raises what the sniffing thread died of
        if sniffer.thread is not None and sniffer.thread.is_alive():
            raise PeerFailed("scapy's sniffer did not stop")
        return list(sniffer.results or [])

    def stop(self) -> str:
        from scapy.all import wrpcap

        packets = self._halt()
        # One socket per interface: merge the interfaces in time order, as mergecap does.
        packets.sort(key=lambda p: float(p.time))
        wrpcap(str(self.path), packets)
        return f"scapy: {len(packets)} packets on {', '.join(self.interfaces)}"

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._halt()


def server_sockets_by_client(port: int) -> dict[str, int]:
    """Server-side sockets on ``port`` per client IP, TIME_WAIT excluded (those are gone)."""
    counts: dict[str, int] = {}
    # grpcio turns 0.0.0.0 into a dual-stack [::] listener: its accepted sockets are IPv6
    # with v4-mapped addresses (the packets on the wire are plain IPv4).
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.raddr \
                and conn.status != psutil.CONN_TIME_WAIT:
            ip = conn.raddr.ip.removeprefix("::ffff:")
            counts[ip] = counts.get(ip, 0) + 1
    return counts


def wait_for_server_sockets(port: int, expected: dict[str, int], timeout: float) -> None:
    """Wait until the server's socket table holds exactly ``expected`` connections per IP.

    This is the kernel's ground truth, checked before the capture stops, so that a
    failure names the peer that misbehaved rather than blaming tracer.
    """
    want = {ip: n for ip, n in expected.items() if n}
    wait_for(lambda: server_sockets_by_client(port),
             f"the server sockets on port {port} per client are {want}",
             until=lambda seen: seen == want, timeout=timeout, error=PeerFailed)


def pcap_linktype_and_count(path: Path) -> tuple[int, int]:
    """Link type and record count of a classic pcap file, read without tracer or scapy."""
    data = path.read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        order = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        order = ">"
    else:
        raise AssertionError(f"{path} is not a classic pcap file (magic {magic.hex()})")
    (linktype,) = struct.unpack_from(order + "I", data, 20)
    count, pos = 0, 24
    while pos + 16 <= len(data):
        (caplen,) = struct.unpack_from(order + "I", data, pos + 8)
        pos += 16 + caplen
        count += 1
    return linktype & 0x0FFFFFFF, count  # the top bits may carry FCS information


@dataclass
class ScenarioResult:
    backend: Backend
    port: int
    pcap: Path
    db: Path
    ips: dict[str, str]  # peer name -> client IP
    capture_summary: str
    capture_lost: int | None  # tcpdump only: packets it saw but did not write
    linktype: int  # of the capture file
    file_packets: int  # records in the capture file
    capture_log: str  # tracer capture's own summary (stderr)
    report: dict[str, Any]
    connections: list[dict[str, Any]]
    peer_output: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def client(self, peer: PeerSpec) -> dict[str, Any]:
        """The report entry of ``peer`` (by its IP)."""
        ip = self.ips[peer.name]
        entries = [c for c in self.report["clients"] if c["client"] == ip]
        assert len(entries) == 1, f"{peer.name} ({ip}): report entries {entries}"
        entry: dict[str, Any] = entries[0]
        return entry

    def connections_of(self, peer: PeerSpec) -> list[dict[str, Any]]:
        ip = self.ips[peer.name]
        return [c for c in self.connections if c["orig_h"] == ip]


def _make_capture(backend: Backend, path: Path, port: int, processes: Processes,
                  hosts: Sequence[netns.Host]) -> TcpdumpCapture | ScapyCapture:
    if backend == "tcpdump":
        return TcpdumpCapture(path, port, processes)
    return ScapyCapture(path, [h.root_if for h in hosts])


def run_scenario(workdir: Path, backend: Backend, peers: Sequence[PeerSpec]) -> ScenarioResult:
    """Run ``peers`` against one server under one capture, then ask tracer about it."""
    started = time.monotonic()
    pcap = workdir / f"{backend}.pcap"
    db = workdir / f"{backend}.db"  # a database of its own: tracer adds up captures
    outputs: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        # Exit order is the reverse: capture, then processes (clients before the server),
        # then the namespaces, which must be empty of processes to go away.
        hosts = stack.enter_context(netns.hosts(len(peers)))
        processes = stack.enter_context(started_processes())
        port = ready_port(processes.start("server", [*grpcio_peer("server"), "0"]))

        capture = _make_capture(backend, pcap, port, processes, hosts)
        stack.callback(capture.abort)
        capture.start()

        ips = {peer.name: host.ip for peer, host in zip(peers, hosts, strict=True)}
        clients = [
            (peer, processes.start(peer.name, host.command(peer.argv(f"{host.gateway}:{port}"))))
            for peer, host in zip(peers, hosts, strict=True)
        ]
        wait_done([proc for _, proc in clients])
        wait_for_server_sockets(
            port, {ips[peer.name]: peer.open_at_end for peer in peers}, SOCKETS_TIMEOUT_S
        )
        time.sleep(SETTLE_S)
        # Stopped while the leakers still hold their connections: they end the capture open.
        summary = capture.stop()
        lost = capture.lost() if isinstance(capture, TcpdumpCapture) else None
        outputs = {proc.name: proc.output() for proc in processes.started}

    linktype, file_packets = pcap_linktype_and_count(pcap)
    log = tracer("capture", "--read", str(pcap), "--port", str(port), "--db", str(db))
    report = json.loads(tracer("report", "--db", str(db), "--format", "json").stdout)
    connections = json.loads(tracer("connections", "--db", str(db), "--format", "json").stdout)
    return ScenarioResult(
        backend=backend, port=port, pcap=pcap, db=db, ips=ips,
        capture_summary=summary, capture_lost=lost, capture_log=log.stderr.strip(),
        linktype=linktype, file_packets=file_packets,
        report=report, connections=connections, peer_output=outputs,
        elapsed_s=time.monotonic() - started,
    )


@contextlib.contextmanager
def nothing_left_behind() -> Iterator[None]:
    """Check on exit that the run left no namespace of ours and no child process."""
    yield
    ours = netns.namespaces_of(os.getpid())
    children = [p.pid for p in psutil.Process().children(recursive=True)]
    assert not ours, f"namespaces left behind: {ours}"
    assert not children, f"processes left behind: {children}"
