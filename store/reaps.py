"""What the database knows for `tracer reap`: each open connection of a client, whether
the live agent's view is current, the reaps done (table ``reaps``, m016_reaps) and what
they add to the report per client. SQL only; the kernel side is tracer.reap."""

from __future__ import annotations

from typing import Any

import sqlite_utils

from store.sql import CLOSED_BY, CLOSED_FIRST_BY
from store.sql import rows as _rows

# The reaps table is cut back to this many rows (the oldest go) at each write.
MAX_REAPS = 100_000

# An RPC still in progress on a connection seen from its start (as store.queries).
_RPC_IN_PROGRESS = "(streams > COALESCE(trailers, 0) + COALESCE(rst_streams, 0))"


def has_reaps(db: sqlite_utils.Database) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'reaps'"
                      ).fetchone() is not None


def _client_where(client: str) -> tuple[str, list[Any]]:
    if client.isdigit():
        return "pid = ?", [int(client)]
    return "orig_h = ?", [client]


def client_known(db: sqlite_utils.Database, client: str) -> bool:
    """Whether any connection (open or closed) of ``client`` (a pid or an IP) is stored."""
    where, params = _client_where(client)
    return db.execute(f"SELECT 1 FROM connections WHERE {where} LIMIT 1",
                      params).fetchone() is not None


def known_clients(db: sqlite_utils.Database, limit: int = 8) -> list[str]:
    """The clients with the most open connections, as `--client` takes them (pid, else IP)."""
    return [r[0] for r in db.execute(
        "SELECT COALESCE(CAST(pid AS TEXT), orig_h) AS who FROM connections WHERE is_open = 1"
        " GROUP BY who ORDER BY COUNT(*) DESC, who LIMIT ?", [limit]).fetchall()]


def open_connections(db: sqlite_utils.Database, client: str) -> list[dict[str, Any]]:
    """The open connections of ``client``: 4-tuple, when it opened, its last activity (any
    HTTP/2 frame but PING, an RPC, a TLS record: last_activity_ts, or the last RPC), its
    process and what hides its inside (TLS, opened before the capture, an RPC running)."""
    where, params = _client_where(client)
    return _rows(
        db,
        "SELECT uid, orig_h, orig_p, resp_h, resp_p, pid, process_start, client_netns,"
        " COALESCE(syn_ts, ts) AS opened_ts, mid_stream, protocol,"
        " COALESCE(protocol, '') = 'tls' AS tls,"
        f" NOT mid_stream AND {_RPC_IN_PROGRESS} AS rpc_in_progress,"
        " MAX(COALESCE(last_activity_ts, ts), COALESCE(last_rpc_ts, ts), ts) AS activity_ts,"
        " streams"
        f" FROM connections WHERE is_open = 1 AND {where} ORDER BY ts, uid",
        params,
    )


def agent_view(db: sqlite_utils.Database) -> dict[str, Any]:
    """The live capture writing this database now, if any: its id, pid and ports and when
    it last wrote (captures.last_ts: every batch, about twice a second). ``running`` is
    False when no live capture's process is alive (its data then ends where it stopped)."""
    from store.lock import process_running

    live = _rows(db, "SELECT id, pid, pid_start, ports, last_ts, status FROM captures"
                     " WHERE kind = 'live' ORDER BY id DESC")
    for capture in live:
        if capture["status"] == "running" and process_running(capture["pid"],
                                                              capture["pid_start"]):
            return {"running": True, "capture": capture["id"], "pid": capture["pid"],
                    "last_write_ts": capture["last_ts"], "ports": _ports(capture["ports"])}
    last = live[0] if live else None
    return {"running": False, "capture": last["id"] if last else None,
            "pid": last["pid"] if last else None,
            "last_write_ts": last["last_ts"] if last else None,
            "ports": _ports(last["ports"]) if last else []}


def server_ports(db: sqlite_utils.Database) -> list[int]:
    out: list[int] = []
    for (ports,) in db.execute("SELECT ports FROM captures ORDER BY id").fetchall():
        out += [p for p in _ports(ports) if p not in out]
    return out


