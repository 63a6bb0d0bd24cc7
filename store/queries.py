"""Read-side queries: the leak report, server health, connection listings. Pure SQL, no printing."""

from __future__ import annotations

import json
import zlib
from itertools import accumulate
from typing import Any

import sqlite_utils

from store import aggregates, reaps
from store.correlate import has_logs, log_evidence
from store.sql import (
    CLOSED_BY,
    CLOSED_FIRST_BY,
    DEFAULT_PREFACE_TIMEOUT,
    HEALTH_CHECK,
    preface_timed_out,
)
from store.sql import percentile as _percentile
from store.sql import rows as _rows
from tracer.events import error_name
from tracer.record import COLUMNS


def capture_summary(db: sqlite_utils.Database) -> dict[str, Any]:
    caps = _rows(db, "SELECT * FROM captures ORDER BY id")
    sources = [r["path"] for r in _rows(
        db, "SELECT path FROM capture_sources ORDER BY capture_id, n"
    )]
    ports: list[int] = []
    for c in caps:
        for p in (c["ports"] or "").split(","):
            if p and int(p) not in ports:
                ports.append(int(p))
    live = [c["interface"] for c in caps if c["kind"] == "live"]
    drops = [c["drops"] for c in caps if c["drops"] is not None]
    firsts = [c["first_ts"] for c in caps if c["first_ts"] is not None]
    lasts = [c["last_ts"] for c in caps if c["last_ts"] is not None]
    if any(c["first_ts"] is None or c["last_ts"] is None for c in caps):
        # A capture cut short before it stored its times (kill -9 at the start): what
        # its connections saw is the best bound there is.
        low, high = db.execute(
            "SELECT MIN(COALESCE(syn_ts, ts)), MAX(end_ts) FROM connections").fetchone()
        firsts += [low] if low is not None else []
        lasts += [high] if high is not None else []
    unix: list[str] = []
    for c in caps:
        for u in (c.get("unix_paths") or "").split(","):
            if u and u not in unix:
                unix.append(u)
    summary: dict[str, Any] = {
        "sources": sources + [f"live:{i}" for i in live if i],
        "port": ports[0] if ports else None,
        "ports": ports,
        "first_ts": min(firsts) if firsts else None,
        "last_ts": max(lasts) if lasts else None,
        "packets": sum(c["packets"] for c in caps),
        "drops": sum(drops) if drops else None,
        "captures": len(caps),
        "damaged": [c["error"] for c in caps if c["status"] == "damaged"],
        "partial": [p for p in (_partial(c) for c in caps) if p is not None],
        "anomalies": sum(c["anomalies"] for c in caps),
        # --unix: the Unix-socket servers followed (no packets: their methods, RPCs,
        # GOAWAYs and HTTP/2 frames are not visible).
        "unix_paths": unix,
    }
    if unix:  # how well its open and close times are known: the longest poll interval
        longest = db.execute(
            "SELECT MAX(value) FROM capture_stats WHERE name = 'unix.poll_interval_ms'"
        ).fetchone()[0]
        summary["unix_poll_interval_s"] = longest / 1000 if longest else 0.5
    if _has_table(db, "prunes"):
        from store.retention import retained

        summary.update(retained(db))
    return summary


def _partial(capture: dict[str, Any]) -> dict[str, Any] | None:
    """Why a capture's data is not whole, or None when it is."""
    from store.lock import process_running

    status = capture["status"]
    kind = "live capture" if capture["kind"] == "live" else "file read"
    what = f"capture {capture['id']} ({kind})"
    if status == "running":
        alive = process_running(capture.get("pid"), capture.get("pid_start"))
        if alive:
            why = f"{what} is still running (pid {capture['pid']}): this is what it stored so far"
        elif alive is None:
            why = f"{what} never finished: the data ends where it stopped"
        else:
            why = (f"{what} never finished: its process (pid {capture['pid']}) is gone "
                   "(killed or crashed); the data ends where it stopped")
        status = "running" if alive else "unfinished"
    elif status == "interrupted":
        why = f"{what} was interrupted: the data ends where it stopped"
    elif status == "failed":
        why = f"{what} failed: {capture['error'] or 'no reason recorded'}"
    else:
        return None
    return {"capture": capture["id"], "status": status, "reason": why}


def _has_table(db: sqlite_utils.Database, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                      [name]).fetchone() is not None


# What a leak is made of: open connections left behind, each carrying next to nothing.
# Activity is what can be seen, never what cannot: RPCs where they are in the clear, TLS
# application data records inside TLS (the RPCs are encrypted), and any traffic at all
# for a connection open before the capture (its earlier RPCs were never seen).
FEW_RPCS = 2  # RPCs of a connection dialled for a call and left behind (a pool's carry many)
# Application data records from the client of a TLS connection that carried one or two
# RPCs: the handshake's end, the HTTP/2 preface and SETTINGS, the ACKs, the RPC itself
# (grpcio 1.85 over TLS 1.3: 6 records for one RPC, about 1.6 more per RPC).
FEW_TLS_RECORDS = 12
# A process that never closes a connection itself and holds this many left behind is a
# leak, whoever closed the others: grpc-go dials a ClientConn again by itself after the
# server closes it (max-connection-age), so the server's closes never bring it down.
MANY_LEFT_BEHIND = 10

# An RPC still in progress on a connection seen from its start: more streams opened than
# ended (the server's END_STREAM, or a RST_STREAM). A watch or subscription stream is one
# RPC that lasts as long as its connection: that connection is in use, never left behind.
RPC_IN_PROGRESS = "(streams > COALESCE(trailers, 0) + COALESCE(rst_streams, 0))"

# Seen from its start, the client sent something and the server never a byte: the client
# waits for the server (its SETTINGS, its TLS ServerHello); a frozen server's victims, never
# connections the client left behind.
WAITING_FOR_SERVER = ("(NOT mid_stream AND COALESCE(orig_bytes, 0) > 0"
                      " AND COALESCE(resp_bytes, 0) = 0)")

LEFT_BEHIND = f"""(open_now AND NOT {WAITING_FOR_SERVER} AND CASE
    WHEN mid_stream THEN last_activity_ts IS NULL
    WHEN COALESCE(protocol, '') = 'tls' THEN COALESCE(tls_records_orig, 0) <= {FEW_TLS_RECORDS}
    ELSE streams <= {FEW_RPCS} AND NOT {RPC_IN_PROGRESS}
END)"""

