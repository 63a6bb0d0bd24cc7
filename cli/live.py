"""Live capture runs: packets from the kernel into the analyzer, records into the store, and
each local client connection attributed to its process.

Two processes:
- this one reads the packet sockets, runs the analyzer and, every FLUSH_INTERVAL seconds,
  sends what changed (new events, finished connections, and the open connections that
  moved) to
- the store worker, which owns the database (a commit per batch, so `kill -9` of either
  loses at most about a second) and attributes connections to processes by reading the
  kernel's socket tables, off the packet path.

At start the kernel's socket table seeds the flow table with the connections already
open on the port (a leak made yesterday shows in the first report), attributed like the
others.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cli.runner import quiet_cycle_collector
from store.queries import report
from store.schema import open_database
from store.writer import CaptureWriter
from tracer import __version__
from tracer.attribution.join import client_sockets, open_connections
from tracer.attribution.sockdiag import SockDiag
from tracer.attribution.sockets import (
    ESTABLISHED,
    ProcessInfo,
    SocketEntry,
    address_owners,
    process_info,
    socket_owners,
    socket_tables,
)
from tracer.pipeline import Analyzer, Drained
from tracer.sources.live import CaptureError, LiveCapture, drop_privileges
from tracer.sources.pcapwriter import PcapngWriter

FLUSH_INTERVAL = 0.5  # seconds between two batches to the store worker
TRIM_INTERVAL = 10.0  # seconds between two returns of freed memory to the system
NEW_CONNECTION_INTERVAL = 0.0  # new connections go to attribution as soon as they appear
READ_TIMEOUT = 0.1
BATCH = 4096
ATTRIBUTION_INTERVAL = 0.5
FULL_SCAN_INTERVAL = 1.0  # other namespaces' tables (slow to read) at most this often
QUICK_SCAN_INTERVAL = 0.02  # new connections looked up within this
RETRY_FIRST = 0.05  # a local client's socket not found yet: look again after this,
RETRY_MAX = 1.0  # doubling up to this


@dataclass
class LiveSettings:
    ports: frozenset[int]
    db_path: str
    interfaces: list[str] = field(default_factory=lambda: ["any"])
    duration: float | None = None
    count: int | None = None
    write_path: str | None = None
    snaplen: int = 262144
    buffer_bytes: int = 32 << 20
    user_filter: str | None = None
    attribution: bool = True
    user: str | None = None
    decode_server_headers: bool = False


@dataclass
class LiveResult:
    capture_id: int = 0
    packets: int = 0
    segments: int = 0
    connections: int = 0
    open_at_end: int = 0
    seeded: int = 0
    received: int = 0
    dropped: int = 0
    attributed: int = 0
    unattributed_closed: int = 0
    remote: int = 0
    elapsed_s: float = 0.0
    written_packets: int = 0
    status: str = "complete"
    error: str | None = None


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop finishes cleanly at its next turn."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {
            sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)
        }

    def _handler(self, signum: int, frame: object) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _until_idle(packets: Iterator[tuple[float, int, bytes] | None],
                writer: PcapngWriter | None,
                opened: list[Any] | None) -> Iterator[tuple[float, int, bytes]]:
    """Packets until the source reports a quiet moment (None) or a new connection appears
    (it goes to attribution at once), teed to --write."""
    for item in packets:
        if item is None:
            return
        if writer is not None:
            writer.write(item[0], item[2])
        yield item
        if opened:
            return


class _Trimmer:
    """Gives the C heap's free memory back to the system (glibc's malloc_trim), at most
    every TRIM_INTERVAL seconds. A long-running agent frees the batches it pickles and the
    records it builds; without this the heap keeps its peak size. A no-op elsewhere (musl)."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.trim: Callable[[int], int] | None = None
        try:
            import ctypes

            self.trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            self.trim = None

    def __call__(self) -> None:
        now = time.monotonic()
        if self.trim is not None and now - self.at >= TRIM_INTERVAL:
            self.at = now
            self.trim(0)


def _changed_open(analyzer: Analyzer, since: float) -> list[dict[str, Any]]:
    """Records of the open connections that changed since the last flush."""
    from tracer.record import build_record

    out = []
    for conn in analyzer.table.connections():
        if conn.done:
            continue
        if conn.flushed_ts is None or conn.last_ts > conn.flushed_ts:
            conn.flushed_ts = conn.last_ts
            out.append(build_record(conn))
    return out


