"""Network namespaces as throwaway client hosts for the real-traffic tests.

Each ``Host`` is a network namespace joined to the root namespace by a veth pair:
the client side is 10.201.N.2/24 inside the namespace, the root side 10.201.N.1/24. A
server listening on 0.0.0.0 in the root namespace is reached from host N at 10.201.N.1,
and sees that host's connections come from its own address, 10.201.N.2: one IP per
client process, as on a real network.

Names carry the creating process id (``trt<pid>n<i>`` for namespaces, ``trt<pid>h<i>``
and ``trt<pid>c<i>`` for the veth ends, all within the 15-character interface name
limit), so concurrent runs never collide and leftovers of a run that was killed hard are
recognised and removed by the next one (``reap_stale``).

``behind_nat`` puts a host behind one of ``linked``'s, which forwards its packets with
their source rewritten to its own address (nftables' masquerade, or iptables'), as a
home router or a Kubernetes node does: the server host sees the router's address.

Needs root and iproute2 (and nftables or iptables for NAT). Every command is bounded in
time.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

PREFIX = "trt"
MAX_HOSTS = 16
SUBNET_BASE = "10.201"  # hosts get 10.201.N.0/24, N in 1..250
COMMAND_TIMEOUT_S = 10.0

_OURS = re.compile(rf"^{PREFIX}(\d+)n(\d+)$")


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message holds its output."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ip", *args], check=False, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    try:
        proc = _ip("netns", "list", check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns` does not run: {exc}"
    if proc.returncode != 0:
        return f"`ip netns` is unavailable: {proc.stderr.strip()}"
    return None


def _namespaces() -> list[str]:
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def namespaces_of(pid: int) -> list[str]:
    """The namespaces this module created for process ``pid`` that still exist."""
    return [n for n in _namespaces() if (m := _OURS.match(n)) and int(m.group(1)) == pid]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale() -> list[str]:
    """Delete namespaces and veth pairs left by runs whose process is gone."""
    removed = []
    for name in _namespaces():
        match = _OURS.match(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        pid, index = match.groups()
        _ip("link", "del", f"{PREFIX}{pid}h{index}", check=False)
        _ip("netns", "del", name, check=False)
        removed.append(name)
    # A root-side veth end whose namespace never got its peer (creation interrupted).
    for match in re.finditer(rf"^\d+: ({PREFIX}(\d+)h\d+)[@:]",
                             _ip("-o", "link", "show").stdout, re.MULTILINE):
        if not _pid_alive(int(match.group(2))):
            _ip("link", "del", match.group(1), check=False)
            removed.append(match.group(1))
    return removed


def _used_octets() -> set[int]:
    """Third octets of 10.201.x.y addresses already on this host's root namespace."""
    used = set()
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        match = re.search(rf"inet {re.escape(SUBNET_BASE)}\.(\d+)\.", line)
        if match:
            used.add(int(match.group(1)))
    return used


def _free_octets(count: int, taken: Sequence[int] = ()) -> list[int]:
    # Start the scan at a pid-derived offset so that two runs starting at once are
    # unlikely to pick the same subnets before either has added its addresses. ``taken``:
    # subnets already given to namespaces (their addresses are not in the root one).
    used = _used_octets() | set(taken)
    start = os.getpid() % 250
    picked = []
    for k in range(250):
        octet = (start + k) % 250 + 1
        if octet not in used:
            picked.append(octet)
            if len(picked) == count:
                return picked
    raise NetnsError(f"no {count} free subnets under {SUBNET_BASE}.0.0/16")


