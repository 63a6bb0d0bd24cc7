"""Attribution policy: which local process owns the client end of each connection, found
by scans of the kernel's socket tables off the packet path (in the store worker).

Each connection gets one verdict: ``local`` (a process of this host, with its pid and
command line), ``remote`` (no network namespace of this host has the client's address),
or ``closed_before_attribution`` (it was gone before a scan could find its socket: counted,
never guessed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tracer.attribution.join import client_sockets
from tracer.attribution.sockdiag import SockDiag
from tracer.attribution.sockets import (
    ProcessInfo,
    SocketEntry,
    address_owners,
    process_info,
    socket_owners,
    socket_tables,
)

ATTRIBUTION_INTERVAL = 0.5  # seconds between two scans while connections wait
FULL_SCAN_INTERVAL = 1.0  # other namespaces' tables (slow to read) at most this often
QUICK_SCAN_INTERVAL = 0.02  # new connections looked up within this
RETRY_FIRST = 0.05  # a local client's socket not found yet: look again after this,
RETRY_MAX = 1.0  # doubling up to this

Verdict = tuple[str, str, "ProcessInfo | None"]  # (uid, verdict, process)


@dataclass
class _Pending:
    orig: tuple[str, int]
    resp: tuple[str, int]
    first_seen: float  # time.time()
    next_try: float = 0.0
    wait: float = RETRY_FIRST
    namespaces: set[int] | None = None  # those that have the client's address, once known


class Attributor:
    """Matches connections to the sockets of local processes, a scan at a time.

    A client address that no network namespace of this host has is remote: settled at the
    first look at the host's addresses taken after the connection appeared (one second at
    most), without touching a socket table. A local one is looked up in its namespace's
    table: this namespace's by sock_diag (microseconds), others' from /proc (milliseconds,
    at most once a second); a socket not found yet is looked for again, less and less
    often (RETRY_FIRST doubling up to RETRY_MAX), until found or the connection closes."""

    def __init__(self, ports: frozenset[int]) -> None:
        self.ports = ports
        self.pending: dict[str, _Pending] = {}
        self.settled: set[str] = set()  # attributed or judged remote, still open
        self.processes: dict[int, ProcessInfo] = {}
        self.counts: dict[str, int] = {}
        self.diag = SockDiag()
        self.last_full = -1e9
        self.recent_owners: dict[int, None] = {}  # pids that owned connections, newest last
        # Verdicts reached before the connection's row was written: applied with it.
        self.deferred: dict[str, tuple[str, ProcessInfo | None, float]] = {}

    def observe(self, records: list[dict[str, Any]], now: float) -> list[tuple[str, str]]:
        """Note new connections; return (uid, verdict) for those that closed before a scan
        could settle them (counted, never guessed)."""
        ended = []
        for r in records:
            uid = r["uid"]
            closed = r["end_reason"] not in (None, "open_at_end")
            if closed:
                if uid in self.settled:
                    self.settled.discard(uid)
                    continue
                pending = self.pending.pop(uid, None)
                first_seen = pending.first_seen if pending is not None else now
                owners = address_owners(r["orig_h"], seen_at=first_seen)
                ended.append((uid, "remote" if owners == set() else "closed_before_attribution"))
                continue
            if uid in self.settled or uid in self.pending:
                continue
            self.pending[uid] = _Pending((r["orig_h"], r["orig_p"]), (r["resp_h"], r["resp_p"]),
                                         now, now)
        return ended

    def scan(self, now: float) -> list[tuple[str, str, ProcessInfo | None]]:
        """(uid, verdict, process) for every pending connection settled by this scan."""
        if not self.pending:
            return []
        own = self.diag.netns
        matched: dict[str, SocketEntry] = {}
        out: list[tuple[str, str, ProcessInfo | None]] = []
        elsewhere: dict[str, _Pending] = {}  # local to another namespace, not found yet
        for uid, p in self.pending.items():
            if p.next_try > now:
                continue
            if p.namespaces is None:
                owners = address_owners(p.orig[0], seen_at=p.first_seen)
                if owners is None:  # no look at the host's addresses since it appeared
                    p.next_try = now + RETRY_MAX / 4
                    continue
                if not owners:
                    out.append((uid, "remote", None))
                    continue
                p.namespaces = owners
            p.next_try = now + p.wait  # if this look does not settle it
            p.wait = min(p.wait * 2, RETRY_MAX)
            entry = self.diag.lookup(p.orig, p.resp) if own in p.namespaces else None
            if entry is not None:
                matched[uid] = entry
            elif p.namespaces - {own}:
                elsewhere[uid] = p
        if elsewhere and time.monotonic() - self.last_full >= FULL_SCAN_INTERVAL:
            self.last_full = time.monotonic()
            wanted = set().union(*(p.namespaces or set() for p in elsewhere.values())) - {own}
            sockets = client_sockets(socket_tables(self.ports, own=[], own_netns=own,
                                                   only=wanted))
            for uid, p in elsewhere.items():
                found = sockets.get((p.orig, p.resp))
                if found is not None:
                    matched[uid] = found
        # The owner found last is looked at first.
        holders = socket_owners({e.inode for e in matched.values() if e.inode},
                                likely=list(reversed(self.recent_owners)))
        for uid, entry in matched.items():
            pid = holders.get(entry.inode)
            info = self._process(pid) if pid is not None else None
            if info is None:
                continue  # no process holds it (closing, or gone): look again later
            out.append((uid, "local", info))
            self.recent_owners.pop(info.pid, None)
            self.recent_owners[info.pid] = None
            if len(self.recent_owners) > 64:
                del self.recent_owners[next(iter(self.recent_owners))]
        for uid, _verdict, _info in out:
            del self.pending[uid]
            self.settled.add(uid)
        return out

    def _process(self, pid: int) -> ProcessInfo | None:
        cached = self.processes.get(pid)
        if cached is not None:
            return cached
        info = process_info(pid)
        if info is not None:
            if len(self.processes) > 10000:
                self.processes.clear()
            self.processes[pid] = info
        return info
