"""Attribution's parts on this host: the host's addresses per network namespace, and the
Attributor settling local and remote clients (real sockets on loopback)."""

from __future__ import annotations

import ipaddress
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing import Pipe
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support import poll

from store.schema import open_database
from store.writer import CaptureWriter
from tracer.agent import store_worker
from tracer.agent.attribution import Attributor
from tracer.agent.messages import Batch, Finish, Opened, Totals
from tracer.agent.store_worker import StoreSettings, StoreWorker
from tracer.attribution import sockets
from tracer.attribution.sockets import (
    LocalAddresses,
    address_owners,
    descriptor_count,
    find_owners,
    namespace_processes,
    parse_fib_trie,
    parse_if_inet6,
    smallest_first,
)

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
        +-- 192.0.2.0/30 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 192.0.2.2
        /32 host LOCAL
"""

IF_INET6 = """\
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000002 04 40 00 82     eth0
"""


def test_fib_trie_gives_local_addresses_and_ranges() -> None:
    nets = parse_fib_trie(FIB_TRIE)
    assert [str(n) for n in nets] == ["127.0.0.0/8", "127.0.0.1/32", "192.0.2.2/32"]


def test_if_inet6_gives_addresses() -> None:
    assert parse_if_inet6(IF_INET6) == {"fe80::fc:ff:fe00:1", "::1", "fd00::2"}


def test_local_addresses_know_their_namespaces() -> None:
    local = LocalAddresses()
    local.add_namespace(1, parse_fib_trie(FIB_TRIE), parse_if_inet6(IF_INET6))
    local.add_namespace(2, [ipaddress.IPv4Network("10.0.0.2/32"),
                            ipaddress.IPv4Network("127.0.0.0/8")], {"::1"})
    assert local.owners("192.0.2.2") == {1}
    assert local.owners("10.0.0.2") == {2}
    assert local.owners("127.3.4.5") == {1, 2}  # the loopback range of each namespace
    assert local.owners("::1") == {1, 2}
    assert local.owners("192.0.2.3") == set()  # on the link, not ours: remote
    assert local.owners("fd00::3") == set()


def test_this_hosts_addresses_read_from_proc() -> None:
    own = os.stat("/proc/self/ns/net").st_ino
    later = time.time() + 0.0
    owners = poll(lambda: address_owners("127.0.0.1", seen_at=later),  # a look a second
                  until=lambda owners: owners is not None, timeout=5.0, interval=0.1)
    assert owners is not None and own in owners
    assert address_owners("198.51.100.77", seen_at=later) == set()


def _record(uid: str, client: tuple[str, int], server: tuple[str, int],
            end_reason: str | None = None) -> dict[str, Any]:
    return {"uid": uid, "orig_h": client[0], "orig_p": client[1], "resp_h": server[0],
            "resp_p": server[1], "end_reason": end_reason}


def _settle(attributor: Attributor, seconds: float = 5.0) -> dict[str, tuple[str, Any]]:
    got: dict[str, tuple[str, Any]] = {}

    def scan() -> bool:
        for settled in attributor.scan(time.time()):
            got[settled.uid] = (settled.verdict, settled.process)
        return not attributor.pending

    if attributor.pending:
        poll(scan, timeout=seconds)
    return got


def test_local_client_named_remote_client_settled_without_a_socket() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    server = listener.getsockname()
    client = socket.create_connection(server)
    accepted, _ = listener.accept()
    try:
        attributor = Attributor(frozenset({server[1]}))
        now = time.time()
        attributor.observe([_record("Clocal", client.getsockname(), server),
                            _record("Cremote", ("198.51.100.77", 40000), server)], now)
        got = _settle(attributor)
        assert got["Clocal"][0] == "local" and got["Clocal"][1].pid == os.getpid()
        assert got["Cremote"] == ("remote", None)
        assert not attributor.pending
    finally:
        for s in (client, accepted, listener):
            s.close()


def test_local_client_gone_before_a_scan_is_counted_not_guessed() -> None:
    attributor = Attributor(frozenset({9}))
    now = time.time()
    attributor.observe([_record("Cgone", ("127.0.0.1", 40001), ("127.0.0.1", 9))], now)
    assert attributor.scan(now) == []  # no such socket: looked for again later
    pending = attributor.pending["Cgone"]
    assert pending.next_try > now
    ended = attributor.observe(
        [_record("Cgone", ("127.0.0.1", 40001), ("127.0.0.1", 9), "fin")], time.time())
    assert [(s.uid, s.verdict, s.process) for s in ended] == \
        [("Cgone", "closed_before_attribution", None)]


@pytest.mark.parametrize("count", [500])
def test_many_remote_clients_cost_no_socket_lookup(count: int) -> None:
    attributor = Attributor(frozenset({9090}))
    calls = 0
    real = attributor.diag.lookup

    def counting(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args)

    attributor.diag.lookup = counting  # type: ignore[method-assign]
    now = time.time()
    attributor.observe([_record(f"C{i}", ("198.51.100.1", 20000 + i), ("192.0.2.1", 9090))
                        for i in range(count)], now)
    got = _settle(attributor)
    assert len(got) == count and {v for v, _ in got.values()} == {"remote"}
    assert calls == 0


# -- the owner of a socket, searched fewest descriptors first ------------------------------


@pytest.fixture
def small_owner() -> Iterator[tuple[int, int]]:
    """A child process holding one socket (and not much else) that this process does not
    hold: (its pid, the socket's inode)."""
    sock = socket.socket()
    inode = os.fstat(sock.fileno()).st_ino
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             pass_fds=[sock.fileno()], stdin=subprocess.DEVNULL)
    sock.close()
    try:
        yield child.pid, inode
    finally:
        child.kill()
        child.wait(10)


