"""The SQLite schema, created and upgraded by named migrations (sqlite-utils Migrations)."""

from __future__ import annotations

import errno
import os
import pwd
import sqlite3
import stat
import urllib.parse

import sqlite_utils
from sqlite_utils.migrations import Migrations

from store import aggregates
from tracer.record import COLUMNS

migrations = Migrations("tracer")

# Every migration is frozen: it does what it did when it was released, whatever the code
# around it says today. The connections table's columns are declared once, in
# tracer.record.COLUMNS (each with the migration that adds it); the migrations below hold
# their own literal copies, and tests/test_schema_history.py checks that a database they
# make has exactly the declared columns, and that a database of every earlier release
# upgrades to the same schema.


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    """The schema of the first release, as it made it. Later releases changed this function
    in place (until m014_unmigrated_columns took those changes over): a database made by
    one of them has some of what m014 adds already."""
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
    db.execute(
        """
        CREATE TABLE connections (
            uid TEXT PRIMARY KEY, ts REAL, syn_ts REAL, synack_ts REAL, established_ts REAL,
            close_ts REAL, end_ts REAL, duration REAL, ip_version INTEGER, orig_h TEXT,
            orig_p INTEGER, resp_h TEXT, resp_p INTEGER, conn_state TEXT, history TEXT,
            orig_pkts INTEGER, orig_bytes INTEGER, resp_pkts INTEGER, resp_bytes INTEGER,
            missed_bytes INTEGER, syn_retries INTEGER, retransmits INTEGER, keepalives INTEGER,
            zero_windows INTEGER, mid_stream INTEGER, is_open INTEGER, close_kind TEXT,
            end_reason TEXT, last_activity_ts REAL, events_dropped INTEGER, protocol TEXT,
            preface_ts REAL, client_settings_ts REAL, server_settings_ts REAL,
            client_settings TEXT, server_settings TEXT, streams INTEGER, first_method TEXT,
            authority TEXT, user_agent TEXT, pings_orig INTEGER, pings_resp INTEGER,
            goaways INTEGER, goaway_sender TEXT, goaway_ts REAL, goaway_last_stream_id INTEGER,
            goaway_error INTEGER, goaway_debug TEXT, rst_streams INTEGER, trailers INTEGER,
            grpc_errors INTEGER, data_frames INTEGER, window_updates INTEGER, tls_sni TEXT,
            tls_alpn TEXT, h2c_upgrade INTEGER,
            capture_id INTEGER NOT NULL REFERENCES captures(id)
        )
        """
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
    db.execute(
        """
        CREATE TABLE events (
            uid TEXT NOT NULL,
            n INTEGER NOT NULL,
            capture_id INTEGER NOT NULL,
            ts REAL NOT NULL,
            name TEXT NOT NULL,
            dir TEXT,
            stream_id INTEGER,
            code INTEGER,
            value INTEGER,
            detail TEXT,
            PRIMARY KEY (uid, n)
        ) WITHOUT ROWID
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
        "CREATE INDEX connections_capture ON connections(capture_id)",
        "CREATE INDEX connections_ts ON connections(ts)",
        "CREATE INDEX connections_open ON connections(is_open)",
        "CREATE INDEX events_capture ON events(capture_id)",
        "CREATE INDEX events_name_ts ON events(name, ts)",
        "CREATE INDEX anomalies_capture ON anomalies(capture_id, reason)",
    ):
        db.execute(sql)


# Registered right after m001_initial, whose in-place changes it carries: the migrations
# after it were written against a database that had them (m009 replaces the timeline view
# and the 4-tuple index m014 makes). A database that has m002 and later already gets it
# last, where it finds all or most of it done.
@migrations()
def m014_unmigrated_columns(db: sqlite_utils.Database) -> None:
    """What later releases added to m001_initial in place instead of in a migration of their
    own, for the databases an earlier m001 made (an upgraded database silently lacked it):
    nine connection columns (each endpoint's TCP state and sequence bounds, whether the
    connection came from the socket table snapshot, each side's first SETTINGS ACK); the
    events table with a rowid (it was keyed by uid and ordinal, WITHOUT ROWID) and its uid
    index; the timeline view; the 4-tuple index; and not the indexes on ts, is_open,
    events' capture and (name, ts), which releases since do without. Each step only where
    it is missing, so a database made since has nothing to do."""
    present = {row[1] for row in db.execute("PRAGMA table_info(connections)").fetchall()}
    for column, kind in (("orig_state", "TEXT"), ("resp_state", "TEXT"),
                         ("orig_seq_first", "INTEGER"), ("orig_seq_next", "INTEGER"),
                         ("resp_seq_first", "INTEGER"), ("resp_seq_next", "INTEGER"),
                         ("from_snapshot", "INTEGER"), ("client_settings_ack_ts", "REAL"),
                         ("server_settings_ack_ts", "REAL")):
        if column not in present:
            db.execute(f"ALTER TABLE connections ADD COLUMN {column} {kind}")
    events = {row[1] for row in db.execute("PRAGMA table_info(events)").fetchall()}
    if "id" not in events:
        # The first release's events table: no view reads it yet (the timeline view comes
        # below), and its two indexes go with it.
        db.execute("ALTER TABLE events RENAME TO events_m001")
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
            "INSERT INTO events (capture_id, uid, n, ts, name, dir, stream_id, code, value,"
            " detail) SELECT capture_id, uid, n, ts, name, dir, stream_id, code, value, detail"
            " FROM events_m001 ORDER BY capture_id, ts, uid, n"
        )
        db.execute("DROP TABLE events_m001")
    # The timeline of each connection: its events, and the once-per-connection moments
    # (SYN, SYN-ACK, handshake, preface, each side's first SETTINGS and its ACK) that are
    # columns of the connection row. Rows the first release wrote have those moments as
    # events too: they show twice.
    db.execute(
        """
        CREATE VIEW IF NOT EXISTS timeline AS
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
    for sql in (
        "DROP INDEX IF EXISTS connections_ts",
        "DROP INDEX IF EXISTS connections_open",
        "DROP INDEX IF EXISTS events_capture",
        "DROP INDEX IF EXISTS events_name_ts",
        "CREATE INDEX IF NOT EXISTS connections_tuple"
        " ON connections(orig_p, orig_h, resp_p, resp_h)",
        "CREATE INDEX IF NOT EXISTS events_uid ON events(uid)",
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
            sha256 TEXT,                   -- of the log's bytes (decompressed), once read whole
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


@migrations()
def m005_report_cache(db: sqlite_utils.Database) -> None:
    """The full report, kept with a fingerprint of the data it was computed from
    (store.queries.report): written by the capture runs, only read by readers. IF NOT
    EXISTS: report() created it itself before this migration."""
    db.execute("CREATE TABLE IF NOT EXISTS report_cache (fingerprint TEXT, report TEXT)")


@migrations()
def m006_capture_runs(db: sqlite_utils.Database) -> None:
    """Which process runs each capture (pid and its start time: pids are reused), so that a
    capture left 'running' by a process that died is told apart from one still running."""
    for column, kind in (("pid", "INTEGER"), ("pid_start", "REAL")):
        db.execute(f"ALTER TABLE captures ADD COLUMN {column} {kind}")


@migrations()
def m007_rpc_counts(db: sqlite_utils.Database) -> None:
    """RPCs are counted per connection instead of stored one row each (one events row per
    RPC cost about 108 bytes with its index: 13 GB a day at 1,000 RPC/s): the first and
    the last RPC's time, and each grpc-status with its count (where trailers were decoded,
    --grpc-status). Per-RPC rows only with --events all."""
    for column in ("first_rpc_ts", "last_rpc_ts"):
        db.execute(f"ALTER TABLE connections ADD COLUMN {column} REAL")
    db.execute(
        """
        CREATE TABLE conn_grpc_status (
            uid TEXT NOT NULL,
            status INTEGER NOT NULL,       -- grpc-status; 0 is OK
            count INTEGER NOT NULL,
            PRIMARY KEY (uid, status)
        ) WITHOUT ROWID
        """
    )


@migrations()
def m008_retention(db: sqlite_utils.Database) -> None:
    """Retention (store.retention): each pass that let old connections go, and what the
    pruned connections added to their client's totals, so that a report over the whole
    database still counts them (a pool whose closed connections were pruned must not
    look like a leak)."""
    db.execute(
        """
        CREATE TABLE prunes (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL,              -- wall clock of the pass (UTC, ISO 8601)
            reason TEXT NOT NULL,          -- age (--retain, --older-than) | size (--max-db-size)
            cutoff_ts REAL NOT NULL,       -- what ended before this is gone
            connections INTEGER NOT NULL,
            log_lines INTEGER NOT NULL,
            bytes_before INTEGER,
            bytes_after INTEGER
        )
        """
    )
    db.execute(
        """
        CREATE TABLE client_history (
            client_key TEXT PRIMARY KEY,   -- as the report groups: pid:PID:START or ip:ADDRESS
            pid INTEGER,
            process_start REAL,
            orig_h TEXT NOT NULL,
            opened INTEGER NOT NULL DEFAULT 0,
            closed INTEGER NOT NULL DEFAULT 0,
            by_client_fin INTEGER NOT NULL DEFAULT 0,
            by_server_fin INTEGER NOT NULL DEFAULT 0,
            by_rst INTEGER NOT NULL DEFAULT 0,
            by_goaway INTEGER NOT NULL DEFAULT 0,
            by_port_reused INTEGER NOT NULL DEFAULT 0,
            health_checks INTEGER NOT NULL DEFAULT 0,
            pre_existing INTEGER NOT NULL DEFAULT 0,
            rpcs INTEGER NOT NULL DEFAULT 0,
            first_ts REAL,
            last_ts REAL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE client_history_methods (
            client_key TEXT NOT NULL,
            method TEXT NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (client_key, method)
        ) WITHOUT ROWID
        """
    )
    # The oldest closed connections go first.
    db.execute("CREATE INDEX connections_closed_end ON connections(end_ts) WHERE is_open = 0")


@migrations()
def m009_folded_closes(db: sqlite_utils.Database) -> None:
    """Each side's first FIN and first RST are columns of the connection row, as the SYN
    and the handshake already were (two events rows per connection were most of the
    events table). The timeline view puts them back among the events; rows written
    before keep theirs in the events table. The 4-tuple index, which only the join of a
    connection continued from an earlier capture uses, keeps only open connections."""
    for column in ("orig_fin_ts", "resp_fin_ts", "orig_rst_ts", "resp_rst_ts"):
        db.execute(f"ALTER TABLE connections ADD COLUMN {column} REAL")
    db.execute("DROP VIEW timeline")
    folded = [("syn_ts", "syn", "orig"), ("synack_ts", "syn_ack", "resp"),
              ("established_ts", "established", "orig"), ("preface_ts", "preface", "orig"),
              ("orig_fin_ts", "fin", "orig"), ("resp_fin_ts", "fin", "resp"),
              ("orig_rst_ts", "rst", "orig"), ("resp_rst_ts", "rst", "resp")]
    parts = ["SELECT uid, ts, name, dir, stream_id, code, value, detail FROM events"]
    parts += [f"SELECT uid, {column}, '{name}', '{side}', NULL, NULL, NULL, NULL"
              f" FROM connections WHERE {column} IS NOT NULL" for column, name, side in folded]
    parts += [f"SELECT uid, {side}_settings{ack}_ts, 'settings{ack}', '{d}', 0, NULL, NULL,"
              f" {f'{side}_settings' if not ack else 'NULL'}"
              f" FROM connections WHERE {side}_settings{ack}_ts IS NOT NULL"
              for ack in ("", "_ack") for side, d in (("client", "orig"), ("server", "resp"))]
    db.execute("CREATE VIEW timeline AS\n    " + "\n    UNION ALL ".join(parts))
    db.execute("DROP INDEX connections_tuple")
    db.execute("CREATE INDEX connections_tuple ON connections(orig_p, orig_h, resp_p, resp_h)"
               " WHERE is_open = 1")


@migrations()
def m010_tls_records(db: sqlite_utils.Database) -> None:
    """TLS application data records each way: inside TLS the RPCs cannot be seen, and the
    records (how many, and when: last_activity_ts) are what tells a pool from a leak."""
    for column in ("tls_records_orig", "tls_records_resp"):
        db.execute(f"ALTER TABLE connections ADD COLUMN {column} INTEGER DEFAULT 0")


@migrations()
def m011_history_closes(db: sqlite_utils.Database) -> None:
    """What the verdicts read of pruned connections too: which side began each close, and
    the TLS records and connections (store.queries: a process that never closes a
    connection itself; RPCs encrypted)."""
    for column in ("closed_by_client", "closed_by_server", "tls_records", "tls_connections"):
        db.execute(f"ALTER TABLE client_history ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")


@migrations()
def m012_server_samples(db: sqlite_utils.Database) -> None:
    """The server on this host, sampled by the live agent (store.server): each listening
    socket's accept queue, and its process's open descriptors against RLIMIT_NOFILE. A
    row when something changed (or a heartbeat): each row's values hold until the next
    row of its listener. A reader copes without these tables (READER_OPTIONAL)."""
    db.execute(
        """
        CREATE TABLE server_samples (
            id INTEGER PRIMARY KEY,
            capture_id INTEGER NOT NULL,
            ts REAL NOT NULL,              -- epoch seconds (wall clock, as packet times)
            address TEXT NOT NULL,         -- the listener's local address and port
            port INTEGER NOT NULL,
            inode INTEGER NOT NULL,
            netns INTEGER,
            queue INTEGER NOT NULL,        -- completed connections not accepted yet
            queue_max INTEGER,             -- the listen backlog; NULL: unknown (other netns)
            pid INTEGER,                   -- NULL: no process found holding the listener
            process_start REAL,
            fds INTEGER,                   -- open descriptors; NULL: not readable
            fd_limit INTEGER,              -- soft RLIMIT_NOFILE; NULL: unknown or unlimited
            stopped INTEGER NOT NULL DEFAULT 0   -- stopped by a signal (SIGSTOP)
        )
        """
    )
    db.execute("CREATE INDEX server_samples_ts ON server_samples(ts)")
    db.execute(
        """
        CREATE TABLE server_processes (
            pid INTEGER NOT NULL,
            process_start REAL NOT NULL,
            comm TEXT,
            cmdline TEXT,
            PRIMARY KEY (pid, process_start)
        )
        """
    )


@migrations()
def m013_attribution_detail(db: sqlite_utils.Database) -> None:
    """What attribution learns beside the pid: each process's pod name and cgroup path
    (its network namespace goes in processes.netns), and on each connection what the
    kernel said of the client socket, known even when no process was found holding it (a
    short call closed first): its owner uid and user, network namespace, cgroup v2 path
    and the container and pod uid that path names. A reader copes without them
    (READER_OPTIONAL)."""
    for column in ("pod_name", "cgroup"):
        db.execute(f"ALTER TABLE processes ADD COLUMN {column} TEXT")
    for column, kind in (("client_uid", "INTEGER"), ("client_user", "TEXT"),
                         ("client_netns", "INTEGER"), ("client_cgroup", "TEXT"),
                         ("client_container", "TEXT"), ("client_pod", "TEXT")):
        db.execute(f"ALTER TABLE connections ADD COLUMN {column} {kind}")


@migrations()
def m015_client_aggregates(db: sqlite_utils.Database) -> None:
    """Per-client totals of the closed connections, kept by triggers as rows change
    (store.aggregates), so that a report adds up a thousand rows instead of a million;
    with the close_ts index (--since) and one of the open connections. Filled from the
    rows already there. A reader copes without them (READER_OPTIONAL: the slow way).
    Frozen like every migration: a change to what the totals count comes with a
    migration that builds them again."""
    aggregates.create(db)


@migrations()
def m018_datasette_views(db: sqlite_utils.Database) -> None:
    """Views for people browsing the database (Datasette, sqlite3): each connection with
    ISO 8601 times beside the epoch ones and its client process joined in, and one row per
    client with its totals. Column descriptions for Datasette are in
    store/datasette-metadata.json. Nothing reads them (READER_OPTIONAL)."""
    iso = "strftime('%Y-%m-%dT%H:%M:%fZ', {0}, 'unixepoch')"
    db.execute(f"""
        CREATE VIEW connection_details AS
        SELECT c.uid, {iso.format('c.ts')} AS opened, c.ts AS opened_ts,
               {iso.format('c.close_ts')} AS closed, c.close_ts AS closed_ts,
               c.duration, c.is_open, c.orig_h AS client_address, c.orig_p AS client_port,
               c.resp_h AS server_address, c.resp_p AS server_port, c.conn_state, c.history,
               c.close_kind AS closed_by, c.streams, c.first_method,
               {iso.format('c.last_activity_ts')} AS last_activity, c.goaway_sender,
               c.goaway_error, c.tls_sni, c.pid, p.comm AS process, p.cmdline AS command_line,
               p.user, COALESCE(p.container, c.client_container) AS container,
               COALESCE(p.pod, c.client_pod) AS pod, c.attribution, c.capture_id
        FROM connections c
        LEFT JOIN processes p ON p.pid = c.pid AND p.start_time = c.process_start
    """)
    db.execute(f"""
        CREATE VIEW client_summary AS
        SELECT c.orig_h AS client_address, c.pid, p.comm AS process,
               p.cmdline AS command_line, COUNT(*) AS connections,
               SUM(c.is_open) AS open, COUNT(*) - SUM(c.is_open) AS closed,
               SUM(c.streams) AS streams, {iso.format('MIN(c.ts)')} AS first_opened,
               {iso.format('MAX(c.ts)')} AS last_opened,
               {iso.format('MIN(CASE WHEN c.is_open = 1 THEN c.ts END)')} AS oldest_open
        FROM connections c
        LEFT JOIN processes p ON p.pid = c.pid AND p.start_time = c.process_start
        GROUP BY c.orig_h, c.pid, c.process_start
    """)


@migrations()
def m016_reaps(db: sqlite_utils.Database) -> None:
    """What `tracer reap --yes` closed (store.reaps): one row per connection it tried to
    close, with its 4-tuple and client, the result and who asked. The report shows them per
    client and names the reap as the close. A reader copes without it (READER_OPTIONAL)."""
    db.execute(
        """
        CREATE TABLE reaps (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,              -- epoch seconds (wall clock) of the SOCK_DESTROY
            uid TEXT NOT NULL,             -- the connection's uid (connections.uid)
            orig_h TEXT NOT NULL,
            orig_p INTEGER NOT NULL,
            resp_h TEXT NOT NULL,
            resp_p INTEGER NOT NULL,
            pid INTEGER,                   -- the client process, where attributed
            process_start REAL,
            result TEXT NOT NULL,          -- closed | already_gone | failed | unsupported
            error TEXT,                    -- the errno's name and text when not closed
            sockets TEXT,                  -- which ends were destroyed: server, client
            by_uid INTEGER NOT NULL,       -- the user who ran it
            by_user TEXT
        )
        """
    )
    db.execute("CREATE INDEX reaps_uid ON reaps(uid)")


@migrations()
def m017_merged_clients(db: sqlite_utils.Database) -> None:
    """Remote clients named by their own host's agent (`tracer merge`, store.merge): for a
    server connection whose client is on another host, the process that host's database
    attributes the same connection to (4-tuple and overlapping time). The connection row
    takes the remote pid and start time (attribution 'merged'), so the report and the
    per-client totals group by it; these tables say which host it runs on and what it
    is. A row goes with its connection (retention). A reader copes without them
    (READER_OPTIONAL: remote clients then show as their addresses)."""
    db.execute(
        """
        CREATE TABLE merged_processes (
            host TEXT NOT NULL,            -- the client host: --name, else its database's name
            pid INTEGER NOT NULL,
            start_time REAL NOT NULL,      -- on the client host's clock
            user TEXT,
            comm TEXT,
            cmdline TEXT,
            container TEXT,
            pod_name TEXT,
            PRIMARY KEY (pid, start_time, host)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE merged_clients (
            uid TEXT PRIMARY KEY,          -- the server's connection
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            process_start REAL NOT NULL,
            peer_uid TEXT NOT NULL,        -- the client host's record of the connection
            source TEXT NOT NULL,          -- the client database's file name
            offset_s REAL,                 -- its open time there minus here (clock skew)
            ambiguous INTEGER NOT NULL DEFAULT 0,  -- another lifetime overlapped too
            merged_at TEXT NOT NULL        -- wall clock of the merge (UTC, ISO 8601)
        ) WITHOUT ROWID
        """
    )
    db.execute("CREATE INDEX merged_clients_host ON merged_clients(host, source)")
    db.execute(
        "CREATE TRIGGER merged_clients_delete AFTER DELETE ON connections BEGIN"
        " DELETE FROM merged_clients WHERE uid = old.uid; END"
    )



@migrations()
def m019_unix_sockets(db: sqlite_utils.Database) -> None:
    """Servers on Unix sockets (`tracer capture --unix PATH`, tracer.unixconns): a
    connection to one is a connections row with protocol 'unix' (orig_h 'unix:' and the
    server's name, orig_p the client socket's inode, resp_h the name, resp_p 0, no packet
    or HTTP/2 column known); this table keeps what the kernel showed of its two sockets
    (their inodes, the client socket's owner, the largest queue seen and how many polls
    found the queues changed) and goes with its connection (retention). The capture says
    which sockets it followed. An index finds a client's Unix connections. A reader copes
    without them (READER_OPTIONAL: no Unix socket was followed then)."""
    db.execute("ALTER TABLE captures ADD COLUMN unix_paths TEXT")
    db.execute(
        """
        CREATE TABLE unix_sockets (
            uid TEXT PRIMARY KEY,          -- the connection
            path TEXT NOT NULL,            -- the server's socket: its path, or @name
            server_inode INTEGER NOT NULL, -- the socket the server accepted
            client_inode INTEGER NOT NULL, -- its peer, the client's socket (0: not given)
            client_uid INTEGER,            -- the client socket's owner (NULL: not listed)
            queue_max INTEGER NOT NULL,    -- bytes not read yet at either end, the most seen
            queue_changes INTEGER NOT NULL -- polls that found the queues changed
        ) WITHOUT ROWID
        """
    )
    db.execute(
        "CREATE TRIGGER unix_sockets_delete AFTER DELETE ON connections BEGIN"
        " DELETE FROM unix_sockets WHERE uid = old.uid; END"
    )
    db.execute("CREATE INDEX connections_unix ON connections(pid, process_start, orig_h)"
               " WHERE protocol = 'unix'")


@migrations()
def m020_capture_host(db: sqlite_utils.Database) -> None:
    """The host a live capture ran on (socket.gethostname() in the agent), so that
    `tracer merge` names a client host's processes by it without --name. NULL for a file
    read (its packets may come from any host) and for the captures before it. A reader
    copes without it (READER_OPTIONAL: merge then names a host by its file)."""
    db.execute("ALTER TABLE captures ADD COLUMN host TEXT")

# -- opening the database ----------------------------------------------------------------
#
# The agent runs as root, often in a directory other users can write to. Every name it
# opens could be a trap planted there: a symbolic link to a file it must not write, a
# FIFO that blocks it, an empty file someone else owns (whoever owns a file can chmod it
# and read it). So the database is opened with O_NOFOLLOW first and checked through that
# descriptor (a regular file, still the one the name pointed at), and SQLite is then
# pointed at the same name without the right to create it (``mode=rw``/``mode=ro``);
# once SQLite has opened it, the name must still be that file. Between the checks and
# SQLite's open only a swap-and-swap-back could slip through, and SQLite writes nothing
# before the last check. (The descriptor is closed before SQLite runs a statement:
# closing any descriptor of a file drops this process's POSIX locks on it, so a process
# must not open the database again while one of its connections is inside a
# transaction on it; the previous os.open here had the same rule.)

# Migrations a reader can do without. A reader never migrates, so a database last written
# by an older tracer may lack some: an index only makes a query slower, and the report
# cache only makes a report slower. A migration whose tables or columns the read-side
# queries use must not be listed here.
READER_OPTIONAL = frozenset({"m004_preface_index", "m005_report_cache", "m006_capture_runs",
                             "m007_rpc_counts", "m008_retention", "m009_folded_closes",
                             "m012_server_samples", "m013_attribution_detail",
                             "m015_client_aggregates", "m018_datasette_views",
                             "m016_reaps", "m017_merged_clients", "m019_unix_sockets",
                             "m020_capture_host"})
# Migrations a reader may find missing when the database has what they add anyway: the
# releases before m014_unmigrated_columns changed m001_initial in place, so a database
# made by most of them has its columns (checked against tracer.record.COLUMNS) though
# not the migration. (The rest of m014, the events table and the timeline view, only a
# database the first release made lacks, and no release could take one past m009: it
# lacks m010 too.)
_READER_CHECKS_TABLES = frozenset({"m014_unmigrated_columns"})
WAL_SIZE_LIMIT = 16 << 20

# The files SQLite keeps beside a database, and opens by name (following symbolic links).
_SIDE_FILES = ("-wal", "-shm", "-journal")
_SQLITE_HEADER = b"SQLite format 3\x00"


def open_database(path: str, *, readonly: bool = False) -> sqlite_utils.Database:
    """Open and migrate the database at ``path``, creating it (0600) if it does not exist.

    With ``readonly``, open an existing database for reading only (``open_database_readonly``):
    nothing is created, migrated or written.

    ``path`` must name a regular file itself: never a symbolic link (nor may its -wal, -shm
    or -journal side files be), a FIFO, a device or a directory. An existing file must be
    an SQLite database, or an empty file of the current user's. StoreError says why not."""
    if readonly:
        return open_database_readonly(path)
    if path == ":memory:":
        conn = sqlite3.connect(path, check_same_thread=False)
    else:
        fd, st, created = _open_file(path, write=True)
        try:
            _check_for_writing(path, fd, st, created)
            conn = _connect(path, "mode=rw", st)
        except StoreError:
            if created and _same(_lstat(path), st):
                os.unlink(path)  # the empty file made just now, nothing else
            raise
        finally:
            os.close(fd)  # before any statement: closing a descriptor drops its POSIX locks
    try:
        db = sqlite_utils.Database(conn)
        if db.execute("PRAGMA page_count").fetchone()[0] == 0:
            # A new database: retention can hand freed pages back to the filesystem
            # (store.retention). Only settable before the first table exists.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        # The write-ahead log is cut back to this after a checkpoint (it keeps its largest
        # size otherwise: a big batch would leave it big for good).
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        # A writer's statement journals (each INSERT whose triggers keep the per-client
        # totals may have to be undone alone) in memory, not in temporary files: on disk
        # they were 350,000 small writes for the bench capture's 12,000 connections. They
        # hold the pages one statement changes, a few each; the writers sort nothing big.
        db.execute("PRAGMA temp_store=MEMORY")
        migrations.apply(db)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"{path} is not a usable tracer database: {exc}") from None
    # SQLite creates the -wal and -shm files with the database file's own mode: 0600 for a
    # database tracer created (they are never chmod-ed by name, which would follow a link).
    return db


def open_database_readonly(path: str) -> sqlite_utils.Database:
    """Open an existing database for reading only: an archived copy, a 0444 file, a file
    on a read-only mount, or the database a capture is writing right now.

    It never writes: no migration, no cache, no file created beside an archived copy.
    SQLite opens it with ``mode=ro``, and the connection is ``query_only``. A database in
    WAL mode has its readers share a -shm index with its writer; SQLite creates that file
    (and an empty -wal) when they are missing, as it must if a writer may come, and a
    reader leaves them there (removing them could break a writer that just began). When
    nobody can have it open as a writer, and SQLite could not or should not create them,
    it is opened ``immutable=1`` instead: no locks, no -shm, the file taken as it is.
    That is when there is no -shm beside it (no connection has it open: every WAL-mode
    connection keeps one) and no -wal content (an immutable reader ignores the -wal: it
    would miss what is in it), and either its directory cannot take new files (read-only
    media) or the file itself is read-only (no write bit: an archived copy; tracer's
    writers refuse such a file, and other users cannot open it for writing). If a writer
    did start on it during the read (only root, with another tool, could), the reader
    could see a half-written state: an error or a wrong answer, never damage, as an
    immutable reader writes nothing.

    A database written by an older tracer is read as it is when the migrations it lacks
    are only ones a reader can do without (READER_OPTIONAL); otherwise StoreError says to
    upgrade it with any writing command (``tracer capture``, ``tracer logs add``), on a
    writable copy if it is archived. Migrating a copy in memory would hide the cost of a
    big database; refusing clearly is better than a traceback from a missing column. A
    database of a newer tracer (migrations this one does not know) is refused too."""
    if path == ":memory:":
        raise StoreError("a read-only database must be a file")
    fd, st, _created = _open_file(path, write=False)
    try:
        _check_side_files(path, st, fresh=False, writing=False)
        header = os.pread(fd, 100, 0)
        if not header:
            raise StoreError(f"{path} is empty: not a tracer database")
        if not header.startswith(_SQLITE_HEADER):
            raise StoreError(f"{path} is not a usable tracer database: file is not a database")
        conn = _connect(path, _reader_query(path, fd, st, wal=2 in header[18:20]), st)
    finally:
        os.close(fd)
    try:
        db = sqlite_utils.Database(conn)
        db.execute("PRAGMA query_only=1")
        db.execute("PRAGMA busy_timeout=5000")
        _check_reader_schema(path, db)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"{path} is not a usable tracer database: {exc}") from None
    except StoreError:
        conn.close()
        raise
    return db


def _reader_query(path: str, fd: int, st: os.stat_result, *, wal: bool) -> str:
    """The URI parameters of a reader (see open_database_readonly)."""
    if not wal:
        return "mode=ro"  # a rollback-journal database: readers only take locks
    shm = _lstat(path + "-shm")
    if shm is not None:
        return "mode=ro"  # in use, or left by a crash: SQLite reads it (read-only if must)
    wal_file = _lstat(path + "-wal")
    wal_content = wal_file is not None and wal_file.st_size > 0
    directory = os.path.dirname(os.path.abspath(path))
    read_only_media = bool(os.fstatvfs(fd).f_flag & os.ST_RDONLY)
    can_add_files = not read_only_media and os.access(directory, os.W_OK)
    if wal_content:
        if not can_add_files:
            raise StoreError(
                f"cannot read {path}: its changes in {path}-wal need a {path}-shm that "
                f"cannot be created here (read-only directory); copy both files somewhere "
                f"writable and read the copy")
        return "mode=ro"
    if not can_add_files or not st.st_mode & 0o222:
        return "mode=ro&immutable=1"
    return "mode=ro"


def _check_reader_schema(path: str, db: sqlite_utils.Database) -> None:
    empty = sqlite_utils.Database(memory=True)
    known = [m.name for m in migrations.pending(empty)]  # all of them, in order
    empty.close()
    applied = {m.name for m in migrations.applied(db)}
    if not applied:
        raise StoreError(f"{path} is not a tracer database: no tracer schema in it")
    newer = sorted(applied - set(known))
    if newer:
        raise StoreError(
            f"{path} was written by a newer tracer (schema {', '.join(newer)} unknown to "
            f"this one): read it with that version")
    upgrade = ("upgrade it by running any `tracer capture` (or `tracer logs add`) on it with "
               "this version, or on a copy somewhere writable if it is archived")
    missing = [name for name in known if name not in applied
               and name not in READER_OPTIONAL and name not in _READER_CHECKS_TABLES]
    if missing:
        raise OlderSchema(
            f"{path} was written by an older tracer (it lacks {', '.join(missing)}): {upgrade}")
    present = {row[1] for row in db.execute("PRAGMA table_info(connections)").fetchall()}
    lacking = [c for c in COLUMNS if c.name not in present
               and (c.since in applied or c.since not in READER_OPTIONAL)]
    if lacking:
        since = sorted({c.since for c in lacking})
        raise OlderSchema(
            f"{path} was written by an older tracer: its connections table lacks "
            f"{', '.join(c.name for c in lacking)} (added by {', '.join(since)}): {upgrade}")


def _open_file(path: str, *, write: bool) -> tuple[int, os.stat_result, bool]:
    """A descriptor on the database file itself (created 0600 when writing and missing),
    its fstat, and whether it was created now."""
    existing = _lstat(path)
    if existing is not None:
        _refuse_kind(path, existing)
    elif not write:
        raise StoreError(f"no database at {path}")
    # O_NONBLOCK and O_NOCTTY: a name swapped for a FIFO or a terminal after the lstat must
    # not block or take over the terminal; the fstat below refuses it.
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    flags |= os.O_RDWR if write else os.O_RDONLY
    try:
        if existing is None:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        else:
            fd = os.open(path, flags)
    except FileExistsError:
        raise StoreError(f"refusing to open DB {path}: it appeared while tracer was "
                         f"creating it; check who else writes there, then try again") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(_link_message(path, "it")) from None
        if exc.errno == errno.ENOENT:
            raise StoreError(f"no database at {path}: it disappeared while tracer was "
                             f"opening it") from None
        raise StoreError(f"cannot open database {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    same = existing is None or (st.st_dev, st.st_ino) == (existing.st_dev, existing.st_ino)
    if not stat.S_ISREG(st.st_mode) or not same:
        os.close(fd)
        raise StoreError(_replaced_message(path))
    if existing is None:
        os.fchmod(fd, 0o600)  # whatever the umask
    return fd, st, existing is None


def _check_for_writing(path: str, fd: int, st: os.stat_result, created: bool) -> None:
    if not created and not st.st_mode & 0o222:
        # root may write a 0444 file anyway; such a file is someone's archived copy, and
        # readers open it immutable (open_database_readonly).
        raise StoreError(
            f"refusing to write to DB {path}: the file is read-only (mode "
            f"{stat.S_IMODE(st.st_mode):04o}, an archived copy?); read it with `tracer "
            f"report`, or make it writable (chmod u+w) to add to it")
    fresh = created or st.st_size == 0
    if fresh and not created and st.st_uid != os.geteuid():
        # An empty file becomes a database only if it is the current user's (`touch
        # tracer.db`, then a capture, is fine). An empty file someone else owns may be a
        # trap: created first in a shared directory for root's agent to fill, its owner
        # could chmod it and read every connection, or change it under the agent.
        raise StoreError(
            f"refusing to use {path} as the database: it is an empty file owned by "
            f"{_user(st.st_uid)}, not by {_user(os.geteuid())}; remove it or give another "
            f"path")
    if not fresh:
        # Checked here, before SQLite sees the file: a file that is not a database is
        # never turned into one.
        if os.pread(fd, len(_SQLITE_HEADER), 0) != _SQLITE_HEADER:
            raise StoreError(f"{path} is not a usable tracer database: file is not a "
                             f"database; refusing to write to it")
    elif os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, 0o600)  # an empty file of ours becomes a database: 0600 like a new one
    _check_side_files(path, st, fresh=fresh, writing=True)


def _check_side_files(path: str, st: os.stat_result, *, fresh: bool, writing: bool) -> None:
    """SQLite opens and writes the side files by name, following links: a planted -shm
    link would have it truncate and write another file. A side file beside a database
    being created (or an empty one) is stale or planted: SQLite would take its content
    into the new database. A writer puts the database's pages in the -wal: one beside an
    existing database must belong to the database's owner or to the current user (SQLite
    gives them the database file's owner), else its owner could read them."""
    for suffix in _SIDE_FILES:
        side = path + suffix
        found = _lstat(side)
        if found is None:
            continue
        if stat.S_ISLNK(found.st_mode):
            raise StoreError(_link_message(path, side) + " (remove it)")
        if not stat.S_ISREG(found.st_mode):
            raise StoreError(f"refusing to open DB {path}: {side} is {_kind(found.st_mode)}, "
                             f"not a regular file; remove it")
        if fresh:
            raise StoreError(f"refusing to open DB {path}: it is new or empty, but {side} "
                             f"exists beside it (stale, or planted); remove it")
        if writing and found.st_uid not in (st.st_uid, os.geteuid()):
            raise StoreError(f"refusing to open DB {path}: {side} belongs to "
                             f"{_user(found.st_uid)}, not to the database's owner; remove it")


def _connect(path: str, query: str, st: os.stat_result) -> sqlite3.Connection:
    """SQLite on the file already checked (``st``): never created by SQLite, and still the
    same file once SQLite has it open (before it reads or writes anything)."""
    absolute = os.path.abspath(path)
    uri = "file://" + urllib.parse.quote(absolute) + "?" + query
    try:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from None
    if not _same(_lstat(path), st):
        conn.close()
        raise StoreError(_replaced_message(path))
    return conn


def _same(now: os.stat_result | None, st: os.stat_result) -> bool:
    """``now`` (an lstat) is the regular file ``st`` was taken of."""
    return now is not None and stat.S_ISREG(now.st_mode) and \
        (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot open database {path}: {exc.strerror}") from None


def _refuse_kind(path: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(_link_message(path, "it"))
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"refusing to open DB {path}: it is {_kind(st.st_mode)}, not a "
                         f"regular file; give the path of a database file")


def _link_message(path: str, which: str) -> str:
    name = path if which == "it" else which
    try:
        target = os.readlink(name)
    except OSError:
        target = "?"
    real = "; give the real path" if which == "it" else ""
    return f"refusing to open DB {path}: {which} is a symbolic link to {target}{real}"


def _replaced_message(path: str) -> str:
    return (f"refusing to open DB {path}: the name was replaced while tracer was opening it; "
            f"check who else writes in {os.path.dirname(os.path.abspath(path))}, then try "
            f"again")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


class StoreError(Exception):
    """The database cannot be opened or written; the message says why."""


class OlderSchema(StoreError):
    """A reader refused a database of an older tracer: any writer can upgrade it."""