def _verdict(c: dict[str, Any], span_s: float) -> tuple[str, str]:
    """leak / suspect / ok, and a reason a person can act on. The rules, in order:

    1. leak: it keeps opening connections it leaves behind (3 or more opened during the
       capture) and closes far fewer than it opens (fewer than half);
    2. leak: it never closes a connection itself and holds MANY_LEFT_BEHIND or more left
       behind, whoever closed the others (the server's GOAWAYs, its FINs);
    3. suspect: two or more left behind;
    4. ok: anything else (pools, closers, health checks)."""
    opened, closed, still_open = c["opened"], c["closed"], c["open"]
    left, seen = c["left_behind"], c["left_behind_seen"]
    span = _duration(span_s)
    if seen >= 3 and closed * 2 < opened:
        rate = f" ({c['open_growth_per_min']:.1f}/min)" if span_s >= 60 else ""
        new = opened - c["pre_existing"]
        before = (f"; {c['pre_existing']} more were open before the capture began"
                  if c["pre_existing"] else "")
        return "leak", (
            f"opened {new}, closed {closed} in {span}{rate}{before}; {_carried(c)}, then "
            f"idle{_via(c)}; {still_open} still open, oldest {_age(c)}"
        )
    if left >= MANY_LEFT_BEHIND and c["closed_by_client"] == 0:
        by_server = c["closed_by_server"]
        closes = (f"; the server closed {by_server} of its connections and it dialled "
                  "again" if by_server else "")
        return "leak", (
            f"never closes a connection itself: holds {left} left behind ({_carried(c)}, "
            f"then idle{_via(c)}){closes}; {still_open} open, oldest {_age(c)}"
        )
    waiting = c["open_waiting_for_server"]
    if left >= 2:
        return "suspect", (
            f"{left} connections left behind still open ({_carried(c)}), {closed} closed, "
            f"in {span}: watch whether they keep growing{_waiting(waiting)}"
        )
    if still_open > waiting:
        kept = still_open - waiting
        pools = "1 long-lived connection" if kept == 1 else f"{kept} long-lived connections"
        busy = c["open_rpc_in_progress"]
        streaming = (f"; {busy} with an RPC still in progress (a stream)" if busy else "")
        return "ok", f"{pools} ({_traffic(c)}{streaming}); {closed} closed{_waiting(waiting)}"
    if waiting:
        return "ok", f"{closed} closed{_waiting(waiting)}"
    if opened == 0:
        n = c["health_checks"]
        return "ok", f"{n} health check{'' if n == 1 else 's'} only (connect, no HTTP/2, close)"
    return "ok", f"all {opened} connections closed"


# On a Unix socket no packet exists: the verdict rests on what the kernel's socket table
# shows, connections opened (seen by a poll), closed and still open, and when. A client
# leaks when it keeps opening connections it leaves open: UNIX_LEAK_OPEN or more opened
# during the capture still open, at UNIX_LEAK_POLLS or more different polls (growing, not
# a pool opened at once), fewer than half of what it opened closed. Open before the
# capture: its age is unknown, never young, never part of the growth.
UNIX_LEAK_OPEN = 3
UNIX_LEAK_POLLS = 3
UNIX_NOT_VISIBLE = "not visible on a Unix socket"


def _unix_verdict(c: dict[str, Any], u: dict[str, Any], span_s: float) -> tuple[str, str]:
    """leak / suspect / ok of a client whose connections are all to Unix sockets, from
    counts and times only (its RPCs are not visible)."""
    opened, closed, still_open = c["opened"], c["closed"], c["open"]
    seen, polls, before = u["open_seen"], u["open_polls"], u["open_before"]
    span = _duration(span_s)
    new = opened - c["pre_existing"]
    earlier = (f"; {c['pre_existing']} more were open before the capture began"
               if c["pre_existing"] else "")
    if seen >= UNIX_LEAK_OPEN and polls >= UNIX_LEAK_POLLS and closed * 2 < new:
        rate = f" ({c['open_growth_per_min']:.1f}/min)" if span_s >= 60 else ""
        return "leak", (
            f"opened {new}, closed {closed} in {span}{rate}{earlier}; {seen} opened during "
            f"the capture still open, opened at {polls} different polls (growing); "
            f"{still_open} still open, oldest {_age(c)}; RPCs {UNIX_NOT_VISIBLE}")
    if seen >= UNIX_LEAK_OPEN and closed * 2 < new:
        return "suspect", (
            f"{seen} opened during the capture still open, all within {polls} poll"
            f"{'' if polls == 1 else 's'} (a pool opened at once, or a burst): watch whether "
            f"they keep growing; {closed} closed; RPCs {UNIX_NOT_VISIBLE}")
    if still_open:
        kept = "1 long-lived connection" if still_open == 1 else \
            f"{still_open} long-lived connections"
        old = f", {before} open before the capture" if before else ""
        return "ok", (f"{kept}{old} (RPCs {UNIX_NOT_VISIBLE}); {closed} closed")
    return "ok", f"all {opened} connections closed (RPCs {UNIX_NOT_VISIBLE})"


def _unix_clients(db: sqlite_utils.Database, where: str, params: list[Any], open_expr: str
                  ) -> dict[tuple[Any, Any, Any], dict[str, Any]]:
    """Per client key (pid, process_start, address if unattributed), its connections to
    Unix sockets: how many, those opened during the capture still open and at how many
    different polls, and those open from before it."""
    if not _has_table(db, "unix_sockets"):
        return {}
    out = {}
    for r in _rows(db, f"""
            SELECT pid, process_start, CASE WHEN pid IS NULL THEN orig_h END AS ip,
                   COUNT(*) AS connections,
                   SUM({open_expr} AND NOT mid_stream) AS open_seen,
                   COUNT(DISTINCT CASE WHEN {open_expr} AND NOT mid_stream THEN ts END)
                       AS open_polls,
                   SUM({open_expr} AND mid_stream) AS open_before
            FROM connections WHERE protocol = 'unix'{where}
            GROUP BY pid, process_start, ip""", params):
        out[(r["pid"], r["process_start"], r["ip"])] = r
    return out


def _unix_terms(c: dict[str, Any], u: dict[str, Any]) -> None:
    """What a client of Unix sockets cannot have: RPCs, methods, idle times (no frame is
    seen, so none is missing); said, never 0."""
    c["transport"] = "unix"
    c["rpcs"] = None
    c["rpcs_per_connection"] = None
    c["idle_s"] = None
    c["traffic"] = UNIX_NOT_VISIBLE
    c["unix"] = {k: u[k] or 0 for k in ("connections", "open_seen", "open_polls",
                                        "open_before")}


def _reaped_verdict(c: dict[str, Any], gone: dict[str, Any], span_s: float) -> tuple[str, str]:
    """The verdict of a client some of whose connections `tracer reap` closed: judged as
    if the reap had not happened (a reaped leak was still a leak), the reap said in the
    reason. The report's counts say the closes as they were: closed_by gets "reaped" (taken
    from the kind the reap's RST was counted as), and the entry a "reaped" summary."""
    c["reaped"] = {k: gone[k] for k in ("reaped", "first_ts", "last_ts", "closed_seen", "by")}
    for kind, n in gone["closed_by"].items():
        if kind in c["closed_by"]:
            c["closed_by"][kind] = max(0, c["closed_by"][kind] - n)
    c["closed_by"]["reaped"] = gone["closed_seen"]
    seen = gone["closed_seen"]
    unreaped = dict(c)
    unreaped["closed"] = max(0, c["closed"] - seen)
    unreaped["left_behind"] = c["left_behind"] + seen
    unreaped["left_behind_seen"] = c["left_behind_seen"] + gone["seen"]
    unreaped["left_behind_before"] = c["left_behind_before"] + gone["before"]
    unreaped["closed_by_client"] = max(0, c["closed_by_client"] - gone["first_by"].get("orig", 0))
    unreaped["closed_by_server"] = max(0, c["closed_by_server"] - gone["first_by"].get("resp", 0))
    verdict, reason = _verdict(unreaped, span_s)
    n = gone["reaped"]
    return verdict, (f"{reason}; {n} more left behind closed by `tracer reap` (counted as "
                     f"left behind)" if n else reason)


