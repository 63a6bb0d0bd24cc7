"""End to end with real processes: real gRPC clients leak, pool and close; tracer names the leakers.

A grpcio server runs in the root network namespace; each client (grpcio and grpc-js, in
leak, pool and close modes) runs on a "host" of its own (a network namespace with its
own IP). The traffic is recorded once by tcpdump (Linux cooked frames) and once by
scapy's sniffer on the veth links (Ethernet frames, no tcpdump involved); each capture
is read with ``tracer capture`` and judged with ``tracer report`` and ``tracer
connections``, as a user would. No mocks: see realtraffic_support.py for the choreography.

Needs root, ``ip netns``; tcpdump for the tcpdump half; node and tests/peers/node_modules
(``make node-deps``) for the grpc-js peers. Each scenario takes about 4-5 s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import realtraffic_support as rt
from support import skip_if

pytestmark = [pytest.mark.live]

# Link types (tcpdump.org/linktypes.html): what each capture writer is expected to produce.
LINKTYPES = {"tcpdump": {113, 276}, "scapy": {1}}  # LINUX_SLL or LINUX_SLL2; ETHERNET

LEAKERS = [p for p in rt.PEERS if p.mode == "leak"]
POOLED = [p for p in rt.PEERS if p.mode == "pool"]
CLOSERS = [p for p in rt.PEERS if p.mode == "close"]


def _ids(peer: rt.PeerSpec) -> str:
    return peer.name


@pytest.fixture(scope="module", params=["tcpdump", "scapy"])
def scenario(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[rt.ScenarioResult]:
    """One real-traffic run per capture backend, shared by the tests of this module."""
    backend: rt.Backend = request.param
    skip_if(rt.unavailable_reason(backend))
    if backend == "scapy":
        pytest.importorskip("scapy.all")
    peers = [p for p in rt.PEERS
             if p.impl == "grpcio" or rt.grpcjs_unavailable_reason() is None]
    with rt.nothing_left_behind():
        result = rt.run_scenario(tmp_path_factory.mktemp(f"real-{backend}"), backend, peers)
    yield result


def _in_scenario(scenario: rt.ScenarioResult, peer: rt.PeerSpec) -> None:
    """Skip when ``peer`` could not take part (grpc-js without node or node_modules)."""
    if peer.name not in scenario.ips:
        pytest.skip(rt.grpcjs_unavailable_reason() or f"{peer.name} did not run")


def test_capture_is_complete(scenario: rt.ScenarioResult) -> None:
    # A precondition of everything else: the file holds every packet of the run.
    assert scenario.capture_lost in (None, 0), scenario.capture_summary
    assert scenario.linktype in LINKTYPES[scenario.backend], scenario.linktype
    cap = scenario.report["capture"]
    assert cap["port"] == scenario.port
    assert cap["packets"] == scenario.file_packets > 0, scenario.capture_log
    assert cap["damaged"] == []
    assert cap["anomalies"] == 0, scenario.capture_log


def test_report_lists_exactly_the_clients(scenario: rt.ScenarioResult) -> None:
    reported = sorted(c["client"] for c in scenario.report["clients"])
    assert reported == sorted(scenario.ips.values())


@pytest.mark.parametrize("peer", rt.PEERS, ids=_ids)
def test_client_counts(scenario: rt.ScenarioResult, peer: rt.PeerSpec) -> None:
    _in_scenario(scenario, peer)
    c = scenario.client(peer)
    assert (c["opened"], c["closed"], c["open"]) == (
        peer.connections, peer.connections - peer.open_at_end, peer.open_at_end
    ), c
    assert c["health_checks"] == 0, c
    assert c["rpcs"] == peer.rpcs, c
    assert c["methods"] == {rt.METHOD: peer.rpcs}, c


@pytest.mark.parametrize("peer", LEAKERS, ids=_ids)
def test_leaking_client_is_flagged(scenario: rt.ScenarioResult, peer: rt.PeerSpec) -> None:
    _in_scenario(scenario, peer)
    c = scenario.client(peer)
    assert c["verdict"] == "leak", c
    assert c["rpcs_per_connection"] == 1.0, c
    assert c["oldest_open_s"] is not None and c["oldest_open_s"] > 0, c
    assert rt.METHOD in c["reason"], c["reason"]


@pytest.mark.parametrize("peer", POOLED + CLOSERS, ids=_ids)
def test_healthy_client_is_not_flagged(scenario: rt.ScenarioResult, peer: rt.PeerSpec) -> None:
    _in_scenario(scenario, peer)
    c = scenario.client(peer)
    assert c["verdict"] == "ok", c


def test_leakers_come_first(scenario: rt.ScenarioResult) -> None:
    verdicts = [c["verdict"] for c in scenario.report["clients"]]
    leaks = sum(1 for p in LEAKERS if p.name in scenario.ips)
    assert verdicts[:leaks] == ["leak"] * leaks and "leak" not in verdicts[leaks:], verdicts


@pytest.mark.parametrize("peer", CLOSERS, ids=_ids)
def test_how_closing_clients_close(scenario: rt.ScenarioResult, peer: rt.PeerSpec) -> None:
    # DESIGN.md "Facts": grpcio closes with a bare FIN; grpc-js sends GOAWAY first.
    _in_scenario(scenario, peer)
    closed_by = scenario.client(peer)["closed_by"]
    kind = "client_fin" if peer.impl == "grpcio" else "goaway"
    assert closed_by[kind] == peer.count, closed_by
    assert sum(closed_by.values()) == peer.count, closed_by


def test_goaways_from_grpcjs_clients_are_counted(scenario: rt.ScenarioResult) -> None:
    closers = [p for p in CLOSERS if p.impl == "grpc-js" and p.name in scenario.ips]
    if not closers:
        pytest.skip(rt.grpcjs_unavailable_reason() or "no grpc-js closing peer")
    goaways = scenario.report["server"]["goaways"]
    # grpc-js sends its GOAWAY twice per connection (DESIGN.md); nobody else sends one.
    assert goaways == {"server": 0, "client": 2 * sum(p.count for p in closers)}, goaways


@pytest.mark.parametrize("peer", rt.PEERS, ids=_ids)
def test_connections_listing(scenario: rt.ScenarioResult, peer: rt.PeerSpec) -> None:
    _in_scenario(scenario, peer)
    rows = scenario.connections_of(peer)
    assert len(rows) == peer.connections, rows
    assert sum(r["is_open"] for r in rows) == peer.open_at_end, rows
    for r in rows:
        assert r["resp_p"] == scenario.port, r
        assert r["first_method"] == rt.METHOD, r
        assert r["preface_ts"] is not None and r["server_settings_ts"] is not None, r
        if r["is_open"]:
            assert r["conn_state"] == "S1" and r["close_kind"] is None, r
        else:
            # A client that closes may still get a late frame and answer it with a RST
            # after its FIN (seen with grpcio): RSTO, and still closed by the client.
            assert r["conn_state"] in ("SF", "RSTO"), r
            assert r["close_kind"] == "client_fin", r
    streams = Counter(r["streams"] for r in rows)
    assert streams == ({peer.rpcs: 1} if peer.mode == "pool" else {1: peer.count}), rows
