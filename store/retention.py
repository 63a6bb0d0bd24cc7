"""Retention: the database kept within an age and a size, oldest closed connections first.

A long-running agent must not become the leak it hunts. Two limits, alone or together:
- age (``--retain 14d``, ``tracer prune --older-than 14d``): connections that ended longer
  ago than that before the end of the data (for a running agent: now) go, with their
  methods, statuses, events and anomalies, and log lines and server samples as old;
- size (``--max-db-size 2G``): while the database holds more than that, the oldest closed
  connections go (and log lines older than the newest of them), a step at a time.

Open connections are never dropped: they are what a leak is made of. What the pruned
connections added to their client's totals is kept in ``client_history`` (opened,
closed, how, RPCs, methods), so that a report over the whole database still counts them:
a pool whose closed connections were pruned must not look like a leak. Each pass is
recorded in ``prunes``: ``tracer report`` says from when the data is retained.

The file really shrinks: new databases use incremental auto-vacuum, and a pass hands the
freed pages back to the filesystem (and truncates the write-ahead log). A database made
before that reuses its freed pages but keeps its size until ``tracer prune`` vacuums it
once.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from dataclasses import dataclass

import sqlite_utils

from store.queries import CLIENT_KEY, CLOSED_BY, CLOSED_FIRST_BY, HEALTH_CHECK
from store.server import drop_before as drop_server_samples_before
from store.writer import utc_now

STEP = 5000  # connections deleted per transaction (a writer waits at most that long)
HIGH_WATER = 0.95  # over this share of its limit, a size pass starts...
SIZE_TARGET = 0.85  # ...and brings the database down to this share
PASS_BUDGET_S = 2.0  # a pass stops after this long; the next one goes on
INTERVAL_S = 60.0  # a running agent applies the age limit this often
SIZE_CHECK_S = 5.0  # and looks at the size this often (two pragmas: cheap)
WAL_SHARE = 8  # the write-ahead log may take up to 1/8 of a size limit


@dataclass(frozen=True)
class Retention:
    """The limits; None for no limit of that kind."""

    older_than_s: float | None = None
    max_bytes: int | None = None
    interval_s: float = INTERVAL_S
    size_check_s: float = SIZE_CHECK_S

    @property
    def wal_bytes(self) -> int:
        """What the write-ahead log may take: counted against the size limit, and held
        there by checkpoints that often (see ``configure``)."""
        if self.max_bytes is None:
            return 0
        return max(64 << 10, min(16 << 20, self.max_bytes // WAL_SHARE))

    def configure(self, db: sqlite_utils.Database) -> None:
        """For a writer that runs for long under the size limit: the write-ahead log is
        checkpointed once it holds ``wal_bytes`` and cut back to that after each
        checkpoint, so that the file and its log together stay under the limit."""
        if self.max_bytes is None:
            return
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute(f"PRAGMA journal_size_limit = {self.wal_bytes}")
        db.execute(f"PRAGMA wal_autocheckpoint = {max(16, self.wal_bytes // page_size)}")

    def over_size(self, db: sqlite_utils.Database) -> bool:
        """The database (with room for its log) has grown past the high-water mark."""
        if self.max_bytes is None:
            return False
        return _used_bytes(db) + self.wal_bytes > self.max_bytes * HIGH_WATER

    def apply(self, db: sqlite_utils.Database, *, now: float | None = None,
              budget_s: float = PASS_BUDGET_S, size_only: bool = False) -> PruneOutcome:
        return prune(db, older_than_s=None if size_only else self.older_than_s,
                     max_bytes=self.max_bytes, now=now, budget_s=budget_s,
                     wal_bytes=self.wal_bytes)


@dataclass
class PruneOutcome:
    connections: int = 0
    log_lines: int = 0
    cutoff_ts: float | None = None  # everything that ended before this is gone
    bytes_before: int = 0
    bytes_after: int = 0
    open_bytes: int | None = None  # set when the open connections alone exceed the limit
    vacuumed: bool = False  # a full VACUUM turned on incremental auto-vacuum
    complete: bool = True  # False when the pass ran out of time (the next one goes on)


def database_bytes(db: sqlite_utils.Database) -> int:
    """What the database takes on disk: its file and its write-ahead log."""
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    return int(page_size * pages + _wal_bytes(db))


def _used_bytes(db: sqlite_utils.Database) -> int:
    """Pages in use (the free ones are handed back by the vacuum step)."""
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    return int(page_size * (pages - free))


def _wal_bytes(db: sqlite_utils.Database) -> int:
    import os

    path = db.execute("PRAGMA database_list").fetchone()[2]
    try:
        return os.stat(path + "-wal").st_size if path else 0
    except OSError:
        return 0


def data_end(db: sqlite_utils.Database) -> float | None:
    """The newest moment the database has data for."""
    row = db.execute("SELECT MAX(last_ts) FROM captures").fetchone()
    end = row[0]
    row = db.execute("SELECT MAX(end_ts) FROM connections").fetchone()
    if row[0] is not None and (end is None or row[0] > end):
        end = row[0]
    return float(end) if end is not None else None


def prune(db: sqlite_utils.Database, *, older_than_s: float | None = None,
          max_bytes: int | None = None, now: float | None = None,
          budget_s: float = PASS_BUDGET_S, vacuum: bool = False,
          wal_bytes: int = 0) -> PruneOutcome:
    """One retention pass (see the module's docstring). ``now``: the moment ages count
    from (default: the end of the data). ``vacuum``: if the database predates incremental
    auto-vacuum, convert it with one full VACUUM (rewrites the file: takes as much free
    space as the database's size). ``wal_bytes``: room kept under ``max_bytes`` for the
    write-ahead log of a writer that goes on writing."""
    out = PruneOutcome(bytes_before=database_bytes(db))
    deadline = time.monotonic() + budget_s
    if older_than_s is not None:
        end = now if now is not None else data_end(db)
        if end is not None:
            cutoff = end - older_than_s
            while time.monotonic() < deadline:
                n = _drop_closed_before(db, cutoff, STEP)
                out.connections += n
                if n < STEP:
                    break
            else:
                out.complete = False
            out.log_lines += _drop_log_lines_before(db, cutoff)
            drop_server_samples_before(db, cutoff)
            if out.connections or out.log_lines:
                out.cutoff_ts = cutoff
                _note(db, "age", cutoff, out.connections, out.log_lines, out.bytes_before)
    if max_bytes is not None:
        _shrink_to(db, max_bytes, wal_bytes, out, deadline)
    if vacuum and db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("VACUUM")
        out.vacuumed = True
    _give_back(db)
    out.bytes_after = database_bytes(db)
    if out.connections or out.log_lines:
        with db.conn:
            db.execute("UPDATE prunes SET bytes_after = ? WHERE id = (SELECT MAX(id) FROM prunes)",
                       [out.bytes_after])
    return out


def _shrink_to(db: sqlite_utils.Database, max_bytes: int, wal_bytes: int,
               out: PruneOutcome, deadline: float) -> None:
    target = int(max_bytes * SIZE_TARGET) - wal_bytes
    used = _used_bytes(db)
    if used + wal_bytes <= max_bytes * HIGH_WATER:
        return
    dropped = lines = 0
    cutoff: float | None = None
    while used > target:
        if time.monotonic() >= deadline:
            out.complete = False
            break
        closed = db.execute(
            "SELECT COUNT(*) FROM connections WHERE is_open = 0").fetchone()[0]
        if not closed:
            break
        rows = db.execute("SELECT COUNT(*) FROM connections").fetchone()[0] + db.execute(
            "SELECT COUNT(*) FROM log_lines").fetchone()[0]
        per_row = used / max(rows, 1)
        want = min(STEP, closed, max(1, math.ceil((used - target) / per_row * 1.1)))
        row = db.execute(
            "SELECT end_ts FROM connections WHERE is_open = 0 ORDER BY end_ts LIMIT 1 OFFSET ?",
            [want - 1],
        ).fetchone()
        cutoff = float(row[0]) + 1e-6
        dropped += _drop_closed_before(db, cutoff, want)
        lines += _drop_log_lines_before(db, cutoff)
        drop_server_samples_before(db, cutoff)
        used = _used_bytes(db)
    if used + wal_bytes > max_bytes and out.complete:
        # Only open connections are left (and what they carry): never dropped.
        out.open_bytes = used
    if dropped or lines:
        out.connections += dropped
        out.log_lines += lines
        out.cutoff_ts = max(cutoff or 0.0, out.cutoff_ts or 0.0)
        _note(db, "size", cutoff or 0.0, dropped, lines, out.bytes_before)


def _drop_closed_before(db: sqlite_utils.Database, cutoff: float, limit: int) -> int:
    """Drop up to ``limit`` closed connections that ended before ``cutoff`` (the oldest
    first), folding them into their client's history first. One transaction."""
    conn = db.conn
    with conn:
        conn.execute("DROP TABLE IF EXISTS temp.doomed")
        conn.execute(
            "CREATE TEMP TABLE doomed AS SELECT uid FROM connections"
            " WHERE is_open = 0 AND end_ts < ? ORDER BY end_ts LIMIT ?", [cutoff, limit])
        n = conn.execute("SELECT COUNT(*) FROM temp.doomed").fetchone()[0]
        if not n:
            conn.execute("DROP TABLE temp.doomed")
            return 0
        conn.execute(
            f"""
            INSERT INTO client_history (client_key, pid, process_start, orig_h, opened, closed,
                by_client_fin, by_server_fin, by_rst, by_goaway, by_port_reused,
                health_checks, pre_existing, rpcs, closed_by_client, closed_by_server,
                tls_records, tls_connections, first_ts, last_ts)
            SELECT key, pid, process_start, MIN(orig_h), SUM(NOT hc), SUM(NOT hc),
                SUM(closed_by = 'client_fin' AND NOT hc), SUM(closed_by = 'server_fin' AND NOT hc),
                SUM(closed_by = 'rst' AND NOT hc), SUM(closed_by = 'goaway' AND NOT hc),
                SUM(closed_by = 'port_reused' AND NOT hc), SUM(hc),
                SUM(mid_stream AND NOT hc), SUM(CASE WHEN NOT hc THEN streams ELSE 0 END),
                SUM(closed_first_by = 'orig' AND NOT hc), SUM(closed_first_by = 'resp' AND NOT hc),
                SUM(CASE WHEN NOT hc THEN COALESCE(tls_records_orig, 0) ELSE 0 END),
                SUM(NOT hc AND COALESCE(protocol, '') = 'tls'),
                MIN(ts), MAX(end_ts)
            FROM (SELECT *, {CLIENT_KEY} AS key, {HEALTH_CHECK} AS hc, {CLOSED_BY} AS closed_by,
                         {CLOSED_FIRST_BY} AS closed_first_by
                  FROM connections WHERE uid IN (SELECT uid FROM temp.doomed))
            GROUP BY key
            ON CONFLICT (client_key) DO UPDATE SET
                closed_by_client = closed_by_client + excluded.closed_by_client,
                closed_by_server = closed_by_server + excluded.closed_by_server,
                tls_records = tls_records + excluded.tls_records,
                tls_connections = tls_connections + excluded.tls_connections,
                opened = opened + excluded.opened, closed = closed + excluded.closed,
                by_client_fin = by_client_fin + excluded.by_client_fin,
                by_server_fin = by_server_fin + excluded.by_server_fin,
                by_rst = by_rst + excluded.by_rst, by_goaway = by_goaway + excluded.by_goaway,
                by_port_reused = by_port_reused + excluded.by_port_reused,
                health_checks = health_checks + excluded.health_checks,
                pre_existing = pre_existing + excluded.pre_existing,
                rpcs = rpcs + excluded.rpcs,
                first_ts = MIN(first_ts, excluded.first_ts),
                last_ts = MAX(last_ts, excluded.last_ts)
            """
        )
        conn.execute(
            f"""
            INSERT INTO client_history_methods (client_key, method, count)
            SELECT {CLIENT_KEY}, m.method, SUM(m.count)
            FROM conn_methods m JOIN connections USING (uid)
            WHERE uid IN (SELECT uid FROM temp.doomed)
            GROUP BY 1, 2
            ON CONFLICT (client_key, method) DO UPDATE SET count = count + excluded.count
            """
        )
        for table in ("conn_methods", "conn_grpc_status", "events", "anomalies",
                      "connections"):
            conn.execute(f"DELETE FROM {table} WHERE uid IN (SELECT uid FROM temp.doomed)")
        conn.execute("DELETE FROM anomalies WHERE uid IS NULL AND ts < ?", [cutoff])
        conn.execute("DROP TABLE temp.doomed")
    return int(n)


def _drop_log_lines_before(db: sqlite_utils.Database, cutoff: float) -> int:
    conn = db.conn
    with conn:
        conn.execute(
            "DELETE FROM log_addresses WHERE line_id IN"
            " (SELECT id FROM log_lines WHERE ts < ?)", [cutoff])
        cur = conn.execute("DELETE FROM log_lines WHERE ts < ?", [cutoff])
    return int(cur.rowcount)


def _note(db: sqlite_utils.Database, reason: str, cutoff: float, connections: int,
          lines: int, before: int) -> None:
    with db.conn:
        db.conn.execute(
            "INSERT INTO prunes (at, reason, cutoff_ts, connections, log_lines, bytes_before)"
            " VALUES (?, ?, ?, ?, ?, ?)", [utc_now(), reason, cutoff, connections, lines, before])


def _give_back(db: sqlite_utils.Database) -> None:
    """Hand the free pages back to the filesystem and truncate the write-ahead log (a
    reader in the middle of a read may keep the log for now: the next pass does it)."""
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        # Each step of this pragma frees one page, and the sqlite3 module's execute()
        # takes one step of a statement without columns: executescript steps to the end.
        db.conn.executescript("PRAGMA incremental_vacuum;")
    with contextlib.suppress(sqlite3.OperationalError):
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def retained(db: sqlite_utils.Database) -> dict[str, float | int | None]:
    """From when the data is whole, and what retention let go."""
    row = db.execute(
        "SELECT MAX(cutoff_ts), COALESCE(SUM(connections), 0), COALESCE(SUM(log_lines), 0),"
        " COUNT(*) FROM prunes").fetchone()
    return {"retained_from": row[0], "pruned_connections": row[1],
            "pruned_log_lines": row[2], "prunes": row[3]}
