"""Closing leaked connections on request: which open connections of a client may be
closed (the database's view joined with the kernel's socket table now), closing them
with SOCK_DESTROY, checking with the kernel that they are gone, and the `ss -K` lines
that do the same by hand.

A connection is a candidate only when all of these hold:
- it is open in the database and its 4-tuple is in the kernel's socket table now (the
  server's accepted socket here, or the client's: here or, for a client process in
  another network namespace of this host, in that one); where the client process is
  known and its socket is local, that process holds the socket (its inode is one of
  the process's descriptors): a new connection that reused the ports is not it;
- it opened at least ``older_than`` seconds ago;
- its last activity is at least ``idle`` seconds ago. Activity is any HTTP/2 frame but
  PING (an RPC's HEADERS and DATA, WINDOW_UPDATE, SETTINGS and their ACKs, RST_STREAM,
  GOAWAY: last_activity_ts), and the last RPC; keepalive PINGs are not activity. Data
  the kernel saw on the socket after the database's last write (tcp_info's last data
  sent or received) counts too, whatever it was: the agent has not said yet;
- its inside can be seen: never a TLS connection (its RPCs are encrypted) nor one open
  before the capture (its earlier RPCs were never seen), nor one with an RPC still in
  progress (a stream). Those are listed as excluded, with the reason.

SOCK_DESTROY of a TCP socket aborts it: its peer gets a RST. The server's accepted
socket goes first (that frees the server's descriptor, the point of it), then the
client's where it is on this host (usually already gone: the RST reached it).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tracer.attribution.sockdiag import DiagSocket, SockDiag

TCP_LISTEN = 10
TCP_TIME_WAIT = 6
# The agent writes a batch every half second, of what it read up to a moment before: data
# the kernel saw on a socket within this long before the last write may not be in it.
WRITE_LAG_S = 2.0
MAX_CANDIDATES = 1_000_000  # rows read of one client at most (the table is capped too)


@dataclass(frozen=True)
class Candidate:
    """An open connection that may be closed, and its sockets on this host."""

    conn: dict[str, Any]  # the database's row (store.reaps.open_connections)
    age_s: float
    idle_s: float
    server: DiagSocket | None  # the server's accepted socket, in this namespace
    client: DiagSocket | None  # the client's socket, here or in its own namespace
    client_pid: int | None  # where the client socket is in another namespace: its process


@dataclass(frozen=True)
class Excluded:
    conn: dict[str, Any]
    reason: str


@dataclass
class Plan:
    now: float
    older_than_s: float
    idle_s: float
    candidates: list[Candidate] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    candidate: Candidate
    result: str  # closed | already_gone | failed | unsupported
    error: str | None  # errno name and text when not closed
    sockets: tuple[str, ...]  # the ends destroyed: "server", "client"


# A destroy call: the socket and the namespace's SockDiag -> 0 or an errno.
Destroyer = Callable[[SockDiag, DiagSocket], int]


def kernel_destroy(diag: SockDiag, sock: DiagSocket) -> int:
    return diag.destroy(sock)


def failing_destroy(code: int) -> Destroyer:
    """A destroyer that answers ``code`` without asking the kernel (the seam the fallback
    paths are tested through: the kernel here has CONFIG_INET_DIAG_DESTROY)."""
    def destroy(_diag: SockDiag, _sock: DiagSocket) -> int:
        return code
    return destroy


class Kernel:
    """The sock_diag sockets of this namespace and of the client processes' namespaces."""

    def __init__(self) -> None:
        self.here = SockDiag()
        self.others: dict[tuple[int, int], SockDiag] = {}

    def close(self) -> None:
        self.here.close()
        for diag in self.others.values():
            diag.close()
        self.others.clear()

    def diag_of(self, pid: int, netns: int) -> SockDiag | None:
        """A sock_diag socket in the namespace of process ``pid`` (None when it cannot be
        entered: no CAP_SYS_ADMIN, the process gone or moved)."""
        key = (pid, netns)
        if key not in self.others:
            try:
                self.others[key] = SockDiag.inside(pid, netns)
            except OSError:
                return None
        return self.others[key]

    def sockets_of(self, diag: SockDiag, ports: frozenset[int]) -> dict[tuple[Any, ...],
                                                                          DiagSocket]:
        """The sockets of ``diag``'s namespace on ``ports`` by (local, remote), listeners
        and TIME_WAIT left out."""
        return {(s.local, s.remote): s for s in diag.sockets(ports)
                if s.state not in (TCP_LISTEN, TCP_TIME_WAIT)}


