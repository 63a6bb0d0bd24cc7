"""The live agent: packets from the kernel into the analyzer, records into the store, and
each local client connection attributed to its process.

Two processes:
- the capture process (this module) reads the packet sockets and runs the analyzer. It is
  driven by deadlines, never by packet counts: the source hands control back at least
  every TURN seconds whatever the traffic (none, a trickle, a flood), and at each turn the
  loop checks for a stop, sends new connections to attribution, and every FLUSH_INTERVAL
  sends what changed (finished connections, the open ones that moved, events) as one
  batch;
- the store worker (tracer.agent.store_worker) owns the database, attribution and
  retention.

At start the kernel's socket table seeds the flow table with the connections already
open on the port (a leak made yesterday shows in the first report), attributed like the
others.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from store.lock import WriterLock
from store.retention import Retention
from store.schema import StoreError, open_database
from tracer import __version__
from tracer.agent.control import StopRequest, Trimmer, quiet_cycle_collector
from tracer.agent.messages import (
    Batch,
    Failed,
    Finish,
    FromWorker,
    Opened,
    Ready,
    Summary,
    Totals,
    ToWorker,
)
from tracer.agent.metrics import MetricsError, MetricsServer, MetricsSettings, check_textfile
from tracer.agent.store_worker import STATUS_FIELDS, StoreSettings, serve
from tracer.agent.unixwatch import Target, UnixTargetError, resolve
from tracer.attribution.join import open_connections
from tracer.attribution.sockdiag import SockDiag
from tracer.attribution.sockets import ESTABLISHED, socket_tables
from tracer.options import CoreOptions
from tracer.pipeline import Analyzer
from tracer.record import build_record
from tracer.sources.live import CaptureError, LiveCapture, drop_privileges
from tracer.sources.pcapwriter import PcapngWriter

TURN = 0.05  # seconds: the longest the loop goes without looking at the clock
FLUSH_INTERVAL = 0.5  # seconds between two batches to the store worker
STATUS_INTERVAL = 1.0  # seconds between two status lines
# New connections go to attribution together, at most this long after the first of them
# (sooner when the source has nothing more to read): one message for a burst of them.
OPENED_BATCH_S = 0.002
FEED_LIMIT = 1 << 20  # packets per turn at most (the turn's time bound comes first)
PIPE_BYTES = 4 << 20  # kernel buffer of the pipe to the store worker
FINISH_BATCH = 2048  # connections per batch when the capture ends
WORKER_READY_TIMEOUT = 60.0  # seconds for the store worker to open the database
WORKER_EXIT_TIMEOUT = 120.0  # seconds for it to write the last batches and finish


@dataclass
class LiveSettings:
    ports: frozenset[int]
    db_path: str
    interfaces: list[str] = field(default_factory=lambda: ["any"])
    duration: float | None = None
    count: int | None = None
    write_path: str | None = None
    snaplen: int = 262144
    buffer_bytes: int = 32 << 20  # the receive ring's size, or the socket buffer's
    ring: bool = True  # the memory-mapped receive ring where the kernel allows it
    user_filter: str | None = None
    attribution: bool = True
    user: str | None = None
    # The analysis core's options (--grpc-status, --events all).
    core: CoreOptions = field(default_factory=CoreOptions)
    retention: Retention | None = None
    # Told when a file read is writing the database and this capture waits for it.
    wait: Callable[[str], None] | None = None
    # Told once how packets are read (the receive ring, or why not), and whether that
    # is a warning (the ring was wanted and the kernel refused it).
    notice: Callable[[str, bool], None] | None = None
    # --metrics, --metrics-file, --metrics-top (tracer.agent.metrics).
    metrics: MetricsSettings | None = None
    # --unix: Unix-socket servers followed through unix_diag (tracer.agent.unixwatch);
    # with no port, no packet socket is opened at all.
    unix: tuple[str, ...] = ()


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
    ring_bytes: int = 0  # the receive ring's size (0: one recv per packet)
    attributed: int = 0
    unattributed_closed: int = 0
    remote: int = 0
    pruned: int = 0
    elapsed_s: float = 0.0
    written_packets: int = 0
    written_interfaces: list[str] = field(default_factory=list)  # --write's, in order seen
    status: str = "complete"  # complete | failed
    error: str | None = None
    stopped_by: int | None = None  # the signal that stopped it
    unix_polls: int = 0  # --unix: polls of the kernel's Unix socket table
    unix_poll_ms: float = 0.0  # their median duration
    unix_opened: int = 0  # Unix-socket connections seen
    unix_interval_s: float = 0.5  # the longest interval between two polls (stretched)
    unix_attributed: int = 0


class StoreFailed(Exception):
    """The store worker stopped: the database cannot be written (the message says why and
    what was kept)."""


class StoreLink:
    """The store worker process and the two pipes to and from it."""

    def __init__(self, settings: StoreSettings, exporter: MetricsServer | None = None) -> None:
        ctx = multiprocessing.get_context("fork")
        inbox, self._sender = ctx.Pipe(duplex=False)
        _widen(self._sender.fileno())
        self._replies, outbox = ctx.Pipe(duplex=False)
        self.rows = ctx.Array("q", STATUS_FIELDS)  # store_worker.StoreWorker.rows
        self.process = ctx.Process(
            target=serve, args=(inbox, outbox, [self._sender, self._replies], settings,
                                self.rows, exporter),
            daemon=True, name="tracer-store")
        self.process.start()
        inbox.close()
        outbox.close()
        if exporter is not None:  # the store worker serves it now, with its own copy
            exporter.httpd.server_close()
        self.summary: Summary | None = None

    def wait_ready(self, stop: StopRequest) -> int:
        """The capture id, once the worker has opened the database."""
        deadline = time.monotonic() + WORKER_READY_TIMEOUT
        while time.monotonic() < deadline and not stop.requested:
            if self._replies.poll(0.1):
                reply = self._receive()
                if isinstance(reply, Ready):
                    return reply.capture_id
                if isinstance(reply, Failed):
                    raise StoreFailed(reply.message)
                break
            if not self.process.is_alive():
                break
        self.check()
        raise StoreFailed(f"the store worker did not start (exit status "
                          f"{self.process.exitcode})")

    def send(self, message: ToWorker) -> None:
        try:
            self._sender.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self.check()
            raise StoreFailed(f"the store worker exited (status {self.process.exitcode})") \
                from None

    def check(self) -> None:
        """Raise StoreFailed if the worker said it cannot go on."""
        while self._replies.poll(0):
            reply = self._receive()
            if isinstance(reply, Failed):
                raise StoreFailed(reply.message)
            if isinstance(reply, Summary):
                self.summary = reply

    def _receive(self) -> FromWorker | None:
        try:
            reply: FromWorker = self._replies.recv()
        except (EOFError, OSError):
            return None
        return reply

    def close(self, timeout: float = WORKER_EXIT_TIMEOUT) -> Summary | None:
        """Wait for the worker to finish; its summary, or None when it had none to give."""
        self._sender.close()
        deadline = time.monotonic() + timeout
        while self.summary is None and time.monotonic() < deadline:
            if self._replies.poll(0.2):
                reply = self._receive()
                if reply is None:
                    break
                if isinstance(reply, Failed):
                    self.process.join(5)
                    raise StoreFailed(reply.message)
                if isinstance(reply, Summary):
                    self.summary = reply
            elif not self.process.is_alive():
                break
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        return self.summary


def _widen(fd: int) -> None:
    """Room in the pipe to the store worker for PIPE_BYTES of messages: while the worker
    digests a batch (a few hundred milliseconds under a flood of new connections), the
    capture process goes on reading packets instead of waiting to hand over the next
    message. Bounded by the kernel (its pipe-max-size for users without
    CAP_SYS_RESOURCE); where even that is refused the pipe keeps its 64 KiB and only
    speed suffers."""
    for size in (PIPE_BYTES, 1 << 20):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
            return
        except OSError:
            continue


def run_live(settings: LiveSettings,
             status: Callable[[str], None] | None = None) -> LiveResult:
    """Capture until the duration, the count or a signal; return the totals."""
    exporter = _metrics_first(settings.metrics)
    try:
        return _run_live(settings, status, exporter)
    finally:
        if exporter is not None:
            exporter.httpd.server_close()


def _metrics_first(metrics: MetricsSettings | None) -> MetricsServer | None:
    """Before anything starts (and while still root): the /metrics port bound, the
    --metrics-file path checked; either failing stops the run with one line."""
    if metrics is None:
        return None
    try:
        if metrics.file is not None:
            check_textfile(metrics.file)
        return MetricsServer(metrics.address) if metrics.address is not None else None
    except MetricsError as exc:
        raise CaptureError(str(exc)) from None


class NoPackets:
    """The packet source of an agent that follows Unix sockets only: nothing to read, and
    the loop still turns every TURN seconds (stop, flush, status and --duration on time)."""

    receive = "no packet capture (Unix sockets only)"
    ring_refused = False
    received = dropped = ring_bytes = ring_full = ring_malformed = 0

    def packets(self, turn: float) -> Iterator[tuple[float, int, bytes] | None]:
        while True:
            time.sleep(turn)
            yield None

    def statistics(self) -> tuple[int, int]:
        return 0, 0

    def close(self) -> None:
        pass


def _run_live(settings: LiveSettings, status: Callable[[str], None] | None,
              exporter: MetricsServer | None) -> LiveResult:
    try:
        targets = tuple(resolve(settings.unix))
    except UnixTargetError as exc:
        raise CaptureError(str(exc)) from None
    if settings.write_path and not settings.ports:
        raise CaptureError("--write keeps packets, and following Unix sockets alone captures "
                           "none: give --port too")
    capture: Any = LiveCapture(settings.interfaces, settings.ports, snaplen=settings.snaplen,
                               buffer_bytes=settings.buffer_bytes,
                               user_filter=settings.user_filter, ring=settings.ring) \
        if settings.ports else NoPackets()
    if settings.notice is not None and settings.ports:
        settings.notice(capture.receive, capture.ring_refused)
    try:
        if settings.user:
            _prepare_for(settings.user, settings.db_path)
            drop_privileges(settings.user)
            _check_writable_as(settings.user, settings.db_path)
            try:
                return _run(settings, capture, status, exporter, targets)
            except ImportError as error:
                raise CaptureError(
                    f"running as {settings.user}, Python could not load {error.name}: that "
                    f"user cannot read this Python installation. Install tracer where "
                    f"{settings.user} can read it, or run without --user."
                ) from error
        return _run(settings, capture, status, exporter, targets)
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

    import store.retention  # noqa: F401 - imported where it is used
    import tracer.agent.store_worker  # noqa: F401 - imported where it is used

    importlib.metadata.entry_points()
    multiprocessing.get_context("fork").Value("q", 0)
    psutil.Process().name()
    psutil.Process().create_time()
    SockDiag().close()
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise CaptureError(f"--user {user}: no such user") from None
    folder = os.path.dirname(os.path.abspath(db_path))
    if not _can_write_as(entry, folder):  # said before anything is created
        raise CaptureError(_unwritable_folder(user, folder))
    try:
        open_database(db_path).close()
    except StoreError as exc:
        raise CaptureError(str(exc)) from None
    for suffix in ("", "-wal", "-shm"):
        # Never by name: a planted link would hand its target to the user.
        try:
            fd = os.open(db_path + suffix, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CaptureError(f"cannot hand {db_path}{suffix} to {user}: {exc.strerror}") \
                from None
        try:
            os.fchown(fd, entry.pw_uid, entry.pw_gid)
        finally:
            os.close(fd)


def _can_write_as(entry: Any, folder: str) -> bool:
    """Whether the user of ``entry`` (a pwd entry) may create files in ``folder``: asked
    of the kernel by a child that becomes that user (permission bits, ACLs and read-only
    mounts all count)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.setgroups(os.getgrouplist(entry.pw_name, entry.pw_gid))
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            os._exit(0 if os.access(folder, os.W_OK | os.X_OK) else 1)
        except BaseException:  # noqa: BLE001 - whatever it was, the answer is no
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _check_writable_as(user: str, db_path: str) -> None:
    """After becoming ``user``: SQLite must create its -wal and -shm files beside the
    database, so ``user`` needs to write there as well as to the file itself."""
    folder = os.path.dirname(os.path.abspath(db_path))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CaptureError(_unwritable_folder(user, folder))
    if not os.access(db_path, os.R_OK | os.W_OK):
        raise CaptureError(f"--user {user} cannot write the database {db_path}")