def _waiting(n: int) -> str:
    return (f"; {n} open waiting for the server's answer (it never sent a byte: a victim of "
            "the server, not left behind)" if n else "")


def _carried(c: dict[str, Any]) -> str:
    """What the connections left behind carried, in the terms that can be seen."""
    parts = []
    clear = c["left_behind"] - c["left_behind_tls"] - c["left_behind_before"]
    if clear:
        rpc = c["rpcs_per_connection"]
        parts.append("1 RPC each" if rpc is not None and round(rpc, 1) == 1.0 else
                     f"{rpc:.1f} RPCs each" if rpc else f"at most {FEW_RPCS} RPCs each")
    if c["left_behind_tls"]:
        parts.append(f"{c['left_behind_tls']} TLS, whose RPCs are encrypted: at most "
                     f"{FEW_TLS_RECORDS} records from the client each")
    if c["left_behind_before"]:
        parts.append(f"{c['left_behind_before']} open before the capture and silent all "
                     "through it")
    return "; ".join(parts) or "nothing seen"


def _via(c: dict[str, Any]) -> str:
    method = next((m for m in c["methods"] if not m.startswith("unknown")), None)
    return f"; method {method}" if method else ""


def _age(c: dict[str, Any]) -> str:
    age = _duration(c["oldest_open_s"] or 0)
    return f"at least {age} (opened before the capture)" if c["oldest_open_before_capture"] \
        else age


def _traffic(c: dict[str, Any]) -> str:
    """What a client's connections carried: RPCs, or TLS records where they are hidden."""
    parts = []
    if c["rpcs"] or not c["tls_records"]:
        parts.append(f"{rpc_text(c)} in all")
    if c["tls_records"]:
        parts.append(f"RPCs encrypted: {c['tls_records']:,} TLS records from the client")
    return "; ".join(parts)


def rpc_text(c: dict[str, Any]) -> str:
    total = c["rpcs"]
    return f"{total} RPC" + ("" if total == 1 else "s")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _client_filter(client: str | None, table: str = "") -> tuple[str, list[Any]]:
    """SQL condition for --client: an IP address, or a pid (columns of ``table``)."""
    if not client:
        return "", []
    prefix = f"{table}." if table else ""
    if client.isdigit():
        return f" AND {prefix}pid = ?", [int(client)]
    return f" AND {prefix}orig_h = ?", [client]


def client_report(db: sqlite_utils.Database, *, since: float | None = None,
                  until: float | None = None, client: str | None = None,
                  totals: bool = True) -> list[dict[str, Any]]:
    """One entry per client, as DESIGN.md's report contract: a process (pid and its start
    time) where the connection was attributed, else the client IP.

    With a window, the connections that existed during [since, until] count; "open" and
    ages are as of ``until``.

    The closed connections are added up from their totals (store.aggregates) where the
    database has them and the window has no ``until`` (open as of then is not what is
    open now); ``totals=False`` reads every connection row by row, which gives the same."""
    summary = capture_summary(db)
    end = until if until is not None else (summary["last_ts"] or 0.0)
    start = since if since is not None else (summary["first_ts"] or end)
    span = max(end - start, 0.0)
    fast = totals and until is None and aggregates.present(db)
    # A window from before every close takes every connection: read as the whole.
    cut = None if fast and aggregates.takes_everything(db, since) else since
    where, params = _client_filter(client)
    if until is not None:
        where += " AND ts <= ?"
        params.append(until)
    if cut is not None:
        where += " AND (close_ts IS NULL OR close_ts >= ?)"  # existed in the window
        params.append(cut)
    if fast:
        rows, methods = _closed_from_totals(db, where, params, start, cut, client)
    else:
        # Open as of the end of the window: no close seen, or a close after it.
        open_expr = "is_open" if until is None else \
            f"(close_ts IS NULL OR close_ts > {float(end)!r})"
        rows = _client_groups(db, where, params, open_expr, start)
        methods = {}
        for pid, process_start, ip, method, n in _client_methods(db, where, params):
            methods.setdefault((pid, process_start, ip), {})[method] = n
    retained_from = summary.get("retained_from")
    if retained_from is not None and since is None and (until is None or until >= retained_from):
        _add_history(db, rows, methods, client)
    processes = {(r["pid"], r["start_time"]): r for r in _rows(db, "SELECT * FROM processes")}
    remote = merged_processes(db)
    details = _socket_details(db, where, params, indexed=fast)
    reaped = reaps.by_client(db, since=since, until=until, client=client)
    unix_clients = _unix_clients(
        db, where, params,
        "is_open" if until is None else f"(close_ts IS NULL OR close_ts > {float(end)!r})")
    out = []
    for r in rows:
        opened = r["opened"] or 0
        key = (r["pid"], r["process_start"])
        proc = processes.get(key) if r["pid"] is not None else None
        merged = remote.get(key) if proc is None and r["pid"] is not None else None
        c: dict[str, Any] = {
            "client": r["client"],
            "pid": r["pid"],
            "process": (proc["cmdline"] or proc["comm"]) if proc else None,
            "container": proc["container"] if proc else None,
            "opened": opened,
            "closed": r["closed"] or 0,
            "open": r["open"] or 0,
            "open_few_rpcs": r["open_few_rpcs"] or 0,
            "pre_existing": r["pre_existing"] or 0,
            "closed_by": {
                "client_fin": r["by_client_fin"] or 0,
                "server_fin": r["by_server_fin"] or 0,
                "rst": r["by_rst"] or 0,
                "goaway": r["by_goaway"] or 0,
                "port_reused": r["by_port_reused"] or 0,
            },
            "health_checks": r["health_checks"] or 0,
            "oldest_open_s": round(max(0.0, end - r["oldest_open_ts"]), 3)
            if r["oldest_open_ts"] is not None else None,
            # Idle: since the last frame other than PING, for the least and the most idle
            # of the open connections.
            "idle_s": {"min": round(max(0.0, end - r["last_open_activity"]), 3),
                       "max": round(max(0.0, end - r["first_open_activity"]), 3)}
            if r["last_open_activity"] is not None else None,
            "open_growth_per_min": round((r["opened_and_left_open"] or 0) / (span / 60.0), 2)
            if span > 0 else None,
            "rpcs": r["rpcs"] or 0,
            # Not a number where every connection is TLS: the RPCs were not seen.
            "rpcs_per_connection": round((r["rpcs"] or 0) / opened, 2)
            if opened and (r["tls_connections"] or 0) < opened else None,
            "methods": methods.get((r["pid"], r["process_start"], r["ip"]), {}),
            "left_behind": r["left_behind"] or 0,
            "left_behind_seen": r["left_behind_seen"] or 0,
            "left_behind_tls": r["left_behind_tls"] or 0,
            "left_behind_before": r["left_behind_before"] or 0,
            "closed_by_client": r["closed_by_client"] or 0,
            "closed_by_server": r["closed_by_server"] or 0,
            "open_tls": r["open_tls"] or 0,
            # Open with an RPC still in progress (a stream: a watch, a subscription).
            "open_rpc_in_progress": r["open_in_rpc"] or 0,
            # Open and never answered by the server (waiting for its SETTINGS).
            "open_waiting_for_server": r["open_waiting"] or 0,
            "open_before_capture": r["open_before"] or 0,
            "tls_records": r["tls_records"] or 0,
            "rpcs_encrypted": bool(r["tls_connections"]),
            # The oldest open connection was open when the capture began: its age is at
            # least oldest_open_s, its real start unknown.
            "oldest_open_before_capture": r["oldest_before_ts"] is not None
            and r["oldest_before_ts"] <= r["oldest_open_ts"],
        }
        if merged is not None:
            # Named by the client host's own agent (`tracer merge`, store.merge).
            c["process"] = merged["cmdline"] or merged["comm"]
            c["container"] = merged["container"]
            c["host"] = merged["host"]
            c["attribution"] = "merged"
            c["process_start"] = merged["start_time"]
            c["user"] = merged["user"]
            c["pod_name"] = merged["pod_name"]
        elif proc is not None:
            c["process_start"] = proc["start_time"]
            c["user"] = proc["user"]
            c["exe"] = proc["exe"]
            c["pod"] = proc["pod"]
            c["netns"] = proc["netns"]
            c["pod_name"] = proc.get("pod_name")  # absent before m013_attribution_detail
            c["cgroup"] = proc.get("cgroup")
        else:
            # No process found (a short call closed first, another user's namespace): what
            # the kernel said of the client sockets, where it said something.
            seen = details.get((r["pid"], r["process_start"], r["ip"]))
            if seen is not None:
                c.update(seen)
        if r["addresses"] > 1:
            c["addresses"] = r["addresses"]
        gone = reaped.get((r["pid"], r["process_start"], r["ip"]))
        u = unix_clients.get((r["pid"], r["process_start"], r["ip"]))
        if u is not None and str(c["client"]).startswith("unix:") and (
                (r["addresses"] or 1) == 1 or u["connections"] >= opened):
            _unix_terms(c, u)  # every connection of it is to a Unix socket
            c["verdict"], c["reason"] = _unix_verdict(c, u, span)
        elif gone is None:
            c["verdict"], c["reason"] = _verdict(c, span)
        else:
            c["verdict"], c["reason"] = _reaped_verdict(c, gone, span)
        out.append(c)
    order = {"leak": 0, "suspect": 1, "ok": 2}
    out.sort(key=lambda c: (order[c["verdict"]], -c["open"], -c["opened"], c["client"],
                            c["pid"] or 0))
    return out