def run_live(settings: LiveSettings,
             status: Callable[[str], None] | None = None) -> LiveResult:
    """Capture until the duration, the count or a signal; return the totals."""
    result = LiveResult()
    capture = LiveCapture(settings.interfaces, settings.ports, snaplen=settings.snaplen,
                          buffer_bytes=settings.buffer_bytes, user_filter=settings.user_filter)
    try:
        if settings.user:
            _prepare_for(settings.user, settings.db_path)
            drop_privileges(settings.user)
            try:
                return _run(settings, capture, result, status)
            except ImportError as error:
                raise CaptureError(
                    f"running as {settings.user}, Python could not load {error.name}: that "
                    f"user cannot read this Python installation. Install tracer where "
                    f"{settings.user} can read it, or run without --user."
                ) from error
        return _run(settings, capture, result, status)
    finally:
        capture.close()


def _prepare_for(user: str, db_path: str) -> None:
    """What must happen while still root, before becoming ``user``: load every module the
    run will need (the interpreter's files may not be readable by ``user``) and create the
    database, handing it to ``user``."""
    import glob  # noqa: F401 - psutil uses it
    import importlib.metadata
    import multiprocessing.connection
    import multiprocessing.popen_fork
    import multiprocessing.sharedctypes
    import multiprocessing.synchronize
    import pwd

    import psutil

    from tracer.record import build_record  # noqa: F401 - imported where it is used

    importlib.metadata.entry_points()
    multiprocessing.get_context("fork").Value("q", 0)
    psutil.Process().name()
    SockDiag().close()
    entry = pwd.getpwnam(user)
    open_database(db_path).close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.chown(db_path + suffix, entry.pw_uid, entry.pw_gid)


def _run(settings: LiveSettings, capture: LiveCapture, result: LiveResult,
         status: Callable[[str], None] | None) -> LiveResult:
    ctx = multiprocessing.get_context("fork")
    reader, sender = ctx.Pipe(duplex=False)
    rows = ctx.Value("q", 0)
    worker = ctx.Process(target=_store_worker, args=(reader, sender, settings, rows),
                         daemon=True)
    worker.start()
    reader.close()
    hello = None
    writer = PcapngWriter(settings.write_path, snaplen=settings.snaplen,
                          comment=f"tracer {__version__} live capture") \
        if settings.write_path else None
    quiet_cycle_collector()
    trim = _Trimmer()
    analyzer = Analyzer(settings.ports, decode_server_headers=settings.decode_server_headers)
    if settings.attribution:
        analyzer.table.opened = []
    stop = _Stop()
    started = time.monotonic()
    started_wall = time.time()
    try:
        # Seed from the kernel's table after the sockets are open: a connection that
        # opens in between is seen both ways and stays one connection.
        now = time.time()
        diag = SockDiag()
        try:
            table = socket_tables(settings.ports, own=diag.dump(settings.ports),
                                  own_netns=diag.netns)
        finally:
            diag.close()
        for oc in open_connections(table, settings.ports):
            if oc.state == ESTABLISHED:
                analyzer.table.seed(now, oc.key())
                result.seeded += 1
        packets = capture.packets(READ_TIMEOUT)
        last_flush = last_status = last_new = time.monotonic()
        flushed_at = 0.0
        last_packets = 0
        while not stop.requested:
            limit = BATCH
            if settings.count is not None:
                limit = min(limit, settings.count - analyzer.stats.packets)
                if limit <= 0:
                    break
            analyzer.feed(_until_idle(packets, writer, analyzer.table.opened), limit)
            mono = time.monotonic()
            if settings.duration is not None and mono - started >= settings.duration:
                break
            opened = analyzer.table.opened
            if opened and mono - last_new >= NEW_CONNECTION_INTERVAL:
                # New connections go to attribution at once: the socket of a short call
                # is gone within milliseconds.
                from tracer.record import build_record

                sender.send(("opened", [build_record(c) for c in opened if not c.done]))
                opened.clear()
                last_new = mono
            if mono - last_flush >= FLUSH_INTERVAL:
                analyzer.table.tick(time.time())
                drained = analyzer.drain()
                records = drained.records + _changed_open(analyzer, flushed_at)
                flushed_at = time.time()
                received, dropped = capture.statistics()
                sender.send(("batch", records, drained.events, drained.anomalies,
                             _totals(analyzer, received, dropped, started_wall)))
                last_flush = mono
                if writer is not None:
                    writer.flush()
                trim()
            if status is not None and mono - last_status >= 1.0:
                rate = (analyzer.stats.packets - last_packets) / (mono - last_status)
                last_packets = analyzer.stats.packets
                last_status = mono
                status(_status_line(analyzer, rate, capture.dropped, rows.value))
        analyzer.finish()
        final: Drained = analyzer.drain()
        received, dropped = capture.statistics()
        result.elapsed_s = time.monotonic() - started
        totals = _totals(analyzer, received, dropped, started_wall)
        sender.send(("batch", final.records, final.events, final.anomalies, totals))
        sender.send(("finish", "complete", None, result.elapsed_s))
        if worker.is_alive():
            hello = _wait_summary(worker, settings)
    finally:
        stop.restore()
        if writer is not None:
            writer.close()
            result.written_packets = writer.packets
        sender.close()
        worker.join(timeout=30)
    stats = analyzer.stats
    result.packets = stats.packets
    result.segments = stats.segments
    result.received, result.dropped = capture.received, capture.dropped
    if hello is not None:
        for key, value in hello.items():
            setattr(result, key, value)
    elif worker.exitcode not in (0, None):
        result.status = "error"
        result.error = f"the store worker exited with status {worker.exitcode}"
    return result