@pytest.fixture
def many_descriptors() -> Iterator[int]:
    """This process holding 300 more descriptors (a leaker, for the search)."""
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(300)]
    try:
        yield len(fds)
    finally:
        for fd in fds:
            os.close(fd)


def _listed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    listed: list[str] = []
    real = os.listdir

    def listdir(path: Any = ".") -> list[str]:
        listed.append(str(path))
        return real(path)

    monkeypatch.setattr(sockets.os, "listdir", listdir)
    return listed


def test_a_big_process_is_not_listed_before_the_small_owner(
        monkeypatch: pytest.MonkeyPatch, small_owner: tuple[int, int],
        many_descriptors: int) -> None:
    """A leaker (this process, hundreds of descriptors) that owned connections before is
    not listed before the small client that holds the socket, even when the count kept of
    it is old and small: a short call's socket would be closed by then."""
    if descriptor_count(os.getpid()) is None:
        pytest.skip("this kernel does not count descriptors in a stat of /proc/PID/fd")
    pid, inode = small_owner
    big = os.getpid()
    sizes = {big: 3}  # counted long ago, before it leaked
    listed = _listed(monkeypatch)
    found = find_owners({inode}, [big, pid], sizes=sizes, everyone=False, order=True)
    assert found[inode][0] == pid
    assert listed == [f"/proc/{pid}/fd/"]  # the big one never
    assert sizes[big] >= many_descriptors


def test_without_counts_the_sizes_known_order_the_search(
        monkeypatch: pytest.MonkeyPatch, small_owner: tuple[int, int],
        many_descriptors: int) -> None:
    """Where a stat does not count descriptors (before Linux 6.2), the counts known from
    earlier listings and from the descriptor numbers owners used order the search."""
    monkeypatch.setattr(sockets, "descriptor_count", lambda pid: None)
    pid, inode = small_owner
    big = os.getpid()
    assert smallest_first([big, pid, big], {big: 400, pid: 5}) == [pid, big]
    assert smallest_first([big, pid], {}) == [big, pid]  # nothing known: as given
    listed = _listed(monkeypatch)
    found = find_owners({inode}, [big], candidates=[pid], sizes={big: 400}, everyone=False,
                        order=True)
    assert found[inode][0] == pid and listed == [f"/proc/{pid}/fd/"]


def test_a_client_not_known_yet_is_found_before_a_leaker_is_listed(
        monkeypatch: pytest.MonkeyPatch, small_owner: tuple[int, int],
        many_descriptors: int) -> None:
    """A new client (in the socket's namespace, never an owner before) is searched before
    a leaker that owned connections (hundreds of descriptors: after every smaller
    process); the candidates are asked for only when the hints did not find the socket."""
    pid, inode = small_owner
    big = os.getpid()
    asked: list[int] = []

    def candidates() -> list[int]:
        asked.append(1)
        return [pid]

    listed = _listed(monkeypatch)
    sizes = {big: 1000}  # what the agent knows of a leaker even where stat cannot count
    found = find_owners({inode}, [big], hints={big: [0, 1]}, candidates=candidates,
                        sizes=sizes, everyone=False, order=True)
    assert found[inode][0] == pid and listed == [f"/proc/{pid}/fd/"] and asked == [1]
    child_fd = found[inode][1]
    asked.clear()
    found = find_owners({inode}, [pid], hints={pid: [child_fd]}, candidates=candidates,
                        everyone=False, order=True)
    assert found[inode] == (pid, child_fd) and asked == []  # the hint was enough


