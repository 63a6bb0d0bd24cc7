"""Per-client totals of the closed connections, kept by triggers as rows change.

A closed connection adds only whole counts to its client's report line (opened, closed,
how, RPCs, TLS records, health checks): everything about age and idleness belongs to the
open ones. So the report adds up the closed connections from these tables and reads only
the open ones row by row (store.queries.client_report); a million connections become a
thousand rows.

Triggers on ``connections`` and ``conn_methods`` keep the tables right whatever writes
(the writer's batches and upserts, attribution, a continued connection, retention's
deletes, a test's own UPDATE): each closed row adds its counts, and takes them back
when it changes or goes. One way of writing escapes them: an INSERT OR REPLACE deletes
the row it replaces without firing the delete trigger unless ``recursive_triggers`` is
on (sqlite-utils turns it on for every connection it opens, as tracer's are); the
writer writes conn_methods with an upsert instead. One writer goes around them on
purpose: ``rekeyed`` gives many connections a new client at once (`tracer merge`) and
moves their totals in a few set-wise statements, the update triggers off within its
transaction.

Counts are kept twice: per client (the whole report), and per client and minute of the
close (``--since``: the minutes after the one it falls in are added up, the connections
of that minute read one by one through the close_ts index). A client is a (pid,
process_start, orig_h): the report groups by process where attributed, else by address,
and an attributed process's addresses are counted from these.

The tables, indexes and triggers come with migration m015_client_aggregates, which
fills them from the rows already there. A database without them (an older tracer's,
read without being upgraded, or one whose triggers went with a rebuilt table) is read
the slow way: ``present`` says which.
"""

from __future__ import annotations

from typing import Any

import sqlite_utils

from store.sql import CLOSED_BY, CLOSED_FIRST_BY, HEALTH_CHECK

BUCKET_S = 60  # the minutes of --since
KEY = ("pid", "process_start", "orig_h")

# What each closed connection adds, as the report's own SUM()s read it (the same text is
# summed row by row over the open connections: store.queries); ``open_now`` is is_open.
CLOSED_COUNTS = {
    "opened": "NOT hc",
    "closed": "NOT hc AND NOT open_now",
    "closed_by_client": "NOT hc AND NOT open_now AND closed_first_by = 'orig'",
    "closed_by_server": "NOT hc AND NOT open_now AND closed_first_by = 'resp'",
    "tls_records": "CASE WHEN NOT hc THEN COALESCE(tls_records_orig, 0) ELSE 0 END",
    "tls_connections": "NOT hc AND COALESCE(protocol, '') = 'tls'",
    "health_checks": "hc",
    "by_client_fin": "closed_by = 'client_fin' AND NOT hc AND NOT open_now",
    "by_server_fin": "closed_by = 'server_fin' AND NOT hc AND NOT open_now",
    "by_rst": "closed_by = 'rst' AND NOT hc AND NOT open_now",
    "by_goaway": "closed_by = 'goaway' AND NOT hc AND NOT open_now",
    "by_port_reused": "closed_by = 'port_reused' AND NOT hc AND NOT open_now",
    "pre_existing": "mid_stream AND NOT hc",
    "rpcs": "CASE WHEN NOT hc THEN streams ELSE 0 END",
}
# The counts that take only closed connections (each term says AND NOT open_now): 0 for
# every open one, so the open connections' row-by-row sums skip them.
CLOSED_ONLY = ("closed", "closed_by_client", "closed_by_server", "by_client_fin", "by_server_fin",
               "by_rst", "by_goaway", "by_port_reused")
# The server's side of the report (store.queries.server_health), over every client.
SERVER_COUNTS = {
    "refused": "conn_state IN ('REJ', 'RSTOS0')",
    "client_rst": "close_kind = 'client_rst'",
    "server_rst": "close_kind = 'server_rst'",
}
COUNTS = {**CLOSED_COUNTS, **SERVER_COUNTS}

# The columns the counts read; a change to none of them leaves the totals as they are.
_READ = ("uid", "pid", "process_start", "orig_h", "is_open", "close_ts", "close_kind",
         "preface_ts", "streams", "mid_stream", "established_ts", "protocol", "goaway_ts",
         "goaway_sender", "tls_records_orig", "conn_state")
MINUTE = f"CAST(close_ts / {BUCKET_S} AS INTEGER)"

# The connections that may have timed out waiting for the server's preface: it never
# came, or came this late. A preface timeout of at least this long is looked for among
# them only (connections_slow_preface: a handful where the server answers).
SLOW_PREFACE_S = 1.0
SLOW_PREFACE = (f"preface_ts IS NOT NULL AND (server_settings_ts IS NULL"
                f" OR server_settings_ts - COALESCE(syn_ts, ts) > {SLOW_PREFACE_S!r})")