def process_inodes(pid: int) -> set[int] | None:
    """The socket inodes process ``pid`` holds, None when its descriptors cannot be read."""
    out = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def plan(rows: Iterable[dict[str, Any]], kernel: Kernel, ports: frozenset[int], *,
         now: float, older_than_s: float, idle_s: float,
         last_write_ts: float | None) -> Plan:
    """Which of the open connections ``rows`` may be closed, and why the others may not."""
    out = Plan(now, older_than_s, idle_s)
    here = kernel.sockets_of(kernel.here, ports)
    own_netns = kernel.here.netns
    elsewhere: dict[tuple[int, int], dict[tuple[Any, ...], DiagSocket] | None] = {}
    inodes: dict[int, set[int] | None] = {}
    for n, conn in enumerate(rows):
        if n >= MAX_CANDIDATES:
            break
        orig = (conn["orig_h"], conn["orig_p"])
        resp = (conn["resp_h"], conn["resp_p"])
        server = here.get((resp, orig))
        client = here.get((orig, resp))
        client_pid = None
        pid, netns = conn.get("pid"), conn.get("client_netns")
        if client is None and pid is not None and netns is not None and netns != own_netns:
            key = (pid, netns)
            if key not in elsewhere:
                diag = kernel.diag_of(pid, netns)
                elsewhere[key] = kernel.sockets_of(diag, ports) if diag is not None else None
            table = elsewhere[key]
            client = table.get((orig, resp)) if table is not None else None
            client_pid = pid if client is not None else None
        if server is None and client is None:
            out.excluded.append(Excluded(conn, "not in the kernel's socket table (closed "
                                               "since the agent's last write, or not on "
                                               "this host)"))
            continue
        if client is not None and pid is not None:
            if pid not in inodes:
                inodes[pid] = process_inodes(pid)
            held = inodes[pid]
            if held is not None and client.inode and client.inode not in held:
                out.excluded.append(Excluded(conn, f"its client socket is not held by pid "
                                                   f"{pid} (another connection on the same "
                                                   "ports?)"))
                continue
        age = now - conn["opened_ts"]
        activity = float(conn["activity_ts"])
        for sock in (server, client):
            if sock is not None and sock.last_data_ms is not None:
                seen = now - sock.last_data_ms / 1000.0
                if last_write_ts is None or seen > last_write_ts - WRITE_LAG_S:
                    activity = max(activity, seen)  # not in the database yet: counted
        idle = now - activity
        reason = None
        if conn["tls"]:
            reason = "TLS: its RPCs are encrypted, so idle cannot be told"
        elif conn["mid_stream"]:
            reason = "open before the capture: its earlier RPCs were never seen"
        elif conn["rpc_in_progress"]:
            reason = "an RPC still in progress (a stream)"
        elif age < older_than_s:
            reason = f"younger than --older-than ({_secs(age)} old)"
        elif idle < idle_s:
            reason = f"active within --idle (last activity {_secs(idle)} ago)"
        if reason is not None:
            out.excluded.append(Excluded(conn, reason))
            continue
        out.candidates.append(Candidate(conn, age, idle, server, client, client_pid))
    return out