# The columns of a connection the report's per-connection terms read.
_TERM_COLUMNS = ("pid, process_start, orig_h, ts, syn_ts, last_activity_ts, mid_stream, protocol,"
                 " streams, trailers, rst_streams, orig_bytes, resp_bytes, tls_records_orig,"
                 " close_kind, preface_ts, established_ts, goaway_ts, close_ts, goaway_sender,"
                 " is_open")


def _client_groups(db: sqlite_utils.Database, where: str, params: list[Any], open_expr: str,
                   start: float, *, by_address: bool = False, index: str | None = None,
                   open_only: bool = False) -> list[dict[str, Any]]:
    """The report's counts per client over the connections ``where`` says, row by row:
    per (pid, process_start, client IP if unattributed), or with ``by_address`` per
    (pid, process_start, orig_h), to be added to the closed connections' totals.
    ``open_only``: ``where`` takes open connections only (open_now is never 0), whose
    closed-only counts (aggregates.CLOSED_ONLY) are 0 without a look.

    Each connection's terms are computed once, a layer at a time (OFFSET 0 keeps SQLite
    from folding the layers into the sums, where hc and left_behind would be computed
    again in each sum that reads them: half the time)."""
    group = "pid, process_start, orig_h" if by_address else "pid, process_start, ip"
    # Per address, the merge counts the addresses (_closed_from_totals).
    addresses = "NULL" if by_address else "COUNT(DISTINCT orig_h)"
    indexed = f" INDEXED BY {index}" if index else ""
    sums = {
        "open": "open_now",
        "open_few_rpcs": f"open_now AND streams <= {FEW_RPCS}",
        "left_behind": "left_behind",
        "left_behind_seen": "left_behind AND NOT mid_stream",
        "left_behind_tls": "left_behind AND NOT mid_stream AND COALESCE(protocol, '') = 'tls'",
        "left_behind_before": "left_behind AND mid_stream",
        "open_tls": "open_now AND COALESCE(protocol, '') = 'tls'",
        "open_in_rpc": (f"open_now AND NOT mid_stream AND COALESCE(protocol, '') <> 'tls'"
                        f" AND {RPC_IN_PROGRESS}"),
        "open_waiting": f"open_now AND {WAITING_FOR_SERVER}",
        "open_before": "open_now AND mid_stream",
        "opened_and_left_open": f"open_now AND mid_stream = 0 AND ts >= {float(start)!r}",
        **aggregates.CLOSED_COUNTS,
    }
    if open_only:
        sums.update(dict.fromkeys(aggregates.CLOSED_ONLY, "0"))
    lowest = {
        "oldest_before_ts": "CASE WHEN open_now AND mid_stream THEN ts END",
        "oldest_open_ts": "CASE WHEN open_now THEN COALESCE(syn_ts, ts) END",
        "first_open_activity": "CASE WHEN open_now THEN COALESCE(last_activity_ts, ts) END",
    }
    highest = {"last_open_activity": "CASE WHEN open_now THEN COALESCE(last_activity_ts, ts) END"}
    terms = ", ".join(f"{e} AS {n}" for n, e in {**sums, **lowest, **highest}.items())
    totals = ",\n               ".join(
        [f"SUM({n}) AS {n}" for n in sums] + [f"MIN({n}) AS {n}" for n in lowest]
        + [f"MAX({n}) AS {n}" for n in highest])
    return _rows(
        db,
        f"""
        SELECT pid, process_start, CASE WHEN pid IS NULL THEN orig_h END AS ip,
               MIN(orig_h) AS client, {addresses} AS addresses,
               {totals}
        FROM (SELECT pid, process_start, orig_h, {terms} FROM (
            SELECT *, {LEFT_BEHIND} AS left_behind FROM (
                SELECT {_TERM_COLUMNS}, {HEALTH_CHECK} AS hc, {CLOSED_BY} AS closed_by,
                       {CLOSED_FIRST_BY} AS closed_first_by, {open_expr} AS open_now
                FROM connections{indexed} WHERE 1{where} LIMIT -1 OFFSET 0
            ) LIMIT -1 OFFSET 0
        ))
        GROUP BY {group}
        """,
        params,
    )