def test_the_processes_of_a_namespace_are_known() -> None:
    """All those of a small namespace; of a big one (a host's), those that started lately
    (a new client's first connections are found without a walk of every process)."""
    own = os.stat("/proc/self/ns/net").st_ino
    assert os.getpid() in namespace_processes(own, 1 << 20)
    assert os.getpid() not in namespace_processes(own, 0)  # older than YOUNG seconds, or
    # seen at the first look: not a newcomer
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             stdin=subprocess.DEVNULL)
    try:
        poll(lambda: child.pid in namespace_processes(own, 0), timeout=5.0)  # looks are rationed
        assert child.pid in namespace_processes(own, 0)
        assert child.pid in namespace_processes(own, 1 << 20)
    finally:
        child.kill()
        child.wait(10)


def test_an_owner_found_at_a_high_descriptor_is_known_to_be_big() -> None:
    attributor = Attributor(frozenset({9}))
    try:
        entry = sockets.SocketEntry(("127.0.0.1", 40000), ("127.0.0.1", 9), 1, 0, 1, 1)
        attributor._owned(4242, 1999, entry)
        assert attributor.fd_counts[4242] >= 2000
    finally:
        attributor.close()


# -- new connections looked for while a batch is read or written ------------------------


class _Live:
    """A store worker attributing connections to a listener on loopback, its inbox, and
    one client connection of this process (not announced yet)."""

    def __init__(self, tmp_path: Path) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.server = self.listener.getsockname()
        self.client = socket.create_connection(self.server)
        self.accepted, _ = self.listener.accept()
        path = tmp_path / "live.db"
        self.db = open_database(str(path))
        self.inbox, self.sender = Pipe(duplex=False)
        self.writer = CaptureWriter.start(self.db, kind="live", ports=[self.server[1]])
        self.worker = StoreWorker(self.writer, StoreSettings(
            db_path=str(path), ports=frozenset([self.server[1]]), interface="lo"))
        address_owners("127.0.0.1", seen_at=0.0)  # the host's addresses read once

    def announce(self, uid: str) -> None:
        self.sender.send(Opened([_record(uid, self.client.getsockname(), self.server)]))

    def close(self) -> None:
        self.worker.finish(Finish("complete", None, 1.0))
        self.worker.close()
        self.inbox.close()
        self.sender.close()
        self.db.conn.close()
        for s in (self.client, self.accepted, self.listener):
            s.close()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[_Live]:
    run = _Live(tmp_path)
    try:
        yield run
    finally:
        run.close()


def test_a_connection_opened_while_a_batch_is_written_is_looked_for_meanwhile(
        live: _Live) -> None:
    """The store worker writes a batch while the connections that opened meanwhile come
    in: their owners are looked for before the write ends (a short call's socket is gone
    after a slow write), and a message of another kind waits for its turn."""
    worker = live.worker
    assert worker.attributor is not None
    written: list[float] = []
    real = live.writer.write

    def slow_write(*args: Any) -> None:
        time.sleep(0.5)  # a batch of a busy capture on a slow disk
        real(*args)
        written.append(time.time())

    live.writer.write = slow_write  # type: ignore[method-assign]
    later = Batch([], [], [], Totals(packets=2))
    live.announce("Cshort")
    live.sender.send(later)
    live.sender.send(Opened([_record("Cafter", ("127.0.0.1", 1), live.server)]))
    worker.batch(Batch([], [], [], Totals(packets=1)), live.inbox)
    verdict, info, at, _detail = worker.attributor.deferred["Cshort"]
    assert verdict == "local" and info is not None and info.pid == os.getpid()
    assert at < written[0]
    assert worker.held == [later]
    assert "Cafter" not in worker.attributor.pending  # read after the held one


def test_the_connections_sent_after_a_big_batch_are_looked_for_before_it_is_unpickled(
        live: _Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy capture's batch takes long to unpickle, and the connections that opened
    while the capture built it come right after it: they are looked for first. A small
    message is unpickled at once."""
    worker = live.worker
    unpickling: list[float] = []

    def slow_loads(data: bytes) -> Any:
        unpickling.append(time.time())
        return pickle.loads(data)

    monkeypatch.setattr(store_worker, "pickle", SimpleNamespace(loads=slow_loads))
    small = Batch([], [], [], Totals(packets=2))
    live.announce("Cshort")
    assert worker.unpickle(pickle.dumps(small), live.inbox) == small
    assert not worker.unwritten  # not read yet
    big = Batch([{"payload": "x" * store_worker.BIG_MESSAGE}], [], [], Totals(packets=1))
    later = Batch([], [], [], Totals(packets=3))
    live.sender.send(later)
    assert worker.unpickle(pickle.dumps(big), live.inbox) == big
    [(uid, verdict, info, at, _detail)] = worker.unwritten
    assert (uid, verdict) == ("Cshort", "local") and info is not None
    assert info.pid == os.getpid() and at < unpickling[-1]
    assert worker.held == [later]  # handled after the big one
