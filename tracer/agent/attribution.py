"""Attribution policy: which local process owns the client end of each connection, found
by looks at the kernel's socket tables off the packet path (in the store worker).

Each connection gets one verdict: ``local`` (a process of this host, with its pid and
command line), ``remote`` (no network namespace of this host has the client's address),
or ``closed_before_attribution`` (it was gone before a look could find its owner: counted,
never guessed). Where the kernel showed the client's socket alive, what it said of it
(owner uid, cgroup and so container, network namespace) comes with the verdict, the
owner's pid or not.
"""

from __future__ import annotations

import contextlib
import heapq
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from tracer.attribution.join import client_sockets
from tracer.attribution.sockdiag import DestroyWatch, SockDiag
from tracer.attribution.sockets import (
    TCP_STATES,
    CgroupPaths,
    ProcessCache,
    ProcessInfo,
    SocketDetail,
    SocketEntry,
    _namespaces,
    address_owners,
    cgroup_names,
    find_owners,
    namespace_processes,
    socket_tables,
)

ATTRIBUTION_INTERVAL = 0.5  # seconds: the longest a scan waits while connections wait
FULL_SCAN_INTERVAL = 1.0  # other namespaces' /proc tables (slow to read) at most this often
QUICK_SCAN_INTERVAL = 0.005  # scans (other than a new connection's) at most this often
RETRY_FIRST = 0.005  # a local client's socket or owner not found yet: look again after
RETRY_MAX = 1.0  # this, doubling up to this
BATCH_LOOKUPS = 32  # more lookups than this in one namespace: one filtered dump instead
WALK_SHARE = 0.05  # walks of every process's descriptors take at most this share of time
NAMESPACE_PROCESSES = 64  # a namespace with no more processes is searched whole for owners
NAMESPACE_RETRY = 30.0  # seconds before entering a namespace that refused us is tried again
MAX_NAMESPACES = 1024  # namespaces with sockets of ours at most
RECENTLY_DESTROYED = 4096  # destroyed sockets remembered for connections not yet seen
RECENT_OWNERS = 64
FD_COUNTS = 4096  # processes whose descriptor counts are kept at most (owners' first)
DRAIN_GAP = 0.001  # seconds: destroyed sockets are read at most this often
FD_WINDOW = (0, 1, 2, -1, 3)  # around the descriptor an owner used last: tried first

Endpoint = tuple[str, int]
_TIME_WAIT = next(k for k, v in TCP_STATES.items() if v == "TIME_WAIT")


class Settled(NamedTuple):
    """One connection's verdict, with what the kernel said of its client socket."""

    uid: str
    verdict: str  # local | remote | closed_before_attribution
    process: ProcessInfo | None
    detail: SocketDetail | None = None


@dataclass
class _Pending:
    orig: Endpoint
    resp: Endpoint
    first_seen: float  # time.time()
    next_try: float = 0.0
    wait: float = RETRY_FIRST
    ts: float = 0.0  # the connection's first packet
    namespaces: set[int] | None = None  # those that have the client's address, once known
    entry: SocketEntry | None = None  # its client socket, as last seen alive
    destroyed: bool = False  # the kernel announced a socket on its 4-tuple destroyed