# What the fast report reads through INDEXED BY (a missing one is an error, not a scan).
INDEXES = {
    # --since: the connections of the minute it falls in, and the preface latencies over
    # the window without a table row read.
    "connections_close": "connections(close_ts, preface_ts, server_settings_ts)",
    # The open connections, the part of a report read row by row, in its grouping order
    # (with what the server's counts and --since read, and the uid their methods are
    # found by).
    "connections_open": "connections(pid, process_start, orig_h, conn_state, close_kind,"
                        " close_ts, uid) WHERE is_open IS NOT 0",
    "connections_latency": "connections(server_settings_ts - preface_ts)"
                           " WHERE preface_ts IS NOT NULL AND server_settings_ts IS NOT NULL",
    "connections_slow_preface": f"connections(COALESCE(syn_ts, ts)) WHERE {SLOW_PREFACE}",
    # The unattributed clients' socket details (store.queries._socket_details).
    "connections_socket_detail": "connections(orig_h, client_user, client_netns,"
                                 " client_container, client_pod, client_cgroup)"
                                 " WHERE pid IS NULL AND client_netns IS NOT NULL",
    "events_goaway": "events(ts) WHERE name = 'goaway'",
}

TOTALS = "client_closed"
MINUTES = "client_closed_minutes"
METHODS = "client_closed_methods"
METHOD_MINUTES = "client_closed_method_minutes"
TABLES = (TOTALS, MINUTES, METHODS, METHOD_MINUTES)
TRIGGERS = ("client_closed_insert", "client_closed_update_old", "client_closed_update_new",
            "client_closed_delete", "client_closed_method_insert", "client_closed_method_update",
            "client_closed_method_delete")


def _keyed(values: tuple[str, ...] | list[str]) -> str:
    """Key values as stored: NULL is a value of its own in a key (GROUP BY groups NULLs
    together; a primary key takes none), so an empty blob, which no column of a
    connection holds, stands for it. The key columns have no type: nothing is converted."""
    return ", ".join(f"IFNULL({v}, X'')" for v in values)


def _unkeyed(column: str) -> str:
    return f"NULLIF({column}, X'') AS {column}"


def _columns(table: str) -> tuple[str, ...]:
    minute = ("minute",) if table in (MINUTES, METHOD_MINUTES) else ()
    method = ("method",) if table in (METHODS, METHOD_MINUTES) else ()
    return minute + KEY + method


def _counts(table: str) -> tuple[str, ...]:
    return ("count",) if table in (METHODS, METHOD_MINUTES) else tuple(COUNTS)


def create(db: sqlite_utils.Database) -> None:
    """The tables, their triggers and indexes, filled from the rows already there."""
    for table in TABLES:
        db.execute(
            f"CREATE TABLE {table} (\n"
            + "".join(f"    {c},\n" for c in _columns(table))
            + "    rows INTEGER NOT NULL DEFAULT 0,\n"
            + "".join(f"    {c} INTEGER NOT NULL DEFAULT 0,\n" for c in _counts(table))
            + f"    PRIMARY KEY ({', '.join(_columns(table))})\n) WITHOUT ROWID"
        )
    for name, on in INDEXES.items():
        db.execute(f"CREATE INDEX {name} ON {on}")
    for sql in _triggers():
        db.execute(sql)
    _fill(db)


def present(db: sqlite_utils.Database) -> bool:
    """The tables, the indexes the fast report reads through and every trigger that keeps
    the tables are there."""
    wanted = (*TABLES, *TRIGGERS, *INDEXES)
    found = db.execute(
        "SELECT COUNT(*) FROM sqlite_master WHERE type IN ('table', 'trigger', 'index')"
        f" AND name IN ({', '.join('?' for _ in wanted)})", list(wanted)).fetchone()[0]
    return bool(found == len(wanted))


def _terms(source: str) -> str:
    """``source`` (rows with the connection columns) with the report's per-connection
    terms beside them."""
    # LIMIT -1 OFFSET 0: computed once, not again in each count that reads them.
    return (f"(SELECT *, {HEALTH_CHECK} AS hc, {CLOSED_BY} AS closed_by,"
            f" {CLOSED_FIRST_BY} AS closed_first_by, is_open AS open_now FROM {source}"
            f" LIMIT -1 OFFSET 0)")


def _one_row(row: str) -> str:
    return "(SELECT " + ", ".join(f"{row}.{c} AS {c}" for c in _READ) + ")"


