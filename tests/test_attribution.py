"""Attribution's parts on this host: the host's addresses per network namespace, and the
Attributor settling local and remote clients (real sockets on loopback)."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from typing import Any

import pytest

from tracer.agent.attribution import Attributor
from tracer.attribution.sockets import (
    LocalAddresses,
    address_owners,
    parse_fib_trie,
    parse_if_inet6,
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
    deadline = time.monotonic() + 5.0
    owners = None
    while owners is None and time.monotonic() < deadline:  # one look a second at most
        owners = address_owners("127.0.0.1", seen_at=later)
        time.sleep(0.1)
    assert owners is not None and own in owners
    assert address_owners("198.51.100.77", seen_at=later) == set()


def _record(uid: str, client: tuple[str, int], server: tuple[str, int],
            end_reason: str | None = None) -> dict[str, Any]:
    return {"uid": uid, "orig_h": client[0], "orig_p": client[1], "resp_h": server[0],
            "resp_p": server[1], "end_reason": end_reason}


def _settle(attributor: Attributor, seconds: float = 5.0) -> dict[str, tuple[str, Any]]:
    got: dict[str, tuple[str, Any]] = {}
    deadline = time.monotonic() + seconds
    while attributor.pending and time.monotonic() < deadline:
        for settled in attributor.scan(time.time()):
            got[settled.uid] = (settled.verdict, settled.process)
        time.sleep(0.05)
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
