"""The server behind the watched ports, when it runs on this host: its listening sockets'
accept queues and its process's file descriptors against RLIMIT_NOFILE.

A server out of file descriptors cannot accept: the kernel still completes the handshakes
of new connections into the listening socket's accept queue, the server never takes them,
no SETTINGS comes back and the clients report the preface timeout (DESIGN.md). What shows
it, read here once a second:

- the listening sockets on the ports: this network namespace's from a sock_diag dump of
  the LISTEN state (for a listener ``idiag_rqueue`` is the accept queue now and
  ``idiag_wqueue`` its maximum, the listen backlog); other namespaces' from
  /proc/PID/net/tcp and tcp6, whose ``rx_queue`` of a LISTEN line is the accept queue now
  (its ``tx_queue`` is the send queue, always 0 there: the maximum is not shown, so it is
  unknown for those);
- the process holding each listener (its socket inode in /proc/PID/fd: found once by a
  walk of the processes, then verified with one readlink per read);
- that process's open descriptors (the size of /proc/PID/fd, else its entries), the soft
  limit of RLIMIT_NOFILE ("Max open files" in /proc/PID/limits), whether it is stopped
  (SIGSTOP: state T in /proc/PID/stat), its command line.

The parsers are pure (text or bytes in, values out); ``ServerReader`` does the reading.
No listener found (the server is on another host) gives no sample: nothing is guessed.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tracer.attribution.sockdiag import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    SockDiag,
    _address,
    request_body,
)
from tracer.attribution.sockets import LISTEN, _addr4, _addr6, _namespaces, _read, process_info

# The kernel's inet_diag_msg (include/uapi/linux/inet_diag.h): family, state, timer,
# retrans, then the socket id (ports, addresses, interface, cookie), then these.
_SOCKID = struct.Struct(">HH16s16sI")  # the id up to its cookie
_COOKIE = struct.Struct("=II")
_MSG_HEAD = 4  # inet_diag_msg: family, state, timer, retrans
_MSG_TAIL = struct.Struct("=IIIII")  # after the id: expires, rqueue, wqueue, uid, inode

DISCOVER_S = 10.0  # other namespaces' tables are all read this often (a listener moved)
OWNER_RETRY_S = 10.0  # a listener no process was found holding: the walk again after this


@dataclass(frozen=True)
class Listener:
    """A listening socket on a watched port."""

    address: str
    port: int
    inode: int
    netns: int
    queue: int  # connections the kernel completed that the server has not accepted yet
    queue_max: int | None  # the accept queue's maximum (the listen backlog); None: unknown


@dataclass(frozen=True)
class ServerSample:
    """One listener and the process holding it, at one moment."""

    listener: Listener
    pid: int | None  # None: no process found holding the socket (not ours to see)
    process_start: float | None
    comm: str | None
    cmdline: str | None
    fds: int | None  # open file descriptors; None when /proc/PID/fd cannot be read
    fd_limit: int | None  # soft RLIMIT_NOFILE; None when unknown or unlimited
    stopped: bool  # stopped by a signal (SIGSTOP) or a tracer


# -- parsers (pure) ----------------------------------------------------------------------


def parse_limits(text: str) -> tuple[int | None, int | None] | None:
    """The soft and hard RLIMIT_NOFILE from /proc/PID/limits ("unlimited" is None), or
    None when the line is missing."""
    for line in text.splitlines():
        if line.startswith("Max open files"):
            fields = line[len("Max open files"):].split()
            if len(fields) < 2:
                return None
            return _limit(fields[0]), _limit(fields[1])
    return None


def _limit(value: str) -> int | None:
    return int(value) if value.isdigit() else None


def parse_listeners(text: str, v6: bool, netns: int, ports: frozenset[int]) -> list[Listener]:
    """The LISTEN sockets on ``ports`` in /proc/net/tcp (or tcp6) content. Their
    ``rx_queue`` is the accept queue now; the maximum is not in this table (None)."""
    out = []
    conv = _addr6 if v6 else _addr4
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or int(fields[3], 16) != LISTEN:
            continue
        host, port = fields[1].rsplit(":", 1)
        if int(port, 16) not in ports:
            continue
        _tx, rx = fields[4].split(":")
        out.append(Listener(conv(host), int(port, 16), int(fields[9]), netns, int(rx, 16), None))
    return out


def parse_diag_listener(data: bytes, pos: int, end: int, netns: int) -> Listener | None:
    """A listener from one inet_diag_msg at ``pos`` (after its netlink header; the message
    ends at ``end``): for a LISTEN socket the kernel puts the accept queue in
    idiag_rqueue and its maximum in idiag_wqueue."""
    tail = pos + _MSG_HEAD + _SOCKID.size + _COOKIE.size
    if tail + _MSG_TAIL.size > min(end, len(data)):
        return None
    family, state = data[pos], data[pos + 1]
    if state != LISTEN:
        return None
    sport, _dport, src, _dst, _if = _SOCKID.unpack_from(data, pos + _MSG_HEAD)
    _exp, rqueue, wqueue, _uid, inode = _MSG_TAIL.unpack_from(data, tail)
    return Listener(_address(family, src), sport, inode, netns, rqueue, wqueue)


def stopped_state(stat_text: str) -> bool:
    """Whether /proc/PID/stat says the process is stopped (T) or stopped by a tracer (t)."""
    rest = stat_text[stat_text.rfind(")") + 1:].split()
    return bool(rest) and rest[0] in ("T", "t")


# -- reading -----------------------------------------------------------------------------


class ListenerDiag:
    """A sock_diag socket that dumps this namespace's listening TCP sockets."""

    def __init__(self) -> None:
        self.diag = SockDiag()
        self.netns = self.diag.netns

    def close(self) -> None:
        self.diag.close()

    def listeners(self, ports: frozenset[int]) -> list[Listener]:
        out: list[Listener] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            found = self.diag.exchange(request_body(family, 1 << LISTEN),
                                       NLM_F_REQUEST | NLM_F_DUMP, parse_diag_listener)
            out.extend(entry for entry in found if entry.port in ports)
        return out