def _upsert(table: str, select: str) -> str:
    columns = _columns(table)
    counts = _counts(table)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}, rows, {', '.join(counts)}) {select}"
        f" ON CONFLICT ({', '.join(columns)}) DO UPDATE SET rows = rows + excluded.rows, "
        + ", ".join(f"{c} = {c} + excluded.{c}" for c in counts)
    )


def _connection_counts(row: str, sign: str) -> list[str]:
    """Add (sign '') or take back ('-') the counts of the closed connection ``row``."""
    counts = ", ".join(f"{sign}COALESCE({e}, 0)" for e in COUNTS.values())
    source = _terms(_one_row(row))
    return [
        _upsert(TOTALS, f"SELECT {_keyed(KEY)}, {sign}1, {counts} FROM {source} WHERE true"),
        _upsert(MINUTES, f"SELECT {_keyed((MINUTE, *KEY))}, {sign}1, {counts} FROM {source}"
                         " WHERE true"),
    ]


def _connection_methods(row: str, sign: str) -> list[str]:
    """Add or take back the method counts of every conn_methods row of the connection
    ``row`` (it is closed)."""
    c = _keyed([f"{row}.{k}" for k in KEY])
    minute = _keyed([f"CAST({row}.close_ts / {BUCKET_S} AS INTEGER)"])
    picked = f"FROM conn_methods m WHERE m.uid = {row}.uid"
    return [
        _upsert(METHODS, f"SELECT {c}, m.method, {sign}1, {sign}m.count {picked}"),
        _upsert(METHOD_MINUTES, f"SELECT {minute}, {c}, m.method, {sign}1, {sign}m.count {picked}"),
    ]


def _method_row(row: str, sign: str) -> list[str]:
    """Add or take back one conn_methods ``row`` (NEW or OLD), if its connection is
    closed."""
    c = _keyed([f"c.{k}" for k in KEY])
    minute = _keyed([f"CAST(c.close_ts / {BUCKET_S} AS INTEGER)"])
    picked = f"FROM connections c WHERE c.uid = {row}.uid AND c.is_open = 0"
    return [
        _upsert(METHODS, f"SELECT {c}, {row}.method, {sign}1, {sign}{row}.count {picked}"),
        _upsert(METHOD_MINUTES,
                f"SELECT {minute}, {c}, {row}.method, {sign}1, {sign}{row}.count {picked}"),
    ]


def _trigger(name: str, when: str, condition: str, body: list[str]) -> str:
    return (f"CREATE TRIGGER {name} {when}" + (f" WHEN {condition}" if condition else "")
            + " BEGIN\n    " + ";\n    ".join(body) + ";\nEND")


def _triggers() -> list[str]:
    changed = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in _READ)
    return [
        _trigger("client_closed_insert", "AFTER INSERT ON connections", "NEW.is_open = 0",
                 _connection_counts("NEW", "") + _connection_methods("NEW", "")),
        _trigger("client_closed_update_old", "AFTER UPDATE ON connections",
                 f"OLD.is_open = 0 AND ({changed})",
                 _connection_counts("OLD", "-") + _connection_methods("OLD", "-")),
        _trigger("client_closed_update_new", "AFTER UPDATE ON connections",
                 f"NEW.is_open = 0 AND ({changed})",
                 _connection_counts("NEW", "") + _connection_methods("NEW", "")),
        _trigger("client_closed_delete", "AFTER DELETE ON connections", "OLD.is_open = 0",
                 _connection_counts("OLD", "-") + _connection_methods("OLD", "-")),
        _trigger("client_closed_method_insert", "AFTER INSERT ON conn_methods", "",
                 _method_row("NEW", "")),
        _trigger("client_closed_method_update", "AFTER UPDATE ON conn_methods", "",
                 _method_row("OLD", "-") + _method_row("NEW", "")),
        _trigger("client_closed_method_delete", "AFTER DELETE ON conn_methods", "",
                 _method_row("OLD", "-")),
    ]