def _client_methods(db: sqlite_utils.Database, where: str, params: list[Any], *,
                    by_address: bool = False, index: str | None = None) -> list[tuple[Any, ...]]:
    """(pid, process_start, ip, method, count) over the connections ``where`` says, the
    most used first (with ``by_address``, the third is orig_h)."""
    ip = "orig_h" if by_address else "CASE WHEN pid IS NULL THEN orig_h END"
    indexed = f" INDEXED BY {index}" if index else ""
    return list(db.execute(
        f"""
        SELECT pid, process_start, {ip} AS ip, m.method AS method, SUM(m.count) AS n
        FROM conn_methods m JOIN connections{indexed} ON connections.uid = m.uid
        WHERE 1{where}
        GROUP BY pid, process_start, ip, m.method
        ORDER BY n DESC, m.method
        """,
        params,
    ).fetchall())


_GROUP_MIN = ("oldest_before_ts", "oldest_open_ts", "first_open_activity")
_GROUP_MAX = ("last_open_activity",)
_GROUP_SUMS = ("open", "open_few_rpcs", "left_behind", "left_behind_seen", "left_behind_tls",
               "left_behind_before", "open_tls", "open_in_rpc", "open_waiting", "open_before",
               "opened_and_left_open", *aggregates.CLOSED_COUNTS)


def _closed_from_totals(
    db: sqlite_utils.Database, where: str, params: list[Any], start: float,
    since: float | None, client: str | None,
) -> tuple[list[dict[str, Any]], dict[tuple[Any, Any, Any], dict[str, int]]]:
    """What _client_groups and _client_methods give over every connection, from the
    closed connections' totals (store.aggregates) and the open connections row by row;
    with ``since``, the closed connections of the minute it falls in row by row too."""
    open_where = where + " AND is_open IS NOT 0"
    parts = _client_groups(db, open_where, params, "is_open", start, by_address=True,
                           index="connections_open", open_only=True)
    method_rows = _client_methods(db, open_where, params, by_address=True,
                                  index="connections_open")
    totals, closed_methods = aggregates.closed_totals(db, since=since, client=client)
    method_rows += closed_methods
    for t in totals:
        address = t["orig_h"]
        part = dict.fromkeys(_GROUP_SUMS, 0) | dict.fromkeys((*_GROUP_MIN, *_GROUP_MAX))
        part.update({name: t[name] for name in aggregates.CLOSED_COUNTS})
        part.update(pid=t["pid"], process_start=t["process_start"], client=address,
                    ip=address if t["pid"] is None else None,
                    addresses=0 if address is None else 1)
        parts.append(part)
    if since is not None:
        edge, edge_params = aggregates.boundary(db, since)
        parts += _client_groups(db, where + edge, params + edge_params, "is_open", start,
                                by_address=True, index="connections_close")
        method_rows += _client_methods(db, where + edge, params + edge_params,
                                       by_address=True, index="connections_close")
    merged: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
    addresses: dict[tuple[Any, Any, Any], set[str]] = {}
    for p in parts:
        key = (p["pid"], p["process_start"], p["ip"])
        row = merged.get(key)
        if p["client"] is not None:
            addresses.setdefault(key, set()).add(p["client"])
        if row is None:
            merged[key] = dict(p)
            continue
        for name in _GROUP_SUMS:
            row[name] = (row[name] or 0) + (p[name] or 0)
        for names, pick in ((_GROUP_MIN, min), (_GROUP_MAX, max), (("client",), min)):
            for name in names:
                values = [v for v in (row[name], p[name]) if v is not None]
                row[name] = pick(values) if values else None
    for key, row in merged.items():
        row["addresses"] = len(addresses.get(key, ()))
    # In the order the row-by-row query groups them (NULL first), as ties are kept.
    rows = [merged[k] for k in sorted(merged, key=lambda k: [(v is not None, v) for v in k])]
    counts: dict[tuple[Any, Any, Any, str], int] = {}
    for pid, process_start, address, method, n in method_rows:
        key4 = (pid, process_start, address if pid is None else None, method)
        counts[key4] = counts.get(key4, 0) + n
    methods: dict[tuple[Any, Any, Any], dict[str, int]] = {}
    for (pid, process_start, ip, method), n in sorted(counts.items(),
                                                       key=lambda kv: (-kv[1], kv[0][3])):
        methods.setdefault((pid, process_start, ip), {})[method] = n
    return rows, methods


_DETAIL_COLUMNS = {"client_user": "user", "client_netns": "netns",
                   "client_container": "container", "client_pod": "pod",
                   "client_cgroup": "cgroup"}


