"""The live agent's Prometheus metrics: the exporter's state, its collector, its HTTP
server and its node_exporter textfile.

The state lives in the store worker, the process that knows which process owns each
client connection (tracer.agent.store_worker): it is updated as batches, verdicts and
server samples arrive, in memory, so a scrape never reads the database and costs one
pass over the open connections. A scrape runs in another thread (the HTTP server's):
every update and every collection holds one lock, so a scrape sees one consistent state.

Per client (pid, program name, client address; pid and program "" where the process is
unknown) the top ``top`` clients by open connections are series of their own; the rest
are summed into one series labelled "other". Counters never go down: what a client adds
while it is not shown (or before it is forgotten) is added to "other" instead, so rate()
summed over the series is the true rate, and a client's own series, when shown, is its
true total. A connection counts for a client once its owner is settled (attribution's
verdict, or PENDING_GRACE_S without one): it never moves from one series to another.

Bounded: at most MAX_OPEN open connections are followed (more are not counted, and
``overflow`` says how many), and clients with nothing open are forgotten after
FORGET_AFTER_S, or sooner beyond MAX_IDLE_CLIENTS.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from store.sql import DEFAULT_PREFACE_TIMEOUT
from tracer import __version__
from tracer.events import ERROR_CODES, ConnectionEvent, GoawaySent

DEFAULT_TOP = 20  # client series shown (the rest are one "other" series)
DEFAULT_IDLE_S = 60.0  # an open connection with no stream activity this long is idle
FILE_INTERVAL_S = 5.0  # the textfile is written this often (and at the end)
PENDING_GRACE_S = 5.0  # a connection whose owner is not settled by then counts as unknown
MAX_OPEN = 200_000  # open connections followed at most (the flow table's own maximum)
MAX_EARLY = 65_536  # verdicts kept for connections whose record has not come yet
MAX_IDLE_CLIENTS = 16_384  # clients with nothing open remembered at most
FORGET_AFTER_S = 3600.0  # a client with nothing open for this long is forgotten
REQUEST_TIMEOUT_S = 10.0  # a scraper that sends nothing for this long is let go
CLOSERS = ("client", "server", "reset", "unknown")
OTHER = ("other", "other", "other")
CLIENT_LABELS = ("pid", "process", "client")

ClientKey = tuple[str, str, str]  # pid, program name, client address


class MetricsError(Exception):
    """The metrics cannot be served or written (a port in use, a bad address, a path
    that is a symbolic link): said before the capture starts."""


@dataclass(frozen=True)
class MetricsSettings:
    """--metrics HOST:PORT, --metrics-file PATH, --metrics-top N."""

    address: tuple[str, int] | None = None
    file: str | None = None
    top: int = DEFAULT_TOP
    idle_s: float = DEFAULT_IDLE_S
    preface_timeout_s: float = DEFAULT_PREFACE_TIMEOUT


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT, or :PORT (every address) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (127.0.0.1:9464, [::1]:9464, or :9464 "
                         "for every address)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


# -- the state ---------------------------------------------------------------------------


class _Client:
    __slots__ = ("closed", "conns", "last_change", "opened", "rpcs", "seen_closed",
                 "seen_opened", "seen_rpcs")

    def __init__(self, now: float) -> None:
        self.conns: dict[str, _Conn] = {}  # its open connections
        self.opened = 0
        self.closed = [0, 0, 0, 0]  # by CLOSERS
        self.rpcs = 0
        # What the last collection accounted for (in its own series or in "other").
        self.seen_opened = 0
        self.seen_closed = [0, 0, 0, 0]
        self.seen_rpcs = 0
        self.last_change = now  # monotonic


class _Conn:
    __slots__ = ("activity_ts", "client", "closer", "dial_ts", "first_seen", "orig_h",
                 "streams", "waiting")

    def __init__(self, dial_ts: float, orig_h: str, first_seen: float) -> None:
        self.dial_ts = dial_ts  # its SYN (or first packet): its age runs from there
        # Its last frame other than PING; None where activity is not visible (a Unix
        # socket's connection, followed without packets): never counted idle.
        self.activity_ts: float | None = dial_ts
        self.orig_h = orig_h
        self.first_seen = first_seen  # monotonic
        self.streams = 0  # RPCs counted so far
        self.client: _Client | None = None  # None: its owner is not settled yet
        self.waiting = False  # its client sent the preface, the server's SETTINGS not come
        self.closer: str | None = None  # closed: who began it (CLOSERS)


@dataclass(frozen=True)
class _Row:
    labels: ClientKey
    open: int
    idle: int
    oldest_s: float | None
    opened: int
    closed: tuple[int, ...]
    rpcs: int


class MetricsState:
    """What the exporter shows, fed as the store worker learns it."""

    def __init__(self, settings: MetricsSettings, ports: frozenset[int],
                 attribution: bool = True, capture_pid: int | None = None,
                 db_path: str | None = None) -> None:
        self.settings = settings
        self.ports = ",".join(map(str, sorted(ports)))
        self.attribution = attribution
        self.capture_pid = capture_pid
        self.db_path = db_path
        self.lock = threading.Lock()
        self.clients: dict[ClientKey, _Client] = {}
        self.conns: dict[str, _Conn] = {}  # open connections by uid
        self.pending: dict[str, _Conn] = {}  # of those, the ones whose owner is not settled
        self.waiting: dict[str, _Conn] = {}  # of those, the ones waiting for the server
        self.early: dict[str, ClientKey] = {}  # verdicts reached before their record came
        self.ended: dict[str, _Conn] = {}  # closed, lingering in the flow table
        self.other_opened = 0
        self.other_closed = [0, 0, 0, 0]
        self.other_rpcs = 0
        self.preface_timeouts = 0
        self.goaways: dict[tuple[str, str], int] = {}
        self.packets = 0
        self.drops: int | None = None
        self.rows_written = 0
        self.accept_queues: dict[int, tuple[int, int | None]] = {}  # port -> now, limit
        self.fds: dict[tuple[int, int], tuple[int | None, int | None]] = {}
        self.overflow = 0  # open connections not followed (MAX_OPEN)

    # -- updates (the store worker's thread) -----------------------------------------------

    def settled(self, verdicts: Iterable[tuple[str, str, Any]]) -> None:
        """Attribution's verdicts: (uid, verdict, process info or None)."""
        with self.lock:
            for uid, _verdict, process in verdicts:
                conn = self.pending.get(uid)
                key = self._key(process, conn.orig_h if conn else "")
                if conn is not None:
                    self._commit(uid, conn, key)
                elif uid not in self.conns and uid not in self.ended:
                    if len(self.early) >= MAX_EARLY:
                        del self.early[next(iter(self.early))]
                    self.early[uid] = key

    @staticmethod
    def _key(process: Any, orig_h: str) -> ClientKey:
        if process is None:
            return ("", "", orig_h)
        name = process.comm or os.path.basename(process.exe or "") or ""
        return (str(process.pid), name, orig_h)

    def records(self, records: Iterable[dict[str, Any]],
                events: Iterable[ConnectionEvent] = ()) -> None:
        """A batch's connection records (finished ones and open ones that moved) and its
        events (GOAWAYs are counted)."""
        now = time.monotonic()
        timeout = self.settings.preface_timeout_s
        with self.lock:
            for r in records:
                uid = r["uid"]
                ended = self.ended.get(uid)
                if ended is not None:  # closed already: its RPCs may still move
                    self._moved(uid, ended, r, timeout)
                    if r["end_reason"] is not None:  # its last record
                        self._settle_ended(uid)
                    continue
                # Closed at its first FIN or RST (as the report counts it), or when the
                # flow table let it go (expired, evicted); still open at the end is open.
                closed = not r.get("is_open", 1) or \
                    r["end_reason"] not in (None, "open_at_end")
                conn = self.conns.get(uid)
                if conn is None:
                    conn = _Conn(r.get("syn_ts") or r["ts"], r["orig_h"], now)
                    if r.get("protocol") == "unix":
                        conn.activity_ts = None
                    if not closed:
                        if len(self.conns) >= MAX_OPEN:
                            self.overflow += 1
                            continue
                        self.conns[uid] = conn
                    key = self.early.pop(uid, None)
                    if key is not None:
                        key = (key[0], key[1], conn.orig_h)
                    elif not self.attribution:
                        key = ("", "", conn.orig_h)
                    if key is not None:
                        self._commit(uid, conn, key)
                    elif not closed:
                        self.pending[uid] = conn
                self._moved(uid, conn, r, timeout)
                if closed:
                    self._closed(uid, conn, r, timeout, now)
                    if r["end_reason"] is None:  # it lingers: more records will come
                        if len(self.ended) >= MAX_OPEN:
                            self._settle_ended(next(iter(self.ended)))
                        self.ended[uid] = conn
            for event in events:
                if isinstance(event, GoawaySent):
                    code = event.error_code
                    error = ERROR_CODES.get(code, "unknown")
                    sender = "client" if event.dir == "orig" else "server"
                    self.goaways[(sender, error)] = self.goaways.get((sender, error), 0) + 1

    def _settle_ended(self, uid: str) -> None:
        """A closed connection's last record: counted as unknown if attribution found no
        owner for it."""
        conn = self.ended.pop(uid)
        if conn.client is None:
            self._commit(uid, conn, ("", "", conn.orig_h))

    def _moved(self, uid: str, conn: _Conn, r: dict[str, Any], timeout: float) -> None:
        streams = r.get("streams") or 0
        if conn.client is not None and streams > conn.streams:
            conn.client.rpcs += streams - conn.streams
        conn.streams = max(conn.streams, streams)
        conn.activity_ts = r.get("last_activity_ts") or conn.activity_ts
        settings_ts = r.get("server_settings_ts")
        if settings_ts is not None:
            if self.waiting.pop(uid, None) is not None and settings_ts - conn.dial_ts > timeout:
                self.preface_timeouts += 1
            conn.waiting = False
        elif r.get("preface_ts") is not None and not conn.waiting and uid in self.conns:
            conn.waiting = True
            self.waiting[uid] = conn

    def _closed(self, uid: str, conn: _Conn, r: dict[str, Any], timeout: float,
                now: float) -> None:
        self.conns.pop(uid, None)
        conn.closer = closed_by(r)
        client = conn.client
        if client is None:
            if self.attribution and r["end_reason"] is None:
                # Closed, lingering in the flow table: attribution may still name its
                # owner (a call of a few milliseconds); counted once it is settled.
                self.pending[uid] = conn
            else:
                self._commit(uid, conn, ("", "", conn.orig_h))
        else:
            client.conns.pop(uid, None)
            client.closed[CLOSERS.index(conn.closer)] += 1
            client.last_change = now
        if r.get("server_settings_ts") is None and r.get("preface_ts") is not None:
            self.waiting.pop(uid, None)
            end = r.get("close_ts") or r.get("end_ts") or conn.dial_ts
            if end - conn.dial_ts >= timeout:
                self.preface_timeouts += 1

    def _commit(self, uid: str, conn: _Conn, key: ClientKey) -> None:
        """Settle the connection's owner: from now on it counts for that client."""
        self.pending.pop(uid, None)
        now = time.monotonic()
        client = self.clients.get(key)
        if client is None:
            client = self.clients[key] = _Client(now)
        conn.client = client
        client.opened += 1
        client.rpcs += conn.streams
        client.last_change = now
        if conn.closer is not None:
            client.closed[CLOSERS.index(conn.closer)] += 1
        elif uid in self.conns:
            client.conns[uid] = conn

    def totals(self, packets: int, drops: int | None, rows_written: int) -> None:
        with self.lock:
            self.packets = max(self.packets, packets)
            if drops is not None:
                self.drops = max(self.drops or 0, drops)
            self.rows_written = max(self.rows_written, rows_written)

    def server(self, samples: Iterable[Any]) -> None:
        """The local server's latest samples (tracer.attribution.server.ServerSample)."""
        queues: dict[int, tuple[int, int | None]] = {}
        fds: dict[tuple[int, int], tuple[int | None, int | None]] = {}
        for s in samples:
            port = s.listener.port
            length, limit = queues.get(port, (0, 0))
            known = None if limit is None or s.listener.queue_max is None \
                else limit + s.listener.queue_max
            queues[port] = (length + s.listener.queue, known)
            if s.pid is not None:
                fds[(s.pid, port)] = (s.fds, s.fd_limit)
        with self.lock:
            self.accept_queues, self.fds = queues, fds

    # -- collection (the scrape's thread) --------------------------------------------------

    def _settle_overdue(self, now: float) -> None:
        for uid, conn in list(self.pending.items()):
            # A closed one waits for its last record (attribution looks until then).
            if conn.closer is None and now - conn.first_seen >= PENDING_GRACE_S:
                self._commit(uid, conn, ("", "", conn.orig_h))
        for uid, conn in list(self.waiting.items()):
            if time.time() - conn.dial_ts >= self.settings.preface_timeout_s:
                self.preface_timeouts += 1
                conn.waiting = False
                del self.waiting[uid]

    def _forget(self, now: float) -> None:
        idle = [(c.last_change, key) for key, c in self.clients.items() if not c.conns]
        excess = len(idle) - MAX_IDLE_CLIENTS
        if excess > 0:
            idle.sort()
        for i, (last, key) in enumerate(idle):
            if i < excess or now - last >= FORGET_AFTER_S:
                self._fold(self.clients.pop(key))

    def _fold(self, client: _Client) -> None:
        """Add what ``client`` added since the last collection to "other"."""
        self.other_opened += client.opened - client.seen_opened
        self.other_rpcs += client.rpcs - client.seen_rpcs
        for i in range(len(CLOSERS)):
            self.other_closed[i] += client.closed[i] - client.seen_closed[i]
        self._seen(client)

    @staticmethod
    def _seen(client: _Client) -> None:
        client.seen_opened, client.seen_rpcs = client.opened, client.rpcs
        client.seen_closed = list(client.closed)

    def snapshot(self) -> tuple[list[_Row], dict[str, Any]]:
        """The client rows (the top ones, then "other") and the rest, taken at once."""
        mono, wall = time.monotonic(), time.time()
        idle_before = wall - self.settings.idle_s
        with self.lock:
            self._settle_overdue(mono)
            self._forget(mono)
            top = heapq.nlargest(self.settings.top, self.clients.items(),
                                 key=lambda kv: (len(kv[1].conns), kv[1].opened))
            shown = {key for key, _ in top}
            rows = []
            for key, c in top:
                idle, oldest = _ages(c.conns.values(), idle_before)
                self._seen(c)
                rows.append(_Row(key, len(c.conns), idle, wall - oldest if oldest else None,
                                 c.opened, tuple(c.closed), c.rpcs))
            rest_open = rest_idle = 0
            rest_oldest: float | None = None
            for key, c in self.clients.items():
                if key in shown:
                    continue
                self._fold(c)
                idle, oldest = _ages(c.conns.values(), idle_before)
                rest_open += len(c.conns)
                rest_idle += idle
                if oldest is not None and (rest_oldest is None or oldest < rest_oldest):
                    rest_oldest = oldest
            rows.append(_Row(OTHER, rest_open, rest_idle,
                             wall - rest_oldest if rest_oldest else None, self.other_opened,
                             tuple(self.other_closed), self.other_rpcs))
            rest = {"preface_timeouts": self.preface_timeouts, "goaways": dict(self.goaways),
                    "packets": self.packets, "drops": self.drops,
                    "rows_written": self.rows_written, "queues": dict(self.accept_queues),
                    "fds": dict(self.fds)}
        return rows, rest

    def collect(self) -> Iterator[Metric]:
        rows, rest = self.snapshot()
        yield from client_families(rows)
        yield from self._server_families(rest)
        yield from self._agent_families(rest)

    def describe(self) -> list[Metric]:
        return []  # no collection at registration

    def _server_families(self, rest: dict[str, Any]) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "tracer_server_preface_timeouts",
            "Connections whose client sent the HTTP/2 preface and the server sent no "
            f"SETTINGS within {self.settings.preface_timeout_s:g}s of the dial.",
            value=rest["preface_timeouts"])
        goaways = CounterMetricFamily("tracer_server_goaways",
                                      "GOAWAY frames seen, by sender and error code.",
                                      labels=("sender", "error"))
        for (sender, error), n in sorted(rest["goaways"].items()):
            goaways.add_metric((sender, error), n)
        yield goaways
        length = GaugeMetricFamily("tracer_server_accept_queue_length",
                                   "Connections the kernel completed that the local server "
                                   "has not accepted yet.", labels=("port",))
        limit = GaugeMetricFamily("tracer_server_accept_queue_limit",
                                  "The local server's accept queue maximum (listen backlog).",
                                  labels=("port",))
        for port, (now, most) in sorted(rest["queues"].items()):
            length.add_metric((str(port),), now)
            if most is not None:
                limit.add_metric((str(port),), most)
        yield length
        yield limit
        fds = GaugeMetricFamily("tracer_server_open_fds",
                                "File descriptors the local server process holds.",
                                labels=("pid", "port"))
        max_fds = GaugeMetricFamily("tracer_server_max_fds",
                                    "The local server process's RLIMIT_NOFILE (soft).",
                                    labels=("pid", "port"))
        for (pid, port), (used, most) in sorted(rest["fds"].items()):
            if used is not None:
                fds.add_metric((str(pid), str(port)), used)
            if most is not None:
                max_fds.add_metric((str(pid), str(port)), most)
        yield fds
        yield max_fds

    def _agent_families(self, rest: dict[str, Any]) -> Iterator[Metric]:
        yield CounterMetricFamily("tracer_agent_packets", "Packets the agent analysed.",
                                  value=rest["packets"])
        drops = CounterMetricFamily("tracer_agent_kernel_drops",
                                    "Packets the kernel dropped before the agent read them.")
        if rest["drops"] is not None:
            drops.add_metric((), rest["drops"])
        yield drops
        yield CounterMetricFamily("tracer_agent_rows_written",
                                  "Rows the store worker wrote (connections and events).",
                                  value=rest["rows_written"])
        size = GaugeMetricFamily("tracer_agent_database_size_bytes",
                                 "The database's size on disk, its write-ahead log included.")
        if self.db_path is not None:
            size.add_metric((), database_size(self.db_path))
        yield size
        rss = GaugeMetricFamily("tracer_agent_resident_memory_bytes",
                                "Resident memory of the agent's processes.",
                                labels=("process",))
        for name, pid in (("capture", self.capture_pid), ("store", os.getpid())):
            found = resident_bytes(pid) if pid is not None else None
            if found is not None:
                rss.add_metric((name,), found)
        yield rss
        info = GaugeMetricFamily("tracer_agent_info", "The agent's version and ports (1).",
                                 labels=("version", "port"))
        info.add_metric((__version__, self.ports), 1)
        yield info