def _fill(db: sqlite_utils.Database) -> None:
    """The totals of the closed connections already there (the migration)."""
    key = ", ".join(KEY)
    counts = ", ".join(f"SUM(COALESCE({e}, 0))" for e in COUNTS.values())
    closed = _terms("(SELECT * FROM connections WHERE is_open = 0)")
    db.execute(_plain_insert(TOTALS, f"SELECT {_keyed(KEY)}, COUNT(*), {counts} FROM {closed}"
                                     f" GROUP BY {key}"))
    db.execute(_plain_insert(MINUTES, f"SELECT {_keyed((MINUTE, *KEY))}, COUNT(*), {counts}"
                                      f" FROM {closed} GROUP BY {MINUTE}, {key}"))
    c = ", ".join(f"c.{k}" for k in KEY)
    minute = f"CAST(c.close_ts / {BUCKET_S} AS INTEGER)"
    joined = ("FROM conn_methods m JOIN connections c ON c.uid = m.uid WHERE c.is_open = 0")
    db.execute(_plain_insert(
        METHODS, f"SELECT {_keyed([f'c.{k}' for k in KEY])}, m.method, COUNT(*), SUM(m.count)"
                 f" {joined} GROUP BY {c}, m.method"))
    db.execute(_plain_insert(
        METHOD_MINUTES, f"SELECT {_keyed([minute, *(f'c.{k}' for k in KEY)])}, m.method,"
                        f" COUNT(*), SUM(m.count) {joined} GROUP BY {minute}, {c}, m.method"))


def _plain_insert(table: str, select: str) -> str:
    return (f"INSERT INTO {table} ({', '.join(_columns(table))}, rows,"
            f" {', '.join(_counts(table))}) {select}")


# The triggers an UPDATE of connections fires; ``rekeyed`` works without them.
UPDATE_TRIGGERS = ("client_closed_update_old", "client_closed_update_new")


def rekeyed(db: sqlite_utils.Database, moves: str, *, also: str = "") -> int:
    """Give the connections listed in table ``moves`` (uid, pid, process_start: a
    temporary one, say) that pid and process start (and set ``also``, more assignments
    of columns the counts do not read, such as ", attribution = 'merged'"), with the
    totals brought up to date once, set-wise, instead of by the per-row update triggers:
    the closed ones' counts (which do not depend on who the client is) are read once,
    taken back from the keys they had and added to the keys they get, and the entries
    left with no row go (as retention's do). How many connections changed.

    Runs inside the caller's transaction, which must be a write one (BEGIN IMMEDIATE:
    no other connection writes until it ends): the two update triggers are dropped and
    created again from their own stored text within it, so no other writer ever finds
    them gone, and a rollback (a crash, an interrupt) restores them with everything
    else. Without the totals (``present``), the connections are only updated."""
    conn = db.conn
    if not conn.in_transaction:
        raise RuntimeError("aggregates.rekeyed runs inside the caller's write transaction")
    update = (f"UPDATE connections SET pid = k.pid, process_start = k.process_start{also}"
              f" FROM {moves} k WHERE connections.uid = k.uid")
    if not present(db):
        return int(conn.execute(update).rowcount)
    read = ", ".join(f"c.{c}" for c in _READ)
    source = (f"(SELECT {read}, k.pid AS new_pid, k.process_start AS new_process_start"
              f" FROM {moves} k JOIN connections c ON c.uid = k.uid WHERE c.is_open = 0)")
    counts = ", ".join(f"COALESCE({e}, 0) AS {name}" for name, e in COUNTS.items())
    conn.execute("DROP TABLE IF EXISTS temp.rekeyed_counts")
    conn.execute("DROP TABLE IF EXISTS temp.rekeyed_methods")
    conn.execute(f"CREATE TEMP TABLE rekeyed_counts AS SELECT uid, {', '.join(KEY)},"
                 f" new_pid, new_process_start, {MINUTE} AS minute, {counts}"
                 f" FROM {_terms(source)}")
    conn.execute("CREATE TEMP TABLE rekeyed_methods AS SELECT r.pid, r.process_start,"
                 " r.orig_h, r.new_pid, r.new_process_start, r.minute, m.method, m.count"
                 " FROM temp.rekeyed_counts r JOIN conn_methods m ON m.uid = r.uid")
    sums = ", ".join(f"SUM({name})" for name in COUNTS)
    negated = ", ".join(f"-SUM({name})" for name in COUNTS)
    for sign, key, total in (("-", KEY, negated),
                             ("", ("new_pid", "new_process_start", "orig_h"), sums)):
        k = ", ".join(key)
        # WHERE true: an upsert's SELECT needs a WHERE before ON CONFLICT (SQLite's parser).
        conn.execute(_upsert(TOTALS, f"SELECT {_keyed(key)}, {sign}COUNT(*), {total}"
                                     f" FROM temp.rekeyed_counts WHERE true GROUP BY {k}"))
        conn.execute(_upsert(MINUTES, f"SELECT {_keyed(('minute', *key))}, {sign}COUNT(*),"
                                      f" {total} FROM temp.rekeyed_counts WHERE true"
                                      f" GROUP BY minute, {k}"))
        conn.execute(_upsert(METHODS, f"SELECT {_keyed(key)}, method, {sign}COUNT(*),"
                                      f" {sign}SUM(count) FROM temp.rekeyed_methods"
                                      f" WHERE true GROUP BY {k}, method"))
        conn.execute(_upsert(METHOD_MINUTES, f"SELECT {_keyed(('minute', *key))}, method,"
                                             f" {sign}COUNT(*), {sign}SUM(count)"
                                             " FROM temp.rekeyed_methods WHERE true"
                                             f" GROUP BY minute, {k}, method"))
    saved = [conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?",
                          [name]).fetchone()[0] for name in UPDATE_TRIGGERS]
    for name in UPDATE_TRIGGERS:
        conn.execute(f"DROP TRIGGER {name}")
    changed = int(conn.execute(update).rowcount)
    for sql in saved:
        conn.execute(sql)
    conn.execute("DROP TABLE temp.rekeyed_counts")
    conn.execute("DROP TABLE temp.rekeyed_methods")
    drop_empty(db)
    return changed