def _ports(text: str | None) -> list[int]:
    return [int(p) for p in (text or "").split(",") if p]


def record(db: sqlite_utils.Database, rows: list[dict[str, Any]]) -> None:
    """Store what a reap did, in one short transaction (the live agent writes the same
    database: SQLite's busy timeout waits for its batch to commit), keeping the table
    within MAX_REAPS rows."""
    if not rows:
        return
    columns = ("ts", "uid", "orig_h", "orig_p", "resp_h", "resp_p", "pid", "process_start",
               "result", "error", "sockets", "by_uid", "by_user")
    conn = db.conn
    with conn:  # BEGIN ... COMMIT, or ROLLBACK on error
        conn.executemany(
            f"INSERT INTO reaps ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            [[r.get(c) for c in columns] for r in rows])
        conn.execute("DELETE FROM reaps WHERE id <= (SELECT MAX(id) FROM reaps) - ?",
                     [MAX_REAPS])


def reaps(db: sqlite_utils.Database, client: str | None = None) -> list[dict[str, Any]]:
    if not has_reaps(db):
        return []
    where, params = _client_where(client) if client else ("1", [])
    return _rows(db, f"SELECT * FROM reaps WHERE {where} ORDER BY id", params)


def by_client(db: sqlite_utils.Database, *, since: float | None = None,
              until: float | None = None, client: str | None = None
              ) -> dict[tuple[Any, Any, Any], dict[str, Any]]:
    """Per client (pid, process_start, IP where unattributed: the report's key), the
    connections a reap closed: how many, when, how many of their closes the agent saw
    (a RST), and how the report's counts took those closes (``closed_by`` kinds and which
    side began them), so that the report can name the reap and judge the client as if
    they were still open: a reaped leak was still a leak."""
    if not has_reaps(db):
        return {}
    where, params = "r.result = 'closed'", []
    if client:
        w, p = _client_where(client)
        where += " AND r." + w
        params += p
    if since is not None:
        where += " AND r.ts >= ?"
        params.append(since)
    if until is not None:
        where += " AND r.ts <= ?"
        params.append(until)
    rows = _rows(
        db,
        f"""
        SELECT r.pid AS pid, r.process_start AS process_start,
               CASE WHEN r.pid IS NULL THEN r.orig_h END AS ip, r.ts AS ts, r.by_uid AS by_uid,
               r.by_user AS by_user, c.is_open AS is_open, c.mid_stream AS mid_stream,
               {_prefixed(CLOSED_BY)} AS closed_by, {_prefixed(CLOSED_FIRST_BY)} AS first_by
        FROM reaps r LEFT JOIN connections c ON c.uid = r.uid
        WHERE {where} AND r.id = (SELECT MAX(id) FROM reaps WHERE uid = r.uid)
        ORDER BY r.id
        """,
        params,
    )
    out: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
    for r in rows:
        key = (r["pid"], r["process_start"], r["ip"])
        entry = out.setdefault(key, {"reaped": 0, "first_ts": r["ts"], "last_ts": r["ts"],
                                     "closed_seen": 0, "closed_by": {}, "first_by": {},
                                     "seen": 0, "before": 0, "by": []})
        entry["reaped"] += 1
        entry["last_ts"] = r["ts"]
        who = r["by_user"] or f"uid {r['by_uid']}"
        if who not in entry["by"]:
            entry["by"].append(who)
        if r["is_open"] == 0 and r["closed_by"] is not None:
            entry["closed_seen"] += 1
            entry["closed_by"][r["closed_by"]] = entry["closed_by"].get(r["closed_by"], 0) + 1
            if r["first_by"]:
                entry["first_by"][r["first_by"]] = entry["first_by"].get(r["first_by"], 0) + 1
            entry["before" if r["mid_stream"] else "seen"] += 1
    return out


def _prefixed(sql: str) -> str:
    """A connections expression of store.sql read through the alias ``c``."""
    for column in ("close_kind", "goaway_ts", "close_ts", "goaway_sender"):
        sql = sql.replace(column, f"c.{column}")
    return sql
