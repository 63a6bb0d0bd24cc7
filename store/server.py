"""The server on this host over the capture: samples of its listeners' accept queues and its
descriptors against RLIMIT_NOFILE (written by the live agent), their summary, and the one
line that says why it stopped answering (read by store.queries.server_health).

A row is written when something that matters changed (the accept queue, the process, its
limit, whether it is stopped, its descriptors by FD_STEP_SHARE of the limit or across the
limit) and otherwise every HEARTBEAT_S, plus the last state read when the capture ends or
the listener goes: a long-running agent writes a few rows a minute for a steady server.
Each row's values hold from its time until the next row of its listener; the last row of
a listener is a moment (nothing is assumed after it). Tables from migration
m012_server_samples; a database without them has no samples (None everywhere).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlite_utils

if TYPE_CHECKING:
    from tracer.attribution.server import ServerSample

HEARTBEAT_S = 30.0  # a row at least this often per listener, changed or not
FD_STEP_SHARE = 100  # descriptors move by limit/100 (at least 1) before that alone is a row
TIMEOUT_SLACK_S = 1.0  # a dial this long before a stall's first sample still counts in it

_INSERT = (
    "INSERT INTO server_samples (capture_id, ts, address, port, inode, netns, queue, queue_max,"
    " pid, process_start, fds, fd_limit, stopped) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _changed(old: ServerSample, new: ServerSample) -> bool:
    a, b = old.listener, new.listener
    if (a.queue, a.queue_max, old.pid, old.process_start, old.fd_limit, old.stopped) != (
            b.queue, b.queue_max, new.pid, new.process_start, new.fd_limit, new.stopped):
        return True
    if old.fds is None or new.fds is None:
        return (old.fds is None) != (new.fds is None)
    limit = new.fd_limit
    if limit is not None and (old.fds >= limit) != (new.fds >= limit):
        return True
    return abs(new.fds - old.fds) >= max(1, (limit or 0) // FD_STEP_SHARE)


class ServerSampleWriter:
    """Writes one capture's server samples: a row when something changed, else a
    heartbeat."""

    def __init__(self, db: sqlite_utils.Database, capture_id: int) -> None:
        self.db = db
        self.capture_id = capture_id
        self.stored: dict[tuple[int, int], tuple[float, ServerSample]] = {}  # last row each
        self.pending: dict[tuple[int, int], tuple[float, ServerSample]] = {}  # read since
        self.processes: set[tuple[int, float]] = set()
        self.rows = 0

    def add(self, ts: float, samples: list[ServerSample]) -> int:
        """Note what was read at ``ts`` (epoch seconds); the rows written."""
        rows: list[tuple[float, ServerSample]] = []
        seen = set()
        for sample in samples:
            key = (sample.listener.port, sample.listener.inode)
            seen.add(key)
            last = self.stored.get(key)
            if last is None or ts - last[0] >= HEARTBEAT_S or _changed(last[1], sample):
                rows.append((ts, sample))
                self.stored[key] = (ts, sample)
                self.pending.pop(key, None)
            else:
                self.pending[key] = (ts, sample)
        for key in set(self.stored) - seen:  # the listener is gone: its last state read
            del self.stored[key]
            last_read = self.pending.pop(key, None)
            if last_read is not None:
                rows.append(last_read)
        self._write(rows)
        return len(rows)

    def flush(self) -> int:
        """Write the last state read of each listener (the capture ends)."""
        rows = list(self.pending.values())
        self.pending.clear()
        for ts, sample in rows:
            self.stored[(sample.listener.port, sample.listener.inode)] = (ts, sample)
        self._write(rows)
        return len(rows)

    def _write(self, rows: list[tuple[float, ServerSample]]) -> None:
        if not rows:
            return
        with self.db.conn:
            for ts, s in rows:
                entry = s.listener
                self.db.conn.execute(_INSERT, [
                    self.capture_id, ts, entry.address, entry.port, entry.inode, entry.netns,
                    entry.queue, entry.queue_max, s.pid, s.process_start, s.fds, s.fd_limit,
                    int(s.stopped)])
                if s.pid is not None and s.process_start is not None and \
                        (s.pid, s.process_start) not in self.processes:
                    if len(self.processes) > 1000:  # a server restarting all the time
                        self.processes.clear()  # (INSERT OR IGNORE keeps the table right)
                    self.processes.add((s.pid, s.process_start))
                    self.db.conn.execute(
                        "INSERT OR IGNORE INTO server_processes (pid, process_start, comm,"
                        " cmdline) VALUES (?, ?, ?, ?)",
                        [s.pid, s.process_start, s.comm, s.cmdline])
        self.rows += len(rows)


def drop_before(db: sqlite_utils.Database, cutoff: float) -> int:
    """Retention: samples older than ``cutoff``, and the processes no sample names."""
    if not _has_samples(db):
        return 0
    with db.conn:
        n = db.conn.execute("DELETE FROM server_samples WHERE ts < ?", [cutoff]).rowcount
        if n:
            db.conn.execute(
                "DELETE FROM server_processes WHERE NOT EXISTS (SELECT 1 FROM server_samples s"
                " WHERE s.pid = server_processes.pid"
                " AND s.process_start = server_processes.process_start)")
    return int(n)


# -- reading -----------------------------------------------------------------------------


def _has_samples(db: sqlite_utils.Database) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                      " AND name = 'server_samples'").fetchone() is not None


def _rows(db: sqlite_utils.Database, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    cur = db.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@dataclass(frozen=True)
class Segment:
    """A row's values over the time they held: [start, end] (a moment when equal)."""

    start: float
    end: float
    row: dict[str, Any]


