"""Connections to Unix-socket servers, from successive snapshots of the kernel's Unix socket
table (sans-IO: a snapshot and its time in, connection records out).

No packet exists on a Unix socket: a connection is known from the polls of unix_diag
that list it (tracer.attribution.unixdiag). It opened between the last poll that did not
list it and the first that did (its open time is that first poll's: within one poll
interval, 0.5 s); it closed between the last poll that listed it and the first that did
not (its close time is that poll's). One listed at the first poll was open before the
capture: its open time is unknown (``mid_stream``, as a TCP connection picked up
mid-stream), never counted as young.

What only packets show (HTTP/2 frames, methods, RPCs, GOAWAY, PING, who closed first) is
absent from these records: the HTTP/2 columns are unknown (None) or 0 where the column
cannot be null, and ``protocol`` is ``unix``, which the report reads as "not visible".
What the kernel shows is kept: the two sockets' inodes, the client socket's owner uid,
and the queues (bytes not read yet at each end), their largest value and how many polls
found them changed (the only sign of traffic there is).

A record is keyed like a TCP one: ``orig_h`` is ``unix:`` and the server's name (the path,
or ``@name``), ``orig_p`` the client socket's inode, ``resp_h`` the server's name and
``resp_p`` 0. The table is bounded (MAX_TRACKED): past it, new connections are counted,
never followed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from tracer.record import COLUMNS, RECORD_FIELDS

MAX_TRACKED = 200_000  # connections followed at most (the flow table's bound)
UNIX_PROTOCOL = "unix"


# One accepted connection as one poll listed it (tracer.attribution.unixdiag.Snapshot):
# (server inode, client inode or 0, server's unread bytes, client's unread bytes or -1,
# client socket's owner uid or -1, the index of the target's label). Plain ints: a poll of
# 10,000 unchanged connections compares tuples and builds nothing.
Listed = tuple[int, int, int, int, int, int]


@dataclass(frozen=True)
class Seen:
    """One accepted connection as one poll listed it, in words."""

    server_inode: int
    client_inode: int  # the accepted socket's peer (0: the kernel gave none)
    label: str  # the server's name: its path or @name
    server_queue: int  # bytes the server has not read yet
    client_queue: int | None  # bytes the client has not read yet (None: its socket unseen)
    client_uid: int | None  # the client socket's owner (None: its socket unseen)


def seen_of(raw: Listed, labels: list[str]) -> Seen:
    return Seen(raw[0], raw[1], labels[raw[5]], raw[2], raw[3] if raw[3] >= 0 else None,
                raw[4] if raw[4] >= 0 else None)


@dataclass
class Tracked:
    uid: str
    seen: Seen
    raw: Listed
    opened_ts: float
    pre_existing: bool
    last_ts: float
    queue_max: int = 0
    queue_changes: int = 0
    sent: bool = False  # a record of it has gone out since it last changed


class UnixConnections:
    """The open connections of the followed Unix sockets, poll after poll."""

    def __init__(self, max_tracked: int = MAX_TRACKED) -> None:
        self.open: dict[int, Tracked] = {}  # server-side inode -> connection
        self.polls = 0
        self.max_tracked = max_tracked
        self.not_followed = 0  # connections seen while the table was full
        self.opened = 0
        self.closed = 0

    def poll(self, ts: float, listed: list[Listed], labels: list[str]
             ) -> tuple[list[dict[str, Any]], list[Tracked]]:
        """One poll's snapshot (``labels``: the targets' names by index): the records to
        write (new connections, closed ones, open ones whose queues changed) and the
        connections new since the last poll."""
        first = self.polls == 0
        self.polls += 1
        out: list[dict[str, Any]] = []
        new: list[Tracked] = []
        now_open: set[int] = set()
        tracked = self.open
        for raw in listed:
            inode = raw[0]
            now_open.add(inode)
            t = tracked.get(inode)
            if t is not None:
                if t.raw == raw:  # nothing changed: the common case, nothing to build
                    t.last_ts = ts
                    continue
                if t.raw[1] != raw[1] and raw[1]:
                    # Its inode came back for another connection between two polls: the
                    # old one closed.
                    out.append(self._closed(t, ts))
                    t = None
            s = seen_of(raw, labels)
            if t is None:
                if len(tracked) >= self.max_tracked:
                    self.not_followed += 1
                    continue
                t = Tracked(connection_uid(s, ts), s, raw, ts, first, ts,
                            queue_max=max(s.server_queue, s.client_queue or 0))
                tracked[inode] = t
                self.opened += 1
                new.append(t)
                out.append(record(t, ts))
                t.sent = True
                continue
            t.last_ts = ts
            queue = max(s.server_queue, s.client_queue or 0)
            if (s.server_queue, s.client_queue) != (t.seen.server_queue, t.seen.client_queue):
                t.queue_changes += 1
                t.sent = False
            if queue > t.queue_max:
                t.queue_max = queue
                t.sent = False
            if s.client_uid is not None and t.seen.client_uid is None:
                t.sent = False
            t.seen = s
            t.raw = raw
            if not t.sent:
                out.append(record(t, ts))
                t.sent = True
        if len(now_open) != len(tracked):
            for inode in [i for i in tracked if i not in now_open]:
                out.append(self._closed(tracked[inode], ts))
        return out, new

    def _closed(self, t: Tracked, ts: float) -> dict[str, Any]:
        del self.open[t.seen.server_inode]
        self.closed += 1
        return record(t, ts, closed=True)

    def finish(self, ts: float) -> list[dict[str, Any]]:
        """The end of the capture: every open connection stored as open at its end."""
        out = [record(t, ts, end_reason="open_at_end") for t in self.open.values()]
        self.open.clear()
        return out


def connection_uid(s: Seen, ts: float) -> str:
    """A connection's uid: ``U`` and 20 hex digits of its sockets and first poll time (the
    TCP ones start with ``C``)."""
    key = f"{s.label}\0{s.server_inode}\0{s.client_inode}\0{ts!r}".encode()
    return "U" + hashlib.blake2b(key, digest_size=10).hexdigest()


# Every column the record must hold, with what a Unix connection cannot know: unknown
# (None) where the column may say so, else 0.
_UNKNOWN: dict[str, Any] = {c.name: None if c.nullable else 0 for c in COLUMNS
                            if c.name in RECORD_FIELDS}


def record(t: Tracked, ts: float, *, closed: bool = False,
           end_reason: str | None = None) -> dict[str, Any]:
    """The connections-table row of ``t`` as of ``ts`` (closed at ``ts`` with
    ``closed``)."""
    s = t.seen
    end = ts if closed or end_reason else t.last_ts
    rec = dict(_UNKNOWN)
    rec.update(
        uid=t.uid, ts=t.opened_ts, close_ts=ts if closed else None, end_ts=end,
        duration=max(0.0, end - t.opened_ts), ip_version=0,
        orig_h=f"unix:{s.label}", orig_p=s.client_inode, resp_h=s.label, resp_p=0,
        # Zeek's codes: OTH for one open before the capture, S1 open, SF closed.
        conn_state="SF" if closed else ("OTH" if t.pre_existing else "S1"),
        history="", orig_state="CLOSED" if closed else "ESTABLISHED",
        resp_state="CLOSED" if closed else "ESTABLISHED",
        mid_stream=int(t.pre_existing), from_snapshot=int(t.pre_existing),
        is_open=0 if closed else 1, close_kind="unix_close" if closed else None,
        end_reason="closed" if closed else end_reason, protocol=UNIX_PROTOCOL,
        methods={}, grpc_statuses={},
        unix={"path": s.label, "server_inode": s.server_inode,
              "client_inode": s.client_inode, "client_uid": s.client_uid,
              "queue_max": t.queue_max, "queue_changes": t.queue_changes},
    )
    return rec