def _socket_details(db: sqlite_utils.Database, where: str, params: list[Any],
                    indexed: bool = False) -> dict[tuple[Any, Any, Any], dict[str, Any]]:
    """Per unattributed client (its address), what the kernel said of most of its client
    sockets: owner user, network namespace, container, pod uid, cgroup (the columns of
    m013_attribution_detail; an older database has none)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(connections)").fetchall()}
    if "client_netns" not in columns:
        return {}
    picks = ", ".join(_DETAIL_COLUMNS)
    out: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
    for r in _rows(
        db,
        f"""
        SELECT orig_h AS ip, {picks}, COUNT(*) AS n
        FROM connections{" INDEXED BY connections_socket_detail" if indexed else ""}
        WHERE pid IS NULL AND client_netns IS NOT NULL{where}
        GROUP BY orig_h, {picks} ORDER BY n DESC, orig_h, {picks}
        """,
        params,
    ):
        key = (None, None, r["ip"])
        if key not in out:  # the most common first
            out[key] = {name: r[column] for column, name in _DETAIL_COLUMNS.items()}
            out[key]["pod_name"] = None
    return out


_HISTORY_COUNTS = ("opened", "closed", "by_client_fin", "by_server_fin", "by_rst", "by_goaway",
                   "by_port_reused", "health_checks", "pre_existing", "rpcs",
                   "closed_by_client", "closed_by_server", "tls_records", "tls_connections")
# What an entry made only of pruned connections has of what only open connections have.
_OPEN_ONLY = ("open", "open_few_rpcs", "opened_and_left_open", "left_behind",
              "left_behind_seen", "left_behind_tls", "left_behind_before", "open_tls",
              "open_before", "open_in_rpc", "open_waiting")


def _add_history(db: sqlite_utils.Database, rows: list[dict[str, Any]],
                 methods: dict[tuple[Any, Any, Any], dict[str, int]],
                 client: str | None) -> None:
    """Add what retention let go (store.retention: client_history) to each client's
    totals, and the clients of whom nothing else is left."""
    where, params = _client_filter(client)
    by_key = {(r["pid"], r["process_start"], r["ip"]): r for r in rows}
    for h in _rows(db, f"SELECT * FROM client_history WHERE 1{where}", params):
        key = (h["pid"], h["process_start"], None if h["pid"] is not None else h["orig_h"])
        row = by_key.get(key)
        if row is None:
            row = by_key[key] = {
                "pid": h["pid"], "process_start": h["process_start"], "ip": key[2],
                "client": h["orig_h"], "addresses": 1, "oldest_open_ts": None,
                "oldest_before_ts": None, "last_open_activity": None,
                "first_open_activity": None, **dict.fromkeys(_OPEN_ONLY, 0),
                **dict.fromkeys(_HISTORY_COUNTS, 0),
            }
            rows.append(row)
        for name in _HISTORY_COUNTS:
            row[name] = (row[name] or 0) + h[name]
    for m in _rows(
        db,
        "SELECT h.pid, h.process_start, h.orig_h, m.method, m.count FROM client_history_methods m"
        f" JOIN client_history h USING (client_key) WHERE 1{_client_filter(client, 'h')[0]}",
        params,
    ):
        key = (m["pid"], m["process_start"], None if m["pid"] is not None else m["orig_h"])
        counts = methods.setdefault(key, {})
        counts[m["method"]] = counts.get(m["method"], 0) + m["count"]
    for key, counts in methods.items():
        methods[key] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


MAX_TIMEOUT_MOMENTS = 10


def _latency_percentiles(db: sqlite_utils.Database) -> tuple[float | None, float | None, int]:
    """p50 and p99 of every preface latency (ms, as _percentile picks them: the value at
    rank round(q * (n - 1)) of the sorted latencies, negatives as 0) and how many,
    through the index of the latencies: three walks of an index, no table row read."""
    answered = "preface_ts IS NOT NULL AND server_settings_ts IS NOT NULL"
    source = f"connections INDEXED BY connections_latency WHERE {answered}"
    n = db.execute(f"SELECT COUNT(*) FROM {source}").fetchone()[0]
    picked: list[float | None] = []
    for q in (0.5, 0.99):
        if not n:
            picked.append(None)
            continue
        rank = min(n - 1, max(0, round(q * (n - 1))))
        value = db.execute(
            f"SELECT server_settings_ts - preface_ts FROM {source}"
            f" ORDER BY server_settings_ts - preface_ts LIMIT 1 OFFSET {int(rank)}").fetchone()[0]
        picked.append(max(0.0, value) * 1000.0)
    return picked[0], picked[1], int(n)


def _server_counts(db: sqlite_utils.Database, window: str, params: list[Any],
                   since: float | None) -> tuple[int, int, int]:
    """Refused connections, client resets and server resets in the window: the closed
    connections' totals (with ``since``, of the minutes after its own, and that minute's
    closed connections row by row) and the open ones row by row."""
    sums = ", ".join(f"COALESCE(SUM({e}), 0)" for e in aggregates.SERVER_COUNTS.values())
    parts = [db.execute(f"SELECT {sums} FROM connections INDEXED BY connections_open"
                        f" WHERE is_open IS NOT 0{window}", params).fetchone()]
    totals = ", ".join(f"COALESCE(SUM({c}), 0)" for c in aggregates.SERVER_COUNTS)
    if since is None:
        parts.append(db.execute(f"SELECT {totals} FROM {aggregates.TOTALS}").fetchone())
    else:
        parts.append(db.execute(
            f"SELECT {totals} FROM {aggregates.MINUTES}"
            f" WHERE minute > CAST(? / {aggregates.BUCKET_S} AS INTEGER)", [since]).fetchone())
        edge, edge_params = aggregates.boundary(db, since)
        parts.append(db.execute(f"SELECT {sums} FROM connections INDEXED BY connections_close"
                                f" WHERE 1{window}{edge}", params + edge_params).fetchone())
    refused, client_rst, server_rst = (sum(int(p[i]) for p in parts) for i in range(3))
    return refused, client_rst, server_rst


def server_health(db: sqlite_utils.Database, *, preface_timeout: float = DEFAULT_PREFACE_TIMEOUT,
                  since: float | None = None, until: float | None = None,
                  totals: bool = True) -> dict[str, Any]:
    """Preface latency and timeouts, GOAWAYs, resets, refusals, over the window; and when
    the server runs on this host (the live agent sampled it: store.server), its process,
    descriptors against RLIMIT_NOFILE, accept queue, and one line saying why it stopped
    answering (None everywhere when no listener was seen: nothing is guessed).

    Read through the indexes and totals of store.aggregates where the database has them
    and the window has no ``until`` (``totals=False``: every row, the same answer)."""
    end = until if until is not None else (capture_summary(db)["last_ts"] or 0.0)
    fast = totals and until is None and aggregates.present(db)
    cut = None if fast and aggregates.takes_everything(db, since) else since
    window, params = "", []
    if until is not None:
        window += " AND ts <= ?"
        params.append(until)
    if cut is not None:
        window += " AND (close_ts IS NULL OR close_ts >= ?)"
        params.append(cut)
    answered = "preface_ts IS NOT NULL AND server_settings_ts IS NOT NULL"
    if fast and cut is None:
        p50, p99, samples = _latency_percentiles(db)
    else:
        # With a window of the fast kind, the close_ts index holds every column read.
        indexed = " INDEXED BY connections_close" if fast else ""
        cur = db.execute(f"SELECT server_settings_ts - preface_ts FROM connections{indexed}"
                         f" WHERE {answered}{window}", params)
        if fast:
            # Sorted once, the two ranks picked, then made ms: the same values (the
            # change to ms keeps the order), without a second sort.
            raw = sorted(r[0] for r in cur)
            p50, p99 = (None if v is None else max(0.0, v) * 1000.0
                        for v in (_percentile(raw, 0.5, presorted=True),
                                  _percentile(raw, 0.99, presorted=True)))
            samples = len(raw)
        else:
            latencies = [max(0.0, r[0]) * 1000.0 for r in cur]
            p50, p99, samples = _percentile(latencies, 0.5), _percentile(latencies, 0.99), \
                len(latencies)
    # Clients that sent the preface and got no server SETTINGS in time: what grpc-go
    # reports as "failed to receive server preface within timeout".
    timed_out = preface_timed_out(preface_timeout, end)
    if fast and preface_timeout >= aggregates.SLOW_PREFACE_S:
        timed_out = (f"{aggregates.SLOW_PREFACE} AND {timed_out}")
        source = "connections INDEXED BY connections_slow_preface"
    else:
        source = "connections"
    timeout_rows = _rows(
        db,
        f"SELECT uid, orig_h, pid, COALESCE(syn_ts, ts) AS dial_ts FROM {source}"
        f" WHERE {timed_out}{window} ORDER BY dial_ts, rowid",
        params,
    )
    moments = []
    if timeout_rows:
        picks = timeout_rows[:: max(1, len(timeout_rows) // MAX_TIMEOUT_MOMENTS)]
        for row in picks[:MAX_TIMEOUT_MOMENTS]:
            t = row["dial_ts"] + preface_timeout
            held = _rows(
                db,
                "SELECT COALESCE('pid ' || pid, orig_h) AS who, COUNT(*) AS n FROM connections"
                " WHERE ts <= ? AND (close_ts IS NULL OR close_ts > ?) GROUP BY who"
                " ORDER BY n DESC",
                [t, t],
            )
            moments.append({
                "ts": round(t, 6), "client": row["orig_h"], "pid": row["pid"],
                "server_open_connections": sum(h["n"] for h in held),
                "top_clients": {h["who"]: h["n"] for h in held[:3]},
            })
    goaways = {"server": 0, "client": 0}
    by_code: dict[str, int] = {}
    for direction, code, n in db.execute(
        "SELECT dir, code, COUNT(*) FROM events WHERE name = 'goaway'"
        + (" AND ts <= ?" if until is not None else "")
        + (" AND ts >= ?" if since is not None else "")
        + " GROUP BY dir, code",
        [x for x in (until, since) if x is not None],
    ):
        side = "server" if direction == "resp" else "client"
        goaways[side] += n
        key = f"{side}:{error_name(code)}"
        by_code[key] = by_code.get(key, 0) + n
    if fast:
        refused, client_rst, server_rst = _server_counts(db, window, params, cut)
        resets = {"client_rst": client_rst, "server_rst": server_rst}
    else:
        refused = db.execute(
            f"SELECT COUNT(*) FROM connections WHERE conn_state IN ('REJ', 'RSTOS0'){window}",
            params).fetchone()[0]
        resets = dict(db.execute(
            "SELECT close_kind, COUNT(*) FROM connections"
            f" WHERE close_kind IN ('client_rst', 'server_rst'){window} GROUP BY close_kind",
            params).fetchall())
    from store import server as local_server

    state = local_server.summary(db, since, until)
    stall: dict[str, Any] | None = None
    explanation = None
    if state is not None:
        dials = local_server.stall_timeouts(state["stall"], [r["dial_ts"] for r in timeout_rows])
        holder = None
        if state["stall"] is not None:
            stall = {k: v for k, v in state["stall"].items() if k != "spans"}
            stall["preface_timeouts"] = len(dials)
            # Who held the most connections (each one of the server's descriptors) when
            # the first of those clients dialled, or when the stall began.
            held = local_server.holders_at(db, dials[0] if dials else stall["since"], 1)
            holder = held[0] if held else None
            stall["top_client"] = {k: holder[k] for k in ("client", "pid", "process", "open")} \
                if holder else None
        explanation = local_server.explain(state, len(timeout_rows), len(dials), holder)
    return {
        "preface_timeouts": len(timeout_rows),
        "preface_timeout_s": preface_timeout,
        "preface_timeout_moments": moments,
        "preface_latency_ms": {
            "p50": round(p50, 3) if p50 is not None else None,
            "p99": round(p99, 3) if p99 is not None else None,
            "samples": samples,
        },
        "goaways": goaways,
        "goaways_by_code": by_code,
        "resets": {"client": resets.get("client_rst", 0), "server": resets.get("server_rst", 0)},
        "refused": refused,
        "process": state["process"] if state else None,
        "accept_queue": state["accept_queue"] if state else None,
        "stall": stall,
        "explanation": explanation,
    }


def merged_processes(db: sqlite_utils.Database) -> dict[tuple[Any, Any], dict[str, Any]]:
    """(pid, start time) -> a remote process another host's agent named (`tracer merge`,
    migration m017_merged_clients; empty without it)."""
    if not _has_table(db, "merged_processes"):
        return {}
    return {(r["pid"], r["start_time"]): r
            for r in _rows(db, "SELECT * FROM merged_processes ORDER BY host")}


def _timeline_who(db: sqlite_utils.Database) -> str:
    """Who a connection belongs to in the timeline, as three columns: its process (pid and
    start time, as the report names one) where attributed, else its address; and the host
    whose agent named it where that was another host's (`tracer merge`)."""
    host = ("CASE WHEN attribution = 'merged' THEN (SELECT m.host FROM merged_clients m"
            " WHERE m.uid = connections.uid) END" if _has_table(db, "merged_clients")
            else "NULL")
    return (f"pid, CASE WHEN pid IS NULL THEN orig_h END, CASE WHEN pid IS NOT NULL THEN"
            f" process_start END, {host}")