def _ages(conns: Iterable[_Conn], idle_before: float) -> tuple[int, float | None]:
    """How many of ``conns`` were last active before ``idle_before``, and the earliest
    dial among them."""
    idle = 0
    oldest: float | None = None
    for conn in conns:
        if conn.activity_ts is not None and conn.activity_ts <= idle_before:
            idle += 1
        if oldest is None or conn.dial_ts < oldest:
            oldest = conn.dial_ts
    return idle, oldest


def client_families(rows: list[_Row]) -> Iterator[Metric]:
    def gauge(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=CLIENT_LABELS)

    open_ = gauge("tracer_client_open_connections", "Open connections of the client.")
    idle = gauge("tracer_client_idle_open_connections",
                 "Open connections with no RPC or stream activity for the idle threshold.")
    oldest = gauge("tracer_client_oldest_open_connection_age_seconds",
                   "Age of the client's oldest open connection.")
    opened = CounterMetricFamily("tracer_client_connections_opened",
                                 "Connections the client opened.", labels=CLIENT_LABELS)
    closed = CounterMetricFamily("tracer_client_connections_closed",
                                 "Connections of the client closed, by who began the close "
                                 "(a RST is reset; a GOAWAY first names its sender).",
                                 labels=(*CLIENT_LABELS, "closed_by"))
    rpcs = CounterMetricFamily("tracer_client_rpcs", "RPCs (HTTP/2 streams) the client began.",
                               labels=CLIENT_LABELS)
    for row in rows:
        labels = row.labels
        open_.add_metric(labels, row.open)
        idle.add_metric(labels, row.idle)
        if row.oldest_s is not None:
            oldest.add_metric(labels, max(0.0, row.oldest_s))
        opened.add_metric(labels, row.opened)
        for who, n in zip(CLOSERS, row.closed, strict=True):
            closed.add_metric((*labels, who), n)
        rpcs.add_metric(labels, row.rpcs)
    yield from (open_, idle, oldest, opened, closed, rpcs)


