"""Log lines lined up with connections: what a client said, and what the wire showed then.

``correlate`` takes the log lines that match a pattern and, for each, finds the
connections of the same process (the line's pid, attributed live) or of an address the
line mentions (a client's own ip:port exactly; the server's ip:port within the window),
and the server's state at that moment: the connections it held open and whose, the
preface latency around it, and how many clients were still waiting for its SETTINGS.
``log_evidence`` groups the matching lines into episodes (one process or log, no pause
longer than EPISODE_GAP_S) for the report's one-line summaries.

Pure SQL plus one regular-expression function registered on the connection; no printing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import sqlite_utils

from store.sql import DEFAULT_PREFACE_TIMEOUT, preface_timed_out
from store.sql import percentile as _percentile
from store.sql import rows as _rows

# What gRPC clients and servers print when connections go wrong, in their own words:
# grpc-go ("failed to receive server preface within timeout", "context deadline
# exceeded"), gRPC C-core / grpcio ("connection attempt timed out before receiving SETTINGS
# frame", "failed to connect to all addresses", "Deadline Exceeded"), grpc-js ("Failed to
# connect before the deadline", "No connection established", "Deadline exceeded after"),
# and the socket errors underneath.
# Most specific first: a line that says several of these is named by the first.
DEFAULT_PHRASES = (
    r"failed to receive server preface(?: within timeout)?",
    r"timed out before receiving SETTINGS frame",
    r"failed to connect to all addresses",
    r"failed to connect before the deadline",
    r"no connection established",
    r"deadline[ _]exceeded",
    r"connection refused",
    r"connection reset by peer",
    r"too many open files",
    r"transport is closing",
    r"i/o timeout",
    r"\bUNAVAILABLE\b",
)
DEFAULT_PATTERN = "(?i)" + "|".join(DEFAULT_PHRASES)
QUIET_LEVELS = ("debug", "info")  # lines the default pattern never takes
_DEFAULT_ORDER = tuple(re.compile("(?i)" + p) for p in DEFAULT_PHRASES)

DEFAULT_WINDOW_S = 5.0
EPISODE_GAP_S = 60.0
MAX_EPISODES = 10
MAX_TRACKED_EPISODES = 100_000
MAX_CONNECTIONS_PER_LINE = 20
MAX_PHRASE = 80
MAX_MESSAGE = 300


class PatternError(ValueError):
    """The --pattern is not a regular expression."""


def compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise PatternError(f"{pattern!r} is not a regular expression: {exc}") from None


def has_logs(db: sqlite_utils.Database) -> bool:
    return bool(db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'log_lines'"
    ).fetchone()) and bool(db.execute("SELECT 1 FROM log_lines LIMIT 1").fetchone())


def _matcher(db: sqlite_utils.Database, regex: re.Pattern[str]) -> str:
    """Register tracer_match(text) -> the matched text or NULL; returns its name. With the
    default pattern the phrase is the most specific one the line says, not the leftmost
    ("UNAVAILABLE: ... timed out before receiving SETTINGS frame" is the latter)."""
    search = regex.search
    ordered = _DEFAULT_ORDER if regex.pattern == DEFAULT_PATTERN else ()

    def match(text: str | None) -> str | None:
        if text is None:
            return None
        m = search(text)
        if m is None:
            return None
        for phrase in ordered:
            best = phrase.search(text)
            if best is not None:
                return best.group(0)
        return m.group(0)

    db.conn.create_function("tracer_match", 1, match, deterministic=True)
    return "tracer_match"


def _matching_lines(db: sqlite_utils.Database, regex: re.Pattern[str], *,
                    since: float | None, until: float | None, source: str | None,
                    pid: int | None) -> Iterator[dict[str, Any]]:
    """Every timed, parsed line that matches, oldest first, streamed from the database."""
    fn = _matcher(db, regex)
    where = ["l.reason IS NULL", "l.ts IS NOT NULL"]
    params: list[Any] = []
    if since is not None:
        where.append("l.ts >= ?")
        params.append(since)
    if until is not None:
        where.append("l.ts <= ?")
        params.append(until)
    if source:
        where.append("s.name = ?")
        params.append(source)
    if pid is not None:
        where.append("l.pid = ?")
        params.append(pid)
    if regex.pattern == DEFAULT_PATTERN:
        # The default phrases name failures; at debug or info level they are a normal
        # life's words (grpc-go logs "transport is closing" at INFO at every close).
        where.append(f"COALESCE(l.level, '') NOT IN ({', '.join(map(repr, QUIET_LEVELS))})")
    cur = db.conn.cursor()
    cur.execute(
        f"SELECT l.id, l.ts, l.level, l.pid, l.process, l.message, s.name,"
        f" {fn}(l.message) AS phrase"
        f" FROM log_lines l JOIN log_sources s ON s.id = l.source_id"
        f" WHERE {' AND '.join(where)} AND phrase IS NOT NULL ORDER BY l.ts, l.id",
        params,
    )
    names = ("id", "ts", "level", "pid", "process", "message", "source", "phrase")
    for row in cur:
        yield dict(zip(names, row, strict=True))


def _untimed_matches(db: sqlite_utils.Database, regex: re.Pattern[str],
                     source: str | None) -> int:
    """Matching lines without a time (kept unparsed): they cannot be lined up."""
    fn = _matcher(db, regex)
    where = ["(l.reason IS NOT NULL OR l.ts IS NULL)"]
    params: list[Any] = []
    if source:
        where.append("s.name = ?")
        params.append(source)
    return int(db.execute(
        f"SELECT COUNT(*) FROM log_lines l JOIN log_sources s ON s.id = l.source_id"
        f" WHERE {' AND '.join(where)} AND {fn}(l.message) IS NOT NULL", params
    ).fetchone()[0])


def _process_names(db: sqlite_utils.Database) -> dict[int, list[dict[str, Any]]]:
    """pid -> the processes that had it (pids are reused), from attribution."""
    out: dict[int, list[dict[str, Any]]] = {}
    for r in _rows(db, "SELECT pid, start_time, comm, cmdline FROM processes ORDER BY start_time"):
        out.setdefault(r["pid"], []).append(r)
    return out


def _process_at(procs: dict[int, list[dict[str, Any]]], pid: int | None,
                t: float) -> dict[str, Any] | None:
    """The process that had ``pid`` at ``t``: the latest started at or before it."""
    best = None
    for p in procs.get(pid, []) if pid is not None else []:
        if p["start_time"] <= t + 1.0:  # start times are known to ~10 ms; be lenient
            best = p
    return best


def _who(pid: int | None, ip: str | None, procs: dict[int, list[dict[str, Any]]],
         t: float) -> str:
    if pid is None:
        return str(ip)
    proc = _process_at(procs, pid, t)
    name = (proc["comm"] or proc["cmdline"] or "") if proc else ""
    return f"pid {pid} {name}".rstrip()


MOMENTS_PER_SCAN = 32


class ServerState:
    """The server's state at moments (to 0.1 s; a burst of lines shares one).

    ``prepare`` computes many moments in one pass over the connections: each moment is a
    handful of aggregate expressions in the same grouped scan, so 50 log lines on a
    million connections cost about one scan, not fifty. Preface latencies around a moment
    come from the preface_ts index."""

    def __init__(self, db: sqlite_utils.Database, window: float,
                 procs: dict[int, list[dict[str, Any]]]) -> None:
        self.db = db
        self.window = window
        self.procs = procs
        self.cache: dict[float, dict[str, Any]] = {}
        spans = db.execute("SELECT MIN(first_ts), MAX(last_ts) FROM captures").fetchone()
        self.first: float | None = spans[0] if spans else None
        self.last: float | None = spans[1] if spans else None

    def at(self, t: float) -> dict[str, Any]:
        key = round(t, 1)
        if key not in self.cache:
            self.prepare([key])
        return self.cache[key]

    def prepare(self, moments: list[float]) -> None:
        todo = sorted({round(t, 1) for t in moments} - set(self.cache))
        for i in range(0, len(todo), MOMENTS_PER_SCAN):
            self._scan(todo[i:i + MOMENTS_PER_SCAN])

    def _scan(self, moments: list[float]) -> None:
        columns = []
        for m in moments:
            opened = f"(ts <= {m!r} AND (close_ts IS NULL OR close_ts > {m!r}))"
            columns.append(f"SUM({opened})")
            columns.append(
                f"SUM({opened} AND preface_ts <= {m!r}"
                f" AND (server_settings_ts IS NULL OR server_settings_ts > {m!r}))")
            columns.append(
                f"MIN(CASE WHEN {opened} AND preface_ts <= {m!r} AND (server_settings_ts"
                f" IS NULL OR server_settings_ts > {m!r}) THEN preface_ts END)")
        last = max(moments)
        rows = self.db.execute(
            f"SELECT pid, MIN(orig_h), {', '.join(columns)} FROM connections"
            f" WHERE ts <= {last!r} AND (close_ts IS NULL OR close_ts > {min(moments)!r})"
            f" GROUP BY pid, process_start, CASE WHEN pid IS NULL THEN orig_h END"
        ).fetchall()
        for k, m in enumerate(moments):
            base = 2 + 3 * k
            held = [(r[base] or 0, r[0], r[1]) for r in rows if r[base]]
            held.sort(key=lambda h: -h[0])
            waits = [r[base + 2] for r in rows if r[base + 2] is not None]
            latencies = [
                max(0.0, r[0]) * 1000.0 for r in self.db.execute(
                    "SELECT server_settings_ts - preface_ts FROM connections WHERE preface_ts"
                    " BETWEEN ? AND ? AND server_settings_ts IS NOT NULL",
                    [m - self.window, m + self.window],
                )
            ]
            p50 = _percentile(latencies, 0.5)
            p99 = _percentile(latencies, 0.99)
            self.cache[m] = {
                "in_capture": (self.first is not None and self.last is not None
                               and self.first - self.window <= m <= self.last + self.window),
                **self._before_capture(m),
                "open_connections": sum(h[0] for h in held),
                "top_clients": [{"client": _who(pid, ip, self.procs, m), "open": n}
                                for n, pid, ip in held[:3]],
                "preface_latency_ms": {"p50": round(p50, 3) if p50 is not None else None,
                                       "p99": round(p99, 3) if p99 is not None else None,
                                       "samples": len(latencies)},
                "waiting_for_server_preface": sum(r[base + 1] or 0 for r in rows),
                "longest_wait_s": round(m - min(waits), 3) if waits else None,
            }


    def _before_capture(self, m: float) -> dict[str, Any]:
        """For a moment before a capture began: what its start found open (the socket
        table read then), which is all that is known of the server at that moment."""
        if self.first is None or m >= self.first:
            return {}
        nxt = self.db.execute(
            "SELECT id, first_ts FROM captures WHERE first_ts > ? ORDER BY first_ts LIMIT 1",
            [m]).fetchone()
        if nxt is None:
            return {}
        held = self.db.execute(
            "SELECT COUNT(*) AS n, pid, MIN(orig_h) FROM connections WHERE capture_id = ?"
            " AND from_snapshot = 1 GROUP BY pid, process_start,"
            " CASE WHEN pid IS NULL THEN orig_h END ORDER BY n DESC", [nxt[0]]).fetchall()
        return {"capture_began_after_s": round(nxt[1] - m, 3),
                "open_at_capture_start": sum(h[0] for h in held),
                "top_clients_at_capture_start": [
                    {"client": _who(pid, ip, self.procs, nxt[1]), "open": n}
                    for n, pid, ip in held[:3]]}


_CONNECTION_SQL = (
    "SELECT uid, ts, close_ts, orig_h, orig_p, resp_h, resp_p, pid, conn_state, close_kind,"
    " preface_ts, server_settings_ts, streams, mid_stream, from_snapshot FROM connections"
)


def _situation(c: dict[str, Any], t: float) -> str:
    """A connection's state at ``t``, in words."""
    if c["ts"] > t:
        if c["from_snapshot"]:
            return (f"open when the capture began {c['ts'] - t:.1f}s after (opened then or "
                    "before: not seen)")
        return f"opened {c['ts'] - t:.1f}s after"
    closed = c["close_ts"] is not None and c["close_ts"] <= t
    if c["preface_ts"] is None and c["mid_stream"]:
        # Its start was never seen: no preface to see, and its RPCs count from then on.
        rpcs = f"{c['streams']} RPC{'s' if c['streams'] != 1 else ''} seen"
        http2 = ("open before the capture (in the socket table at its start), " if
                 c["from_snapshot"] else "picked up mid-stream, ") + rpcs
    elif c["preface_ts"] is None:
        http2 = "no HTTP/2 preface"
    elif c["server_settings_ts"] is None or c["server_settings_ts"] > t:
        since = (c["close_ts"] if closed else t) - c["preface_ts"]
        # (a preface sent after the line's moment: none expected yet, 0.0s, never -0.0s)
        http2 = f"no server preface after {max(0.0, since):.1f}s"
    else:
        latency = (c["server_settings_ts"] - c["preface_ts"]) * 1000
        # A server may send its SETTINGS before the client's preface arrives (grpc does).
        http2 = (f"server preface in {latency:.1f} ms" if latency >= 0
                 else f"server preface first ({-latency:.1f} ms before the client's)")
    if closed:
        return f"closed {t - c['close_ts']:.1f}s before ({c['close_kind'] or 'closed'}), {http2}"
    return f"open {t - c['ts']:.1f}s, {http2}"