def _fingerprint(db: sqlite_utils.Database) -> str:
    """Changes whenever the data a report reads changes (runs, imports, attribution)."""
    caps = db.execute(
        "SELECT COUNT(*), MAX(id), MAX(finished_at), SUM(status = 'running') FROM captures"
    ).fetchone()
    rows = db.execute("SELECT MAX(rowid), COUNT(*) FROM connections").fetchone()
    procs = db.execute("SELECT COUNT(*) FROM processes").fetchone()
    logs: list[Any] = []
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'log_lines'").fetchone():
        logs = list(db.execute("SELECT MAX(id), COUNT(*) FROM log_lines").fetchone())
    # A merge changes who the connections are (their pid), not their number.
    merged: list[Any] = []
    if _has_table(db, "merged_clients"):
        merged = list(db.execute("SELECT COUNT(*), MAX(merged_at) FROM merged_clients").fetchone())
    return json.dumps([list(caps), list(rows), list(procs), logs] + ([merged] if merged else []))


def report_fingerprint(db: sqlite_utils.Database, preface_timeout: float) -> str:
    """What a stored full report was computed from (store.stored_report keeps it)."""
    return _fingerprint(db) + f"|{preface_timeout!r}"


def stored_report(db: sqlite_utils.Database, fingerprint: str) -> dict[str, Any] | None:
    """The stored full report if it was computed from the data as it is now (never while
    a capture runs: its data changes continuously); reads only."""
    running = db.execute("SELECT COUNT(*) FROM captures WHERE status = 'running'").fetchone()
    has_cache = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'report_cache'"
    ).fetchone()
    row = db.execute("SELECT fingerprint, report FROM report_cache").fetchone() \
        if has_cache else None
    if row is None or row[0] != fingerprint or running[0]:
        return None
    # Compressed JSON (store.stored_report), or the JSON text earlier versions stored.
    kept = row[1]
    cached: dict[str, Any] = json.loads(zlib.decompress(kept) if isinstance(kept, bytes)
                                        else kept)
    return cached


def report(db: sqlite_utils.Database, *, preface_timeout: float = DEFAULT_PREFACE_TIMEOUT,
           since: float | None = None, until: float | None = None,
           client: str | None = None, cache: bool = True,
           totals: bool = True) -> dict[str, Any]:
    """The whole report, as DESIGN.md's JSON contract. It only reads.

    The full report (no window, no client filter) is kept in the database with a
    fingerprint of the data it was computed from, and served from there until the data
    changes. Only the writer side stores it (store.stored_report: the capture runs at
    their end, `tracer logs add/remove`, `tracer prune`; the report_cache table comes with
    migration m005_report_cache); here it is only read. Computed afresh, the closed
    connections come from their clients' totals (store.aggregates) where the database
    has them; ``totals=False`` reads every row (the same report, slower)."""
    if cache and since is None and until is None and not client:
        cached = stored_report(db, report_fingerprint(db, preface_timeout))
        if cached is not None:
            return cached
    data = {
        "capture": capture_summary(db),
        "clients": client_report(db, since=since, until=until, client=client, totals=totals),
        "server": server_health(db, preface_timeout=preface_timeout, since=since, until=until,
                                totals=totals),
    }
    if has_logs(db):
        data["log_evidence"] = log_evidence(db, since=since, until=until,
                                            preface_timeout=preface_timeout)
    return data