def segments(db: sqlite_utils.Database, since: float | None = None,
             until: float | None = None) -> list[Segment]:
    """The samples as spans, clipped to [since, until]; empty without the tables."""
    if not _has_samples(db):
        return []
    where, params = " WHERE ts <= ?", [until if until is not None else float("inf")]
    if since is not None:
        # And each listener's last row before the window: its values at the window's start.
        where += (" AND (ts >= ? OR id IN (SELECT MAX(id) FROM server_samples WHERE ts < ?"
                  " GROUP BY capture_id, port, inode))")
        params += [since, since]
    rows = _rows(db, f"SELECT * FROM server_samples{where} ORDER BY capture_id, port, inode,"
                     " ts, id", params)
    low = since if since is not None else float("-inf")
    high = until if until is not None else float("inf")
    out = []
    keys = [(r["capture_id"], r["port"], r["inode"]) for r in rows]
    for i, row in enumerate(rows):
        end = rows[i + 1]["ts"] if i + 1 < len(rows) and keys[i + 1] == keys[i] else row["ts"]
        if end < low or row["ts"] > high:
            continue
        out.append(Segment(max(row["ts"], low), min(end, high), row))
    return out


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _intersect(a: list[tuple[float, float]],
               b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Where two sorted unions of spans overlap (one pass over both)."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start <= end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return _union(out)


def _at_limit(row: dict[str, Any]) -> bool:
    return row["fds"] is not None and row["fd_limit"] is not None and \
        row["fds"] >= row["fd_limit"]


def _full(row: dict[str, Any]) -> bool:
    return row["queue_max"] is not None and row["queue"] >= row["queue_max"]


def _spans(segs: list[Segment], test: Any) -> dict[str, Any]:
    """When ``test`` held: first start, last end (None when it still held at the last
    sample), total seconds, and whether it held from the first sample already (then it
    began at that time or before)."""
    spans = _union([(s.start, s.end) for s in segs if test(s.row)])
    if not spans:
        return {"since": None, "until": None, "s": 0.0, "spans": [], "at_first_sample": False}
    ongoing = test(max(segs, key=lambda s: (s.end, s.start)).row)
    return {"since": spans[0][0], "until": None if ongoing else spans[-1][1],
            "s": round(sum(e - s for s, e in spans), 3), "spans": spans,
            "at_first_sample": spans[0][0] <= min(s.start for s in segs)}


def summary(db: sqlite_utils.Database, since: float | None = None,
            until: float | None = None) -> dict[str, Any] | None:
    """The server process and its accept queue over the window, or None when no listener
    was seen on this host (the server is elsewhere, or a file was read)."""
    segs = segments(db, since, until)
    if not segs:
        return None
    pid, own = _server_process(segs)
    process = None
    at_limit = _spans(own, _at_limit)
    stopped = _spans(own, lambda r: bool(r["stopped"]))
    if pid is not None:
        latest = max(own, key=lambda s: (s.end, s.start)).row
        names = _rows(db, "SELECT comm, cmdline FROM server_processes WHERE pid = ?"
                          " AND process_start = ?", [pid, latest["process_start"]])
        fds = [s.row["fds"] for s in own if s.row["fds"] is not None]
        limits = [s.row["fd_limit"] for s in own if s.row["fd_limit"] is not None]
        process = {
            "pid": pid, "process_start": latest["process_start"],
            "comm": names[0]["comm"] if names else None,
            "cmdline": names[0]["cmdline"] if names else None,
            "fd_limit": latest["fd_limit"] if latest["fd_limit"] is not None else (
                limits[-1] if limits else None),
            "fds_max": max(fds) if fds else None, "fds_last": latest["fds"],
            "at_limit_since": at_limit["since"], "at_limit_until": at_limit["until"],
            "at_limit_s": at_limit["s"], "at_limit_at_first_sample": at_limit["at_first_sample"],
            "stopped_since": stopped["since"], "stopped_until": stopped["until"],
            "stopped_at_first_sample": stopped["at_first_sample"],
            "samples": len({s.row["id"] for s in own}),
        }
    by_listener: dict[tuple[Any, ...], list[Segment]] = {}
    for s in own:
        by_listener.setdefault((s.row["address"], s.row["port"], s.row["inode"]), []).append(s)
    key = max(by_listener, key=lambda k: (max(s.row["queue"] for s in by_listener[k]),
                                          len(by_listener[k])))
    lsegs = by_listener[key]
    latest = max(lsegs, key=lambda s: (s.end, s.start)).row
    waiting = _spans(lsegs, lambda r: r["queue"] > 0)
    full = _spans(lsegs, _full)
    limits = [s.row["queue_max"] for s in lsegs if s.row["queue_max"] is not None]
    queue = {
        "address": key[0], "port": key[1],
        "limit": limits[-1] if limits else None,
        "max": max(s.row["queue"] for s in lsegs), "last": latest["queue"],
        "waiting_since": waiting["since"], "waiting_until": waiting["until"],
        "waiting_s": waiting["s"], "waiting_at_first_sample": waiting["at_first_sample"],
        "full_since": full["since"], "full_until": full["until"], "full_s": full["s"],
        "full_at_first_sample": full["at_first_sample"],
        "listeners": len(by_listener),
    }
    stall_spans = _intersect(waiting["spans"], _union(at_limit["spans"] + stopped["spans"]))
    stall = None
    if stall_spans:
        ongoing = (latest["queue"] > 0) and (_at_limit(latest) or bool(latest["stopped"]))
        why = "fd_limit" if _intersect(stall_spans, at_limit["spans"]) else "stopped"
        stall = {"since": stall_spans[0][0], "until": None if ongoing else stall_spans[-1][1],
                 "s": round(sum(e - s for s, e in stall_spans), 3), "why": why,
                 "spans": stall_spans}
    return {"process": process, "accept_queue": queue, "stall": stall}


def _server_process(segs: list[Segment]) -> tuple[int | None, list[Segment]]:
    """The server process of the samples, and its segments: where several processes held
    the listeners (a restart, a pre-forking server), the one most at its descriptor limit,
    then the nearest to it."""
    by_pid: dict[int | None, list[Segment]] = {}
    for s in segs:
        by_pid.setdefault(s.row["pid"], []).append(s)
    pids = [p for p in by_pid if p is not None]
    if len(pids) <= 1:
        pid = pids[0] if pids else None
        return pid, by_pid[pid]

    def rank(pid: int) -> tuple[float, bool, float, int]:
        own = by_pid[pid]
        ratio = max(((s.row["fds"] or 0) / s.row["fd_limit"] for s in own
                     if s.row["fd_limit"]), default=0.0)
        return (_spans(own, _at_limit)["s"], any(_at_limit(s.row) for s in own), ratio,
                len(own))

    pid = max(pids, key=rank)
    return pid, by_pid[pid]


def holders_at(db: sqlite_utils.Database, t: float, limit: int = 3) -> list[dict[str, Any]]:
    """Who held the most connections open to the server at ``t``: pid (with its command)
    where attributed, else the address."""
    rows = _rows(
        db,
        "SELECT c.pid, c.process_start, CASE WHEN c.pid IS NULL THEN c.orig_h END AS ip,"
        " COUNT(*) AS open FROM connections c WHERE c.ts <= ? AND (c.close_ts IS NULL"
        " OR c.close_ts > ?) GROUP BY 1, 2, 3 ORDER BY open DESC LIMIT ?", [t, t, limit])
    for r in rows:
        r["process"] = None
        if r["pid"] is not None:
            names = _rows(db, "SELECT comm, cmdline FROM processes WHERE pid = ? AND"
                              " start_time IS ?", [r["pid"], r["process_start"]])
            if names:
                r["process"] = names[0]["comm"] or names[0]["cmdline"]
        r["client"] = f"pid {r['pid']}" if r["pid"] is not None else r["ip"]
    return rows


def _clock(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%H:%M:%SZ")


def _when(since: float | None, until: float | None, first: bool = False) -> str:
    """" since T", " from T to U"; "at least" when it held at the first sample already."""
    if since is None:
        return ""
    least = "at least " if first else ""
    if until is None:
        return f" since {least}{_clock(since)}"
    return f" from {least}{_clock(since)} to {_clock(until)}"


def explain(state: dict[str, Any], timeouts: int, in_stall: int,
            holder: dict[str, Any] | None) -> str:
    """The server part of the report in one line: what was seen, and only that.

    ``timeouts``: the window's preface timeouts; ``in_stall``: those dialled while the
    server could not accept; ``holder``: who held the most connections then."""
    process, queue, stall = state["process"], state["accept_queue"], state["stall"]
    parts = []
    if process is not None:
        name = process["comm"] or (process["cmdline"] or "").split(" ")[0] or "?"
        who = f"server pid {process['pid']} ({name})"
        fds, limit = process["fds_max"], process["fd_limit"]
        if fds is not None and limit is not None and process["at_limit_since"] is not None:
            when = _when(process["at_limit_since"], process["at_limit_until"],
                         process["at_limit_at_first_sample"])
            # More than the limit: descriptors inherited above it (the limit only stops
            # new ones).
            held = f"{fds:,} of {limit:,}" if fds <= limit else f"{fds:,} (limit {limit:,})"
            who += f" holds {held} file descriptors{when}"
        elif fds is not None and limit is not None:
            who += f" holds at most {fds:,} of {limit:,} file descriptors"
        elif fds is not None:
            who += f" holds at most {fds:,} file descriptors"
        if process["stopped_since"] is not None:
            when = _when(process["stopped_since"], process["stopped_until"],
                         process["stopped_at_first_sample"])
            who += f", stopped (SIGSTOP){when}"
        parts.append(who)
    else:
        address = f"[{queue['address']}]" if ":" in queue["address"] else queue["address"]
        where = f"{address}:{queue['port']}" if queue["port"] else queue["address"]  # 0: Unix
        parts.append(f"server listener {where} (no process found holding it)")
    backlog = f" (backlog {queue['limit']:,})" if queue["limit"] is not None else ""
    if queue["full_since"] is not None:
        when = _when(queue["full_since"], queue["full_until"], queue["full_at_first_sample"])
        parts.append(f"accept queue full, {queue['max']:,} of {queue['limit']:,}{when}: the "
                     "kernel drops new SYNs, handshakes do not complete")
    elif queue["waiting_since"] is not None:
        when = _when(queue["waiting_since"], queue["waiting_until"],
                     queue["waiting_at_first_sample"])
        parts.append(f"accept queue up to {queue['max']:,} waiting{backlog}{when}")
    else:
        parts.append(f"accept queue empty at every sample{backlog}")
    if stall is not None:
        why = ("no descriptor left to accept them with" if stall["why"] == "fd_limit"
               else "the process is stopped")
        text = f"new connections are not accepted ({why}), so no SETTINGS comes back"
        if in_stall:
            text += (f": that is the preface timeout ({in_stall:,} of "
                     f"{timeouts:,} in this window)")
        parts.append(text)
        if holder is not None and stall["why"] == "fd_limit":
            name = f" ({holder['process']})" if holder.get("process") else ""
            parts.append(f"{holder['client']}{name} holds {holder['open']:,} of them "
                         "(its open connections to the server)")
    elif timeouts:
        parts.append(f"it was not out of descriptors while connections waited: the "
                     f"{timeouts:,} preface timeouts have another cause")
    return "; ".join(parts)


def stall_timeouts(stall: dict[str, Any] | None, dials: list[float]) -> list[float]:
    """The dial times (of preface timeouts) that fall in the stall."""
    if stall is None:
        return []
    return [t for t in dials if any(s - TIMEOUT_SLACK_S <= t <= e for s, e in stall["spans"])]


def series(db: sqlite_utils.Database, first: float, bucket: float, n: int,
           pid: int | None = None) -> dict[str, Any] | None:
    """Per timeline bucket, the most the server held: descriptors, its limit, its accept
    queue and the queue's maximum (None where no sample covers the bucket). One process
    (``pid``, else the one summary() names), one listener (the busiest)."""
    segs = segments(db, None, first + n * bucket)
    if not segs:
        return None
    if pid is None:
        pid, own = _server_process(segs)
    else:
        own = [s for s in segs if s.row["pid"] == pid]
    if not own:
        return None
    listeners: dict[tuple[Any, ...], int] = {}
    for s in own:
        key = (s.row["port"], s.row["inode"])
        listeners[key] = max(listeners.get(key, 0), s.row["queue"])
    busiest = max(listeners, key=lambda k: listeners[k])
    out: dict[str, list[int | None]] = {
        name: [None] * n for name in ("fds", "fd_limit", "accept_queue", "accept_queue_max")}

    def index(ts: float) -> int:
        return max(0, min(n - 1, int((ts - first) // bucket)))

    for s in own:
        listener = (s.row["port"], s.row["inode"]) == busiest
        for i in range(index(s.start), index(s.end) + 1):
            for name, column, take in (("fds", "fds", True), ("fd_limit", "fd_limit", True),
                                       ("accept_queue", "queue", listener),
                                       ("accept_queue_max", "queue_max", listener)):
                value = s.row[column]
                if take and value is not None:
                    old = out[name][i]
                    out[name][i] = value if old is None else max(old, value)
    return {"pid": pid, **out}
