"""Batched writes of one capture run: the capture row, connections, events, anomalies."""

from __future__ import annotations

import datetime
import errno
import json
import sqlite3
from collections.abc import Iterable
from operator import itemgetter
from typing import Any

import sqlite_utils

from store.schema import StoreError
from tracer.attribution.sockets import ProcessInfo, SocketDetail
from tracer.events import AnomalyFound, ConnectionEvent
from tracer.record import COLUMNS, RECORD_FIELDS, WRITTEN_COLUMNS, continued_record

# Anomaly rows kept per reason per capture; the counts in capture_stats stay exact.
MAX_ANOMALY_ROWS_PER_REASON = 1000

# An upsert, not a replace: a live capture writes an open connection again as it changes,
# and the attribution columns (written separately) must survive that.
_CONN_SQL = (
    f"INSERT INTO connections ({', '.join(WRITTEN_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in WRITTEN_COLUMNS)}) "
    f"ON CONFLICT (uid) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in WRITTEN_COLUMNS if c != "uid")
)
# A record's values in WRITTEN_COLUMNS order, but for the last one: the capture's id.
_record_values = itemgetter(*RECORD_FIELDS)
assert WRITTEN_COLUMNS == RECORD_FIELDS + ("capture_id",)
# What attribution writes into a connection's row, once its client socket's owner is known.
_ATTRIBUTION_COLUMNS = tuple(c.name for c in COLUMNS if c.source == "attribution")
_ATTRIBUTION_SQL = (
    f"UPDATE connections SET {', '.join(f'{c} = ?' for c in _ATTRIBUTION_COLUMNS)}"
    " WHERE uid = ?"
)
_attribution_values = itemgetter(*_ATTRIBUTION_COLUMNS)
_EVENT_SQL = (
    "INSERT INTO events (uid, n, capture_id, ts, name, dir, stream_id, code, value, detail)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Once-per-connection events whose time is a column of the connection row (see the
# timeline view in store/schema.py): not stored twice. So are each side's first SETTINGS
# and first SETTINGS ACK (the events say so with first=True).
FOLDED_EVENTS = frozenset(("syn", "syn_ack", "established", "preface", "fin", "rst"))
_FOLDED_FIRSTS = frozenset(("settings", "settings_ack"))


def stored(event: ConnectionEvent) -> bool:
    name = event.name
    if name in FOLDED_EVENTS:
        return False
    return not (name in _FOLDED_FIRSTS and getattr(event, "first", False))
# An upsert, not a replace: a replace fires no delete trigger where recursive_triggers is
# off, and the clients' totals (store.aggregates) must see the count it replaces.
_METHOD_SQL = ("INSERT INTO conn_methods (uid, method, count) VALUES (?, ?, ?)"
               " ON CONFLICT (uid, method) DO UPDATE SET count = excluded.count")
_STATUS_SQL = "INSERT OR REPLACE INTO conn_grpc_status (uid, status, count) VALUES (?, ?, ?)"
_CONTINUE_SQL = (
    "SELECT * FROM connections WHERE orig_p = ? AND orig_h = ? AND resp_p = ? AND resp_h = ?"
    " AND is_open = 1 AND end_ts <= ? ORDER BY end_ts DESC LIMIT 1"
)
_ANOMALY_SQL = (
    "INSERT INTO anomalies (capture_id, ts, uid, reason, detail) VALUES (?, ?, ?, ?, ?)"
)


# (connection uid, verdict, process or None, when it was decided, what the kernel said of
# the client socket or None)
Attribution = tuple[str, str, "ProcessInfo | None", float, "SocketDetail | None"]


SQLITE_FULL = 13
_NO_DETAIL = SocketDetail()


class StoreFull(StoreError):
    """The database's filesystem is full (or the user's quota is used up)."""


def store_failure(exc: BaseException, path: str) -> StoreError:
    """A failed write as a StoreError whose message says what happened to which file."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, sqlite3.Error):
        if (getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL
                or "database or disk is full" in str(exc)):
            return StoreFull(f"no space left for the database {path}")
        return StoreError(f"the database {path} could not be written: {exc}")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"no space left for {exc.filename or path}")
    return StoreError(f"{path}: {exc}")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class CaptureWriter:
    """Writes one capture run into an open database."""

    def __init__(self, db: sqlite_utils.Database, capture_id: int) -> None:
        """Write into an existing capture (see ``start``); several writers, in several
        processes, may write into the same capture."""
        self.db = db
        self.capture_id = capture_id
        self.anomaly_counts: dict[str, int] = {}
        self.connections = 0
        self.open_at_end = 0
        self.events = 0
        self.continued = 0  # connections folded into a row of an earlier capture
        # Continuations still being written: new uid -> (old row as it was, its methods,
        # its grpc-status counts).
        self._continued: dict[str, tuple[dict[str, Any], dict[str, int], dict[int, int]]] = {}

    @classmethod
    def start(cls, db: sqlite_utils.Database, *, kind: str, ports: Iterable[int],
              interface: str | None = None, tool_version: str = "",
              writer: tuple[int, float] | None = None,
              host: str | None = None) -> CaptureWriter:
        """Create the capture row of a new run. ``writer``: the (pid, start time) of the
        process that runs it, so that a reader can tell a capture still running from one
        whose process died (kill -9, a crash) before it could finish. ``host``: the host
        whose packets it captures (a live capture's own), which `tracer merge` names
        this database's processes by."""
        pid, pid_start = writer if writer is not None else (None, None)
        with db.conn:
            cur = db.conn.execute(
                "INSERT INTO captures (kind, started_at, status, ports, interface, tool_version,"
                " pid, pid_start, host) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                [kind, utc_now(), ",".join(str(p) for p in sorted(ports)), interface,
                 tool_version, pid, pid_start, host],
            )
        return cls(db, cur.lastrowid)  # type: ignore[arg-type]

    def update_progress(self, *, packets: int, segments: int, first_ts: float | None,
                        last_ts: float | None, drops: int | None) -> None:
        """The running capture's totals so far: a capture cut short (kill -9, a full disk)
        still says how far it got."""
        with self.db.conn:
            self.db.conn.execute(
                "UPDATE captures SET first_ts = ?, last_ts = ?, packets = ?, segments = ?,"
                " drops = ? WHERE id = ?",
                [first_ts, last_ts, packets, segments, drops, self.capture_id],
            )

    def stored_counts(self) -> tuple[int, int]:
        """(connections, open ones) stored for this capture."""
        row = self.db.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(is_open), 0) FROM connections WHERE capture_id = ?",
            [self.capture_id],
        ).fetchone()
        return int(row[0]), int(row[1])

    def kept_text(self) -> str:
        """What this capture has in the database: said when it cannot go on."""
        try:
            connections, still_open = self.stored_counts()
        except sqlite3.Error as exc:
            return f"what was committed before is kept (it cannot be counted: {exc})"
        return (f"the {connections:,} connections ({still_open:,} open) committed before "
                "are kept")

    def attribute(self, verdicts: list[Attribution]) -> list[Attribution]:
        """Store who owns each connection's client end (and the processes); return the
        verdicts whose connection has no row yet (written before it: applied later)."""
        missing = []
        db = self.db.conn
        with db:
            for uid, verdict, info, ts, detail in verdicts:
                if info is not None:
                    db.execute(
                        "INSERT OR IGNORE INTO processes (pid, start_time, ppid, user, comm,"
                        " cmdline, exe, container, pod, netns, pod_name, cgroup)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [info.pid, info.start_time, info.ppid, info.user, info.comm,
                         info.cmdline, info.exe, info.container, info.pod, info.netns,
                         info.pod_name, info.cgroup],
                    )
                d = detail or _NO_DETAIL
                row = {
                    "pid": info.pid if info else None,
                    "process_start": info.start_time if info else None,
                    "attribution": verdict, "attributed_ts": ts, "client_uid": d.uid,
                    "client_user": d.user, "client_netns": d.netns, "client_cgroup": d.cgroup,
                    "client_container": d.container, "client_pod": d.pod,
                }
                cur = db.execute(_ATTRIBUTION_SQL, [*_attribution_values(row), uid])
                if cur.rowcount == 0:
                    missing.append((uid, verdict, info, ts, detail))
        return missing

    def followed_unix(self, labels: list[str]) -> None:
        """The Unix sockets this capture follows (--unix), in the capture's row."""
        with self.db.conn:
            self.db.conn.execute("UPDATE captures SET unix_paths = ? WHERE id = ?",
                                 [",".join(labels), self.capture_id])

    def unix_sockets(self, records: list[dict[str, Any]]) -> None:
        """What the kernel showed of each Unix-socket connection's sockets (records of
        tracer.unixconns, written just before)."""
        rows = [(r["uid"], u["path"], u["server_inode"], u["client_inode"], u["client_uid"],
                 u["queue_max"], u["queue_changes"]) for r in records
                if (u := r.get("unix")) is not None]
        if not rows:
            return
        with self.db.conn:
            self.db.conn.executemany(
                "INSERT INTO unix_sockets (uid, path, server_inode, client_inode, client_uid,"
                " queue_max, queue_changes) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (uid) DO"
                " UPDATE SET client_uid = COALESCE(excluded.client_uid, client_uid),"
                " queue_max = excluded.queue_max, queue_changes = excluded.queue_changes",
                rows)

    def write(
        self,
        records: list[dict[str, Any]],
        events: list[ConnectionEvent],
        anomalies: list[AnomalyFound],
    ) -> None:
        """One transaction for one batch."""
        cid = self.capture_id
        conn = self.db.conn
        with conn:
            if events:
                conn.executemany(
                    _EVENT_SQL,
                    [(e.uid, e.n, cid, e.ts, e.name, e.dir) + e.columns()
                     for e in events if stored(e)],
                )
                self.events += len(events)
            if anomalies:
                rows = []
                counts = self.anomaly_counts
                for a in anomalies:
                    seen = counts.get(a.reason, 0)
                    counts[a.reason] = seen + 1
                    if seen < MAX_ANOMALY_ROWS_PER_REASON:
                        rows.append((cid, a.ts, a.uid, a.reason, a.detail))
                conn.executemany(_ANOMALY_SQL, rows)
            if records:
                # After events and anomalies: a continued connection moves its rows to the old uid.
                records = [r for r in records if not (r["mid_stream"] and self._continue(r))]
                conn.executemany(_CONN_SQL, [_record_values(r) + (cid,) for r in records])
                conn.executemany(
                    _METHOD_SQL,
                    [(r["uid"], m, c) for r in records for m, c in r["methods"].items()],
                )
                statuses = [(r["uid"], st, c) for r in records
                            for st, c in r["grpc_statuses"].items()]
                if statuses:
                    conn.executemany(_STATUS_SQL, statuses)
                self.connections += len(records)
                self.open_at_end += sum(1 for r in records if r["is_open"])

    def _continue(self, rec: dict[str, Any]) -> bool:
        """Fold a connection picked up mid-stream into the earlier row of the same TCP
        connection (a previous capture's, left open at its end), if there is one.

        The same 4-tuple, an earlier end, still open, and each side's sequence numbers
        moving forward from where the old row stopped (within 2^30) make it the same
        connection: rotated capture files read one run at a time, or an agent restarted.
        The bytes in between were not captured: they count as missed. A live capture
        writes an open connection again as it changes: each time the merge starts over
        from the old row as it was."""
        conn = self.db.conn
        known = self._continued.get(rec["uid"])
        if known is None:
            cur = conn.execute(_CONTINUE_SQL, [rec["orig_p"], rec["orig_h"], rec["resp_p"],
                                               rec["resp_h"], rec["ts"]])
            row = cur.fetchone()
            if row is None:
                return False
            old = dict(zip([d[0] for d in cur.description], row, strict=True))
            methods = dict(conn.execute(
                "SELECT method, count FROM conn_methods WHERE uid = ?", [old["uid"]]
            ).fetchall())
            statuses = dict(conn.execute(
                "SELECT status, count FROM conn_grpc_status WHERE uid = ?", [old["uid"]]
            ).fetchall())
            if continued_record(old, rec) is None:
                return False
            known = self._continued[rec["uid"]] = (old, methods, statuses)
            self.continued += 1
        old, methods, statuses = known
        merged = continued_record(old, rec)
        assert merged is not None
        uid = old["uid"]
        conn.execute(
            f"UPDATE connections SET {', '.join(f'{k} = ?' for k in merged)} WHERE uid = ?",
            [*merged.values(), uid],
        )
        total = dict(methods)
        for m, c in rec["methods"].items():
            total[m] = total.get(m, 0) + c
        conn.execute("DELETE FROM conn_methods WHERE uid = ?", [uid])
        conn.executemany(_METHOD_SQL, [(uid, m, c) for m, c in total.items()])
        status_total = dict(statuses)
        for st, c in rec["grpc_statuses"].items():
            status_total[st] = status_total.get(st, 0) + c
        conn.execute("DELETE FROM conn_grpc_status WHERE uid = ?", [uid])
        conn.executemany(_STATUS_SQL, [(uid, st, c) for st, c in status_total.items()])
        for table in ("events", "anomalies"):
            conn.execute(f"UPDATE {table} SET uid = ? WHERE uid = ?", [uid, rec["uid"]])
        if rec["end_reason"] not in (None, "open_at_end"):
            del self._continued[rec["uid"]]
        return True

    def add_source(self, n: int, path: str, *, fmt: str, compressed: bool, size: int | None,
                   sha256: str | None, packets: int, linktypes: list[int]) -> None:
        with self.db.conn:
            self.db.conn.execute(
                "INSERT OR REPLACE INTO capture_sources (capture_id, n, path, format, compressed,"
                " size, sha256, packets, linktypes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [self.capture_id, n, path, fmt, int(compressed), size, sha256, packets,
                 json.dumps(linktypes)],
            )

    def finish(self, *, status: str, error: str | None, first_ts: float | None,
               last_ts: float | None, packets: int, segments: int, connections: int,
               open_at_end: int, anomaly_counts: dict[str, int], drops: int | None,
               elapsed_s: float, stats: dict[str, int]) -> None:
        """Close the capture with the totals of every writer that wrote into it."""
        cid = self.capture_id
        conn = self.db.conn
        with conn:
            conn.execute(
                "UPDATE captures SET finished_at=?, status=?, error=?, first_ts=?, last_ts=?,"
                " packets=?, segments=?, connections=?, open_at_end=?, anomalies=?, drops=?,"
                " elapsed_s=? WHERE id=?",
                [utc_now(), status, error, first_ts, last_ts, packets, segments,
                 connections, open_at_end, sum(anomaly_counts.values()), drops,
                 elapsed_s, cid],
            )
            merged = dict(stats)
            for reason, count in anomaly_counts.items():
                merged[f"anomaly.{reason}"] = count
            conn.executemany(
                "INSERT OR REPLACE INTO capture_stats (capture_id, name, value) VALUES (?, ?, ?)",
                [(cid, k, v) for k, v in sorted(merged.items())],
            )

    def mark_failed(self, error: str) -> bool:
        """Mark the capture failed with as small a write as there is, after a failure
        (a full disk): on this connection, or else on a fresh one (a connection whose
        write failed may hold on to what it could not write). False if neither could."""
        sql = "UPDATE captures SET status = 'failed', error = ?, finished_at = ? WHERE id = ?"
        params = [error, utc_now(), self.capture_id]
        try:
            with self.db.conn:
                self.db.conn.execute(sql, params)
            return True
        except sqlite3.Error:
            pass
        path = self.db.conn.execute("PRAGMA database_list").fetchone()[2]
        try:
            fresh = sqlite3.connect(path, timeout=5.0)
            try:
                with fresh:
                    fresh.execute(sql, params)
            finally:
                fresh.close()
            return True
        except sqlite3.Error:
            return False

    def supersede_same_sources(self) -> list[int]:
        """Drop earlier captures made of exactly the same files (same sha256s, same order).

        Connection and event keys are deterministic, so re-reading a file rewrote the same
        rows; what remains of the earlier run is its capture row and whatever it had that
        this run did not produce."""
        cid = self.capture_id
        conn = self.db.conn
        mine = [r[0] for r in conn.execute(
            "SELECT sha256 FROM capture_sources WHERE capture_id=? ORDER BY n", [cid]
        )]
        if not mine or None in mine:
            return []
        old_ids = []
        for (other,) in conn.execute(
            "SELECT id FROM captures WHERE id != ? AND kind = 'file'", [cid]
        ).fetchall():
            theirs = [r[0] for r in conn.execute(
                "SELECT sha256 FROM capture_sources WHERE capture_id=? ORDER BY n", [other]
            )]
            if theirs == mine:
                old_ids.append(other)
        with conn:
            for old in old_ids:
                conn.execute(
                    "DELETE FROM conn_methods WHERE uid IN"
                    " (SELECT uid FROM connections WHERE capture_id=?)", [old]
                )
                conn.execute(
                    "DELETE FROM conn_grpc_status WHERE uid IN"
                    " (SELECT uid FROM connections WHERE capture_id=?)", [old]
                )
                for table in ("connections", "events", "anomalies"):
                    conn.execute(f"DELETE FROM {table} WHERE capture_id=?", [old])
                for table in ("capture_sources", "capture_stats"):
                    conn.execute(f"DELETE FROM {table} WHERE capture_id=?", [old])
                conn.execute("DELETE FROM captures WHERE id=?", [old])
        return old_ids