def connection_columns(db: sqlite_utils.Database) -> list[str]:
    """The connections table's columns as tracer.record.COLUMNS declares them, in its order:
    all of them, but for those of a migration a reader can do without that this database
    lacks (store.schema.READER_OPTIONAL; opening it checked the others are there)."""
    present = {row[1] for row in db.execute("PRAGMA table_info(connections)").fetchall()}
    return [c.name for c in COLUMNS if c.name in present]


def connections(db: sqlite_utils.Database, *, open_only: bool = False,
                client: str | None = None, state: str | None = None,
                limit: int | None = None, since: float | None = None,
                until: float | None = None) -> list[dict[str, Any]]:
    """The stored connections in the order they opened. ``client``: an address or a pid;
    ``since``: those that existed from then on (open then, or opened later); ``until``:
    those opened up to then."""
    where = []
    params: list[Any] = []
    if open_only:
        where.append("is_open = 1")
    if client:
        condition, values = _client_filter(client)
        where.append(condition.removeprefix(" AND "))
        params += values
    if since is not None:
        where.append("(is_open = 1 OR end_ts >= ?)")
        params.append(since)
    if until is not None:
        where.append("ts <= ?")
        params.append(until)
    if state:
        where.append("conn_state = ?")
        params.append(state)
    sql = f"SELECT {', '.join(connection_columns(db))} FROM connections"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ts, uid"
    if limit:
        sql += f" LIMIT {int(limit)}"
    rows = _rows(db, sql, params)
    hosts = dict(db.execute(
        "SELECT uid, host FROM merged_clients WHERE uid IN (SELECT value FROM json_each(?))",
        [json.dumps([r["uid"] for r in rows if r.get("attribution") == "merged"])]).fetchall()) \
        if _has_table(db, "merged_clients") else {}
    for r in rows:
        if r["uid"] in hosts:
            r["host"] = hosts[r["uid"]]  # the client host whose agent named its process
        r["goaway_error_name"] = error_name(r["goaway_error"]) if r["goaway_error"] is not None \
            else None
    return rows


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)


def _timeline_client(db: sqlite_utils.Database, key: tuple[Any, ...],
                     series: list[int]) -> dict[str, Any]:
    pid, address, start, host = key
    process = None
    if pid is not None:
        row = db.execute("SELECT cmdline, comm FROM processes WHERE pid = ? AND start_time = ?",
                         [pid, start]).fetchone()
        if row is None and host is not None and _has_table(db, "merged_processes"):
            row = db.execute("SELECT cmdline, comm FROM merged_processes WHERE pid = ?"
                             " AND start_time = ? AND host = ?", [pid, start, host]).fetchone()
        process = (row[0] or row[1]) if row else None
    label = (f"pid {pid}" + (f" on {host}" if host else "")) if pid is not None else address
    return {"label": label, "pid": pid, "process_start": start, "address": address,
            "host": host, "process": process, "open": series}


def timeline(db: sqlite_utils.Database, *, bucket: float, client: str | None = None,
             since: float | None = None, until: float | None = None,
             preface_timeout: float = DEFAULT_PREFACE_TIMEOUT) -> dict[str, Any]:
    """Open connections per client at the end of each bucket, with the preface timeouts and
    GOAWAYs that happened in it. Two grouped scans and a running sum: fine for millions."""
    summary = capture_summary(db)
    first = since if since is not None else summary["first_ts"]
    last = until if until is not None else summary["last_ts"]
    if first is None or last is None:
        return {"bucket_s": bucket, "start": None, "times": [], "clients": [], "markers": {},
                "server": None}
    n = max(1, int((last - first) // bucket) + 1)
    where, params = _client_filter(client)
    who = _timeline_who(db)

    def index(column: str) -> str:
        # bucket 0 holds everything before the start: open connections carried in
        return f"MAX(0, MIN({n - 1}, CAST(({column} - {first!r}) / {bucket!r} AS INTEGER)))"

    deltas: dict[tuple[Any, ...], list[int]] = {}
    for *key, i, change in db.execute(
        f"SELECT {who}, {index('COALESCE(syn_ts, ts)')}, COUNT(*) FROM connections"
        f" WHERE ts <= {last!r}{where} GROUP BY 1, 2, 3, 4, 5", params
    ):
        deltas.setdefault(tuple(key), [0] * n)[i] += change
    for *key, i, change in db.execute(
        f"SELECT {who}, {index('close_ts')}, COUNT(*) FROM connections"
        f" WHERE close_ts IS NOT NULL AND close_ts <= {last!r}{where} GROUP BY 1, 2, 3, 4, 5",
        params
    ):
        deltas.setdefault(tuple(key), [0] * n)[i] -= change
    clients = [_timeline_client(db, key, list(accumulate(d))) for key, d in deltas.items()]
    clients.sort(key=lambda c: (-max(c["open"], default=0), c["label"]))
    markers: dict[str, list[Any]] = {"preface_timeouts": [0] * n, "goaways_server": [0] * n,
                                     "goaways_client": [0] * n}
    for i, count in db.execute(
        f"SELECT {index('COALESCE(syn_ts, ts) + ' + repr(preface_timeout))}, COUNT(*)"
        f" FROM connections WHERE {preface_timed_out(preface_timeout, last)}{where}"
        f" GROUP BY 1", params
    ):
        markers["preface_timeouts"][i] += count
    # Preface latency (client preface to server SETTINGS) per bucket: p50 and p99.
    latencies: list[list[float]] = [[] for _ in range(n)]
    for i, latency in db.execute(
        f"SELECT {index('preface_ts')}, server_settings_ts - preface_ts FROM connections"
        f" WHERE preface_ts IS NOT NULL AND server_settings_ts IS NOT NULL"
        f" AND preface_ts <= {last!r}{where}", params
    ):
        latencies[i].append(max(0.0, latency) * 1000.0)
    p50s = [_percentile(v, 0.5) for v in latencies]
    p99s = [_percentile(v, 0.99) for v in latencies]
    markers["preface_p50_ms"] = [round(v, 3) if v is not None else None for v in p50s]
    markers["preface_p99_ms"] = [round(v, 3) if v is not None else None for v in p99s]
    joined, _ = _client_filter(client, "c")
    for direction, i, count in db.execute(
        f"SELECT e.dir, {index('e.ts')}, COUNT(*) FROM events e"
        f" JOIN connections c ON c.uid = e.uid WHERE e.name = 'goaway'"
        f" AND e.ts <= {last!r}{joined} GROUP BY 1, 2", params
    ):
        markers["goaways_server" if direction == "resp" else "goaways_client"][i] += count
    from store import server as local_server

    return {
        "bucket_s": bucket,
        "start": first,
        "times": [first + (i + 1) * bucket for i in range(n)],
        # One entry per client, the most connections open first: "pid" and
        # "process_start" (a process, as the report names it) or "address" (unattributed),
        # "host" where another host's agent named it, "process" its command line, "label"
        # what the table's column says, and "open": connections open at each bucket's end.
        "clients": clients,
        "markers": markers,
        # The server process on this host (sampled by the live agent), per bucket: the most
        # descriptors it held and its limit, its accept queue and the queue's maximum;
        # None when no listener was seen on this host.
        "server": local_server.series(db, first, bucket, n),
    }