def close(plan_: Plan, kernel: Kernel, destroy: Destroyer = kernel_destroy,
          ports: frozenset[int] = frozenset()) -> list[Outcome]:
    """SOCK_DESTROY of each candidate's sockets (the server's first), then one look at the
    kernel's tables to tell closed from not. EOPNOTSUPP (no CONFIG_INET_DIAG_DESTROY) or
    EPERM/EACCES (no CAP_NET_ADMIN) stops at the first: the others would answer the same."""
    outcomes: list[Outcome] = []
    stop: tuple[str, str] | None = None  # (result, error) given to the rest
    for cand in plan_.candidates:
        if stop is not None:
            outcomes.append(Outcome(cand, stop[0], stop[1], ()))
            continue
        destroyed: list[str] = []
        error = None
        gone = 0
        for side, sock in (("server", cand.server), ("client", cand.client)):
            if sock is None:
                continue
            diag = kernel.here if side == "server" or cand.client_pid is None else \
                kernel.diag_of(cand.client_pid, sock.netns)
            if diag is None:
                error = error or "cannot enter the client's network namespace"
                continue
            code = destroy(diag, sock)
            if code == 0:
                destroyed.append(side)
            elif code in (errno.ENOENT, errno.ESTALE):
                gone += 1  # gone already (the client's, after the server's RST)
            elif code == errno.EOPNOTSUPP:
                stop = ("unsupported", describe_errno(code))
                break
            elif code in (errno.EPERM, errno.EACCES):
                stop = ("failed", describe_errno(code))
                break
            else:
                error = error or describe_errno(code)
        if stop is not None and not destroyed:
            outcomes.append(Outcome(cand, stop[0], stop[1], ()))
            continue
        if destroyed:
            outcomes.append(Outcome(cand, "closed", error, tuple(destroyed)))
        elif error is None and gone:
            outcomes.append(Outcome(cand, "already_gone", None, ()))
        else:
            outcomes.append(Outcome(cand, "failed", error or "nothing destroyed", ()))
    return verify(outcomes, kernel, ports)


def verify(outcomes: list[Outcome], kernel: Kernel, ports: frozenset[int]) -> list[Outcome]:
    """Each "closed" outcome checked against the kernel's tables now: a socket of it
    still there (the same one: its cookie) makes it "failed"."""
    if not any(o.result == "closed" for o in outcomes):
        return outcomes
    here = {s.cookie for s in kernel.here.sockets(ports)}
    others: dict[tuple[int, int], set[int]] = {}
    out = []
    for o in outcomes:
        c = o.candidate
        left = []
        if o.result == "closed":
            if c.server is not None and c.server.cookie in here:
                left.append("server")
            if c.client is not None:
                if c.client_pid is None:
                    still = c.client.cookie in here
                else:
                    key = (c.client_pid, c.client.netns)
                    if key not in others:
                        diag = kernel.diag_of(*key)
                        others[key] = {s.cookie for s in diag.sockets(ports)} \
                            if diag is not None else set()
                    still = c.client.cookie in others[key]
                if still:
                    left.append("client")
        if left:
            out.append(Outcome(c, "failed", f"still in the kernel's socket table: "
                                            f"{', '.join(left)} socket", o.sockets))
        else:
            out.append(o)
    return out


def describe_errno(code: int) -> str:
    name = "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode.get(code, str(code))
    text = os.strerror(code)
    if code == errno.EOPNOTSUPP:
        return (f"{name}: {text}: this kernel was built without CONFIG_INET_DIAG_DESTROY, "
                "so sockets cannot be destroyed through sock_diag")
    if code in (errno.EPERM, errno.EACCES):
        return f"{name}: {text}: destroying sockets needs CAP_NET_ADMIN (run it as root)"
    return f"{name}: {text}"


