"""The live agent's watch of Unix-socket servers (``tracer capture --unix PATH``): unix_diag
polled at most every POLL_INTERVAL, its snapshots turned into connection records
(tracer.unixconns), each new connection's client attributed to its process.

It runs in the store worker, on that process's deadlines, like the samples of the server:
no packet exists, so nothing of it is on the capture process's packet path, and a poll
never holds up a stop or a save. A poll of 10,000 connections costs tens of milliseconds of
CPU (benchmarks/unix.py): the interval is stretched past POLL_INTERVAL so that the polls'
CPU stays under CPU_SHARE of a core, and the interval used is in the capture's stats
(``unix.poll_interval_ms``, the longest) so that the report says how well open and close
times are known. The client of a connection is the owner of its peer socket: that
inode is looked for among the descriptors of the processes that owned connections before
(their next descriptors first), then of every process (tracer.attribution.sockets,
the one look-up of inodes TCP attribution uses). One not found is looked for again at
the next polls, less and less often, until its connection closes.
"""

from __future__ import annotations

import math
import os
import stat as stat_mod
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from tracer.attribution.server import Listener
from tracer.attribution.sockets import ProcessCache, ProcessInfo, SocketDetail, find_owners
from tracer.attribution.unixdiag import (
    Targets,
    UnixDiag,
    UnixSocket,
    display_name,
    file_key,
    kernel_dev,
    raw_name,
)
from tracer.events import AnomalyFound
from tracer.unixconns import UnixConnections

POLL_INTERVAL = 0.5  # seconds between two dumps at most often
CPU_SHARE = 0.05  # a poll's CPU time at most this share of the interval: it is stretched
MAX_INTERVAL = 10.0  # seconds between two dumps at most (a bound on what a poll misses)
RECENT_OWNERS = 64
FD_AHEAD = 8  # descriptors after an owner's last one tried first (a leaker's next socket)
RETRY_MAX = 8.0  # seconds: an owner not found is looked for again at most this far apart
MAX_PENDING = 10_000  # connections whose owner is looked for at most (the rest: counted)
WALK_SHARE = 0.1  # walks of every process's descriptors take at most this share of time

Verdict = tuple[str, str, ProcessInfo | None, float, SocketDetail | None]


def poll_interval(cpu_s: float) -> float:
    """Seconds between two polls that cost ``cpu_s`` of CPU each (the median of the last
    ones): POLL_INTERVAL, or longer so that polling takes at most CPU_SHARE of a core (up
    to MAX_INTERVAL), in tenths of a second."""
    wanted = cpu_s / CPU_SHARE
    if wanted <= POLL_INTERVAL:
        return POLL_INTERVAL
    return min(MAX_INTERVAL, math.ceil(wanted * 10) / 10)


class UnixTargetError(ValueError):
    """A --unix argument that names nothing to follow (the message says why)."""


@dataclass
class Target:
    label: str  # as the report names it: the absolute path, or @name
    targets: Targets


def resolve(arguments: tuple[str, ...]) -> list[Target]:
    """The sockets to follow. A path must be a socket file now (its device and inode
    identify the listener whatever name it was bound by); an abstract name (``@name``,
    ``unix-abstract:name``) is taken as it is."""
    out = []
    for arg in arguments:
        label = display_name(arg)
        if label.startswith("@"):
            if len(label) < 2:
                raise UnixTargetError(f"--unix {arg}: an abstract name needs a name after @")
            out.append(Target(label, Targets(names=frozenset({label}))))
            continue
        try:
            st = os.stat(label)  # follows a link: the server's socket is what it names
        except OSError as exc:
            raise UnixTargetError(f"--unix {arg}: cannot stat {label}: {exc.strerror}; "
                                  "give the path of a listening Unix socket (or @name for "
                                  "an abstract one)") from None
        if not stat_mod.S_ISSOCK(st.st_mode):
            raise UnixTargetError(f"--unix {arg}: {label} is not a socket")
        out.append(Target(label, Targets(names=frozenset({label}),
                                         files=frozenset({(kernel_dev(st.st_dev),
                                                           st.st_ino)}))))
    return out


@dataclass
class _Pending:
    inode: int
    next_try: float
    wait: float = POLL_INTERVAL


@dataclass
class PollResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    anomalies: list[AnomalyFound] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    listeners: list[tuple[UnixSocket, int]] = field(default_factory=list)
    seconds: float = 0.0