class _Kernel:
    """sock_diag sockets, one per network namespace that has clients (this one's from the
    start, others' created inside them when the first client there appears), and the
    watches of destroyed sockets beside them. A socket keeps its namespace alive: those of
    namespaces no process is in any more are closed at the next look at the namespaces."""

    def __init__(self, own: SockDiag, ports: frozenset[int]) -> None:
        self.own = own
        self.ports = ports
        self.diags: dict[int, SockDiag] = {own.netns: own}
        self.watches: dict[int, DestroyWatch] = {}
        self.refused: dict[int, float] = {}  # netns -> when to try entering it again
        self.looked_at = _namespaces.at
        self.drained_at = -1e9
        # Without CAP_NET_ADMIN (--user) there is no watch: vanished sockets are learnt
        # from packets.
        with contextlib.suppress(OSError):
            self.watches[own.netns] = DestroyWatch(ports, netns=own.netns)

    def diag(self, netns: int) -> SockDiag | None:
        found = self.diags.get(netns)
        if found is not None:
            return found
        now = time.monotonic()
        if self.refused.get(netns, 0.0) > now or len(self.diags) >= MAX_NAMESPACES:
            return None
        pid = _namespaces.get().get(netns)
        if pid is None:
            return None
        try:
            made = self.diags[netns] = SockDiag.inside(pid, netns)
        except OSError:
            self.refused[netns] = now + NAMESPACE_RETRY
            return None
        with contextlib.suppress(OSError):
            self.watches[netns] = DestroyWatch.inside(pid, netns, self.ports)
        return made

    def prune(self) -> None:
        """Close the sockets of namespaces that have no process left (after each look at
        the host's namespaces)."""
        if _namespaces.at == self.looked_at:
            return
        self.looked_at = _namespaces.at
        alive = _namespaces.readers
        for netns in [ns for ns in self.diags if ns != self.own.netns and ns not in alive]:
            self.diags.pop(netns).close()
            watch = self.watches.pop(netns, None)
            if watch is not None:
                watch.close()
        for netns in [ns for ns in self.refused if ns not in alive]:
            del self.refused[netns]

    def drain(self) -> list[SocketEntry]:
        now = time.monotonic()
        if now - self.drained_at < DRAIN_GAP:
            return []
        self.drained_at = now
        out: list[SocketEntry] = []
        for watch in list(self.watches.values()):
            try:
                out.extend(watch.drain())
            except OSError:
                continue
        return out

    @property
    def overruns(self) -> int:
        return sum(w.overruns for w in self.watches.values())

    def close(self) -> None:
        for diag in self.diags.values():
            diag.close()
        for watch in self.watches.values():
            watch.close()


