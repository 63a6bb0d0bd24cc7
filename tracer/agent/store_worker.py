"""The live agent's store worker: the process that owns the database.

It receives the capture process's messages (tracer.agent.messages), writes each batch in
one transaction (so `kill -9` of either process loses at most about a second), looks up
which process owns each new connection off the packet path (tracer.agent.attribution) at
once, even while a batch is written (a helper thread writes it) and before the batch
sent just ahead of it is unpickled, and keeps the database within its retention
(store.retention). Driven by deadlines: a scan, a retention pass and a trim happen on
time whether messages come or not.

When the capture process dies (kill -9), the pipe reports end of file and this process
finishes the capture as interrupted. When the database cannot be written (a full disk)
it marks the capture failed, says what was kept, and exits.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from typing import Any

from store.retention import Retention
from store.schema import StoreError, open_database
from store.server import ServerSampleWriter
from store.stored_report import store_report
from store.writer import Attribution, CaptureWriter, StoreFull, store_failure
from tracer import __version__
from tracer.agent.attribution import (
    ATTRIBUTION_INTERVAL,
    QUICK_SCAN_INTERVAL,
    Attributor,
    Settled,
)
from tracer.agent.control import Trimmer, ignore_stop_signals, own_identity
from tracer.agent.messages import (
    Batch,
    Failed,
    Finish,
    FromWorker,
    Opened,
    Ready,
    Summary,
    Totals,
)
from tracer.agent.metrics import (
    FILE_INTERVAL_S,
    MetricsError,
    MetricsServer,
    MetricsSettings,
    MetricsState,
    registry_for,
    write_textfile,
)
from tracer.agent.unixwatch import Target, UnixWatch
from tracer.attribution.server import Listener, ServerReader

IDLE_WAKE = 1.0  # seconds: the longest the worker sleeps with nothing due
WRITE_POLL = 0.002  # seconds: while a batch is written, what is due is looked at this often
SWITCH_INTERVAL = 0.0005  # seconds: the GIL passes from the helper thread this soon
BIG_MESSAGE = 1 << 16  # bytes: before a message this big (a batch) is unpickled,
FOLLOWERS_QUIET = 0.002  # new connections are taken until none came for this long
FOLLOWERS_MAX = 0.02  # or for this long at most
SERVER_SAMPLE_INTERVAL = 1.0  # seconds between two looks at the server (store.server)


@dataclass(frozen=True)
class StoreSettings:
    """What the store worker needs to know of the capture."""

    db_path: str
    ports: frozenset[int]
    interface: str
    attribution: bool = True
    retention: Retention | None = None
    metrics: MetricsSettings | None = None  # --metrics, --metrics-file (tracer.agent.metrics)
    unix: tuple[Target, ...] = ()  # --unix: the Unix-socket servers followed


STATUS_FIELDS = 4  # rows written; Unix connections open, their clients, not attributed


class StoreWorker:
    """One live capture's writer, attribution and retention, a message at a time."""

    def __init__(self, writer: CaptureWriter, settings: StoreSettings,
                 rows: Any | None = None, exporter: MetricsServer | None = None,
                 capture_pid: int | None = None) -> None:
        self.writer = writer
        self.settings = settings
        # Shared counters the status line shows (a multiprocessing.Array of STATUS_FIELDS):
        # rows written, and with --unix the connections open, their client processes and
        # those not attributed yet.
        self.rows = rows
        self.attributor = Attributor(settings.ports) if settings.attribution else None
        self.unwritten: list[Attribution] = []  # verdicts for the next batch to write
        self.retention = settings.retention
        self.totals = Totals()
        self.trim = Trimmer()
        self.last_scan = 0.0
        now = time.monotonic()
        self.next_prune = now if self.retention is not None else float("inf")
        self.next_size_check = now + (self.retention.size_check_s if self.retention else 0.0)
        self.pruned = 0
        if self.retention is not None:
            self.retention.configure(writer.db)
        # The server's accept queue and descriptors, when it runs on this host (what
        # --no-attribution turns off is the look-up of each connection's owner).
        self.server: ServerReader | None = None
        with contextlib.suppress(OSError):  # no sock_diag here: no server samples
            self.server = ServerReader(settings.ports)
        self.server_samples = ServerSampleWriter(writer.db, writer.capture_id)
        self.next_server_sample = now
        # --unix: the kernel's Unix socket table, polled on this process's deadlines.
        self.unix = UnixWatch(list(settings.unix), settings.attribution) \
            if settings.unix else None
        self.next_unix_poll = now
        self.unix_listeners: list[Listener] = []  # the followed sockets', as last polled
        # Messages other than new connections read before a batch was unpickled or while
        # it was written: handled next, in order (the inbox is not read again until then:
        # one at most).
        self.held: list[Any] = []
        self.inbox_closed = False  # end of file met while a batch was written
        self.status = "interrupted"  # until the capture process says how it ended
        self.error: str | None = None
        self.elapsed = 0.0
        # Prometheus metrics: the state here, where each connection's owner is known.
        self.metrics: MetricsState | None = None
        self.exporter = exporter
        self.rows_written = 0
        self.next_textfile = float("inf")
        self.textfile_error: str | None = None
        if settings.metrics is not None:
            self.metrics = MetricsState(settings.metrics, settings.ports,
                                        attribution=self.attributor is not None,
                                        capture_pid=capture_pid, db_path=settings.db_path)
            self.registry = registry_for(self.metrics)
            if exporter is not None:
                exporter.serve(self.registry)
            if settings.metrics.file is not None:
                self._write_textfile()

    # -- messages ----------------------------------------------------------------------

    def opened(self, message: Opened) -> None:
        if self.attributor is None:
            return
        now = time.time()
        # Looked for at once, at their SYN: a call of a few milliseconds is still open.
        self._record(self.attributor.observe(message.records, now), now)
        self._scan(now)

    def batch(self, message: Batch, inbox: Pipe | None = None) -> None:
        """Write one batch; with ``inbox``, new connections that come meanwhile are looked
        for while it is written (see _write_aside)."""
        writer = self.writer
        self._write_aside(
            lambda: writer.write(message.records, message.events, message.anomalies), inbox)
        self.rows_written += len(message.records) + len(message.events)
        if self.rows is not None:
            self.rows[0] = self.rows_written
        attributor = self.attributor
        if attributor is not None:
            now = time.time()
            self._record(attributor.observe(message.records, now), now)
            self._write_verdicts(message.records)
        self.totals = message.totals
        t = message.totals
        if self.metrics is not None:  # after the verdicts: a closed one counts for its owner
            self.metrics.records(message.records, message.events)
            self.metrics.totals(t.packets, t.drops, self.rows_written)
        writer.update_progress(packets=t.packets, segments=t.segments, first_ts=t.first_ts,
                               last_ts=t.last_ts, drops=t.drops)
        self.trim()

    def finish(self, message: Finish) -> None:
        self.status, self.error, self.elapsed = message.status, message.error, message.elapsed_s
        if self.attributor is not None:  # a last look for the ones still open
            self._scan(time.time(), everything=True)
            self._write_verdicts()
        if self.unix is not None:  # a last poll; what is still open is open at the end
            self._poll_unix(last=True)
            self.unix.close()

    def unpickle(self, data: bytes, inbox: Pipe | None = None) -> Any:
        """A message from the bytes ``inbox`` gave. A busy capture's batch takes ten to a
        hundred milliseconds to unpickle and to write, and the capture process sends the
        connections that opened while it built the batch just after it: before a big
        message is unpickled, those are taken and looked for (a new connection can be
        looked for before the messages sent before it: a batch only holds connections
        announced before it), until none came for FOLLOWERS_QUIET (FOLLOWERS_MAX at
        most). Any other message waits in ``held``."""
        if len(data) >= BIG_MESSAGE and inbox is not None and self.attributor is not None:
            deadline = time.monotonic() + FOLLOWERS_MAX
            while not self.held and not self.inbox_closed:
                wait = min(FOLLOWERS_QUIET, deadline - time.monotonic())
                if wait <= 0 or not self._take(inbox, wait):
                    break
        return pickle.loads(data)

    def _write_aside(self, write: Callable[[], None], inbox: Pipe | None) -> None:
        """``write()`` (a batch's transaction), meanwhile taking the new connections
        ``inbox`` brings, and the looks that fall due, at once.

        A busy capture's batch takes ten or twenty milliseconds to write: a short call's
        socket is gone by then. So the write runs in a helper thread (sqlite lets go of
        the GIL while it works, and SWITCH_INTERVAL bounds how long the helper keeps it
        otherwise), and this thread touches only the attribution state meanwhile, never
        the database. Any other message (the next batch, the end) waits in ``held`` and
        stops the reading until the write is done. (Unpickling a batch aside would not
        do: it keeps the GIL for as long as it takes.)"""
        if inbox is None or self.attributor is None or self.inbox_closed:
            write()
            return
        failure: list[BaseException] = []

        def run() -> None:
            try:
                write()
            except BaseException as exc:  # noqa: BLE001 - raised again by the caller
                failure.append(exc)

        helper = threading.Thread(target=run, name="tracer-store-write", daemon=True)
        helper.start()
        try:
            while helper.is_alive():
                wait = min(WRITE_POLL, self._attribution_due())
                if self.held or self.inbox_closed:
                    helper.join(wait)
                else:
                    self._take(inbox, wait)
        finally:
            helper.join()
        if failure:
            raise failure[0]

    def _take(self, inbox: Pipe, wait: float) -> bool:
        """Read the next message if one comes within ``wait`` seconds: a new connection
        is looked for at once, any other waits in ``held``. False: none came (or the
        inbox is closed)."""
        try:
            if not inbox.poll(wait):
                return False
            message = inbox.recv()
        except (EOFError, OSError):
            self.inbox_closed = True  # the capture process is gone (kill -9)
            return False
        if isinstance(message, Opened):
            self.opened(message)
        else:
            self.held.append(message)
        return True

    # -- what is due without a message ---------------------------------------------------

    def due(self) -> float:
        """Do what is due; return how long until something is due again (seconds)."""
        now = time.monotonic()
        waits = [IDLE_WAKE, self._attribution_due()]
        if now >= self.next_textfile:
            self._write_textfile()
        waits.append(self.next_textfile - time.monotonic())
        if self.unix is not None:
            if now >= self.next_unix_poll:
                self._poll_unix()
            waits.append(self.next_unix_poll - time.monotonic())
        if self.server is not None:
            if now >= self.next_server_sample:
                self._sample_server()
            waits.append(self.next_server_sample - time.monotonic())
        retention = self.retention
        if retention is not None:
            db = self.writer.db
            if now >= self.next_prune:  # the age limit, and the size
                self.pruned += retention.apply(db, now=self.totals.last_ts).connections
                self.next_prune = time.monotonic() + retention.interval_s
                self.next_size_check = time.monotonic() + retention.size_check_s
            elif now >= self.next_size_check:
                if retention.over_size(db):
                    self.pruned += retention.apply(db, size_only=True).connections
                self.next_size_check = time.monotonic() + retention.size_check_s
            waits.append(min(self.next_prune, self.next_size_check) - time.monotonic())
        return max(0.0, min(waits))

    def _attribution_due(self) -> float:
        """Look at the pending connections due a look (QUICK_SCAN_INTERVAL apart at most);
        return how long until the next one is due (seconds)."""
        attributor = self.attributor
        if attributor is None or not attributor.pending:
            return IDLE_WAKE
        due = attributor.next_due()
        wall = time.time()
        if due is not None and due <= wall and \
                time.monotonic() - self.last_scan >= QUICK_SCAN_INTERVAL:
            self._scan(wall)
            due = attributor.next_due()
        soonest = self.last_scan + QUICK_SCAN_INTERVAL - time.monotonic()
        return max(0.0, soonest, (due - time.time()) if due is not None
                   else ATTRIBUTION_INTERVAL)

    def _poll_unix(self, last: bool = False) -> None:
        """One poll of the Unix sockets followed: its records written with their owners
        (and, with ``last``, the open ones as open at the end)."""
        assert self.unix is not None
        started = time.monotonic()
        self.next_unix_poll = started + self.unix.interval
        now = time.time()
        try:
            polled = self.unix.poll(now)
            self.next_unix_poll = started + self.unix.interval  # stretched if costly
        except OSError as exc:  # netlink timed out: the next poll is half a second away
            self.unix.counts["poll_failed"] = self.unix.counts.get("poll_failed", 0) + 1
            if self.unix.counts["poll_failed"] == 1:
                print(f"warning: a poll of the Unix sockets failed ({exc.strerror or exc})",
                      file=sys.stderr, flush=True)
            if not last:
                return
            polled = None
        records = polled.records if polled is not None else []
        if polled is not None:
            self.unix_listeners = self.unix.server_listeners(polled)
        if last:
            records = records + self.unix.finish(now)
        self.writer.write(records, [], polled.anomalies if polled is not None else [])
        self.writer.unix_sockets(records)
        if polled is not None and polled.verdicts:
            self.writer.attribute(polled.verdicts)
        self.rows_written += len(records)
        if self.rows is not None:
            self.rows[0] = self.rows_written
            open_now, clients, unknown = self.unix.open_clients()
            self.rows[1], self.rows[2], self.rows[3] = open_now, clients, unknown
        if self.metrics is not None:
            self.metrics.records(records)
            if polled is not None:
                self.metrics.settled((v[0], v[1], v[2]) for v in polled.verdicts)

    def _sample_server(self) -> None:
        assert self.server is not None
        self.next_server_sample = time.monotonic() + SERVER_SAMPLE_INTERVAL
        try:
            samples = self.server.read(self.unix_listeners)
        except OSError:
            return  # this look failed (netlink timed out): the next one is a second away
        self.server_samples.add(time.time(), samples)
        if self.metrics is not None:
            self.metrics.server(samples)

    def _write_textfile(self) -> None:
        """--metrics-file: the exposition written again (atomically). A failure is said
        once (and again when it changes); the capture goes on."""
        assert self.settings.metrics is not None and self.settings.metrics.file is not None
        self.next_textfile = time.monotonic() + FILE_INTERVAL_S
        try:
            write_textfile(self.settings.metrics.file, self.registry)
        except MetricsError as exc:
            if str(exc) != self.textfile_error:
                print(f"warning: {exc}", file=sys.stderr, flush=True)
            self.textfile_error = str(exc)
            return
        self.textfile_error = None

    def _scan(self, now: float, everything: bool = False) -> None:
        assert self.attributor is not None
        self.last_scan = time.monotonic()
        self._record(self.attributor.scan(now, everything=everything), now)

    def _record(self, verdicts: list[Settled], now: float) -> None:
        """Count verdicts; they are written with the next batch (most are reached at the
        SYN, before their connection has a row: one transaction for all, then)."""
        if not verdicts:
            return
        attributor = self.attributor
        assert attributor is not None
        if self.metrics is not None:
            self.metrics.settled((s.uid, s.verdict, s.process) for s in verdicts)
        for settled in verdicts:
            attributor.counts[settled.verdict] = attributor.counts.get(settled.verdict, 0) + 1
        self.unwritten.extend((s.uid, s.verdict, s.process, now, s.detail) for s in verdicts)

    def _write_verdicts(self, records: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
        """Write the verdicts reached since the last batch, and those reached before their
        connection had a row whose row ``records`` just wrote."""
        attributor = self.attributor
        assert attributor is not None
        todo, self.unwritten = self.unwritten, []
        if attributor.deferred:
            todo += [(r["uid"], *attributor.deferred.pop(r["uid"]))
                     for r in records if r["uid"] in attributor.deferred]
        if not todo:
            return
        for uid, verdict, info, ts, detail in self.writer.attribute(todo):
            attributor.deferred[uid] = (verdict, info, ts, detail)

    # -- the end -------------------------------------------------------------------------

    def close(self) -> Summary:
        """Close the capture with its totals; the summary for the capture process."""
        writer = self.writer
        self.server_samples.flush()  # the server's last state read
        stats = {f"attribution.{k}": v for k, v in
                 (self.attributor.counts if self.attributor else {}).items()}
        stats["kernel.received"] = self.totals.received
        stats["kernel.ring_bytes"] = self.totals.ring_bytes
        if self.totals.ring_bytes:
            stats["kernel.ring_full"] = self.totals.ring_full
        if self.totals.ring_malformed:
            stats["kernel.ring_malformed"] = self.totals.ring_malformed
        if self.pruned:
            stats["retention.pruned_connections"] = self.pruned
        if self.unix is not None:
            stats.update(self.unix.stats())
        connections, open_at_end = writer.stored_counts()
        self.close_metrics()
        t = self.totals
        writer.finish(
            status=self.status, error=self.error, first_ts=t.first_ts, last_ts=t.last_ts,
            packets=t.packets, segments=t.segments, connections=connections,
            open_at_end=open_at_end, anomaly_counts=writer.anomaly_counts, drops=t.drops,
            elapsed_s=self.elapsed, stats=stats,
        )
        return Summary(writer.capture_id, connections, open_at_end, stats, self.pruned)

    def close_metrics(self) -> None:
        """The last textfile (what the capture ended with), and no more scrapes."""
        if self.metrics is not None and self.next_textfile != float("inf"):
            self._write_textfile()
            self.next_textfile = float("inf")
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None


def serve(inbox: Pipe, outbox: Pipe, inherited: list[Pipe], settings: StoreSettings,
          rows: Any, exporter: MetricsServer | None = None) -> None:
    """Entry point of the store worker process; ``exporter``: the bound /metrics server."""
    ignore_stop_signals()
    capture_pid = os.getppid()
    # Our copies of the other ends must go: when the capture process dies (kill -9), the
    # pipe then reports end of file and this process finishes the capture.
    for end in inherited:
        end.close()
    try:
        db = open_database(settings.db_path)
        writer = CaptureWriter.start(db, kind="live", ports=settings.ports,
                                     interface=settings.interface, tool_version=__version__,
                                     writer=own_identity(), host=socket.gethostname())
    except (StoreError, sqlite3.Error, OSError) as exc:
        _tell(outbox, Failed(_why(exc, settings.db_path)))
        return
    if settings.unix:
        writer.followed_unix([t.label for t in settings.unix])
    _tell(outbox, Ready(writer.capture_id))
    sys.setswitchinterval(SWITCH_INTERVAL)  # see StoreWorker._write_aside
    worker = StoreWorker(writer, settings, rows, exporter, capture_pid)
    try:
        _loop(inbox, worker)
        summary = worker.close()
        store_report(db)  # computed once now, read many times (store.queries.report)
    except (StoreError, sqlite3.Error, OSError) as exc:
        _tell(outbox, Failed(_fail(worker, exc, settings.db_path), writer.capture_id))
        return
    finally:
        _close_quietly(db.conn.close)
    _tell(outbox, summary)


def _tell(outbox: Pipe, message: FromWorker) -> None:
    """Answer the capture process, unless it is gone (kill -9): then nobody listens."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        outbox.send(message)


def _loop(inbox: Pipe, worker: StoreWorker) -> None:
    handlers: dict[type, Callable[[Any], None]] = {
        Opened: worker.opened, Batch: lambda message: worker.batch(message, inbox),
    }
    while True:
        if worker.held:  # read while a batch was read or written
            message = worker.held.pop(0)
        elif worker.inbox_closed:
            return  # the capture process is gone (kill -9): keep what we have
        else:
            wait = worker.due()
            try:
                if not inbox.poll(wait):
                    continue
                data = inbox.recv_bytes()
            except (EOFError, OSError):
                return  # the capture process is gone (kill -9): keep what we have
            message = worker.unpickle(data, inbox)
        if isinstance(message, Finish):
            worker.finish(message)
            return
        handlers[type(message)](message)


def _why(exc: BaseException, db_path: str) -> str:
    if isinstance(exc, StoreError):
        return str(exc)
    return str(store_failure(exc, db_path))


def _fail(worker: StoreWorker, exc: BaseException, db_path: str) -> str:
    """Mark the capture failed (if the database still takes that much) and say what was
    kept."""
    failure = exc if isinstance(exc, StoreError) else store_failure(exc, db_path)
    writer = worker.writer
    worker.status, worker.error = "failed", str(failure)
    try:
        worker.close()
        marked = True
    except (StoreError, sqlite3.Error, OSError):
        marked = writer.mark_failed(str(failure))
    what = (f"capture {writer.capture_id} is marked failed" if marked else
            f"capture {writer.capture_id} could not be marked failed (a full disk takes no "
            "more writes)")
    prefix = "disk full" if isinstance(failure, StoreFull) else "cannot write the database"
    return f"{prefix}: {failure}; {what}; {writer.kept_text()}"


def _close_quietly(close: Callable[[], None]) -> None:
    with contextlib.suppress(sqlite3.Error):
        close()


__all__ = ["StoreSettings", "StoreWorker", "serve"]

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(f"{os.path.basename(__file__)} runs inside `tracer capture`")
