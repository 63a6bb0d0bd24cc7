"""The SQLite schema, created and upgraded by named migrations (sqlite-utils Migrations)."""

from __future__ import annotations

import os
import sqlite3

import sqlite_utils
from sqlite_utils.migrations import Migrations

from tracer.record import RECORD_FIELDS

migrations = Migrations("tracer")

# Column types of the connections table; anything not listed is INTEGER.
_REAL = {
    "ts", "syn_ts", "synack_ts", "established_ts", "close_ts", "end_ts", "duration",
    "last_activity_ts", "preface_ts", "client_settings_ts", "server_settings_ts", "goaway_ts",
    "client_settings_ack_ts", "server_settings_ack_ts",
}
_TEXT = {
    "uid", "orig_h", "resp_h", "conn_state", "history", "close_kind", "end_reason", "protocol",
    "orig_state", "resp_state",
    "client_settings", "server_settings", "first_method", "authority", "user_agent",
    "goaway_sender", "goaway_debug", "tls_sni", "tls_alpn",
}


def _column_type(name: str) -> str:
    if name in _REAL:
        return "REAL"
    if name in _TEXT:
        return "TEXT"
    return "INTEGER"


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE captures (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,            -- file | live
            started_at TEXT NOT NULL,      -- wall clock when the run started (UTC, ISO 8601)
            finished_at TEXT,
            status TEXT NOT NULL,          -- running | complete | damaged | interrupted
            error TEXT,
            ports TEXT NOT NULL,           -- comma-separated server ports
            interface TEXT,
            first_ts REAL,
            last_ts REAL,
            packets INTEGER NOT NULL DEFAULT 0,
            segments INTEGER NOT NULL DEFAULT 0,
            connections INTEGER NOT NULL DEFAULT 0,
            open_at_end INTEGER NOT NULL DEFAULT 0,
            anomalies INTEGER NOT NULL DEFAULT 0,
            drops INTEGER,                 -- packets the kernel or the capturing tool dropped
            elapsed_s REAL,
            tool_version TEXT
        )
        """
    )
    db.execute(
        """
        CREATE TABLE capture_sources (
            capture_id INTEGER NOT NULL REFERENCES captures(id),
            n INTEGER NOT NULL,
            path TEXT NOT NULL,
            format TEXT,
            compressed INTEGER NOT NULL DEFAULT 0,
            size INTEGER,
            sha256 TEXT,
            packets INTEGER NOT NULL DEFAULT 0,
            linktypes TEXT,
            PRIMARY KEY (capture_id, n)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE capture_stats (
            capture_id INTEGER NOT NULL REFERENCES captures(id),
            name TEXT NOT NULL,
            value INTEGER NOT NULL,
            PRIMARY KEY (capture_id, name)
        )
        """
    )
    cols = ",\n".join(
        f"{name} {_column_type(name)}" + (" PRIMARY KEY" if name == "uid" else "")
        for name in RECORD_FIELDS
    )
    db.execute(
        f"CREATE TABLE connections (\n{cols},\ncapture_id INTEGER NOT NULL REFERENCES captures(id))"
    )
    db.execute(
        """
        CREATE TABLE conn_methods (
            uid TEXT NOT NULL,
            method TEXT NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (uid, method)
        ) WITHOUT ROWID
        """
    )
    # Append-only: the timeline of each connection's control frames and lifecycle. The
    # once-per-connection moments (SYN, SYN-ACK, handshake, preface, each side's first
    # SETTINGS and its ACK) live in the connection row's *_ts columns instead; the
    # timeline view puts both together.
    db.execute(
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            capture_id INTEGER NOT NULL,
            uid TEXT NOT NULL,
            n INTEGER NOT NULL,            -- ordinal of the event within its connection
            ts REAL NOT NULL,
            name TEXT NOT NULL,
            dir TEXT,                      -- orig (client side) | resp (server side)
            stream_id INTEGER,
            code INTEGER,
            value INTEGER,
            detail TEXT
        )
        """
    )
    db.execute(
        """
        CREATE VIEW timeline AS
            SELECT uid, ts, name, dir, stream_id, code, value, detail FROM events
            UNION ALL SELECT uid, syn_ts, 'syn', 'orig', NULL, NULL, NULL, NULL
                FROM connections WHERE syn_ts IS NOT NULL
            UNION ALL SELECT uid, synack_ts, 'syn_ack', 'resp', NULL, NULL, NULL, NULL
                FROM connections WHERE synack_ts IS NOT NULL
            UNION ALL SELECT uid, established_ts, 'established', 'orig', NULL, NULL, NULL, NULL
                FROM connections WHERE established_ts IS NOT NULL
            UNION ALL SELECT uid, preface_ts, 'preface', 'orig', NULL, NULL, NULL, NULL
                FROM connections WHERE preface_ts IS NOT NULL
            UNION ALL SELECT uid, client_settings_ts, 'settings', 'orig', 0, NULL, NULL,
                    client_settings
                FROM connections WHERE client_settings_ts IS NOT NULL
            UNION ALL SELECT uid, server_settings_ts, 'settings', 'resp', 0, NULL, NULL,
                    server_settings
                FROM connections WHERE server_settings_ts IS NOT NULL
            UNION ALL SELECT uid, client_settings_ack_ts, 'settings_ack', 'orig', 0, NULL, NULL,
                    NULL
                FROM connections WHERE client_settings_ack_ts IS NOT NULL
            UNION ALL SELECT uid, server_settings_ack_ts, 'settings_ack', 'resp', 0, NULL, NULL,
                    NULL
                FROM connections WHERE server_settings_ack_ts IS NOT NULL
        """
    )
    db.execute(
        """
        CREATE TABLE anomalies (
            id INTEGER PRIMARY KEY,
            capture_id INTEGER NOT NULL,
            ts REAL,
            uid TEXT,
            reason TEXT NOT NULL,
            detail TEXT
        )
        """
    )
    for sql in (
        "CREATE INDEX connections_orig_h ON connections(orig_h)",
        "CREATE INDEX connections_tuple ON connections(orig_p, orig_h, resp_p, resp_h)",
        "CREATE INDEX connections_capture ON connections(capture_id)",
        "CREATE INDEX events_uid ON events(uid)",
        "CREATE INDEX anomalies_capture ON anomalies(capture_id, reason)",
    ):
        db.execute(sql)