def drop_empty(db: sqlite_utils.Database) -> None:
    """Drop the entries whose connections are all gone (retention, in its transaction)."""
    if not present(db):
        return
    for table in TABLES:
        db.conn.execute(f"DELETE FROM {table} WHERE rows = 0")


def _client_condition(client: str | None) -> tuple[str, list[Any]]:
    if not client:
        return "", []
    if client.isdigit():
        return " AND pid = ?", [int(client)]
    return " AND orig_h = ?", [client]


def closed_totals(db: sqlite_utils.Database, *, since: float | None,
                  client: str | None) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]]:
    """The closed connections' counts per (pid, process_start, orig_h), and their method
    counts as (pid, process_start, orig_h, method, count): all of them, or with
    ``since`` those of the minutes after the one ``since`` falls in (and those closed
    without a close time, which every window takes), which ``boundary`` completes."""
    where, params = _client_condition(client)
    key = ", ".join(_unkeyed(c) for c in KEY)
    if since is None:
        counts = ", ".join(("rows", *COUNTS))
        groups = db.execute(f"SELECT {key}, {counts} FROM {TOTALS} WHERE rows > 0{where}",
                            params)
        names = [d[0] for d in groups.description]
        out = [dict(zip(names, r, strict=True)) for r in groups.fetchall()]
        methods = db.execute(f"SELECT {key}, method, count FROM {METHODS}"
                             f" WHERE rows > 0{where}", params).fetchall()
        return out, methods
    # A blob sorts after every number: the connections closed without a close time
    # (minute NULL, stored as X'') come after every minute, as every window takes them.
    after = f"minute > CAST(? / {BUCKET_S} AS INTEGER) AND rows > 0{where}"
    counts = ", ".join(f"SUM({c}) AS {c}" for c in ("rows", *COUNTS))
    groups = db.execute(f"SELECT {key}, {counts} FROM {MINUTES} WHERE {after}"
                        f" GROUP BY {', '.join(KEY)}", [since, *params])
    names = [d[0] for d in groups.description]
    out = [dict(zip(names, r, strict=True)) for r in groups.fetchall()]
    methods = db.execute(f"SELECT {key}, method, SUM(count) FROM {METHOD_MINUTES}"
                         f" WHERE {after} GROUP BY {', '.join(KEY)}, method",
                         [since, *params]).fetchall()
    return out, methods


def takes_everything(db: sqlite_utils.Database, since: float | None) -> bool:
    """A window from ``since`` takes every connection (none closed before it): one step
    down the close_ts index."""
    if since is None:
        return False
    return db.execute("SELECT 1 FROM connections INDEXED BY connections_close"
                      " WHERE close_ts < ? LIMIT 1", [since]).fetchone() is None


def boundary(db: sqlite_utils.Database, since: float) -> tuple[str, list[Any]]:
    """SQL condition (and its parameters) for the closed connections of the minute
    ``since`` falls in, which ``closed_totals`` leaves out, read through connections_close
    (the window's own condition keeps those closed at or after ``since``)."""
    minute = db.execute(f"SELECT CAST(? / {BUCKET_S} AS INTEGER)", [since]).fetchone()[0]
    # Every close time of that minute is below this (a minute's end, rounded up, or 0).
    below = float(BUCKET_S) * (abs(minute) + 2)
    condition = f" AND is_open = 0 AND close_ts >= ? AND close_ts < ? AND {MINUTE} = ?"
    return condition, [since, below, minute]
