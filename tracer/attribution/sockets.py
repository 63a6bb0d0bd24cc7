"""The kernel's socket tables and process details, read from /proc (the I/O side of attribution).

Every network namespace has its own table (/proc/PID/net/tcp and tcp6 show the table of
PID's namespace), so containers' clients are found too: one process per namespace is
enough to read its table. Socket inodes are matched to processes through
/proc/PID/fd/*. Addresses come back as the packets show them: an IPv4-mapped IPv6
address (a dual-stack socket) is reported as plain IPv4.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import re
import socket
import stat
import struct
import time
from collections.abc import Callable
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
    cookie: int = 0  # sock_diag's socket id (0: not known, as from /proc)
    cgroup: int | None = None  # cgroup v2 id of the socket's creator (sock_diag only)


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
    pod: str | None  # Kubernetes pod uid
    netns: int | None = None  # inode of its network namespace (/proc/PID/ns/net)
    pod_name: str | None = None  # the pod's name (its hostname), where there is a pod
    cgroup: str | None = None  # its cgroup path (the one naming its container or unit)


@dataclass(frozen=True)
class SocketDetail:
    """What the kernel told of a client socket besides its owner: known for a socket seen
    alive even when no process was found holding it (a short call closed first)."""

    uid: int | None = None
    user: str | None = None
    netns: int | None = None
    cgroup: str | None = None  # cgroup v2 path of the process that created the socket
    container: str | None = None
    pod: str | None = None


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
            with contextlib.suppress(ValueError):
                out.add(ipaddress.IPv4Network(f"{leaf}{stripped.split()[0]}", strict=False))
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

    CACHE = 1 << 16  # addresses whose owners (found in ranges) are kept

    def __init__(self) -> None:
        self.exact: dict[str, set[int]] = {}
        self.ranges: list[tuple[ipaddress.IPv4Network, int]] = []
        self.cache: dict[str, set[int]] = {}

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
        cached = self.cache.get(address)
        if cached is not None:
            return cached
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return set()
        owners = {ns for net, ns in self.ranges if ip in net}
        if len(self.cache) >= self.CACHE:
            self.cache.clear()
        self.cache[address] = owners
        return owners


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


class _Namespaces:
    """One process per network namespace, to read that namespace's tables and addresses
    through. Walking every process for this costs more than reading the tables: all of
    them every few seconds (REFRESH); sooner, when a caller meets an address it does not
    know (a client in a namespace whose first process just started), only the processes
    that appeared since the last look, and the addresses of the namespaces that are new or
    young (a container's address comes a moment after its first process). Those quick
    looks are at least SOONEST apart, and further while they would take more than
    SOONEST_SHARE of the time. Each look also notes the processes of each namespace
    (``members``) and those that started lately (``newcomers``: a new client's first
    connections come before anything else says who it is); a search for a socket's
    owner asks for a quick look too, to see the newest processes."""

    REFRESH = 5.0
    SOONEST = 0.02
    SOONEST_SHARE = 0.02
    YOUNG = 10.0  # seconds a new namespace's addresses are read again at each quick look
    NEWCOMERS = 256  # processes that started lately kept at most (for YOUNG seconds)

    def __init__(self) -> None:
        self.readers: dict[int, str] = {}
        # The processes of each namespace, as the looks found them (a quick look adds the
        # new ones; the next full look forgets those gone): one pid a process at most.
        self.members: dict[int, list[int]] = {}
        self.newcomers: dict[int, tuple[int, float]] = {}  # pid -> (netns, when seen)
        self.addresses = LocalAddresses()
        self.at = -1e9  # time.monotonic() of the last full look
        self.wall_at = 0.0  # time.time() of the last look, full or quick
        self.quick_at = -1e9
        self.quick_cost = 0.0
        self.pids: set[str] = set()
        self.born: dict[int, float] = {}  # namespaces found by quick looks: when
        self.per_ns: dict[int, tuple[list[ipaddress.IPv4Network], set[str]]] = {}

    def get(self, *, sooner: bool = False) -> dict[int, str]:
        now = time.monotonic()
        if now - self.at >= self.REFRESH:
            self._full(now)
        elif sooner and now - self.quick_at >= max(self.SOONEST,
                                                   self.quick_cost / self.SOONEST_SHARE):
            self._quick(now)
        return self.readers

    def _full(self, now: float) -> None:
        wall = time.time()
        pids = _pids()
        readers: dict[int, str] = {}
        members: dict[int, list[int]] = {}
        first = not self.pids
        for pid in ["self", *pids]:
            ns = _netns(pid)
            if ns is None:
                continue
            if ns not in readers:
                readers[ns] = pid
            if pid != "self":
                members.setdefault(ns, []).append(int(pid))
                if not first and pid not in self.pids:
                    self._arrived(int(pid), ns, now)
        self.members = members
        alive = {int(p) for p in pids}
        self.newcomers = {pid: v for pid, v in self.newcomers.items() if pid in alive}
        self.per_ns = {ns: self._addresses_of(pid) for ns, pid in readers.items()}
        self.readers, self.addresses = readers, self._build(readers)
        self.pids = set(pids)
        self.born = {ns: t for ns, t in self.born.items() if ns in readers}
        self.at, self.wall_at = now, wall

    def _quick(self, now: float) -> None:
        wall = time.time()
        pids = _pids()
        seen = set(pids)
        readers = dict(self.readers)
        for pid in seen - self.pids:
            ns = _netns(pid)
            if ns is None:
                continue
            self.members.setdefault(ns, []).append(int(pid))
            self._arrived(int(pid), ns, now)
            if ns not in readers:
                readers[ns] = pid
                self.born[ns] = now
        self.pids = seen
        for ns, born in list(self.born.items()):
            if now - born > self.YOUNG:
                del self.born[ns]
            elif ns in readers:
                self.per_ns[ns] = self._addresses_of(readers[ns])
        if self.born or len(readers) != len(self.readers):
            self.readers, self.addresses = readers, self._build(readers)
        self.wall_at, self.quick_at = wall, now
        self.quick_cost = time.monotonic() - now

    def _arrived(self, pid: int, netns: int, now: float) -> None:
        """Note a process that started since the last look (the oldest ones go first)."""
        newcomers = self.newcomers
        newcomers[pid] = (netns, now)
        while newcomers:
            oldest = next(iter(newcomers))
            if len(newcomers) <= self.NEWCOMERS and now - newcomers[oldest][1] <= self.YOUNG:
                break
            del newcomers[oldest]

    @staticmethod
    def _addresses_of(pid: str) -> tuple[list[ipaddress.IPv4Network], set[str]]:
        v4 = _read(f"/proc/{pid}/net/fib_trie")
        v6 = _read(f"/proc/{pid}/net/if_inet6")
        return parse_fib_trie(v4 or ""), parse_if_inet6(v6 or "")

    def _build(self, readers: dict[int, str]) -> LocalAddresses:
        addresses = LocalAddresses()
        for ns, (v4, v6) in self.per_ns.items():
            if ns in readers:
                addresses.add_namespace(ns, v4, v6)
        return addresses


_namespaces = _Namespaces()


def address_owners(address: str, *, seen_at: float) -> set[int] | None:
    """The network namespaces of this host that have ``address``, from a look at them taken
    after ``seen_at`` (time.time()); None while no such look is allowed yet (they are
    rationed: see _Namespaces): ask again later. An address the last look found in
    namespaces that still have processes is taken as it is (a look finds new namespaces,
    and only an address nobody has needs a look after it appeared)."""
    known = _namespaces.addresses.owners(address)
    if known and all(ns in _namespaces.readers for ns in known):
        return known
    if _namespaces.wall_at < seen_at:
        _namespaces.get(sooner=True)
        if _namespaces.wall_at < seen_at:
            found = _namespaces.addresses.owners(address)
            return found or None  # known now; unknown: wait for a newer look
    return _namespaces.addresses.owners(address)


def namespace_processes(netns: int, limit: int) -> list[int]:
    """The processes in network namespace ``netns`` (newest first) as the last look at the
    host's processes found them, with those a quick look (rationed: see _Namespaces)
    finds started since; when there are more than ``limit`` (the host's own namespace,
    where that would be every process), only those that started in the last YOUNG
    seconds."""
    _namespaces.get(sooner=True)
    pids = _namespaces.members.get(netns, [])
    if len(pids) <= limit:
        return sorted(pids, reverse=True)
    now = time.monotonic()
    return sorted((pid for pid, (ns, at) in _namespaces.newcomers.items()
                   if ns == netns and now - at <= _Namespaces.YOUNG), reverse=True)


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
    return {inode: pid for inode, (pid, _fd) in find_owners(inodes, likely or []).items()}


PROBE_LIMIT = 256  # processes whose descriptors are counted to order one search at most
BIG_PROCESS = 256  # descriptors: a process with more is searched after every smaller one


def descriptor_count(pid: int) -> int | None:
    """How many descriptors process ``pid`` has open, from one stat of /proc/PID/fd (Linux
    6.2 and later report it as the directory's size; None: not known so)."""
    try:
        size = os.stat(f"/proc/{pid}/fd").st_size
    except OSError:
        return None
    return size if size > 0 else None


def smallest_first(pids: list[int], sizes: dict[int, int] | None = None) -> list[int]:
    """``pids`` (each once) ordered by how many descriptors each has, fewest first: a
    process's descriptors are read one by one, and a leaker's thousands searched before
    the small client that holds the socket take longer than the client's socket lives."""
    return [pid for pid, _count in _counted(pids, sizes)]


def _counted(pids: list[int], sizes: dict[int, int] | None) -> list[tuple[int, int]]:
    """(pid, descriptors) of each of ``pids`` once, fewest first. Counted by
    descriptor_count (the first PROBE_LIMIT), else taken from ``sizes`` (the counts of
    earlier listings), else 0; equal counts keep the order given."""
    out: list[tuple[int, int]] = []
    for rank, pid in enumerate(dict.fromkeys(pids)):
        probed = descriptor_count(pid) if rank < PROBE_LIMIT else None
        if probed is not None and sizes is not None:
            sizes[pid] = probed
        out.append((pid, probed if probed is not None else (sizes or {}).get(pid, 0)))
    out.sort(key=lambda item: item[1])
    return out


def find_owners(inodes: set[int], likely: list[int], *,
                hints: dict[int, list[int]] | None = None,
                candidates: list[int] | Callable[[], list[int]] | None = None,
                everyone: bool = True,
                sizes: dict[int, int] | None = None,
                order: bool = False,
                walked: list[float] | None = None) -> dict[int, tuple[int, int]]:
    """Which process, and which of its descriptors, holds each socket inode.

    Looked for in this order: the descriptors ``hints`` names for each of the ``likely``
    pids (a client reuses the number of the socket it just closed, a leaker takes the
    next one: a readlink each, where listing a leaker's descriptors means thousands);
    then every descriptor of the ``likely`` pids, in that order, and of ``candidates``
    (the processes of the socket's cgroup or namespace; a function that gives them is
    called only when the hints did not find every socket) after them; then, with
    ``everyone``, of every other process, newest (highest pid) first. With ``order`` the
    ``likely`` and ``candidates`` are searched fewest descriptors first, and those with
    more than BIG_PROCESS (or, of the others, known to have had more) only after every
    other process (a new client, not known yet, is found before a leaker's thousands are
    read). A process's descriptors are read newest (highest) first. ``sizes``, when given,
    gets the number of descriptors of each process listed or counted; ``walked`` the
    seconds the look at every other process (and at the big ones after it) took, when
    there was one."""
    owners: dict[int, tuple[int, int]] = {}
    if not inodes:
        return owners
    wanted = {f"socket:[{i}]": i for i in inodes}
    hints = hints or {}
    for pid in likely:
        for fd in hints.get(pid, ()):
            try:
                inode = wanted.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if inode is not None and inode not in owners:
                owners[inode] = (pid, fd)
                if len(owners) == len(wanted):
                    return owners
    tried: set[int] = set()

    def search(pid: int) -> bool:
        """Look through one process's descriptors; True once every inode is found."""
        tried.add(pid)
        base = f"/proc/{pid}/fd/"
        try:
            names = os.listdir(base)
        except OSError:
            return False  # gone, or not ours to read (after --user)
        if sizes is not None:
            sizes[pid] = len(names)
        skip = hints.get(pid, ())
        for fd in sorted((int(n) for n in names), reverse=True):
            if fd in skip:
                continue
            try:
                target = os.readlink(f"{base}{fd}")
            except OSError:
                continue
            inode = wanted.get(target)
            if inode is not None and inode not in owners:
                owners[inode] = (pid, fd)
                if len(owners) == len(wanted):
                    return True
        return False

    if callable(candidates):
        candidates = candidates()
    first = [*likely, *(candidates or [])]
    big: list[int] = []
    if order:
        counted = _counted(first, sizes)
        first = [pid for pid, count in counted if count <= BIG_PROCESS]
        big = [pid for pid, count in counted if count > BIG_PROCESS]
    for pid in first:
        if pid not in tried and search(pid):
            return owners
    if everyone:
        started = time.monotonic()
        later = set(big)
        known = sizes or {}
        try:
            for pid in sorted((int(p) for p in _pids()), reverse=True):
                if pid in tried or pid in later:
                    continue
                if order and known.get(pid, 0) > BIG_PROCESS:
                    big.append(pid)  # known to be big from an earlier listing: last
                elif search(pid):
                    return owners
            for pid in big:
                if pid not in tried and search(pid):
                    return owners
        finally:
            if walked is not None:
                walked.append(time.monotonic() - started)
        return owners
    for pid in big:
        if pid not in tried and search(pid):
            return owners
    return owners


# -- containers, pods and cgroups --------------------------------------------------------

_HEX64 = re.compile(
    r"^(?:(?:docker|cri-containerd|containerd|crio-conmon|crio|libpod-conmon|libpod)-)?"
    r"([0-9a-f]{64})(?:\.scope)?$")
_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_POD = re.compile(rf"(?:^|-)pod({_UUID}|[0-9a-f]{{32}})(?:\.slice)?$")


@dataclass(frozen=True)
class CgroupNames:
    """What a cgroup path says of its processes."""

    container: str | None  # container id (64 hex digits)
    pod: str | None  # Kubernetes pod uid (with dashes)
    path: str | None  # the path that says most (None: only the root)


def cgroup_names(path: str) -> CgroupNames:
    """Container id and pod uid of one cgroup path: docker (``/docker/<id>``,
    ``docker-<id>.scope``), containerd (``cri-containerd-<id>.scope``,
    ``/kubepods/<class>/pod<uid>/<id>``), cri-o (``crio-<id>.scope``), podman
    (``libpod-<id>.scope``), systemd slices (``kubepods-<class>-pod<uid_with_underscores>
    .slice``). Nested containers (a kind node's pods) give the innermost container."""
    container = pod = None
    for part in path.split("/"):
        if pod is None:
            found = _POD.search(part)
            if found is not None:
                pod = found.group(1).replace("_", "-")
        match = _HEX64.match(part)
        if match is not None:
            container = match.group(1)
    return CgroupNames(container, pod, path if path not in ("", "/") else None)


def parse_cgroup(text: str) -> CgroupNames:
    """/proc/PID/cgroup content (cgroup v1 ``N:controllers:/path`` lines, the v2
    ``0::/path`` line, or both on a hybrid host): the ids the paths carry, and the path
    that carries them (else the v2 path, else the systemd one, else any other that is
    not the root)."""
    paths: list[tuple[str, str]] = []  # (controllers, path)
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) == 3:
            paths.append((fields[1], fields[2].strip()))
    best, score = None, 0
    for _controllers, path in paths:
        names = cgroup_names(path)
        says = (names.container is not None) * 2 + (names.pod is not None)
        if says > score:
            best, score = names, says
    if best is not None:
        return best
    for wanted in ("", "name=systemd"):
        for controllers, path in paths:
            if controllers == wanted and path not in ("", "/"):
                return CgroupNames(None, None, path)
    for _controllers, path in paths:
        if path not in ("", "/"):
            return CgroupNames(None, None, path)
    return CgroupNames(None, None, None)


def _container(pid: int) -> tuple[str | None, str | None]:
    """Container id and Kubernetes pod uid from /proc/PID/cgroup, when there are any."""
    names = _cgroup_of(pid)
    return names.container, names.pod


def _cgroup_of(pid: int) -> CgroupNames:
    text = _read(f"/proc/{pid}/cgroup")
    return parse_cgroup(text) if text is not None else CgroupNames(None, None, None)


_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
ENVIRON_LIMIT = 1 << 16  # bytes of /proc/PID/environ read at most
HOSTNAME_LIMIT = 256  # bytes of a container's /etc/hostname read at most


def parse_environ_hostname(data: bytes) -> str | None:
    """HOSTNAME from /proc/PID/environ content (NUL-separated), if it is a host name."""
    for item in data.split(b"\0"):
        if item.startswith(b"HOSTNAME="):
            return _hostname(item[9:])
    return None


def _hostname(raw: bytes) -> str | None:
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    return name if _HOSTNAME.match(name) else None


def read_in_root(pid: int, parts: tuple[str, ...], limit: int) -> bytes | None:
    """At most ``limit`` bytes of a regular file inside the root directory of process
    ``pid`` (its container's filesystem), or None. Each component is opened below the
    previous one without following symbolic links: a link planted in the container (an
    absolute one would resolve on this host's filesystem) is refused, as are FIFOs and
    devices."""
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        at = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    opened = [at]
    try:
        for name in parts[:-1]:
            at = os.open(name, os.O_PATH | os.O_DIRECTORY | flags, dir_fd=at)
            opened.append(at)
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | flags, dir_fd=at)
        opened.append(fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        for fd in opened:
            os.close(fd)


def pod_name(pid: int) -> str | None:
    """The name of the pod process ``pid`` runs in (a pod's hostname is its name): the
    HOSTNAME its environment starts with, else /etc/hostname in its filesystem."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read(ENVIRON_LIMIT)
    except OSError:
        environ = b""
    name = parse_environ_hostname(environ)
    if name is not None:
        return name
    raw = read_in_root(pid, ("etc", "hostname"), HOSTNAME_LIMIT)
    return _hostname(raw.split(b"\n", 1)[0]) if raw else None


def _cgroup2_mount(mountinfo: str) -> tuple[str, str] | None:
    """(mount point, root within the hierarchy) of the cgroup v2 mount, from
    /proc/self/mountinfo content."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            fields = left.split()
            if len(fields) >= 5:
                return _unescape(fields[4]), _unescape(fields[3])
    return None


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class CgroupPaths:
    """cgroup v2 ids (INET_DIAG_CGROUP_ID: the inode of the cgroup's directory) to paths,
    from a walk of the cgroup2 mount: at most once a second, and only when an id is not
    known yet. Bounded: a walk stops after MAX_DIRS directories."""

    REFRESH = 1.0
    MAX_DIRS = 20000
    PROCS_LIMIT = 1 << 16  # bytes of a cgroup.procs read at most

    def __init__(self, mountinfo: str | None = None) -> None:
        text = mountinfo if mountinfo is not None else _read("/proc/self/mountinfo")
        self.mount = _cgroup2_mount(text or "")
        self.paths: dict[int, str] = {}
        self.at = -1e9

    def path(self, cgroup_id: int | None) -> str | None:
        """The path of cgroup ``cgroup_id`` ("/" for the root), or None if unknown."""
        if cgroup_id is None or self.mount is None:
            return None
        found = self.paths.get(cgroup_id)
        if found is None and time.monotonic() - self.at >= self.REFRESH:
            self._walk()
            found = self.paths.get(cgroup_id)
        return found

    def procs(self, path: str) -> list[int]:
        """The pids in cgroup ``path`` (not its children)."""
        if self.mount is None or path in ("", "/"):
            return []
        mountpoint, root = self.mount
        relative = path[len(root):] if root != "/" and path.startswith(root) else path
        try:
            with open(os.path.join(mountpoint, relative.lstrip("/"), "cgroup.procs"),
                      "rb") as f:
                data = f.read(self.PROCS_LIMIT)
        except OSError:
            return []
        return [int(p) for p in data.split() if p.isdigit()]

    def _walk(self) -> None:
        self.at = time.monotonic()
        assert self.mount is not None
        mountpoint, root = self.mount
        prefix = "" if root == "/" or root.startswith("/..") else root.rstrip("/")
        paths: dict[int, str] = {}
        try:
            paths[os.stat(mountpoint).st_ino] = prefix or "/"
        except OSError:
            self.paths = paths
            return
        stack = [(mountpoint, prefix)]
        while stack and len(paths) < self.MAX_DIRS:
            directory, shown = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                child = f"{shown}/{entry.name}"
                paths[entry.inode()] = child
                stack.append((entry.path, child))
        self.paths = paths


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
    names = _cgroup_of(pid)
    netns = _netns(str(pid))
    pod = pod_name(pid) if names.pod is not None else None
    return ProcessInfo(pid, start, ppid, user, name, cmdline, exe, names.container, names.pod,
                       netns, pod, names.path)



class ProcessCache:
    """Processes (process_info) and user names looked up once each, for the attribution
    loops: both tables bounded (emptied when full, then filled again as needed)."""

    MAX_PROCESSES = 10000
    MAX_USERS = 4096

    def __init__(self) -> None:
        self.processes: dict[int, ProcessInfo] = {}
        self.users: dict[int, str | None] = {}

    def process(self, pid: int) -> ProcessInfo | None:
        cached = self.processes.get(pid)
        if cached is not None:
            return cached
        info = process_info(pid)
        if info is not None:
            if len(self.processes) > self.MAX_PROCESSES:
                self.processes.clear()
            self.processes[pid] = info
        return info

    def user(self, uid: int) -> str | None:
        """The name of user ``uid``; None when it has none."""
        if uid not in self.users:
            try:
                self.users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self.users[uid] = None
            if len(self.users) > self.MAX_USERS:
                self.users.clear()
        return self.users.get(uid)
