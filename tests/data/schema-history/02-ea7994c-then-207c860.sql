-- The schema of a database made by ea7994c, then opened by 207c860: each commit's own
-- code (git archive), then `sqlite3 DB .dump`. Made by
-- tests/data/make_history.py; read by tests/test_schema_history.py.
PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE IF NOT EXISTS "_sqlite_migrations" (
   "id" INTEGER PRIMARY KEY,
   "migration_set" TEXT,
   "name" TEXT,
   "applied_at" TEXT
);
INSERT INTO _sqlite_migrations VALUES(1,'tracer','m001_initial','2026-12-02 17:39:51.606531+00:00');
INSERT INTO _sqlite_migrations VALUES(2,'tracer','m002_attribution','2026-12-02 17:39:52.171793+00:00');
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
        );
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
        );
CREATE TABLE capture_stats (
            capture_id INTEGER NOT NULL REFERENCES captures(id),
            name TEXT NOT NULL,
            value INTEGER NOT NULL,
            PRIMARY KEY (capture_id, name)
        );
CREATE TABLE connections (
uid TEXT PRIMARY KEY,
ts REAL,
syn_ts REAL,
synack_ts REAL,
established_ts REAL,
close_ts REAL,
end_ts REAL,
duration REAL,
ip_version INTEGER,
orig_h TEXT,
orig_p INTEGER,
resp_h TEXT,
resp_p INTEGER,
conn_state TEXT,
history TEXT,
orig_pkts INTEGER,
orig_bytes INTEGER,
resp_pkts INTEGER,
resp_bytes INTEGER,
missed_bytes INTEGER,
syn_retries INTEGER,
retransmits INTEGER,
keepalives INTEGER,
zero_windows INTEGER,
mid_stream INTEGER,
is_open INTEGER,
close_kind TEXT,
end_reason TEXT,
last_activity_ts REAL,
events_dropped INTEGER,
protocol TEXT,
preface_ts REAL,
client_settings_ts REAL,
server_settings_ts REAL,
client_settings TEXT,
server_settings TEXT,
client_settings_ack_ts REAL,
server_settings_ack_ts REAL,
streams INTEGER,
first_method TEXT,
authority TEXT,
user_agent TEXT,
pings_orig INTEGER,
pings_resp INTEGER,
goaways INTEGER,
goaway_sender TEXT,
goaway_ts REAL,
goaway_last_stream_id INTEGER,
goaway_error INTEGER,
goaway_debug TEXT,
rst_streams INTEGER,
trailers INTEGER,
grpc_errors INTEGER,
data_frames INTEGER,
window_updates INTEGER,
tls_sni TEXT,
tls_alpn TEXT,
h2c_upgrade INTEGER,
capture_id INTEGER NOT NULL REFERENCES captures(id), pid INTEGER, process_start REAL, attribution TEXT, attributed_ts REAL);
CREATE TABLE conn_methods (
            uid TEXT NOT NULL,
            method TEXT NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (uid, method)
        ) WITHOUT ROWID
        ;
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
        );
CREATE TABLE anomalies (
            id INTEGER PRIMARY KEY,
            capture_id INTEGER NOT NULL,
            ts REAL,
            uid TEXT,
            reason TEXT NOT NULL,
            detail TEXT
        );
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
        );
CREATE UNIQUE INDEX "idx__sqlite_migrations_migration_set_name"
    ON "_sqlite_migrations" ("migration_set", "name");
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
                FROM connections WHERE server_settings_ack_ts IS NOT NULL;
CREATE INDEX connections_orig_h ON connections(orig_h);
CREATE INDEX connections_capture ON connections(capture_id);
CREATE INDEX connections_ts ON connections(ts);
CREATE INDEX connections_open ON connections(is_open);
CREATE INDEX events_uid ON events(uid);
CREATE INDEX anomalies_capture ON anomalies(capture_id, reason);
CREATE INDEX connections_process ON connections(pid, process_start);
COMMIT;