@dataclass
class _Owner:
    pid: int
    fd: str  # the descriptor that holds the socket: one readlink tells it still does
    start: float | None
    comm: str | None
    cmdline: str | None


def find_socket(inode: int, likely: list[int]) -> tuple[int, str] | None:
    """The (pid, fd) holding socket ``inode``: the ``likely`` pids first, then every
    process; None when no process we can read holds it."""
    target = f"socket:[{inode}]"
    pids = [str(p) for p in likely] + [p for p in os.listdir("/proc") if p.isdigit()]
    for pid in pids:
        base = f"/proc/{pid}/fd/"
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(base + fd) == target:
                    return int(pid), fd
            except OSError:
                continue
    return None


class ServerReader:
    """Reads the listeners on ``ports`` and their processes: ``read()`` once a second.

    Costs per read, with the owners known: one sock_diag dump (LISTEN sockets only), and
    per server process a listing of /proc/PID/fd, /proc/PID/limits, /proc/PID/stat and one
    readlink. The walk of every process's descriptors happens only for a listener not
    seen before (or whose holder closed it), and at most every OWNER_RETRY_S for one that
    no process we can read holds."""

    def __init__(self, ports: frozenset[int]) -> None:
        self.ports = ports
        self.diag = ListenerDiag()
        self.owners: dict[int, _Owner] = {}  # listener inode -> its holder
        self.unowned: dict[int, float] = {}  # inode -> when to look for its holder again
        self.foreign: dict[int, str] = {}  # other namespaces with a listener: netns -> pid
        self.next_discovery = 0.0

    def close(self) -> None:
        self.diag.close()

    def read(self, extra: Sequence[Listener] = ()) -> list[ServerSample]:
        """The listeners on the ports, and ``extra`` ones found otherwise (the Unix sockets
        followed, tracer.agent.unixwatch), each with the process holding it."""
        now = time.monotonic()
        found = self.diag.listeners(self.ports) + self._foreign(now) if self.ports else []
        found += extra
        live = {entry.inode for entry in found}
        for gone in set(self.owners) - live:
            del self.owners[gone]
        for gone in set(self.unowned) - live:
            del self.unowned[gone]
        per_pid: dict[int, tuple[int | None, int | None, bool]] = {}
        out = []
        for entry in found:
            owner = self._owner(entry.inode, now)
            if owner is None:
                out.append(ServerSample(entry, None, None, None, None, None, None, False))
                continue
            facts = per_pid.get(owner.pid)
            if facts is None:
                facts = per_pid[owner.pid] = _process_facts(owner.pid)
            fds, fd_limit, stopped = facts
            out.append(ServerSample(entry, owner.pid, owner.start, owner.comm, owner.cmdline,
                                    fds, fd_limit, stopped))
        return out

    def _foreign(self, now: float) -> list[Listener]:
        """Listeners of the other network namespaces: all of them looked at every
        DISCOVER_S, the ones where a listener was found every read."""
        own = self.diag.netns
        if now >= self.next_discovery:
            self.next_discovery = now + DISCOVER_S
            readers = {ns: pid for ns, pid in _namespaces.get().items() if ns != own}
        else:
            readers = self.foreign
        out: list[Listener] = []
        seen: dict[int, str] = {}
        for ns, pid in readers.items():
            for name, v6 in (("tcp", False), ("tcp6", True)):
                text = _read(f"/proc/{pid}/net/{name}")
                if text is None:
                    continue  # that process is gone: the next discovery finds another
                listeners = parse_listeners(text, v6, ns, self.ports)
                if listeners:
                    seen[ns] = pid
                    out.extend(listeners)
        self.foreign = seen
        return out

    def _owner(self, inode: int, now: float) -> _Owner | None:
        owner = self.owners.get(inode)
        if owner is not None:
            try:
                if os.readlink(f"/proc/{owner.pid}/fd/{owner.fd}") == f"socket:[{inode}]":
                    return owner
            except OSError:
                pass
            del self.owners[inode]
        if self.unowned.get(inode, 0.0) > now or not inode:
            return None
        likely = list(dict.fromkeys(o.pid for o in self.owners.values()))
        held = find_socket(inode, likely)
        if held is None:
            self.unowned[inode] = now + OWNER_RETRY_S
            return None
        self.unowned.pop(inode, None)
        pid, fd = held
        info = process_info(pid)
        owner = _Owner(pid, fd, info.start_time if info else None, info.comm if info else None,
                       info.cmdline if info else None)
        self.owners[inode] = owner
        return owner


def _process_facts(pid: int) -> tuple[int | None, int | None, bool]:
    """(open descriptors, soft RLIMIT_NOFILE, stopped) of a process; None where unknown."""
    try:
        # Since Linux 6.2 the size of /proc/PID/fd is the count of open descriptors (a
        # few microseconds; listing them takes about 0.4 us each: 0.6 ms for 1,500).
        fds: int | None = os.stat(f"/proc/{pid}/fd").st_size or len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None  # not ours to read (the agent runs as another user), or gone
    limits = _read(f"/proc/{pid}/limits")
    parsed = parse_limits(limits) if limits is not None else None
    stat = _read(f"/proc/{pid}/stat")
    return fds, parsed[0] if parsed else None, stopped_state(stat) if stat else False