def _unwritable_folder(user: str, folder: str) -> str:
    return (f"--user {user} cannot write in {folder}, where SQLite keeps the database's "
            f"-wal and -shm files: give {user} a folder it can write (for example "
            f"`install -d -o {user} /var/lib/tracer` and --db /var/lib/tracer/tracer.db)")


def _run(settings: LiveSettings, capture: LiveCapture | NoPackets,
         status: Callable[[str], None] | None,
         exporter: MetricsServer | None = None, unix: tuple[Target, ...] = ()) -> LiveResult:
    result = LiveResult()
    # Before anything is started: a --write path that cannot be used stops the run here.
    pcap = PcapngWriter(settings.write_path, snaplen=settings.snaplen,
                        comment=f"tracer {__version__} live capture") \
        if settings.write_path else None
    lock = _lock(settings)
    stop = StopRequest()
    analyzer = Analyzer(settings.ports, settings.core)
    link = StoreLink(StoreSettings(db_path=settings.db_path, ports=settings.ports,
                                   interface=",".join(settings.interfaces),
                                   attribution=settings.attribution,
                                   retention=settings.retention, metrics=settings.metrics,
                                   unix=unix),
                     exporter)
    summary: Summary | None = None
    try:
        try:
            result.capture_id = link.wait_ready(stop)
        except StoreFailed as exc:
            raise CaptureError(str(exc)) from None
        quiet_cycle_collector()
        if settings.attribution:
            analyzer.outbox.opened = []
        result.seeded = _seed(analyzer, settings.ports) if settings.ports else 0
        started = time.monotonic()
        loop = _Loop(settings, capture, analyzer, link, pcap, stop, status)
        try:
            loop.run()
            result.elapsed_s = time.monotonic() - started
            loop.finish(Finish("complete", None, result.elapsed_s))
        except StoreFailed as exc:
            result.status, result.error = "failed", str(exc)
            result.elapsed_s = time.monotonic() - started
        result.stopped_by = stop.signum
    finally:
        stop.restore()
        if pcap is not None:
            pcap.close()
            result.written_packets = pcap.packets
            result.written_interfaces = pcap.interfaces
        try:
            summary = link.close()
        except StoreFailed as exc:
            result.status, result.error = "failed", str(exc)
        lock.release()
    stats = analyzer.stats
    result.packets = stats.packets
    result.segments = stats.segments
    result.received, result.dropped = capture.received, capture.dropped
    result.ring_bytes = capture.ring_bytes
    if summary is not None:
        result.capture_id = summary.capture_id
        result.connections = summary.connections
        result.open_at_end = summary.open_at_end
        result.attributed = summary.stats.get("attribution.local", 0)
        result.unattributed_closed = summary.stats.get("attribution.closed_before_attribution", 0)
        result.remote = summary.stats.get("attribution.remote", 0)
        result.pruned = summary.pruned
        result.unix_polls = summary.stats.get("unix.polls", 0)
        result.unix_poll_ms = summary.stats.get("unix.poll_us_median", 0) / 1000.0
        result.unix_opened = summary.stats.get("unix.opened", 0)
        result.unix_interval_s = summary.stats.get("unix.poll_interval_ms", 500) / 1000.0
        result.unix_attributed = summary.stats.get("unix.attribution.local", 0)
    elif result.status != "failed":
        result.status = "failed"
        result.error = (f"the store worker exited (status {link.process.exitcode}) before "
                        "it finished the capture")
    return result