def _wait_summary(worker: Any, settings: LiveSettings) -> dict[str, Any] | None:
    worker.join(timeout=60)
    db = open_database(settings.db_path)
    try:
        row = db.execute(
            "SELECT id, connections, open_at_end FROM captures ORDER BY id DESC LIMIT 1"
        ).fetchone()
        stats = dict(db.execute(
            "SELECT name, value FROM capture_stats WHERE capture_id = ?", [row[0]]
        ).fetchall())
    finally:
        db.close()
    return {
        "capture_id": row[0], "connections": row[1], "open_at_end": row[2],
        "attributed": stats.get("attribution.local", 0),
        "unattributed_closed": stats.get("attribution.closed_before_attribution", 0),
        "remote": stats.get("attribution.remote", 0),
    }


def _totals(analyzer: Analyzer, received: int, dropped: int, started: float) -> dict[str, Any]:
    """Capture totals so far. A live capture's window is its wall-clock run, not the span
    from its first packet to its last: a quiet port is observed too."""
    s = analyzer.stats
    return {"packets": s.packets, "segments": s.segments, "first_ts": started,
            "last_ts": max(time.time(), s.last_ts or 0.0), "received": received,
            "drops": dropped}


def _status_line(analyzer: Analyzer, rate: float, drops: int, rows: int) -> str:
    conns = analyzer.table.connections()
    clients = len({c.orig_key[: len(c.orig_key) // 2 - 2] for c in conns if c.is_open})
    return (f"{analyzer.stats.packets:,} packets ({rate:,.0f}/s), "
            f"{sum(1 for c in conns if c.is_open):,} open connections, {clients:,} clients, "
            f"kernel drops {drops:,}, rows written {rows:,}")


# -- the store worker ------------------------------------------------------------------


@dataclass
class _Pending:
    orig: tuple[str, int]
    resp: tuple[str, int]
    first_seen: float  # time.time()
    next_try: float = 0.0
    wait: float = RETRY_FIRST
    namespaces: set[int] | None = None  # those that have the client's address, once known


class Attributor:
    """Matches connections to the sockets of local processes, a scan at a time.

    A client address that no network namespace of this host has is remote: settled at the
    first look at the host's addresses taken after the connection appeared (one second at
    most), without touching a socket table. A local one is looked up in its namespace's
    table: this namespace's by sock_diag (microseconds), others' from /proc (milliseconds,
    at most once a second); a socket not found yet is looked for again, less and less
    often (RETRY_FIRST doubling up to RETRY_MAX), until found or the connection closes."""

    def __init__(self, ports: frozenset[int]) -> None:
        self.ports = ports
        self.pending: dict[str, _Pending] = {}
        self.settled: set[str] = set()  # attributed or judged remote, still open
        self.processes: dict[int, ProcessInfo] = {}
        self.counts: dict[str, int] = {}
        self.diag = SockDiag()
        self.last_full = -1e9
        self.recent_owners: dict[int, None] = {}  # pids that owned connections, newest last
        # Verdicts reached before the connection's row was written: applied with it.
        self.deferred: dict[str, tuple[str, ProcessInfo | None, float]] = {}

    def observe(self, records: list[dict[str, Any]], now: float) -> list[tuple[str, str]]:
        """Note new connections; return (uid, verdict) for those that closed before a scan
        could settle them (counted, never guessed)."""
        ended = []
        for r in records:
            uid = r["uid"]
            closed = r["end_reason"] not in (None, "open_at_end")
            if closed:
                if uid in self.settled:
                    self.settled.discard(uid)
                    continue
                pending = self.pending.pop(uid, None)
                first_seen = pending.first_seen if pending is not None else now
                owners = address_owners(r["orig_h"], seen_at=first_seen)
                ended.append((uid, "remote" if owners == set() else "closed_before_attribution"))
                continue
            if uid in self.settled or uid in self.pending:
                continue
            self.pending[uid] = _Pending((r["orig_h"], r["orig_p"]), (r["resp_h"], r["resp_p"]),
                                         now, now)
        return ended

    def scan(self, now: float) -> list[tuple[str, str, ProcessInfo | None]]:
        """(uid, verdict, process) for every pending connection settled by this scan."""
        if not self.pending:
            return []
        own = self.diag.netns
        matched: dict[str, SocketEntry] = {}
        out: list[tuple[str, str, ProcessInfo | None]] = []
        elsewhere: dict[str, _Pending] = {}  # local to another namespace, not found yet
        for uid, p in self.pending.items():
            if p.next_try > now:
                continue
            if p.namespaces is None:
                owners = address_owners(p.orig[0], seen_at=p.first_seen)
                if owners is None:  # no look at the host's addresses since it appeared
                    p.next_try = now + RETRY_MAX / 4
                    continue
                if not owners:
                    out.append((uid, "remote", None))
                    continue
                p.namespaces = owners
            p.next_try = now + p.wait  # if this look does not settle it
            p.wait = min(p.wait * 2, RETRY_MAX)
            entry = self.diag.lookup(p.orig, p.resp) if own in p.namespaces else None
            if entry is not None:
                matched[uid] = entry
            elif p.namespaces - {own}:
                elsewhere[uid] = p
        if elsewhere and time.monotonic() - self.last_full >= FULL_SCAN_INTERVAL:
            self.last_full = time.monotonic()
            wanted = set().union(*(p.namespaces or set() for p in elsewhere.values())) - {own}
            sockets = client_sockets(socket_tables(self.ports, own=[], own_netns=own,
                                                   only=wanted))
            for uid, p in elsewhere.items():
                found = sockets.get((p.orig, p.resp))
                if found is not None:
                    matched[uid] = found
        holders = socket_owners({e.inode for e in matched.values() if e.inode},
                                likely=list(self.recent_owners))
        for uid, entry in matched.items():
            pid = holders.get(entry.inode)
            info = self._process(pid) if pid is not None else None
            if info is None:
                continue  # no process holds it (closing, or gone): look again later
            out.append((uid, "local", info))
            self.recent_owners.pop(info.pid, None)
            self.recent_owners[info.pid] = None
            if len(self.recent_owners) > 64:
                del self.recent_owners[next(iter(self.recent_owners))]
        for uid, _verdict, _info in out:
            del self.pending[uid]
            self.settled.add(uid)
        return out

    def _process(self, pid: int) -> ProcessInfo | None:
        cached = self.processes.get(pid)
        if cached is not None:
            return cached
        info = process_info(pid)
        if info is not None:
            if len(self.processes) > 10000:
                self.processes.clear()
            self.processes[pid] = info
        return info


def _store_worker(conn: Any, sender: Any, settings: LiveSettings, rows: Any) -> None:
    """Entry point of the store worker process."""
    # The capture process decides when to stop: a signal to the whole process group (^C in
    # a terminal, systemd's KillMode=control-group) must not kill the writer first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Our copy of the pipe's write end must go: when the capture process dies (kill -9),
    # the pipe then reports end of file and this process finishes the capture.
    sender.close()
    db = open_database(settings.db_path)
    iface = ",".join(settings.interfaces)
    writer = CaptureWriter.start(db, kind="live", ports=settings.ports, interface=iface,
                                 tool_version=__version__)
    attributor = Attributor(settings.ports) if settings.attribution else None
    totals: dict[str, Any] = {}
    status, error, elapsed = "interrupted", None, 0.0
    last_scan = 0.0
    trim = _Trimmer()
    while True:
        timeout = ATTRIBUTION_INTERVAL if attributor and attributor.pending else 1.0
        try:
            ready = conn.poll(timeout)
            message = conn.recv() if ready else None
        except (EOFError, OSError):
            break  # the capture process is gone (kill -9): keep what we have
        if message is not None and message[0] == "finish":
            _, status, error, elapsed = message
            if attributor is not None:  # a last look for the ones still open
                _record_attribution(writer, attributor.scan(time.time()), attributor,
                                    time.time())
            break
        now = time.time()
        if message is not None and message[0] == "opened":
            if attributor is not None:
                attributor.observe(message[1], now)
                if time.monotonic() - last_scan >= QUICK_SCAN_INTERVAL:
                    last_scan = time.monotonic()
                    _record_attribution(writer, attributor.scan(now), attributor, now)
            continue
        if message is not None:
            _, records, events, anomalies, totals = message
            writer.write(records, events, anomalies)
            rows.value += len(records) + len(events)
            if attributor is not None and attributor.deferred:
                late = [(r["uid"], *attributor.deferred.pop(r["uid"]))
                        for r in records if r["uid"] in attributor.deferred]
                _apply_attribution(writer, late)
            if attributor is not None:
                ended = attributor.observe(records, now)
                _record_attribution(writer, [(u, v, None) for u, v in ended], attributor, now)
            _update_capture(writer, totals)
            trim()
        if attributor is not None and time.monotonic() - last_scan >= ATTRIBUTION_INTERVAL:
            last_scan = time.monotonic()
            _record_attribution(writer, attributor.scan(now), attributor, now)
    stats = dict(attributor.counts) if attributor else {}
    stats = {f"attribution.{k}": v for k, v in stats.items()}
    connections, open_at_end = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(is_open), 0) FROM connections WHERE capture_id = ?",
        [writer.capture_id],
    ).fetchone()
    writer.finish(
        status=status, error=error, first_ts=totals.get("first_ts"),
        last_ts=totals.get("last_ts"), packets=totals.get("packets", 0),
        segments=totals.get("segments", 0), connections=connections, open_at_end=open_at_end,
        anomaly_counts=writer.anomaly_counts, drops=totals.get("drops"),
        elapsed_s=elapsed, stats={**stats, "kernel.received": totals.get("received", 0)},
    )
    report(db)  # computed once now, read many times (store.queries.report)
    db.close()


def _update_capture(writer: CaptureWriter, totals: dict[str, Any]) -> None:
    with writer.db.conn:
        writer.db.conn.execute(
            "UPDATE captures SET first_ts = ?, last_ts = ?, packets = ?, segments = ?,"
            " drops = ? WHERE id = ?",
            [totals.get("first_ts"), totals.get("last_ts"), totals.get("packets", 0),
             totals.get("segments", 0), totals.get("drops"), writer.capture_id],
        )


def _record_attribution(writer: CaptureWriter,
                        verdicts: list[tuple[str, str, ProcessInfo | None]],
                        attributor: Attributor, now: float) -> None:
    if not verdicts:
        return
    for _uid, verdict, _info in verdicts:
        attributor.counts[verdict] = attributor.counts.get(verdict, 0) + 1
    missing = _apply_attribution(writer, [(u, v, i, now) for u, v, i in verdicts])
    for uid, verdict, info, ts in missing:
        attributor.deferred[uid] = (verdict, info, ts)


def _apply_attribution(
    writer: CaptureWriter, verdicts: list[tuple[str, str, ProcessInfo | None, float]]
) -> list[tuple[str, str, ProcessInfo | None, float]]:
    """Write verdicts; return those whose connection has no row yet."""
    missing = []
    db = writer.db.conn
    with db:
        for uid, verdict, info, ts in verdicts:
            if info is not None:
                db.execute(
                    "INSERT OR IGNORE INTO processes (pid, start_time, ppid, user, comm, cmdline,"
                    " exe, container, pod) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [info.pid, info.start_time, info.ppid, info.user, info.comm, info.cmdline,
                     info.exe, info.container, info.pod],
                )
            cur = db.execute(
                "UPDATE connections SET pid = ?, process_start = ?, attribution = ?,"
                " attributed_ts = ? WHERE uid = ?",
                [info.pid if info else None, info.start_time if info else None, verdict, ts,
                 uid],
            )
            if cur.rowcount == 0:
                missing.append((uid, verdict, info, ts))
    return missing


def explain(exc: CaptureError) -> str:
    return str(exc)


__all__ = ["CaptureError", "LiveResult", "LiveSettings", "explain", "run_live"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `tracer capture --port PORT`")