@dataclass(frozen=True)
class Host:
    """One client "host": a namespace, its address and the server-facing address."""

    netns: str
    index: int
    octet: int
    root_if: str  # the veth end in the root namespace (capture here)
    client_if: str  # the veth end inside the namespace

    @property
    def ip(self) -> str:
        """The client's source address as the server sees it."""
        return f"{SUBNET_BASE}.{self.octet}.2"

    @property
    def gateway(self) -> str:
        """The root namespace's address on this link: where the client dials the server."""
        return f"{SUBNET_BASE}.{self.octet}.1"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _create(index: int, octet: int) -> Host:
    pid = os.getpid()
    host = Host(f"{PREFIX}{pid}n{index}", index, octet, f"{PREFIX}{pid}h{index}",
                f"{PREFIX}{pid}c{index}")
    inside = ("netns", "exec", host.netns, "ip")
    try:
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.root_if, "type", "veth", "peer", "name", host.client_if)
        _ip("link", "set", host.client_if, "netns", host.netns)
        _ip("addr", "add", f"{host.gateway}/24", "dev", host.root_if)
        _ip("link", "set", host.root_if, "up")
        _ip(*inside, "addr", "add", f"{host.ip}/24", "dev", host.client_if)
        _ip(*inside, "link", "set", host.client_if, "up")
        _ip(*inside, "link", "set", "lo", "up")
    except BaseException:
        _destroy(host)
        raise
    return host


def _destroy(host: Host) -> list[str]:
    """Remove one host; returns the error messages of the steps that failed."""
    errors = []
    # Deleting one veth end deletes the pair; the namespace may already have taken it.
    _ip("link", "del", host.root_if, check=False)
    proc = _ip("netns", "del", host.netns, check=False)
    if proc.returncode != 0 and host.netns in _namespaces():
        errors.append(f"{host.netns}: {proc.stderr.strip()}")
    return errors


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """``count`` client hosts, removed on exit whatever happens inside.

    Processes started in a namespace must be ended before exit: ``ip netns del`` only
    drops the name, and a namespace lives on as long as a process is in it.
    """
    if not 1 <= count <= MAX_HOSTS:
        raise ValueError(f"between 1 and {MAX_HOSTS} hosts, not {count}")
    reap_stale()
    created: list[Host] = []
    failed = False
    try:
        for index, octet in enumerate(_free_octets(count)):
            created.append(_create(index, octet))
        yield list(created)
    except BaseException:
        failed = True
        raise
    finally:
        errors = []
        for host in created:
            errors += _destroy(host)
        # Do not let a cleanup error hide the failure that got us here.
        if errors and not failed:
            raise NetnsError("could not remove: " + "; ".join(errors))