def _lock(settings: LiveSettings) -> WriterLock:
    """The database's write lock, for this capture and its store worker (which inherits
    it). Another live capture on the database: refused at once; a file read: waited for."""
    try:
        db = open_database(settings.db_path)
    except StoreError as exc:
        raise CaptureError(str(exc)) from None
    try:
        lock = WriterLock(db, settings.db_path)
        lock.acquire(wait=settings.wait,
                     refuse_if=lambda holder: holder is not None and holder["kind"] == "live")
    except StoreError as exc:
        raise CaptureError(str(exc)) from None
    except KeyboardInterrupt:
        raise CaptureError(f"gave up waiting for {settings.db_path}") from None
    finally:
        db.close()
    return lock


def _seed(analyzer: Analyzer, ports: frozenset[int]) -> int:
    """Seed from the kernel's table after the sockets are open: a connection that opens in
    between is seen both ways and stays one connection."""
    now = time.time()
    diag = SockDiag()
    try:
        table = socket_tables(ports, own=diag.dump(ports), own_netns=diag.netns)
    finally:
        diag.close()
    seeded = 0
    for oc in open_connections(table, ports):
        if oc.state == ESTABLISHED:
            analyzer.table.seed(now, oc.key())
            seeded += 1
    return seeded


def _this_turn(packets: Iterator[tuple[float, int, bytes] | None],
               opened: list[Any] | None) -> Iterator[tuple[float, int, bytes]]:
    """Packets until the source ends the turn (None: the turn is over, or the source has
    nothing more for now) or OPENED_BATCH_S after a new connection appeared (the new
    ones go to attribution together)."""
    clock = time.monotonic
    due = 0.0
    for item in packets:
        if item is None:
            return
        yield item
        if opened:
            now = clock()
            if not due:
                due = now + OPENED_BATCH_S
            elif now >= due:
                return


