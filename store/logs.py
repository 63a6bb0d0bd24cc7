"""Batched writes of one log source (``tracer logs add``) and the log read side.

Fast because a log gives a million lines: one transaction per batch; the lines are bound
straight from the parser's records (``itemgetter`` in C, no tuple built per line in
Python); a line's id is not read back but known, because inside a write transaction
SQLite gives a new row of an INTEGER PRIMARY KEY table the largest id plus one (see
"ROWIDs and the INTEGER PRIMARY KEY" in SQLite's documentation), so the ids of a batch
are the largest id before it plus 1, 2, 3... in insertion order.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import sqlite_utils

from tracer.logs.records import LogLine, LogRecord, UnparsedLine

_PARSED_COLUMNS = itemgetter(0, 1, 2, 3, 4, 5)  # LogRecord: line_no, ts, level, pid, ...
_UNPARSED_COLUMNS = itemgetter(0, 1, 2)  # UnparsedLine: line_no, reason, raw
_TS = itemgetter(1)
_ADDRESS_SQL = "INSERT INTO log_addresses (line_id, ip, port) VALUES (?, ?, ?)"
# min(NULL, x) is NULL in SQLite: coalesce keeps the old bound when a batch has no time,
# and takes the batch's when the row has none yet.
_COUNTS_SQL = (
    "UPDATE log_sources SET lines = lines + :lines, parsed = parsed + :parsed,"
    " unparsed = unparsed + :unparsed,"
    " first_ts = coalesce(min(first_ts, :low), first_ts, :low),"
    " last_ts = coalesce(max(last_ts, :high), last_ts, :high) WHERE id = :id"
)
# Pages of the database kept in memory while writing (KiB, as PRAGMA cache_size takes
# it when negative): the two address indexes take rows in random order, and with the
# default 2 MB SQLite rewrites the same index pages to the WAL over and over.
WRITE_CACHE_KIB = 65536


@dataclass
class SourceTotals:
    """What one writer has written (the parts of one log add up to its source's row)."""

    lines: int = 0
    parsed: int = 0
    unparsed: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    addresses: int = 0  # ip:port mentions stored


class LogWriter:
    """Writes the lines of one log source into an open database."""

    def __init__(self, db: sqlite_utils.Database, source_id: int,
                 lock: contextlib.AbstractContextManager[Any] | None = None) -> None:
        """Write into an existing source (see ``start``). Several writers, in several
        processes, may write the parts of one log at once: ``lock``, shared by them,
        hands the write transactions round without SQLite's busy-wait back-off."""
        self.db = db
        self.source_id = source_id
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self.totals = SourceTotals()
        sid = int(source_id)
        self._parsed_sql = (
            "INSERT INTO log_lines (source_id, line_no, ts, level, pid, process, message)"
            f" VALUES ({sid}, ?, ?, ?, ?, ?, ?)"
        )
        self._unparsed_sql = (
            f"INSERT INTO log_lines (source_id, line_no, reason, message) VALUES ({sid}, ?, ?, ?)"
        )
        db.execute(f"PRAGMA cache_size=-{WRITE_CACHE_KIB}")

    @classmethod
    def start(cls, db: sqlite_utils.Database, *, name: str, path: str | None,
              tz: str | None, fmt: str = "auto") -> LogWriter:
        """Create the source's row (its format, checksum and counts come as it is read)."""
        cur = db.execute(
            "INSERT INTO log_sources (name, path, format, tz, added_ts) VALUES (?, ?, ?, ?, ?)",
            [name, path, fmt, tz, time.time()],
        )
        db.conn.commit()
        assert cur.lastrowid is not None
        return cls(db, cur.lastrowid)

    def write(self, records: Sequence[LogLine], lines: int) -> None:
        """One transaction: these records, and ``lines`` more lines read (blank ones
        included) in the source's counts."""
        parsed = [r for r in records if r.__class__ is LogRecord]
        unparsed = [r for r in records if r.__class__ is UnparsedLine] \
            if len(parsed) != len(records) else []
        low = high = None
        if parsed:
            times = list(map(_TS, parsed))
            low, high = min(times), max(times)
        conn = self.db.conn
        with self._lock:
            # IMMEDIATE: the write lock from the start, so no other writer can add lines
            # between reading the largest id and inserting after it.
            conn.execute("BEGIN IMMEDIATE")
            try:
                base = conn.execute(
                    "SELECT coalesce(max(id), 0) + 1 FROM log_lines").fetchone()[0]
                conn.executemany(self._parsed_sql, map(_PARSED_COLUMNS, parsed))
                conn.executemany(self._unparsed_sql, map(_UNPARSED_COLUMNS, unparsed))
                addresses = [(line_id, ip, port)
                             for line_id, r in enumerate(parsed, base) if r[6]
                             for ip, port in r[6]]
                after = base + len(parsed)
                addresses += [(line_id, ip, port)
                              for line_id, u in enumerate(unparsed, after) if u[3]
                              for ip, port in u[3]]
                conn.executemany(_ADDRESS_SQL, addresses)
                # Increments: the other parts' writers update the same row.
                conn.execute(_COUNTS_SQL, {
                    "lines": lines, "parsed": len(parsed), "unparsed": len(unparsed),
                    "low": low, "high": high, "id": self.source_id})
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        t = self.totals
        t.lines += lines
        t.parsed += len(parsed)
        t.unparsed += len(unparsed)
        t.addresses += len(addresses)
        if low is not None and high is not None:
            t.first_ts = low if t.first_ts is None else min(t.first_ts, low)
            t.last_ts = high if t.last_ts is None else max(t.last_ts, high)

    def finish(self, *, fmt: str, sha256: str | None) -> list[dict[str, Any]]:
        """Record the format and, for a log read whole, its checksum; then drop the earlier
        sources with the same checksum (the same log added again: its lines are now
        this source's). Returns the sources dropped."""
        conn = self.db.conn
        with conn:
            conn.execute("UPDATE log_sources SET format = ?, sha256 = ? WHERE id = ?",
                         [fmt, sha256, self.source_id])
        if sha256 is None:
            return []
        same = [dict(r) for r in self.db.query(
            "SELECT * FROM log_sources WHERE sha256 = ? AND id != ? ORDER BY id",
            [sha256, self.source_id])]
        for source in same:
            remove_source(self.db, source["id"])
        return same


def remove_source(db: sqlite_utils.Database, source_id: int) -> int:
    """Delete one log source with its lines and their addresses; returns the lines
    deleted."""
    conn = db.conn
    with conn:
        conn.execute(
            "DELETE FROM log_addresses WHERE line_id IN "
            "(SELECT id FROM log_lines WHERE source_id = ?)", [source_id])
        deleted = conn.execute("DELETE FROM log_lines WHERE source_id = ?", [source_id]).rowcount
        conn.execute("DELETE FROM log_sources WHERE id = ?", [source_id])
    return int(deleted)


# -- read side ------------------------------------------------------------------------------


def log_sources(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every log source with its counts and time range, oldest first."""
    return [dict(r) for r in db.query("SELECT * FROM log_sources ORDER BY id")]


def find_sources(db: sqlite_utils.Database, which: str) -> list[int]:
    """The ids of the sources named ``which``: an id, a name, or a path."""
    if which.isascii() and which.isdigit():
        rows = db.execute("SELECT id FROM log_sources WHERE id = ?", [int(which)]).fetchall()
        if rows:
            return [int(rows[0][0])]
    rows = db.execute("SELECT id FROM log_sources WHERE name = ? OR path = ? ORDER BY id",
                      [which, which]).fetchall()
    return [int(r[0]) for r in rows]


@dataclass
class LineFilter:
    """Which stored log lines to show."""

    sources: list[int] | None = None
    pid: int | None = None
    since: float | None = None
    until: float | None = None
    grep: re.Pattern[str] | None = None
    address: tuple[str, int | None] | None = None  # (ip, port or None for any port)
    unparsed: bool = False  # only the lines kept unparsed, with their reasons
    limit: int | None = None


def log_lines(db: sqlite_utils.Database, f: LineFilter) -> Iterator[dict[str, Any]]:
    """Stored lines matching ``f``: parsed ones in time order, or with ``f.unparsed`` the
    unparsed ones in file order; each with its source name and its addresses, a list of
    (ip, port)."""
    where: list[str] = []
    params: list[Any] = []
    if f.unparsed:
        where.append("l.reason IS NOT NULL")
    else:
        where.append("l.ts IS NOT NULL")
    if f.sources is not None:
        where.append(f"l.source_id IN ({', '.join('?' for _ in f.sources)})")
        params += f.sources
    if f.pid is not None:
        where.append("l.pid = ?")
        params.append(f.pid)
    if f.since is not None:
        where.append("l.ts >= ?")
        params.append(f.since)
    if f.until is not None:
        where.append("l.ts <= ?")
        params.append(f.until)
    if f.address is not None:
        ip, port = f.address
        sub = "SELECT line_id FROM log_addresses WHERE ip = ?"
        params.append(ip)
        if port is not None:
            sub += " AND port = ?"
            params.append(port)
        where.append(f"l.id IN ({sub})")
    order = "l.source_id, l.line_no" if f.unparsed else "l.ts, l.source_id, l.line_no"
    sql = (
        "SELECT l.id, l.ts, s.name AS source, l.line_no, l.level, l.pid, l.process,"
        " l.message, l.reason FROM log_lines l JOIN log_sources s ON s.id = l.source_id"
        f" WHERE {' AND '.join(where)} ORDER BY {order}"
    )
    if f.limit is not None and f.grep is None:
        sql += f" LIMIT {int(f.limit)}"
    shown = 0
    cur = db.conn.execute(sql, params)
    columns = [d[0] for d in cur.description]
    address_sql = "SELECT ip, port FROM log_addresses WHERE line_id = ? ORDER BY rowid"
    for row in cur:
        line = dict(zip(columns, row, strict=True))
        if f.grep is not None and not f.grep.search(line["message"]):
            continue
        line["addresses"] = [(ip, port) for ip, port in
                             db.conn.execute(address_sql, [line["id"]])]
        yield line
        shown += 1
        if f.limit is not None and shown >= f.limit:
            return


def logs_end(db: sqlite_utils.Database) -> float | None:
    """The time of the latest stored log line (for --since -10m)."""
    row = db.execute("SELECT max(last_ts) FROM log_sources").fetchone()
    return None if row is None or row[0] is None else float(row[0])