class UnixWatch:
    """unix_diag polls and attribution for the followed Unix sockets."""

    def __init__(self, targets: list[Target], attribution: bool = True) -> None:
        self.targets = targets
        self.keep = Targets(names=frozenset().union(*(t.targets.names for t in targets)),
                            files=frozenset().union(*(t.targets.files for t in targets)))
        self.labels = [t.label for t in targets]
        # The scan's keys: the raw names and the socket files, to the target's index.
        self.names: dict[bytes, int] = {}
        self.files: dict[int, int] = {}
        for i, t in enumerate(targets):
            for name in t.targets.names:
                self.names.setdefault(raw_name(name), i)
            for dev, ino in t.targets.files:
                self.files.setdefault(file_key(dev, ino), i)
        self.diag = UnixDiag()
        try:
            self.netns = os.stat("/proc/self/ns/net").st_ino
        except OSError:
            self.netns = 0
        self.conns = UnixConnections()
        self.attribution = attribution
        self.pending: dict[str, _Pending] = {}  # uid -> its client inode, to look for
        self.recent: dict[int, int] = {}  # pid -> the descriptor of its last connection
        self.owners: dict[str, int] = {}  # an open connection's uid -> its client's pid
        self.known = ProcessCache()  # processes and user names, looked up once
        self.counts: dict[str, int] = {}
        self.next_walk = 0.0  # monotonic: when every process may be walked again
        self.poll_seconds: list[float] = []  # the last polls' durations (bounded)
        self.poll_cpu: list[float] = []  # and their CPU times (this thread's)
        self.interval = POLL_INTERVAL  # seconds until the next poll, as of the last one
        self.longest_interval = POLL_INTERVAL

    def close(self) -> None:
        self.diag.close()

    def server_listeners(self, polled: PollResult) -> list[Listener]:
        """The followed sockets' listeners of a poll, as the server sampler takes them
        (tracer.attribution.server): its queue is the connections the kernel holds for
        the server that it has not accepted yet, its maximum the listen backlog; the
        address is the socket's name (port 0)."""
        return [Listener(self.labels[target], 0, sock.inode, self.netns,
                         sock.rqueue if sock.rqueue is not None else 0, sock.wqueue)
                for sock, target in polled.listeners]

    def poll(self, ts: float) -> PollResult:
        """One dump: what changed, as records; the new connections' owners where found."""
        started = time.monotonic()
        cpu = time.thread_time()
        out = PollResult()
        dump = self.diag.snapshot(self.names, self.files)
        for reason, n in (dump.malformed or {}).items():
            self._count(f"malformed.{reason}", n)
            out.anomalies.append(AnomalyFound(ts, None, reason,
                                              f"{n} unix_diag message(s) in one dump"))
        out.listeners = dump.listeners
        records, new = self.conns.poll(ts, dump.conns, self.labels)
        out.records = records
        if self.attribution:
            for t in new:
                if not t.seen.client_inode:
                    self._count("no_peer")
                elif len(self.pending) < MAX_PENDING:
                    self.pending[t.uid] = _Pending(t.seen.client_inode, 0.0)
                else:
                    self._count("pending_full")
            for r in records:
                if r["close_ts"] is not None:
                    self.owners.pop(r["uid"], None)
                if r["close_ts"] is not None and r["uid"] in self.pending:
                    del self.pending[r["uid"]]
                    self._count("closed_before_attribution")
                    out.verdicts.append((r["uid"], "closed_before_attribution", None, ts,
                                         self._detail(r["unix"]["client_uid"])))
            out.verdicts.extend(self._attribute(ts, records))
        out.seconds = time.monotonic() - started
        self.poll_seconds.append(out.seconds)
        del self.poll_seconds[:-64]
        self.poll_cpu.append(time.thread_time() - cpu)
        del self.poll_cpu[:-9]
        self.interval = poll_interval(statistics.median(self.poll_cpu))
        self.longest_interval = max(self.longest_interval, self.interval)
        return out

    def _attribute(self, ts: float, records: list[dict[str, Any]]) -> list[Verdict]:
        now = time.monotonic()
        due = {uid: p for uid, p in self.pending.items() if p.next_try <= now}
        if not due:
            return []
        by_inode = {p.inode: uid for uid, p in due.items()}
        likely = list(reversed(self.recent))
        hints = {pid: [fd + d for d in range(1, FD_AHEAD + 1)] + [fd]
                 for pid, fd in self.recent.items()}
        everyone = now >= self.next_walk
        walked: list[float] = []
        found = find_owners(set(by_inode), likely, hints=hints, everyone=everyone,
                            walked=walked)
        if walked:
            self.next_walk = time.monotonic() + walked[0] / WALK_SHARE
        uids = {r["uid"]: r for r in records}
        out: list[Verdict] = []
        for inode, uid in by_inode.items():
            p = due[uid]
            owner = found.get(inode)
            info = self.known.process(owner[0]) if owner is not None else None
            if owner is None or info is None:
                p.next_try = now + p.wait
                p.wait = min(p.wait * 2, RETRY_MAX)
                continue
            del self.pending[uid]
            self.owners[uid] = owner[0]
            self.recent.pop(owner[0], None)
            self.recent[owner[0]] = owner[1]
            while len(self.recent) > RECENT_OWNERS:
                del self.recent[next(iter(self.recent))]
            self._count("local")
            rec = uids.get(uid)
            client_uid = rec["unix"]["client_uid"] if rec is not None else None
            out.append((uid, "local", info, time.time(), self._detail(client_uid)))
        return out

    def open_clients(self) -> tuple[int, int, int]:
        """The connections open now, their client processes, and those whose client is
        not known (yet, or never: another namespace, attribution off)."""
        owners = self.owners
        pids = {owners[t.uid] for t in self.conns.open.values() if t.uid in owners}
        known = sum(1 for t in self.conns.open.values() if t.uid in owners)
        return len(self.conns.open), len(pids), len(self.conns.open) - known

    def finish(self, ts: float) -> list[dict[str, Any]]:
        for uid in self.pending:
            del uid
            self._count("not_found")
        self.pending.clear()
        return self.conns.finish(ts)

    def stats(self) -> dict[str, int]:
        out = {f"unix.attribution.{k}": v for k, v in self.counts.items()}
        out["unix.polls"] = self.conns.polls
        out["unix.opened"] = self.conns.opened
        out["unix.open"] = len(self.conns.open)
        out["unix.poll_interval_ms"] = round(self.longest_interval * 1000)
        out["unix.closed"] = self.conns.closed
        if self.poll_seconds:
            out["unix.poll_us_median"] = round(
                statistics.median(self.poll_seconds) * 1e6)
        if self.conns.not_followed:
            out["unix.not_followed"] = self.conns.not_followed
        return out

    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def _detail(self, uid: int | None) -> SocketDetail | None:
        if uid is None:
            return None
        return SocketDetail(uid=uid, user=self.known.user(uid))