def opened_record(conn: Any) -> dict[str, Any]:
    """What attribution needs of a new connection (the whole record comes with the next
    batch): a fraction of build_record to build and pickle."""
    orig_h, orig_p, resp_h, resp_p = conn.addresses()
    return {"uid": conn.uid, "ts": conn.ts, "end_reason": None, "orig_h": orig_h,
            "orig_p": orig_p, "resp_h": resp_h, "resp_p": resp_p}


class _Loop:
    """The capture process's loop, by deadlines."""

    def __init__(self, settings: LiveSettings, capture: LiveCapture | NoPackets,
                 analyzer: Analyzer,
                 link: StoreLink, pcap: PcapngWriter | None, stop: StopRequest,
                 status: Callable[[str], None] | None) -> None:
        self.settings = settings
        self.capture = capture
        self.analyzer = analyzer
        self.link = link
        self.pcap = pcap
        self.stop = stop
        self.status = status
        self.started_wall = time.time()
        self.trim = Trimmer()

    def run(self) -> None:
        settings, analyzer, link = self.settings, self.analyzer, self.link
        outbox = analyzer.outbox
        # With --write, each packet with its interface, written before the analyzer has it.
        if self.pcap is None:
            packets = self.capture.packets(TURN)
        else:  # a writer only beside a packet capture (_run_live)
            assert isinstance(self.capture, LiveCapture)
            packets = self.pcap.tee(self.capture.tagged_packets(TURN))
        clock = time.monotonic
        now = clock()
        end = now + settings.duration if settings.duration is not None else float("inf")
        next_flush = now + FLUSH_INTERVAL
        next_status = now + STATUS_INTERVAL
        last_status, last_packets = now, 0
        while not self.stop.requested:
            limit = FEED_LIMIT
            if settings.count is not None:
                limit = min(limit, settings.count - analyzer.stats.packets)
                if limit <= 0:
                    return
            analyzer.feed(_this_turn(packets, outbox.opened), limit)
            opened = outbox.opened
            if opened:
                link.send(Opened([opened_record(c) for c in opened if not c.done]))
                opened.clear()
            now = clock()
            if now >= next_flush:
                self.flush()
                next_flush = now + FLUSH_INTERVAL
            if self.status is not None and now >= next_status:
                rate = (analyzer.stats.packets - last_packets) / max(now - last_status, 1e-9)
                last_status, last_packets = now, analyzer.stats.packets
                next_status = now + STATUS_INTERVAL
                shared = link.rows[:]
                unix = (shared[1], shared[2], shared[3]) if settings.unix else None
                self.status(status_line(analyzer, rate, self.capture.dropped, shared[0],
                                        unix=unix, packets=bool(settings.ports)))
            if now >= end:
                return

    def totals(self) -> Totals:
        received, dropped = self.capture.statistics()
        s = self.analyzer.stats
        return Totals(packets=s.packets, segments=s.segments, first_ts=self.started_wall,
                      last_ts=max(time.time(), s.last_ts or 0.0), received=received,
                      drops=dropped, ring_bytes=self.capture.ring_bytes,
                      ring_full=self.capture.ring_full,
                      ring_malformed=self.capture.ring_malformed)

    def flush(self) -> None:
        analyzer = self.analyzer
        analyzer.table.tick(time.time())  # time moves on with no packets too
        drained = analyzer.drain()
        records = drained.records + _changed_open(analyzer)
        self.link.send(Batch(records, drained.events, drained.anomalies, self.totals()))
        self.link.check()
        if self.pcap is not None:
            self.pcap.flush()
        self.trim()

    def finish(self, finish: Finish) -> None:
        """End of the capture: every open connection stored as open at the end, a batch
        at a time (memory stays flat however many are open)."""
        self.flush()
        for drained in self.analyzer.finish_batches(FINISH_BATCH):
            self.link.send(Batch(drained.records, drained.events, drained.anomalies,
                                 self.totals()))
        self.link.send(finish)