@contextlib.contextmanager
def linked(count: int) -> Iterator[tuple[str, list[Host]]]:
    """A "server host" namespace and ``count`` client host namespaces, each joined to it
    by a veth pair of its own (no route through the root namespace): two machines on one
    link, as far as their packets go. Each ``Host``'s ``gateway`` is the server host's
    address on that link (dial the server there), ``ip`` the client's, ``root_if`` the
    server host's end of the link and ``client_if`` the client's. All removed on exit
    whatever happens inside; end the processes started in them first."""
    if not 1 <= count < MAX_HOSTS:
        raise ValueError(f"between 1 and {MAX_HOSTS - 1} client hosts, not {count}")
    reap_stale()
    pid = os.getpid()
    first = MAX_HOSTS  # indexes of their own: never a name hosts() uses
    server = f"{PREFIX}{pid}n{first}"
    created: list[Host] = []
    failed = False
    try:
        _ip("netns", "add", server)
        _ip("netns", "exec", server, "ip", "link", "set", "lo", "up")
        for k, octet in enumerate(_free_octets(count), start=1):
            i = first + k
            host = Host(f"{PREFIX}{pid}n{i}", i, octet, f"{PREFIX}{pid}h{i}",
                        f"{PREFIX}{pid}c{i}")
            _ip("netns", "add", host.netns)
            created.append(host)
            _ip("link", "add", host.root_if, "type", "veth", "peer", "name", host.client_if)
            _ip("link", "set", host.root_if, "netns", server)
            _ip("link", "set", host.client_if, "netns", host.netns)
            for ns, dev, addr in ((server, host.root_if, host.gateway),
                                  (host.netns, host.client_if, host.ip)):
                _ip("netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
                _ip("netns", "exec", ns, "ip", "link", "set", dev, "up")
            _ip("netns", "exec", host.netns, "ip", "link", "set", "lo", "up")
        yield server, list(created)
    except BaseException:
        failed = True
        raise
    finally:
        errors = []
        for host in created:
            errors += _destroy(host)
        proc = _ip("netns", "del", server, check=False)
        if proc.returncode != 0 and server in _namespaces():
            errors.append(f"{server}: {proc.stderr.strip()}")
        if errors and not failed:
            raise NetnsError("could not remove: " + "; ".join(errors))


def nat_unavailable_reason() -> str | None:
    """Why ``behind_nat`` cannot be used here, or None when it can."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if shutil.which("nft") is None and shutil.which("iptables") is None:
        return ("source NAT needs nftables (`nft`) or iptables, and neither is installed "
                "(`make system-deps` installs nftables)")
    return None


def _run(argv: Sequence[str]) -> None:
    proc = subprocess.run(list(argv), check=False, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {(proc.stderr or proc.stdout).strip()}")


def _masquerade(router: str, out_if: str) -> None:
    """In namespace ``router``: forward IPv4, and rewrite the source of what leaves by
    ``out_if`` to that interface's address."""
    inside = ["ip", "netns", "exec", router]
    _run([*inside, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
    if shutil.which("nft") is not None:
        rules = ("table ip tracer_test_nat {\n"
                 "  chain postrouting {\n"
                 "    type nat hook postrouting priority srcnat; policy accept;\n"
                 f'    oifname "{out_if}" masquerade\n'
                 "  }\n}\n")
        proc = subprocess.run([*inside, "nft", "-f", "-"], input=rules, check=False,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        if proc.returncode != 0:
            raise NetnsError(f"nft -f - in {router}: {(proc.stderr or proc.stdout).strip()}")
    else:
        _run([*inside, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", out_if, "-j",
              "MASQUERADE"])


@dataclass(frozen=True)
class NattedHost:
    """A client host behind a NAT router: its own namespace and link to the router."""

    host: Host  # host.ip: its own address; host.gateway: the router's on their link
    server: str  # where it dials the server host (the router's gateway)
    seen_as: str  # the address the server host sees its connections come from: the router's


@contextlib.contextmanager
def behind_nat(router: Host, taken: Sequence[int] = ()) -> Iterator[NattedHost]:
    """A client host whose only link goes to ``router`` (one of ``linked``'s client hosts),
    which forwards its packets to the server host with their source rewritten to the
    router's own address (masquerade). ``taken``: the subnets of the other hosts, never
    reused for this link. Removed on exit whatever happens inside; end the processes
    started in it first (the router's rules go with the router's namespace)."""
    skip = nat_unavailable_reason()
    if skip is not None:
        raise NetnsError(skip)
    pid = os.getpid()
    i = router.index + MAX_HOSTS  # linked() uses MAX_HOSTS+1 up: never one of its names
    (octet,) = _free_octets(1, [router.octet, *taken])
    host = Host(f"{PREFIX}{pid}n{i}", i, octet, f"{PREFIX}{pid}h{i}", f"{PREFIX}{pid}c{i}")
    failed = False
    try:
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.root_if, "type", "veth", "peer", "name", host.client_if)
        _ip("link", "set", host.root_if, "netns", router.netns)
        _ip("link", "set", host.client_if, "netns", host.netns)
        for ns, dev, addr in ((router.netns, host.root_if, host.gateway),
                              (host.netns, host.client_if, host.ip)):
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            _ip("netns", "exec", ns, "ip", "link", "set", dev, "up")
        _ip("netns", "exec", host.netns, "ip", "link", "set", "lo", "up")
        _ip("netns", "exec", host.netns, "ip", "route", "add", "default", "via", host.gateway)
        _masquerade(router.netns, router.client_if)
        yield NattedHost(host, server=router.gateway, seen_as=router.ip)
    except BaseException:
        failed = True
        raise
    finally:
        errors = _destroy(host)
        if errors and not failed:
            raise NetnsError("could not remove: " + "; ".join(errors))
