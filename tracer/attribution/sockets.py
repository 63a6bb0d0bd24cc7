"""The kernel's socket tables and process details, read from /proc (the I/O side of attribution).

Every network namespace has its own table (/proc/PID/net/tcp and tcp6 show the table of
PID's namespace), so containers' clients are found too: one process per namespace is
enough to read its table. Socket inodes are matched to processes through
/proc/PID/fd/*. Addresses come back as the packets show them: an IPv4-mapped IPv6
address (a dual-stack socket) is reported as plain IPv4.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass

# /proc/net/tcp states (include/net/tcp_states.h).
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}
ESTABLISHED = 1
LISTEN = 10


@dataclass(frozen=True)
class SocketEntry:
    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    uid: int
    inode: int
    netns: int  # inode of the network namespace the table came from


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    start_time: float  # seconds since the epoch; with pid, names one process (pid reuse)
    ppid: int | None
    user: str | None
    comm: str | None
    cmdline: str | None
    exe: str | None
    container: str | None
    pod: str | None


def _addr4(hexaddr: str) -> str:
    return socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(hexaddr, 16)))


def _addr6(hexaddr: str) -> str:
    raw = b"".join(struct.pack("<I", int(hexaddr[i:i + 8], 16)) for i in range(0, 32, 8))
    addr = ipaddress.IPv6Address(raw)
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)


def parse_table(text: str, v6: bool, netns: int) -> list[SocketEntry]:
    """Parse /proc/net/tcp or tcp6 content."""
    out = []
    conv = _addr6 if v6 else _addr4
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local, remote = fields[1], fields[2]
        lh, lp = local.rsplit(":", 1)
        rh, rp = remote.rsplit(":", 1)
        out.append(SocketEntry(
            (conv(lh), int(lp, 16)), (conv(rh), int(rp, 16)), int(fields[3], 16),
            int(fields[7]), int(fields[9]), netns,
        ))
    return out


def _netns(pid: str) -> int | None:
    try:
        link = os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return int(link[link.index("[") + 1:-1])


def _pids() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit()]


def parse_fib_trie(text: str) -> list[ipaddress.IPv4Network]:
    """The IPv4 addresses (and local ranges, such as 127.0.0.0/8) of a namespace, from
    /proc/net/fib_trie: each ``|-- ADDRESS`` leaf followed by a ``/LEN host LOCAL`` line."""
    out: set[ipaddress.IPv4Network] = set()
    leaf: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|-- "):
            leaf = stripped[4:]
        elif leaf is not None and stripped.startswith("/") and stripped.endswith("host LOCAL"):
            try:
                out.add(ipaddress.IPv4Network(f"{leaf}{stripped.split()[0]}", strict=False))
            except ValueError:
                pass
    return sorted(out)


def parse_if_inet6(text: str) -> set[str]:
    """The IPv6 addresses of a namespace, from /proc/net/if_inet6."""
    out = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                out.add(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
            except ValueError:
                continue
    return out


class LocalAddresses:
    """Which network namespaces of this host own an address: a client address no namespace
    owns is a remote client."""

    def __init__(self) -> None:
        self.exact: dict[str, set[int]] = {}
        self.ranges: list[tuple[ipaddress.IPv4Network, int]] = []

    def add_namespace(self, netns: int, v4: list[ipaddress.IPv4Network], v6: set[str]) -> None:
        for net in v4:
            if net.prefixlen == 32:
                self.exact.setdefault(str(net.network_address), set()).add(netns)
            else:
                self.ranges.append((net, netns))
        for addr in v6:
            self.exact.setdefault(addr, set()).add(netns)

    def owners(self, address: str) -> set[int]:
        """The namespaces that have ``address`` (empty: not an address of this host)."""
        found = self.exact.get(address)
        if found is not None or not self.ranges or ":" in address:
            return found or set()
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return set()
        return {ns for net, ns in self.ranges if ip in net}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


class _Namespaces:
    """One process per network namespace, to read that namespace's tables and addresses
    through. Walking every process for this costs more than reading the tables: refreshed
    every few seconds, or sooner (at most once a second) when a caller meets an address it
    does not know."""

    REFRESH = 5.0
    SOONEST = 1.0

    def __init__(self) -> None:
        self.readers: dict[int, str] = {}
        self.addresses = LocalAddresses()
        self.at = -1e9
        self.wall_at = 0.0  # time.time() of the last refresh

    def get(self, *, sooner: bool = False) -> dict[int, str]:
        now = time.monotonic()
        age = now - self.at
        if age >= self.REFRESH or (sooner and age >= self.SOONEST):
            readers: dict[int, str] = {}
            for pid in ["self", *_pids()]:
                ns = _netns(pid)
                if ns is not None and ns not in readers:
                    readers[ns] = pid
            addresses = LocalAddresses()
            for ns, pid in readers.items():
                v4 = _read(f"/proc/{pid}/net/fib_trie")
                v6 = _read(f"/proc/{pid}/net/if_inet6")
                addresses.add_namespace(ns, parse_fib_trie(v4 or ""), parse_if_inet6(v6 or ""))
            self.readers, self.addresses = readers, addresses
            self.at, self.wall_at = now, time.time()
        return self.readers


_namespaces = _Namespaces()


def address_owners(address: str, *, seen_at: float) -> set[int] | None:
    """The network namespaces of this host that have ``address``, from a look at them taken
    after ``seen_at`` (time.time()); None while no such look is allowed yet (at most one
    a second): ask again later."""
    if _namespaces.wall_at < seen_at:
        _namespaces.get(sooner=True)
        if _namespaces.wall_at < seen_at:
            found = _namespaces.addresses.owners(address)
            return found or None  # known now; unknown: wait for a newer look
    return _namespaces.addresses.owners(address)


def socket_tables(ports: frozenset[int], *, own: list[SocketEntry] | None = None,
                  own_netns: int | None = None,
                  only: set[int] | None = None) -> list[SocketEntry]:
    """TCP sockets of every network namespace (or of the ``only`` ones) with a local or
    remote port in ``ports``.

    ``own`` is this namespace's table when the caller already has it (sock_diag): then only
    the other namespaces are read from /proc."""
    out: list[SocketEntry] = list(own or [])
    for ns, pid in _namespaces.get().items():
        if (own is not None and ns == own_netns) or (only is not None and ns not in only):
            continue
        for name, v6 in (("tcp", False), ("tcp6", True)):
            text = _read(f"/proc/{pid}/net/{name}")
            if text is None:
                continue  # that process is gone: the next refresh finds another
            out.extend(
                e for e in parse_table(text, v6, ns)
                if e.local[1] in ports or e.remote[1] in ports
            )
    return out


def socket_owners(inodes: set[int], likely: list[int] | None = None) -> dict[int, int]:
    """Which process holds each socket inode (the first found when several share it).

    ``likely`` pids are searched first, in that order: a client that opened connections
    before usually opens the next ones too, and its file descriptors are found without
    walking every process's. A process's descriptors are read newest (highest) first: a
    leaker holds thousands, and the socket looked for is the one it opened last."""
    owners: dict[int, int] = {}
    if not inodes:
        return owners
    wanted = {f"socket:[{i}]": i for i in inodes}
    order = [str(p) for p in (likely or [])]
    for pid in [*order, *_pids()]:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to read (after --user)
        base = f"/proc/{pid}/fd/"
        fds.sort(key=int, reverse=True)
        for fd in fds:
            try:
                target = os.readlink(base + fd)
            except OSError:
                continue
            inode = wanted.get(target)
            if inode is not None and inode not in owners:
                owners[inode] = int(pid)
                if len(owners) == len(wanted):
                    return owners
    return owners


def _container(pid: int) -> tuple[str | None, str | None]:
    """Container id and Kubernetes pod uid from /proc/PID/cgroup, when there are any."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except OSError:
        return None, None
    container = pod = None
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        for part in path.split("/"):
            if part.startswith("pod") and ("-" in part or "_" in part) and pod is None:
                # kubepods-burstable-pod<uid>.slice or pod<uid>
                candidate = part[3:].split(".")[0].replace("_", "-")
                if len(candidate) >= 32:
                    pod = candidate
            stem = part.rsplit(".", 1)[0]
            for prefix in ("docker-", "cri-containerd-", "crio-", "libpod-"):
                stem = stem.removeprefix(prefix)
            if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem):
                container = stem
    return container, pod


def process_info(pid: int) -> ProcessInfo | None:
    """Details of one process, or None if it is gone."""
    import psutil

    try:
        p = psutil.Process(pid)
        with p.oneshot():
            start = p.create_time()
            ppid = p.ppid()
            name = p.name()
            try:
                user = p.username()
            except (KeyError, psutil.Error):
                user = None
            try:
                cmdline = " ".join(p.cmdline()) or None
            except psutil.AccessDenied:
                cmdline = None
            try:
                exe = p.exe() or None
            except psutil.AccessDenied:
                exe = None
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return ProcessInfo(pid, 0.0, None, None, None, None, None, None, None)
    container, pod = _container(pid)
    return ProcessInfo(pid, start, ppid, user, name, cmdline, exe, container, pod)