def _changed_open(analyzer: Analyzer) -> list[dict[str, Any]]:
    """Records of the open connections that changed since they were last sent."""
    out = []
    for conn in analyzer.table.awake():
        if conn.done:
            continue
        if conn.flushed_ts is None or conn.last_ts > conn.flushed_ts:
            conn.flushed_ts = conn.last_ts
            out.append(build_record(conn))
    return out


def status_line(analyzer: Analyzer, rate: float, drops: int, rows: int,
                unix: tuple[int, int, int] | None = None, packets: bool = True) -> str:
    """One line on how the capture goes: every open connection counted, asleep or not;
    with ``unix`` (open, client processes, not attributed yet) the Unix-socket ones too,
    and without ``packets`` (--unix alone) those only."""
    parts = []
    if packets:
        by_client = analyzer.table.open_by_client()
        clients = len(by_client)
        open_now = sum(by_client.values())
        parts.append(f"{analyzer.stats.packets:,} packets ({rate:,.0f}/s), "
                     f"{open_now:,} open connection{'s' if open_now != 1 else ''} from "
                     f"{clients:,} client address{'es' if clients != 1 else ''}, kernel "
                     f"drops {drops:,}")
    if unix is not None:
        open_unix, processes, unknown = unix
        pending = f" ({unknown:,} not attributed yet)" if unknown else ""
        parts.append(f"{open_unix:,} open Unix-socket connection"
                     f"{'s' if open_unix != 1 else ''} from {processes:,} client process"
                     f"{'es' if processes != 1 else ''}{pending}")
    parts.append(f"rows written {rows:,}")
    return ", ".join(parts)


__all__ = ["CaptureError", "LiveResult", "LiveSettings", "StoreFailed", "run_live",
           "status_line"]