def closed_by(r: dict[str, Any]) -> str:
    """Who began a closed connection's end: a GOAWAY before the TCP close names its
    sender, else a RST is "reset", else the side of the first FIN (store.sql's
    CLOSED_FIRST_BY, with RSTs apart)."""
    kind = r.get("close_kind")
    goaway_ts = r.get("goaway_ts")
    close_ts = r.get("close_ts")
    if kind is not None and goaway_ts is not None and (close_ts is None or goaway_ts <= close_ts):
        return "client" if r.get("goaway_sender") == "orig" else "server"
    if kind in ("client_rst", "server_rst"):
        return "reset"
    if kind == "client_fin":
        return "client"
    if kind == "server_fin":
        return "server"
    return "unknown"  # expired, evicted, its port reused


def database_size(db_path: str) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.stat(db_path + suffix).st_size
    return total


_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


# -- exposition --------------------------------------------------------------------------


def registry_for(state: MetricsState) -> CollectorRegistry:
    """A registry of its own with only the tracer_* collector (no process or platform
    collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(state)
    return registry


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # a scraper that says nothing does not hold the server

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class MetricsServer:
    """The HTTP server of /metrics: bound by the capture process before the capture starts
    (a port in use is said at once, and a port below 1024 bound while still root), served
    by a thread of the store worker, which owns the state. One request at a time: a
    scrape takes milliseconds, and no flood of connections makes threads."""

    def __init__(self, address: tuple[str, int]) -> None:
        host, port = address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise MetricsError(f"--metrics {host}:{port}: {exc.strerror}") from None
        family, _, _, _, sockaddr = infos[0]

        class Server(WSGIServer):
            address_family = family

        try:
            self.httpd = make_server(str(sockaddr[0]), port, _unavailable, Server,
                                     handler_class=_QuietHandler)
        except OSError as exc:
            why = ("the port is in use" if exc.errno == errno.EADDRINUSE else
                   "no interface has that address" if exc.errno == errno.EADDRNOTAVAIL
                   else exc.strerror)
            raise MetricsError(f"--metrics {host}:{port}: cannot listen: {why}") from None
        self.port = self.httpd.server_address[1]
        self.thread: threading.Thread | None = None

    def serve(self, registry: CollectorRegistry) -> None:
        """Start answering (in the process that owns the state)."""
        self.httpd.set_app(make_wsgi_app(registry))
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={
            "poll_interval": 0.2}, name="tracer-metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join(5.0)
        self.httpd.server_close()


def _unavailable(environ: Any, start_response: Any) -> list[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"the agent is starting\n"]


# -- the node_exporter textfile ----------------------------------------------------------


def check_textfile(path: str) -> None:
    """Refuse a --metrics-file that cannot be replaced safely: a symbolic link, anything
    but a regular file, a folder that does not exist."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MetricsError(f"--metrics-file {path}: the folder {folder} does not exist")
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise MetricsError(f"--metrics-file {path}: {exc.strerror}") from None
    if stat.S_ISLNK(found.st_mode):
        raise MetricsError(f"--metrics-file {path} is a symbolic link: refused (it is "
                           "replaced by a rename; give the real path)")
    if not stat.S_ISREG(found.st_mode):
        raise MetricsError(f"--metrics-file {path} is not a regular file: refused")


def write_textfile(path: str, registry: CollectorRegistry) -> None:
    """The exposition into ``path`` atomically: a new file beside it (O_EXCL|O_NOFOLLOW,
    so nothing planted there is followed), written, synced, renamed over ``path`` (a
    rename replaces a link, never writes through it). node_exporter reads *.prom files
    and ignores others, so the temporary name ends otherwise."""
    check_textfile(path)
    data = generate_latest(registry)
    folder, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
    except OSError as exc:
        raise MetricsError(f"--metrics-file {path}: cannot create {temp}: {exc.strerror}") \
            from None
    try:
        try:
            os.fchmod(fd, 0o644)  # node_exporter, often not root, reads it (whatever umask)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise MetricsError(f"--metrics-file {path}: {exc.strerror}") from None


__all__ = ["DEFAULT_TOP", "MetricsError", "MetricsServer", "MetricsSettings", "MetricsState",
           "check_textfile", "parse_address", "registry_for", "write_textfile"]