@migrations()
def m002_attribution(db: sqlite_utils.Database) -> None:
    """Which process owns each connection's client end (live capture)."""
    db.execute(
        """
        CREATE TABLE processes (
            pid INTEGER NOT NULL,
            start_time REAL NOT NULL,      -- with pid, names one process (pids are reused)
            ppid INTEGER,
            user TEXT,
            comm TEXT,
            cmdline TEXT,
            exe TEXT,
            container TEXT,
            pod TEXT,
            netns INTEGER,
            PRIMARY KEY (pid, start_time)
        )
        """
    )
    for column, kind in (("pid", "INTEGER"), ("process_start", "REAL"),
                         ("attribution", "TEXT"), ("attributed_ts", "REAL")):
        db.execute(f"ALTER TABLE connections ADD COLUMN {column} {kind}")
    db.execute("CREATE INDEX connections_process ON connections(pid, process_start)")


@migrations()
def m003_logs(db: sqlite_utils.Database) -> None:
    """Application logs lined up with the connections (tracer logs add): one row per log
    source, one per line (parsed, or kept with the reason it could not be), and the
    ``ip:port`` endpoints each line mentions, in the connections table's address form."""
    db.execute(
        """
        CREATE TABLE log_sources (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            path TEXT,                     -- NULL for standard input and the journal
            format TEXT NOT NULL,          -- json, klog, syslog, logfmt, plain; a+b when mixed
            tz TEXT,                       -- the zone of times written without an offset
            added_ts REAL NOT NULL,
            sha256 TEXT,                   -- of the log's bytes (decompressed); NULL until read whole
            lines INTEGER NOT NULL DEFAULT 0,
            parsed INTEGER NOT NULL DEFAULT 0,
            unparsed INTEGER NOT NULL DEFAULT 0,
            first_ts REAL,
            last_ts REAL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE log_lines (
            id INTEGER PRIMARY KEY,
            source_id INTEGER NOT NULL REFERENCES log_sources(id),
            line_no INTEGER NOT NULL,
            ts REAL,                       -- epoch seconds UTC; NULL when unparsed
            level TEXT,
            pid INTEGER,
            process TEXT,
            message TEXT NOT NULL,         -- the raw line when unparsed
            reason TEXT                    -- NULL when parsed
        )
        """
    )
    db.execute(
        """
        CREATE TABLE log_addresses (
            line_id INTEGER NOT NULL REFERENCES log_lines(id),
            ip TEXT NOT NULL,
            port INTEGER NOT NULL
        )
        """
    )
    for sql in (
        "CREATE INDEX log_lines_ts ON log_lines(ts)",
        "CREATE INDEX log_lines_pid ON log_lines(pid, ts)",
        "CREATE INDEX log_addresses_ip ON log_addresses(ip, port)",
        "CREATE INDEX log_addresses_line ON log_addresses(line_id)",
    ):
        db.execute(sql)


@migrations()
def m004_preface_index(db: sqlite_utils.Database) -> None:
    """`tracer correlate` reads the preface latencies around each log line's moment."""
    db.execute("CREATE INDEX connections_preface ON connections(preface_ts)")


def open_database(path: str) -> sqlite_utils.Database:
    """Open (creating 0600 if needed) and migrate the database at ``path``."""
    if path != ":memory:":
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open database {path}: {exc.strerror}") from None
        os.close(fd)
    try:
        conn = sqlite3.connect(path, check_same_thread=False)
        db = sqlite_utils.Database(conn)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        migrations.apply(db)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a usable tracer database: {exc}") from None
    if path != ":memory:":
        for suffix in ("-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.chmod(path + suffix, 0o600)
    return db


class StoreError(Exception):
    """The database cannot be opened or written; the message says why."""