def _endpoint(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def ss_command(cand: Candidate) -> list[str]:
    """The `ss -K` command lines that close this candidate's sockets by hand (each end in
    its own network namespace)."""
    out = []
    for sock, pid in ((cand.server, None), (cand.client, cand.client_pid)):
        if sock is None:
            continue
        prefix = f"nsenter --net=/proc/{pid}/ns/net " if pid is not None else ""
        out.append(f"{prefix}ss -K dst {_endpoint(sock.remote[0])} dport = {sock.remote[1]}"
                   f" src {_endpoint(sock.local[0])} sport = {sock.local[1]}")
    return out


def who_runs() -> tuple[int, str | None]:
    import pwd

    uid = os.getuid()
    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, None


def records(outcomes: list[Outcome], now: float | None = None) -> list[dict[str, Any]]:
    """The reaps table's rows of ``outcomes`` (store.reaps.record)."""
    uid, user = who_runs()
    ts = time.time() if now is None else now
    out = []
    for o in outcomes:
        c = o.candidate.conn
        out.append({"ts": ts, "uid": c["uid"], "orig_h": c["orig_h"], "orig_p": c["orig_p"],
                    "resp_h": c["resp_h"], "resp_p": c["resp_p"], "pid": c["pid"],
                    "process_start": c["process_start"], "result": o.result,
                    "error": o.error, "sockets": ",".join(o.sockets) or None,
                    "by_uid": uid, "by_user": user})
    return out


class ReapError(Exception):
    """A reap that cannot start (unknown client, no port known); the message says why."""


@dataclass
class Reap:
    """What one `tracer reap` saw and did."""

    client: str
    ports: list[int]
    view: dict[str, Any]  # store.reaps.agent_view
    stale: str | None  # why the database's view may miss recent RPCs, None when current
    plan: Plan
    closing: bool = False  # asked to close, and allowed to
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def unsupported(self) -> bool:
        return any(o.result == "unsupported" for o in self.outcomes)


def staleness(view: dict[str, Any], now: float, idle_s: float) -> str | None:
    """Why the database may not hold the RPCs of the last ``idle_s`` seconds, or None."""
    if not view["running"]:
        if view["capture"] is None:
            return "no live capture ever wrote this database"
        return (f"no live capture is writing this database (capture {view['capture']}, "
                f"pid {view['pid']}, has stopped)")
    last = view["last_write_ts"]
    if last is None or now - last > idle_s:
        ago = "never" if last is None else f"{_secs(now - last)} ago"
        return (f"the live capture (capture {view['capture']}, pid {view['pid']}) last wrote "
                f"{ago}, longer ago than --idle")
    return None


def reap(db: Any, client: str, *, older_than_s: float, idle_s: float, close_them: bool,
         trust_stale: bool = False, destroy: Destroyer = kernel_destroy,
         now: Callable[[], float] = time.time) -> Reap:
    """The candidates of ``client`` (a pid or an IP) and, with ``close_them``, closed and
    recorded in ``db`` (opened for writing then). A stale view of the database (no live
    agent, or its last write older than ``idle_s``) closes nothing unless ``trust_stale``.
    """
    from store import reaps as store_reaps

    if not store_reaps.client_known(db, client):
        known = store_reaps.known_clients(db)
        hint = (f"; clients with open connections: {', '.join(known)}" if known
                else "; no client has an open connection")
        what = "process id" if client.isdigit() else "client address"
        raise ReapError(f"no connection of {what} {client} in the database{hint}")
    rows_now = store_reaps.open_connections(db, client)
    unix = [r for r in rows_now if r.get("protocol") == "unix"]
    if unix and len(unix) == len(rows_now):
        paths = sorted({r["resp_h"] for r in unix})
        raise ReapError(
            f"the {len(unix)} open connection{'s' if len(unix) != 1 else ''} of {client} "
            f"{'are' if len(unix) != 1 else 'is'} to the Unix socket {', '.join(paths)}: "
            "SOCK_DESTROY closes TCP sockets only, so tracer cannot close them. The client "
            "process closes them when it closes its channels or exits: restart it "
            f"(`kill {client}`" + (")" if client.isdigit() else " for its pid)")
            + ", or restart the server to drop every connection")
    ports = store_reaps.server_ports(db)
    if not ports:
        raise ReapError("the database names no server port (no capture recorded)")
    view = store_reaps.agent_view(db)
    stale = staleness(view, now(), idle_s)
    kernel = Kernel()
    try:
        # Connections to a Unix socket cannot be destroyed from here (above): left out.
        rows = [r for r in store_reaps.open_connections(db, client)
                if r.get("protocol") != "unix"]
        t = now()
        result = Reap(client, ports, view, stale,
                      plan(rows, kernel, frozenset(ports), now=t, older_than_s=older_than_s,
                           idle_s=idle_s, last_write_ts=view["last_write_ts"]))
        if close_them and (stale is None or trust_stale):
            result.closing = True
            result.outcomes = close(result.plan, kernel, destroy, frozenset(ports))
            store_reaps.record(db, records(result.outcomes, now()))
    finally:
        kernel.close()
    return result


def _secs(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


__all__ = ["Candidate", "Excluded", "Kernel", "Outcome", "Plan", "Reap", "ReapError", "close",
           "describe_errno", "failing_destroy", "kernel_destroy", "plan", "reap", "records",
           "ss_command", "staleness"]
