"""Joining a server host's database with its client hosts' databases: remote callers named.

A server's agent sees a remote client only as an address; the agent on the client's host
knows the process that owns the same connection. The same connection is the same 4-tuple
(client address and port -> server address and port: without NAT the client's own
address is what the server sees) with lifetimes that overlap, each on its own host's
clock, so within a tolerance for the skew between them. A port the client host used
again gives two records of one 4-tuple whose lifetimes may both overlap: the one opened
closest in time is taken, and the case counted.

Behind NAT (or from a host whose database is not given) the server sees an address that
no client database has a connection from: those connections stay addresses, counted
under that reason; no 4-tuple of one host is ever taken for another's.

The join is SQL: the client database's records are copied (one read of it, opened
read-only: it may be an archived copy) into a temporary table of the server's
connection, indexed by 4-tuple, and joined with the server's unattributed connections
in one statement. The matches are staged in another temporary table and written
set-wise, a few statements in one transaction per client database (a crash or an
interrupt leaves the database as it was): the connection rows take the remote pid and
start time (attribution 'merged'), so the report and the per-client totals group by the
remote process, the totals moved once for all of them (store.aggregates.rekeyed, not
the per-row triggers), and merged_clients / merged_processes (migration
m017_merged_clients) say on which host it runs and what it is. While a live capture
writes the server's database the transactions are short (WRITE_BATCH rows each), each
leaving it whole. A connection attributed on this host is never touched; one merged
before is never merged again, so merging the same database twice changes nothing.

A client host is named by --name, else by the host name its agent recorded (captures.host,
migration m020_capture_host), else by its database's file name.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

DEFAULT_MAX_SKEW_S = 2.0
# Server rows per transaction while a live capture writes the server's database: its
# writes wait for the merge's (SQLite's busy timeout, 5 s, then the capture fails), so
# they must be short. Without one, each client database is merged in one transaction.
WRITE_BATCH = 5000
COPY_BATCH = 10000  # client rows read and inserted at a time (memory stays bounded)
TOP_UNMATCHED = 5  # unmatched addresses listed per client database
_FOREVER = 1e300  # the end of a connection still open

# A server connection whose client is not known on this host: no pid, and the agent said
# remote (or did not look: a file read, --no-attribution). closed_before_attribution was
# a socket on this host, whose owner went too soon: no other host has it.
def _remote(table: str = "") -> str:
    t = f"{table}." if table else ""
    # A connection to a Unix socket never left this host: no 4-tuple to join on.
    return (f"{t}pid IS NULL AND ({t}attribution IS NULL OR {t}attribution = 'remote')"
            f" AND COALESCE({t}protocol, '') <> 'unix'")


# Unattributed connections to a Unix socket, skipped by the merge (and counted).
UNIX_SKIPPED = "Unix socket: local to this host, nothing to join"
_UNIX_UNNAMED = ("pid IS NULL AND (attribution IS NULL OR attribution = 'remote')"
                 " AND protocol = 'unix'")


REMOTE = _remote()
# Its lifetime on its host's clock: from the SYN (or first packet) to the close, open on.
_OPENED = "COALESCE(syn_ts, ts)"
_ENDED = "CASE WHEN is_open THEN NULL ELSE COALESCE(close_ts, end_ts) END"

NO_ADDRESS = ("no client connection from that address (NAT, or a host whose database is"
              " not merged)")
NO_OVERLAP = "address seen, no overlapping lifetime (NAT, another host, or outside its capture)"
NOT_ATTRIBUTED = "seen on the client host, not attributed there (closed before it looked)"


@dataclass
class MergeResult:
    """What one client database gave."""

    host: str
    source: str
    client_connections: int = 0
    candidates: int = 0  # server connections still unnamed when this database was merged
    matched: int = 0  # named now
    ambiguous: int = 0  # of those, another lifetime of the same 4-tuple overlapped too
    already: int = 0  # named by this database in an earlier merge
    unmatched: dict[str, int] = field(default_factory=dict)  # reason -> connections
    unmatched_addresses: list[tuple[str, int, str]] = field(default_factory=list)
    offset_s: float | None = None  # median open time there minus here
    processes: int = 0  # distinct remote processes named now
    named_by: str = "--name"  # where ``host`` comes from: --name, recorded, file name: ...

    @property
    def changed(self) -> bool:
        return self.matched > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host, "host_from": self.named_by, "source": self.source,
            "client_connections": self.client_connections, "candidates": self.candidates,
            "matched": self.matched, "ambiguous": self.ambiguous,
            "already_merged": self.already, "processes": self.processes,
            "unmatched": dict(self.unmatched),
            "unmatched_addresses": [{"client": a, "connections": n, "reason": r}
                                    for a, n, r in self.unmatched_addresses],
            "clock_offset_s": self.offset_s,
        }


def merge_client(server: sqlite_utils.Database, client: sqlite_utils.Database, *,
                 host: str, source: str, max_skew_s: float = DEFAULT_MAX_SKEW_S,
                 now: str | None = None, batch: int | None = None) -> MergeResult:
    """Name the server's remote clients that ``client`` (another host's database, opened
    read-only) attributes; what matched and what did not, and why. The matches are
    written in one transaction, or with ``batch`` in transactions of that many (see
    _write)."""
    result = MergeResult(host=host, source=source)
    result.already = server.execute(
        "SELECT COUNT(*) FROM merged_clients WHERE host = ? AND source = ?",
        [host, source]).fetchone()[0]
    result.client_connections = _copy_peer(server, client)
    result.candidates = server.execute(
        f"SELECT COUNT(*) FROM connections WHERE {REMOTE}").fetchone()[0]
    pairs = server.execute(
        f"""
        SELECT s.uid, p.uid, p.pid, p.process_start, p.t0 - s.t0
        FROM (SELECT uid, orig_h, orig_p, resp_h, resp_p, {_OPENED} AS t0,
                     COALESCE({_ENDED}, {_FOREVER}) AS t1
              FROM connections WHERE {REMOTE}) s
        JOIN temp.merge_peer p
          ON p.orig_p = s.orig_p AND p.orig_h = s.orig_h AND p.resp_p = s.resp_p
             AND p.resp_h = s.resp_h
        WHERE p.t0 <= s.t1 + :skew AND COALESCE(p.t1, {_FOREVER}) >= s.t0 - :skew
        """, {"skew": max_skew_s}).fetchall()
    assigned, ambiguous = _assign(pairs)
    named = [a for a in assigned if a[2] is not None]
    result.ambiguous = sum(1 for a in named if a[0] in ambiguous)
    offsets = [a[4] for a in named]
    result.offset_s = round(statistics.median(offsets), 6) if offsets else None
    result.processes = len({(a[2], a[3]) for a in named})
    _keep(server, [a[0] for a in assigned if a[2] is None], "merge_unattributed")
    result.matched = _write(server, named, ambiguous, host=host, source=source,
                            now=now or _utc_now(), batch=batch)
    _count_unmatched(server, result)
    server.execute("DROP TABLE temp.merge_peer")
    server.execute("DROP TABLE temp.merge_peer_hosts")
    server.execute("DROP TABLE temp.merge_peer_processes")
    server.execute("DROP TABLE temp.merge_unattributed")
    return result


def _copy_peer(server: sqlite_utils.Database, client: sqlite_utils.Database) -> int:
    """The client database's connections and processes, into temporary tables of the
    server's connection (indexed by 4-tuple); how many connections."""
    server.execute("DROP TABLE IF EXISTS temp.merge_peer")
    server.execute("CREATE TEMP TABLE merge_peer (uid TEXT, orig_h TEXT, orig_p INTEGER,"
                   " resp_h TEXT, resp_p INTEGER, t0 REAL, t1 REAL, pid INTEGER,"
                   " process_start REAL)")
    n = 0
    with server.conn:
        for rows in _batches(client.execute(
                f"SELECT uid, orig_h, orig_p, resp_h, resp_p, {_OPENED}, {_ENDED}, pid,"
                " process_start FROM connections")):
            server.conn.executemany(
                "INSERT INTO temp.merge_peer VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            n += len(rows)
    server.execute("CREATE INDEX temp.merge_peer_tuple"
                   " ON merge_peer(orig_p, orig_h, resp_p, resp_h)")
    server.execute("DROP TABLE IF EXISTS temp.merge_peer_hosts")
    server.execute("CREATE TEMP TABLE merge_peer_hosts (orig_h TEXT PRIMARY KEY)"
                   " WITHOUT ROWID")
    server.execute("INSERT OR IGNORE INTO temp.merge_peer_hosts SELECT orig_h"
                   " FROM temp.merge_peer WHERE orig_h IS NOT NULL")
    have = {row[1] for row in client.execute("PRAGMA table_info(processes)").fetchall()}
    optional = ", ".join(c if c in have else f"NULL AS {c}" for c in ("pod_name",))
    server.execute("DROP TABLE IF EXISTS temp.merge_peer_processes")
    server.execute("CREATE TEMP TABLE merge_peer_processes (pid INTEGER, start_time REAL,"
                   " user TEXT, comm TEXT, cmdline TEXT, container TEXT, pod_name TEXT,"
                   " PRIMARY KEY (pid, start_time))")
    with server.conn:
        for rows in _batches(client.execute(
                "SELECT pid, start_time, user, comm, cmdline, container, "
                f"{optional} FROM processes")):
            server.conn.executemany(
                "INSERT OR IGNORE INTO temp.merge_peer_processes VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows)
    return n


def _batches(cur: Any) -> Iterator[list[Any]]:
    while True:
        rows = cur.fetchmany(COPY_BATCH)
        if not rows:
            return
        yield rows


Pair = tuple[str, str, Any, Any, float]


def _assign(pairs: list[Pair]) -> tuple[list[Pair], set[str]]:
    """One client record per server connection and the other way round, the closest open
    times first; the server connections that had more than one candidate."""
    seen: dict[str, int] = {}
    for p in pairs:
        seen[p[0]] = seen.get(p[0], 0) + 1
    ambiguous = {uid for uid, n in seen.items() if n > 1}
    taken_server: set[str] = set()
    taken_peer: set[str] = set()
    out = []
    for p in sorted(pairs, key=lambda p: (abs(p[4]), p[0], p[1])):
        if p[0] in taken_server or p[1] in taken_peer:
            continue
        taken_server.add(p[0])
        taken_peer.add(p[1])
        out.append(p)
    return out, ambiguous


def _keep(server: sqlite_utils.Database, uids: list[str], table: str) -> None:
    server.execute(f"DROP TABLE IF EXISTS temp.{table}")
    server.execute(f"CREATE TEMP TABLE {table} (uid TEXT PRIMARY KEY) WITHOUT ROWID")
    with server.conn:
        server.conn.executemany(f"INSERT OR IGNORE INTO temp.{table} VALUES (?)",
                                [(u,) for u in uids])


def _write(server: sqlite_utils.Database, named: list[Pair], ambiguous: set[str], *,
           host: str, source: str, now: str, batch: int | None) -> int:
    """Store the matches set-wise; how many connections were named (a connection the live
    agent attributed meanwhile keeps its own). They are staged in a temporary table, then
    applied in one transaction, or with ``batch`` (a live capture writes the database: it
    must not wait long) in transactions of that many: each a few statements over its part
    of the staged table, which leave the database whole (totals included) whenever it
    stops."""
    conn = server.conn
    conn.execute("DROP TABLE IF EXISTS temp.merge_matched")
    conn.execute("CREATE TEMP TABLE merge_matched (n INTEGER PRIMARY KEY, uid TEXT UNIQUE,"
                 " pid INTEGER, process_start REAL, peer_uid TEXT, offset_s REAL,"
                 " ambiguous INTEGER)")
    with conn:
        conn.executemany("INSERT INTO temp.merge_matched VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [(i, a[0], a[2], a[3], a[1], round(a[4], 6), int(a[0] in ambiguous))
                          for i, a in enumerate(named)])
    step = batch or max(len(named), 1)
    done = 0
    for first in range(0, len(named), step):
        done += _apply(server, first, first + step, host=host, source=source, now=now)
    conn.execute("DROP TABLE temp.merge_matched")
    return done


def _apply(server: sqlite_utils.Database, first: int, end: int, *, host: str, source: str,
           now: str) -> int:
    """The staged matches ``first`` to ``end`` (exclusive), in one write transaction: the
    connections still unattributed take the remote process (the per-client totals moved
    with them once, set-wise: store.aggregates.rekeyed), merged_clients and
    merged_processes say who it is. Any failure rolls all of it back."""
    from store import aggregates

    conn = server.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DROP TABLE IF EXISTS temp.merge_apply")
        conn.execute("CREATE TEMP TABLE merge_apply (uid TEXT PRIMARY KEY, pid INTEGER,"
                     " process_start REAL, peer_uid TEXT, offset_s REAL, ambiguous INTEGER)"
                     " WITHOUT ROWID")
        conn.execute(
            "INSERT INTO temp.merge_apply SELECT m.uid, m.pid, m.process_start, m.peer_uid,"
            " m.offset_s, m.ambiguous FROM temp.merge_matched m"
            " JOIN connections c ON c.uid = m.uid"
            f" WHERE m.n >= ? AND m.n < ? AND {_remote('c')}"
            " AND m.uid NOT IN (SELECT uid FROM merged_clients)", [first, end])
        conn.execute(
            "INSERT OR IGNORE INTO merged_processes (host, pid, start_time, user, comm,"
            " cmdline, container, pod_name) SELECT ?, p.pid, p.start_time, p.user,"
            " p.comm, p.cmdline, p.container, p.pod_name FROM temp.merge_peer_processes p"
            " WHERE (p.pid, p.start_time) IN (SELECT pid, process_start"
            " FROM temp.merge_apply)", [host])
        done: int = conn.execute(
            "INSERT INTO merged_clients (uid, host, pid, process_start, peer_uid, source,"
            " offset_s, ambiguous, merged_at) SELECT uid, ?, pid, process_start, peer_uid,"
            " ?, offset_s, ambiguous, ? FROM temp.merge_apply", [host, source, now]).rowcount
        aggregates.rekeyed(server, "temp.merge_apply", also=", attribution = 'merged'")
        conn.execute("DROP TABLE temp.merge_apply")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return done


def _count_unmatched(server: sqlite_utils.Database, result: MergeResult) -> None:
    """The server connections still unnamed after this database, by reason, and the
    addresses with the most of them."""
    reason = (f"CASE WHEN uid IN (SELECT uid FROM temp.merge_unattributed)"
              f" THEN '{NOT_ATTRIBUTED}'"
              f" WHEN orig_h IN (SELECT orig_h FROM temp.merge_peer_hosts) THEN '{NO_OVERLAP}'"
              f" ELSE '{NO_ADDRESS}' END")
    for why, n in server.execute(
            f"SELECT {reason}, COUNT(*) FROM connections WHERE {REMOTE} GROUP BY 1"):
        result.unmatched[why] = n
    unix = server.execute(f"SELECT COUNT(*) FROM connections WHERE {_UNIX_UNNAMED}"
                          ).fetchone()[0]
    if unix:
        result.unmatched[UNIX_SKIPPED] = unix
    result.unmatched_addresses = [
        (ip, n, why) for ip, why, n in server.execute(
            f"SELECT orig_h, {reason}, COUNT(*) AS n FROM connections WHERE {REMOTE}"
            f" GROUP BY 1, 2 ORDER BY n DESC, orig_h LIMIT {TOP_UNMATCHED}")]


@dataclass
class MergeRun:
    """A whole `tracer merge`: each client database's result, and what else was done."""

    results: list[MergeResult]
    live_writer: str | None  # the live capture writing the server's database meanwhile
    report_stored: bool  # the stored report was computed again (readers find it current)


def merge_databases(server_path: str, clients: Sequence[tuple[str, str | None]], *,
                    max_skew_s: float = DEFAULT_MAX_SKEW_S,
                    wait: Callable[[str], None] | None = None) -> MergeRun:
    """Merge each client database (path, host name) into the server's database, in order:
    a database merged later names only what the earlier ones left unnamed. A host name of
    None is the one the database recorded, else its file's (``host_of``).

    Every database is checked before anything is written: the server's must be a tracer
    database (of this version or an older one, which is upgraded), each client's too
    (opened read-only, never changed), and no file given twice. A file read writing the
    server's database is waited for (``wait`` says so); a live capture is not: the merge
    writes beside it in short transactions. StoreError says what is wrong."""
    from store.lock import StoreBusy, WriterLock, describe
    from store.schema import OlderSchema, StoreError, open_database, open_database_readonly
    from store.stored_report import store_report

    paths = [server_path, *(p for p, _ in clients)]
    identities: dict[tuple[int, int], str] = {}
    for path in paths:
        if not os.path.lexists(path):
            raise StoreError(f"no database at {path}")
        try:
            st = os.stat(path)
        except OSError as exc:
            raise StoreError(f"cannot open database {path}: {exc.strerror}") from None
        first = identities.setdefault((st.st_dev, st.st_ino), path)
        if first != path or paths.count(path) > 1:
            raise StoreError(f"{first} is given twice ({path}): give the server's database "
                             "once, then each client host's database once")
    with contextlib.suppress(OlderSchema):  # the writer below upgrades it
        open_database_readonly(server_path).close()
    readers = []
    try:
        for path, _host in clients:
            readers.append(open_database_readonly(path))
        server = open_database(server_path)
        try:
            lock = WriterLock(server, server_path)
            live: str | None = None
            try:
                lock.acquire(wait=wait, refuse_if=lambda holder: holder is not None
                             and holder["kind"] == "live")
            except StoreBusy:
                live = describe(lock.holder())
            try:
                results = []
                for reader, (path, given) in zip(readers, clients, strict=True):
                    host, named_by = (given, "--name") if given is not None else \
                        host_of(reader, path)
                    result = merge_client(server, reader, host=host,
                                          source=os.path.basename(path), max_skew_s=max_skew_s,
                                          batch=WRITE_BATCH if live else None)
                    result.named_by = named_by
                    results.append(result)
                running = server.execute(
                    "SELECT COUNT(*) FROM captures WHERE status = 'running'").fetchone()[0]
                stored = any(r.changed for r in results) and not running
                if stored:
                    store_report(server)  # readers never write: the report as it is now
            finally:
                lock.release()
        finally:
            server.close()
    finally:
        for reader in readers:
            reader.close()
    return MergeRun(results=results, live_writer=live, report_stored=stored)


def merged_counts(db: sqlite_utils.Database) -> dict[str, int]:
    """Server connections named by each host merged so far."""
    return dict(db.execute("SELECT host, COUNT(*) FROM merged_clients GROUP BY host"
                           " ORDER BY host").fetchall())


def host_of(client: sqlite_utils.Database, path: str) -> tuple[str, str]:
    """A client database's host name when none is given, and where it comes from: the
    host its live captures recorded (migration m020_capture_host), else (an older
    tracer's database, only file reads, or captures on several hosts) its file name
    without .db."""
    hosts: list[str] = []
    if "host" in {row[1] for row in client.execute("PRAGMA table_info(captures)").fetchall()}:
        hosts = [r[0] for r in client.execute(
            "SELECT DISTINCT host FROM captures WHERE host IS NOT NULL AND host != ''"
            " ORDER BY host").fetchall()]
    if len(hosts) == 1:
        return hosts[0], "recorded"
    name = os.path.basename(path)
    stem, ext = os.path.splitext(name)
    named = stem if ext in (".db", ".sqlite", ".sqlite3") and stem else name
    if hosts:
        return named, f"file name: it records {len(hosts)} hosts ({', '.join(hosts)})"
    return named, "file name: no host recorded in it"


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