def _related(db: sqlite_utils.Database, line: dict[str, Any], addresses: list[tuple[str, int]],
             window: float, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The connections of the line's process and addresses that existed around it."""
    t = line["ts"]
    lo, hi = t - window, t + window
    alive = "ts <= ? AND (close_ts IS NULL OR close_ts >= ?)"
    found: dict[str, dict[str, Any]] = {}

    def take(rows: list[dict[str, Any]], why: str) -> None:
        for r in rows:
            entry = found.setdefault(r["uid"], r)
            entry.setdefault("why", [])
            if why not in entry["why"]:
                entry["why"].append(why)

    for ip, port in addresses:
        take(_rows(db, f"{_CONNECTION_SQL} WHERE orig_h = ? AND orig_p = ?", [ip, port]),
             "client address")
    if line["pid"] is not None:
        # A log line's pid is of this host: never another host's process (`tracer merge`).
        take(_rows(db, f"{_CONNECTION_SQL} WHERE pid = ? AND attribution IS NOT 'merged'"
                       f" AND {alive}", [line["pid"], hi, lo]),
             "same pid")
    for ip, port in addresses:
        take(_rows(db, f"{_CONNECTION_SQL} WHERE resp_h = ? AND resp_p = ? AND {alive}"
                       f" AND (close_ts BETWEEN ? AND ? OR ts BETWEEN ? AND ?)",
                   [ip, port, hi, lo, lo, hi, lo, hi]),
             "server address")
    rank = {"client address": 0, "same pid": 1, "server address": 2}

    def order(c: dict[str, Any]) -> tuple[int, float]:
        edge = c["close_ts"] if c["close_ts"] is not None else c["ts"]
        return (min(rank[w] for w in c["why"]), abs(edge - t))

    rows = sorted(found.values(), key=order)
    for c in rows[:limit]:
        c["at_line"] = _situation(c, t)
    return rows[:limit], len(rows)


def _addresses(db: sqlite_utils.Database, line_ids: list[int]) -> dict[int, list[tuple[str, int]]]:
    out: dict[int, list[tuple[str, int]]] = {}
    for i in range(0, len(line_ids), 500):
        chunk = line_ids[i:i + 500]
        for line_id, ip, port in db.execute(
            f"SELECT line_id, ip, port FROM log_addresses WHERE line_id IN"
            f" ({','.join('?' * len(chunk))})", chunk
        ):
            out.setdefault(line_id, []).append((ip, port))
    return out


def correlate(db: sqlite_utils.Database, *, pattern: str = DEFAULT_PATTERN,
              window: float = DEFAULT_WINDOW_S, since: float | None = None,
              until: float | None = None, source: str | None = None, pid: int | None = None,
              limit: int = 50) -> dict[str, Any]:
    """For each matching log line (the first ``limit``), its connections and the server's
    state then."""
    regex = compile_pattern(pattern)
    out: dict[str, Any] = {"pattern": pattern, "window_s": window, "matched": 0,
                           "matched_untimed": 0, "lines": []}
    if not has_logs(db):
        out["note"] = "no log lines in this database: add some with `tracer logs add`"
        return out
    shown: list[dict[str, Any]] = []
    matched = 0
    for line in _matching_lines(db, regex, since=since, until=until, source=source, pid=pid):
        matched += 1
        if len(shown) < limit:
            shown.append(line)
    out["matched"] = matched
    out["matched_untimed"] = _untimed_matches(db, regex, source)
    addresses = _addresses(db, [line["id"] for line in shown])
    procs = _process_names(db)
    state = ServerState(db, window, procs)
    state.prepare([line["ts"] for line in shown])
    for line in shown:
        conns, total = _related(db, line, addresses.get(line["id"], []), window,
                                MAX_CONNECTIONS_PER_LINE)
        proc = _process_at(procs, line["pid"], line["ts"])
        out["lines"].append({
            "ts": line["ts"], "source": line["source"], "level": line["level"],
            "pid": line["pid"],
            "process": line["process"] or (proc["comm"] if proc else None),
            "message": line["message"][:MAX_MESSAGE],
            "match": line["phrase"][:MAX_PHRASE],
            "addresses": [f"{ip}:{port}" if ":" not in ip else f"[{ip}]:{port}"
                          for ip, port in addresses.get(line["id"], [])],
            "server": state.at(line["ts"]),
            "connections": conns,
            "connections_total": total,
        })
    return out


def log_evidence(db: sqlite_utils.Database, *, pattern: str = DEFAULT_PATTERN,
                 since: float | None = None, until: float | None = None,
                 preface_timeout: float = DEFAULT_PREFACE_TIMEOUT) -> list[dict[str, Any]]:
    """Matching log lines grouped into episodes (one pid, or one log when the lines carry
    no pid; no pause over EPISODE_GAP_S), the largest first, each with one line of text."""
    if not has_logs(db):
        return []
    lines = _matching_lines(db, compile_pattern(pattern), since=since, until=until,
                            source=None, pid=None)
    open_episodes: dict[tuple[Any, ...], dict[str, Any]] = {}
    episodes: list[dict[str, Any]] = []
    for line in lines:
        key = ("pid", line["pid"]) if line["pid"] is not None else ("log", line["source"])
        ep = open_episodes.get(key)
        if ep is None or line["ts"] - ep["last_ts"] > EPISODE_GAP_S:
            if len(episodes) >= MAX_TRACKED_EPISODES:
                continue  # bounded; the largest are almost always among the first
            ep = {"pid": line["pid"], "source": line["source"], "process": line["process"],
                  "first_ts": line["ts"], "last_ts": line["ts"], "lines": 0,
                  "phrases": Counter()}
            open_episodes[key] = ep
            episodes.append(ep)
        ep["last_ts"] = line["ts"]
        ep["lines"] += 1
        ep["phrases"][line["phrase"][:MAX_PHRASE]] += 1
    episodes.sort(key=lambda e: (-e["lines"], e["first_ts"]))
    procs = _process_names(db)
    state = ServerState(db, DEFAULT_WINDOW_S, procs)
    end = state.last if state.last is not None else 0.0
    state.prepare([ep["last_ts"] for ep in episodes[:MAX_EPISODES]])
    out = []
    for ep in episodes[:MAX_EPISODES]:
        phrase, _n = ep["phrases"].most_common(1)[0]
        proc = _process_at(procs, ep["pid"], ep["first_ts"])
        process = ep["process"] or (proc["comm"] if proc else None)
        server = state.at(ep["last_ts"])
        # The connections whose preface timed out while the episode was being written:
        # dialled up to a timeout before its first line, given up by its last.
        timeouts = db.execute(
            f"SELECT COUNT(*) FROM connections WHERE {preface_timed_out(preface_timeout, end)}"
            " AND COALESCE(syn_ts, ts) BETWEEN ? AND ?"
            + (" AND pid = ?" if ep["pid"] is not None else ""),
            [ep["first_ts"] - preface_timeout - DEFAULT_WINDOW_S, ep["last_ts"]]
            + ([ep["pid"]] if ep["pid"] is not None else []),
        ).fetchone()[0]
        out.append({
            "lines": ep["lines"], "phrase": phrase, "pid": ep["pid"], "process": process,
            "source": ep["source"], "first_ts": ep["first_ts"], "last_ts": ep["last_ts"],
            "server": server, "preface_timeouts_nearby": int(timeouts),
            "text": evidence_text(ep["lines"], phrase, ep["pid"], process, ep["source"],
                                  ep["first_ts"], ep["last_ts"], server),
        })
    return out


def _clock(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%H:%M:%S")


def evidence_text(n: int, phrase: str, pid: int | None, process: str | None, source: str,
                  first: float, last: float, server: dict[str, Any]) -> str:
    """"14 'failed to receive server preface within timeout' lines from pid 4321 (app)
    between 10:02:01 and 10:05:13 UTC, while the server held 1012 open connections (1009
    from pid 777 orders-client)"."""
    who = f"pid {pid}" + (f" ({process})" if process else "") if pid is not None \
        else f"log {source}"
    when = (f"at {_clock(first)} UTC" if last - first < 1.0
            else f"between {_clock(first)} and {_clock(last)} UTC")
    text = f"{n} '{phrase}' line{'s' if n != 1 else ''} from {who} {when}"
    if not server["in_capture"]:
        return text + ", outside the captured time"
    text += f", while the server held {server['open_connections']} open connections"
    top = server["top_clients"]
    if top:
        text += f" ({top[0]['open']} from {top[0]['client']})"
    if server["waiting_for_server_preface"]:
        text += (f"; {server['waiting_for_server_preface']} waiting for its preface, the "
                 f"longest {server['longest_wait_s']:.1f}s")
    return text