class Attributor:
    """Matches connections to the sockets of local processes, a look at a time.

    A new connection is looked for at once (the capture process hands it over at its
    SYN): a call of a few milliseconds is still open then. A client address that no
    network namespace of this host has is remote: settled at the first look at the host's
    addresses taken after the connection appeared (one second at most), without touching
    a socket table. A local one is looked up in its namespace by sock_diag (microseconds:
    this namespace's socket, or one made inside the other namespace; /proc tables at
    most once a second where that cannot be done), then its inode among the descriptors
    the processes that owned connections before used last (and the next ones), then
    among all those of these owners, of the processes in the socket's cgroup and of
    those in its namespace (all of a container's or a client's namespace; of a host's,
    those that started lately), fewest descriptors first, then of every other process
    (newest first, as long as such walks stay within WALK_SHARE of the time), and those
    of processes with hundreds of descriptors (a leaker's) last of all: the small client
    of a short call is not made to wait behind them, whether it owned connections before
    or not. A socket or owner not found yet is looked for again, less and less often
    (RETRY_FIRST doubling up to RETRY_MAX), until found, or the kernel says it destroyed
    the socket, or the connection closes."""

    def __init__(self, ports: frozenset[int]) -> None:
        self.ports = ports
        self.pending: dict[str, _Pending] = {}
        self.by_tuple: dict[tuple[Endpoint, Endpoint], str] = {}
        self.queue: list[tuple[float, int, str]] = []  # (next_try, n, uid): a heap
        self.queued = 0
        self.settled: set[str] = set()  # attributed or judged remote, still open
        self.known = ProcessCache()  # processes and user names, looked up once
        self.counts: dict[str, int] = {}
        self.diag = SockDiag()
        self.kernel = _Kernel(self.diag, ports)
        self.cgroups = CgroupPaths()
        self.last_full = -1e9
        self.next_walk = -1e9  # monotonic: when every process may be walked again
        self.recent_owners: dict[int, None] = {}  # pids that owned connections, newest last
        self.owner_fd: dict[int, int] = {}  # pid -> the descriptor its last connection had
        self.fd_counts: dict[int, int] = {}  # pid -> its descriptors, when last listed
        self.traits: dict[int, tuple[int, int | None]] = {}  # pid -> its sockets' uid, cgroup
        self.destroyed: dict[tuple[Endpoint, Endpoint], tuple[int, float]] = {}
        # Verdicts reached before the connection's row was written: applied with it.
        self.deferred: dict[str, tuple[str, ProcessInfo | None, float, SocketDetail | None]] = {}

    # -- connections in and out ------------------------------------------------------------

    def observe(self, records: list[dict[str, Any]], now: float) -> list[Settled]:
        """Note new connections; return the verdicts of those that closed (or whose client
        socket the kernel destroyed) before a look could settle them (counted, never
        guessed)."""
        ended = self._destroyed()
        for r in records:
            uid = r["uid"]
            closed = r["end_reason"] not in (None, "open_at_end")
            if closed:
                if uid in self.settled:
                    self.settled.discard(uid)
                    continue
                pending = self._drop(uid)
                first_seen = pending.first_seen if pending is not None else now
                owners = address_owners(r["orig_h"], seen_at=first_seen)
                if owners == set():
                    ended.append(Settled(uid, "remote", None))
                else:
                    ended.append(Settled(uid, "closed_before_attribution", None,
                                         self._detail(pending, owners)))
                continue
            if uid in self.settled or uid in self.pending:
                continue
            p = _Pending((r["orig_h"], r["orig_p"]), (r["resp_h"], r["resp_p"]), now, now,
                         ts=r.get("ts") or now)
            gone = self.destroyed.pop((p.orig, p.resp), None)
            # A socket on its 4-tuple destroyed since its first packet: most likely its own,
            # gone before it got here (the look says: nothing there is then final).
            p.destroyed = gone is not None and gone[1] >= p.ts
            self.pending[uid] = p
            self.by_tuple[(p.orig, p.resp)] = uid
            self._push(uid, p)
        return ended

    def next_due(self) -> float | None:
        """When (time.time()) the next pending connection is due a look; None: none."""
        queue = self.queue
        while queue:
            at, _n, uid = queue[0]
            p = self.pending.get(uid)
            if p is not None and p.next_try == at:
                return at
            heapq.heappop(queue)
        return None

    def scan(self, now: float, *, everything: bool = False) -> list[Settled]:
        """The verdicts of the pending connections settled by this look: those due a look,
        or with ``everything`` all of them (the last look, at the end of a capture)."""
        out = self._destroyed()
        self.kernel.prune()
        due = list(self.pending.items()) if everything else self._due(now)
        if not due:
            return out
        own = self.diag.netns
        lookups: dict[int, list[tuple[str, _Pending]]] = {}
        for uid, p in due:
            if p.namespaces is None:
                owners = address_owners(p.orig[0], seen_at=p.first_seen)
                if owners is None:  # no look at the host's addresses since it appeared
                    p.next_try = now + p.wait
                    p.wait = min(p.wait * 2, RETRY_MAX)
                    self._push(uid, p)
                    continue
                if not owners:
                    out.append(self._settle(uid, "remote", None, None))
                    continue
                if own in owners and _loopback(p.orig[0]):
                    owners = {own}  # another namespace's loopback never reaches our capture
                p.namespaces = owners
            p.next_try = now + p.wait  # if this look does not settle it
            p.wait = min(p.wait * 2, RETRY_MAX)
            self._push(uid, p)
            for ns in p.namespaces:
                lookups.setdefault(ns, []).append((uid, p))
        matched = self._lookup(lookups)
        for uid, p in due:
            if p.destroyed and uid not in matched and uid in self.pending:
                self._count("client_socket_destroyed")
                out.append(self._settle(uid, "closed_before_attribution", None,
                                        self._detail(p, None)))
        holders = self._owners(matched)
        for uid, entry in matched.items():
            p = self.pending[uid]
            p.entry = entry if entry.state != _TIME_WAIT else p.entry
            held = holders.get(entry.inode) if entry.inode else None
            info = self.known.process(held[0]) if held is not None else None
            if info is not None:
                self._owned(info.pid, held[1] if held is not None else None, entry)
                out.append(self._settle(uid, "local", info, self._detail(p, None)))
            elif not entry.inode:
                # No process holds it any more: closed, the kernel finishing it.
                self._count("client_socket_closed")
                out.append(self._settle(uid, "closed_before_attribution", None,
                                        self._detail(p, None)))
        return out

    def close(self) -> None:
        self.kernel.close()

    # -- the looks -------------------------------------------------------------------------

    def _lookup(self, lookups: dict[int, list[tuple[str, _Pending]]]) -> dict[str, SocketEntry]:
        """The client sockets found for the connections to look up in each namespace."""
        matched: dict[str, SocketEntry] = {}
        elsewhere: dict[int, list[tuple[str, _Pending]]] = {}
        for ns, items in lookups.items():
            items = [(uid, p) for uid, p in items if uid not in matched]
            if not items:
                continue
            diag = self.kernel.diag(ns)
            if diag is None:
                elsewhere[ns] = items
                continue
            try:
                if len(items) > BATCH_LOOKUPS:
                    self._count("dumps")
                    table = client_sockets(diag.dump_clients(self.ports))
                    for uid, p in items:
                        found = table.get((p.orig, p.resp))
                        if found is not None:
                            matched[uid] = found
                else:
                    for uid, p in items:
                        found = diag.lookup(p.orig, p.resp)
                        if found is not None:
                            matched[uid] = found
            except OSError:
                continue  # netlink timed out: these are looked at again later
        if elsewhere and time.monotonic() - self.last_full >= FULL_SCAN_INTERVAL:
            self.last_full = time.monotonic()
            own = self.diag.netns
            sockets = client_sockets(socket_tables(self.ports, own=[], own_netns=own,
                                                   only=set(elsewhere)))
            for items in elsewhere.values():
                for uid, p in items:
                    found = sockets.get((p.orig, p.resp))
                    if found is not None and uid not in matched:
                        matched[uid] = found
        return matched

    def _owners(self, matched: dict[str, SocketEntry]) -> dict[int, tuple[int, int]]:
        """(pid, descriptor) holding each matched socket's inode, where found."""
        groups: dict[tuple[int, int | None, int], set[int]] = {}
        for entry in matched.values():
            if entry.inode:
                groups.setdefault((entry.uid, entry.cgroup, entry.netns),
                                  set()).add(entry.inode)
        found: dict[int, tuple[int, int]] = {}
        recent = list(reversed(self.recent_owners))
        for (uid, cgroup, netns), inodes in groups.items():
            # Owners whose sockets had another uid or cgroup cannot hold these. After the
            # descriptors they used last, these owners, the processes of the socket's
            # cgroup and those of its namespace (of a host's, only those started lately)
            # are listed fewest descriptors first, and a leaker's thousands after every
            # other process (when a walk of them is due): a short call's client must
            # not wait behind them, even before it is known.
            likely = [pid for pid in recent if self.traits.get(pid, (uid, cgroup)) ==
                      (uid, cgroup)]
            hints = {pid: [fd + d for d in FD_WINDOW if fd + d >= 0]
                     for pid in likely if (fd := self.owner_fd.get(pid)) is not None}

            def candidates(cgroup: int | None = cgroup, netns: int = netns) -> list[int]:
                path = self.cgroups.path(cgroup)
                return [*(self.cgroups.procs(path) if path else []),
                        *namespace_processes(netns, NAMESPACE_PROCESSES)]

            walked: list[float] = []
            found.update(find_owners(inodes, likely, hints=hints, candidates=candidates,
                                     everyone=time.monotonic() >= self.next_walk,
                                     sizes=self.fd_counts, order=True, walked=walked))
            if walked:
                self.next_walk = time.monotonic() + walked[0] / WALK_SHARE
                self._count("process_walks")
        if len(self.fd_counts) > FD_COUNTS:  # counted, never owners: forgotten
            self.fd_counts = {pid: self.fd_counts[pid] for pid in self.recent_owners
                              if pid in self.fd_counts}
        return found

    def _destroyed(self) -> list[Settled]:
        """Pending connections whose client socket the kernel announced destroyed: closed
        before attribution, at once. Others are remembered a while (their connection may
        not have reached us yet)."""
        out = []
        now = time.time()
        for entry in self.kernel.drain():
            key = (entry.local, entry.remote)
            uid = self.by_tuple.get(key)
            if uid is None:
                self.destroyed[key] = (entry.cookie, now)
                if len(self.destroyed) > RECENTLY_DESTROYED:
                    del self.destroyed[next(iter(self.destroyed))]
                continue
            p = self.pending[uid]
            if p.entry is not None and p.entry.cookie:
                if p.entry.cookie == entry.cookie:  # the very socket seen before
                    self._count("client_socket_destroyed")
                    out.append(self._settle(uid, "closed_before_attribution", None,
                                            self._detail(p, None)))
                continue  # else another socket on the same 4-tuple (an earlier one)
            # Never seen alive: a look now confirms that nothing is there any more.
            p.destroyed = True
            p.next_try = now
            self._push(uid, p)
        return out

    # -- bookkeeping -----------------------------------------------------------------------

    def _push(self, uid: str, p: _Pending) -> None:
        self.queued += 1
        heapq.heappush(self.queue, (p.next_try, self.queued, uid))

    def _due(self, now: float) -> list[tuple[str, _Pending]]:
        out = []
        queue = self.queue
        while queue and queue[0][0] <= now:
            at, _n, uid = heapq.heappop(queue)
            p = self.pending.get(uid)
            if p is not None and p.next_try == at:
                out.append((uid, p))
        return out

    def _drop(self, uid: str) -> _Pending | None:
        p = self.pending.pop(uid, None)
        if p is not None and self.by_tuple.get((p.orig, p.resp)) == uid:
            del self.by_tuple[(p.orig, p.resp)]
        return p

    def _settle(self, uid: str, verdict: str, info: ProcessInfo | None,
                detail: SocketDetail | None) -> Settled:
        self._drop(uid)
        self.settled.add(uid)
        return Settled(uid, verdict, info, detail)

    def _owned(self, pid: int, fd: int | None, entry: SocketEntry) -> None:
        self.recent_owners.pop(pid, None)
        self.recent_owners[pid] = None
        if fd is not None:
            self.owner_fd[pid] = fd
            # It has that many descriptors at least (they are numbered from 0): where
            # they cannot be counted, a leaker found at its next descriptor each time is
            # known to be big all the same.
            self.fd_counts[pid] = max(self.fd_counts.get(pid, 0), fd + 1)
        self.traits[pid] = (entry.uid, entry.cgroup)
        while len(self.recent_owners) > RECENT_OWNERS:
            old = next(iter(self.recent_owners))
            del self.recent_owners[old]
            self.owner_fd.pop(old, None)
            self.traits.pop(old, None)
        if len(self.fd_counts) > 4 * RECENT_OWNERS:
            self.fd_counts = {pid: self.fd_counts[pid] for pid in self.recent_owners
                              if pid in self.fd_counts}

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def _detail(self, p: _Pending | None, owners: set[int] | None) -> SocketDetail | None:
        """What is known of a connection's client socket without its owner."""
        entry = p.entry if p is not None else None
        spaces = owners if owners is not None else (p.namespaces if p is not None else None)
        netns = entry.netns if entry is not None else (
            next(iter(spaces)) if spaces is not None and len(spaces) == 1 else None)
        if entry is None:
            return SocketDetail(netns=netns) if netns is not None else None
        path = self.cgroups.path(entry.cgroup)
        names = cgroup_names(path) if path else None
        return SocketDetail(uid=entry.uid, user=self.known.user(entry.uid), netns=netns,
                            cgroup=names.path if names else None,
                            container=names.container if names else None,
                            pod=names.pod if names else None)



def _loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1 (as the decoder writes them)."""
    return address.startswith(("127.", "::ffff:127.")) or address == "::1"
