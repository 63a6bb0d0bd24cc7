"""Real captures (../shared/captures, next to the repository) against their written ground truth.

The facts below come from ../shared/captures/README.md (its tables and its per-connection
ground truth), written down here as data. A few facts the README does not state (an SNI, a
:path) were read from the bytes independently (tshark shows the same) and say so. Nothing
here is a snapshot of what tracer printed.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import FULL, shared_captures

from tracer.events import ConnectionEvent
from tracer.pipeline import Analyzer
from tracer.sources.pcapfile import CaptureReader

CAPTURES = shared_captures()
EXTERNAL = CAPTURES / "external"
GENERATED = CAPTURES / "generated"

# RFC 9113 section 7
ERRORS = {"NO_ERROR": 0, "INTERNAL_ERROR": 2, "CANCEL": 8, "ENHANCE_YOUR_CALM": 11}
DIR = {"client": "orig", "server": "resp"}
UNBOUNDED = 2**31 - 1

# Server ports: the README's "decode" column (external) and "Server ports" line (generated).
GRPCIO, GRPCJS = 50051, 50052
EXTERNAL_PORTS: dict[str, tuple[int, ...]] = {
    "sv-http2-errorcode-grpcjs-via-connect-proxy.pcap": (8888, 6233),
    "sv-doh-post-firefox-client-goaway.pcap": (80,),
    "sv-doh-get-chrome-ping-rststream.pcap": (80,),
    "sv-h2c-upgrade-curl-go-goaway-debugdata-rst.pcap": (8080,),
    "sv-h2c-upgrade-range-5conns-h1-and-h2-rststream.pcap": (8080,),
    "sv-http2-continuation-rststream.pcap": (8080,),
    "sv-h2c-upgrade-nosyn.pcap": (80,),
    "sv-http2-nghttp2-ipv6-client-goaway.pcap": (3000,),
    "ndpi-http2-go-sbi-midstream-server-goaway.pcapng": (29518,),
    "deepflow-grpcgo-1.64-clientstream-ping-fin.pcap": (38888,),
    "deepflow-grpcgo-1.63-serverstream-midstream-loss.pcap": (9001,),
    "deepflow-grpcgo-midstream-stream928401.pcap": (7000,),
    "deepflow-grpc-midstream-interleaved-stream18131981.pcap": (3550,),
    "deepflow-grpcgo-1.22-hipstershop-midstream.pcap": (7070,),
    "deepflow-grpc-unary-midstream.pcap": (30035,),
    "arkime-tls12-alpn-h2-handshake-ipv6.pcap": (443,),
    "arkime-h2c-prior-knowledge-nghttp2-push-goaway.pcap": (80,),
}
CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".pcap.gz", ".pcapng.gz")


# -- running the pipeline ------------------------------------------------------------------------


@dataclass
class Result:
    records: list[dict[str, Any]]
    events: list[ConnectionEvent]
    anomalies: list[Any]
    packets: int
    first_ts: float
    sha256: str
    reader_packets: int

    def by_client_port(self) -> dict[int, dict[str, Any]]:
        return {r["orig_p"]: r for r in self.records}

    def events_of(self, uid: str, name: str | None = None) -> list[ConnectionEvent]:
        return [e for e in self.events if e.uid == uid and (name is None or e.name == name)]


@functools.cache
def analyze(path: Path, ports: tuple[int, ...]) -> Result:
    a = Analyzer(frozenset(ports), FULL)
    with CaptureReader.open(str(path)) as r:
        it = iter(r)
        while a.feed(it, 10000):
            pass
        digest = r.sha256()
        reader_packets = r.info.packets
    a.finish()
    d = a.drain()
    assert a.stats.first_ts is not None
    return Result(d.records, d.events, d.anomalies, a.stats.packets, a.stats.first_ts, digest,
                  reader_packets)


def ports_for(path: Path) -> tuple[int, ...]:
    if path.parent == GENERATED:
        spec = GENERATED_TRUTH.get(path.name)
        if spec is None:
            pytest.fail(f"{path.name}: no ground truth in this test; add it from the README")
        return (spec[0],)
    ports = EXTERNAL_PORTS.get(path.name)
    if ports is None:
        pytest.fail(f"{path.name}: server port unknown; add it to EXTERNAL_PORTS from the README")
    return ports


def capture_files() -> list[Path]:
    files = [p for d in (EXTERNAL, GENERATED) for p in sorted(d.iterdir())
             if p.name.endswith(CAPTURE_SUFFIXES)]
    return files


def ext(name: str) -> Result:
    return analyze(EXTERNAL / name, EXTERNAL_PORTS[name])


def only(result: Result) -> dict[str, Any]:
    assert len(result.records) == 1, [(r["orig_p"], r["resp_p"]) for r in result.records]
    return result.records[0]


def goaways(result: Result, uid: str) -> list[tuple[str, int, int, str]]:
    return [(e.dir, e.last_stream_id, e.error_code, e.debug)
            for e in result.events_of(uid, "goaway")]


def names_in_order(result: Result, uid: str, names: set[str]) -> list[tuple[str, str]]:
    return [(e.name, e.dir) for e in result.events_of(uid) if e.name in names]


def request_streams(result: Result, uid: str) -> list[int]:
    return [e.stream_id for e in result.events_of(uid, "request")]


def ping_frames(result: Result, uid: str, direction: str) -> int:
    return sum(1 for e in result.events_of(uid)
               if e.dir == direction and e.name in ("ping", "ping_ack"))


# -- every file ----------------------------------------------------------------------------------


def test_every_capture_has_ground_truth_here() -> None:
    names = {p.name for p in capture_files()}
    assert names, f"no captures in {CAPTURES}"
    known = set(EXTERNAL_PORTS) | set(GENERATED_TRUTH)
    assert names == known, (f"missing here: {sorted(names - known)}; "
                            f"gone from the folder: {sorted(known - names)}")


@pytest.mark.parametrize("path", capture_files(), ids=lambda p: p.name)
def test_capture_parses_cleanly(path: Path) -> None:
    result = analyze(path, ports_for(path))
    assert result.packets == result.reader_packets > 0
    assert result.records, "no connection found"
    assert result.anomalies == []
    for r in result.records:
        assert r["events_dropped"] == 0
        assert r["resp_p"] in ports_for(path), "connection oriented away from the server port"


def _manifest() -> dict[str, str]:
    manifest = EXTERNAL / "MANIFEST.psv"
    if not manifest.exists():
        return {}
    with manifest.open() as f:
        return {row["local_name"]: row["sha256"] for row in csv.DictReader(f, delimiter="|")}


@pytest.mark.parametrize("name", sorted(_manifest()))
def test_reader_reads_every_byte(name: str) -> None:
    # The digest of what the reader consumed equals the published one: nothing skipped.
    assert ext(name).sha256 == _manifest()[name]


# -- generated/: per-connection ground truth ------------------------------------------------------


@dataclass(frozen=True)
class Conn:
    cport: int
    fin: list[tuple[str, float]]  # (who, seconds after the capture's first packet), in order
    rst: list[tuple[str, float]]
    goaways: list[tuple[str, int, str, str]]  # (sender, last_stream_id, error, debug), in order
    pings: tuple[int, int]  # PING frames (ACKs included) sent by client / server
    open_at_end: bool = False
    streams: list[int] | None = None


# From the README, "Per-connection ground truth (client port, owner from `ss -tnp`)".
GENERATED_TRUTH: dict[str, tuple[int, list[Conn]]] = {
    "grpcio-client-close.pcapng": (GRPCIO, [
        Conn(59340, fin=[("client", 2.005), ("server", 2.005)], rst=[], goaways=[], pings=(2, 2)),
    ]),
    "grpcio-client-exit-noclose.pcapng": (GRPCIO, [
        Conn(60996, fin=[("client", 3.005), ("server", 3.008)], rst=[], goaways=[], pings=(2, 2)),
    ]),
    "grpcio-client-keepalive.pcapng": (GRPCIO, [
        Conn(38586, fin=[("client", 6.003), ("server", 6.003)], rst=[], goaways=[], pings=(7, 7)),
    ]),
    "grpcio-client-leak.pcapng": (GRPCIO, [
        Conn(38180, fin=[("client", 2.013), ("server", 2.013)], rst=[], goaways=[], pings=(2, 2)),
        Conn(38194, fin=[], rst=[], goaways=[], pings=(2, 2), open_at_end=True),
        Conn(38196, fin=[], rst=[], goaways=[], pings=(2, 2), open_at_end=True),
    ]),
    "grpcio-client-shared-pool.pcapng": (GRPCIO, [
        Conn(44676, fin=[("client", 2.008), ("server", 2.008)], rst=[], goaways=[], pings=(4, 4)),
    ]),
    "grpcio-client-sigkill.pcapng": (GRPCIO, [
        Conn(32770, fin=[("client", 3.004), ("server", 3.004)], rst=[], goaways=[], pings=(2, 2)),
    ]),
    "grpcio-server-graceful-stop.pcapng": (GRPCIO, [
        Conn(44684, fin=[("server", 1.918), ("client", 1.918)], rst=[],
             goaways=[("server", UNBOUNDED, "NO_ERROR", "Server shutdown"),
                      ("server", 1, "NO_ERROR", "Server shutdown")],
             pings=(3, 3)),
    ]),
    "grpcio-server-max-idle.pcapng": (GRPCIO, [
        Conn(38626, fin=[("server", 3.860), ("client", 3.860)], rst=[],
             goaways=[("server", 1, "INTERNAL_ERROR", "connection idle")], pings=(2, 2)),
    ]),
    "grpcio-server-stop-immediate.pcapng": (GRPCIO, [
        Conn(56812, fin=[("server", 1.916)], rst=[("server", 1.917)],
             goaways=[("server", UNBOUNDED, "NO_ERROR", "Server shutdown"),
                      ("server", 1, "INTERNAL_ERROR", "Cancelling all calls")],
             pings=(3, 3)),
    ]),
    "grpcio-server-too-many-pings.pcapng": (GRPCIO, [
        Conn(40216, fin=[("server", 3.006), ("client", 3.007)], rst=[],
             goaways=[("server", 1, "ENHANCE_YOUR_CALM", "too_many_pings")], pings=(5, 5)),
    ]),
    "grpcjs-client-close.pcapng": (GRPCJS, [
        Conn(52224, fin=[("server", 2.025), ("client", 2.026)], rst=[],
             goaways=[("client", 0, "NO_ERROR", ""), ("server", 1, "NO_ERROR", ""),
                      ("server", 1, "NO_ERROR", ""), ("client", 0, "NO_ERROR", "")],
             pings=(0, 0)),
    ]),
    "grpcjs-client-exit-noclose.pcapng": (GRPCJS, [
        Conn(56946, fin=[("client", 3.025), ("server", 3.026)], rst=[], goaways=[], pings=(0, 0)),
    ]),
    "grpcjs-client-keepalive.pcapng": (GRPCJS, [
        Conn(47196, fin=[("client", 6.022), ("server", 6.023)], rst=[],
             goaways=[("client", 0, "NO_ERROR", ""), ("client", 0, "NO_ERROR", ""),
                      ("server", 1, "NO_ERROR", ""), ("server", 1, "NO_ERROR", "")],
             pings=(6, 6)),
    ]),
    "grpcjs-client-leak.pcapng": (GRPCJS, [
        Conn(59590, fin=[("client", 2.024), ("server", 2.025)], rst=[],
             goaways=[("client", 0, "NO_ERROR", ""), ("client", 0, "NO_ERROR", ""),
                      ("server", 1, "NO_ERROR", ""), ("server", 1, "NO_ERROR", "")],
             pings=(0, 0)),
        Conn(59598, fin=[], rst=[], goaways=[], pings=(0, 0), open_at_end=True),
        Conn(59604, fin=[], rst=[], goaways=[], pings=(0, 0), open_at_end=True),
    ]),
    "grpcjs-client-shared-pool.pcapng": (GRPCJS, [
        # "1 TCP connection carrying streams 1, 3 and 5"
        Conn(36370, fin=[("server", 2.028), ("client", 2.028)], rst=[],
             goaways=[("client", 0, "NO_ERROR", ""), ("server", 5, "NO_ERROR", ""),
                      ("server", 5, "NO_ERROR", ""), ("client", 0, "NO_ERROR", "")],
             pings=(0, 0), streams=[1, 3, 5]),
    ]),
    "grpcjs-client-sigkill.pcapng": (GRPCJS, [
        Conn(59574, fin=[("client", 3.026), ("server", 3.026)], rst=[], goaways=[], pings=(0, 0)),
    ]),
    "grpcjs-client-vs-grpcio-server-too-many-pings.pcapng": (GRPCIO, [
        Conn(33036, fin=[("server", 4.009)], rst=[("server", 4.010)],
             goaways=[("server", 1, "ENHANCE_YOUR_CALM", "too_many_pings"),
                      ("client", 0, "NO_ERROR", ""), ("client", 0, "NO_ERROR", "")],
             pings=(5, 5)),
    ]),
    "grpcjs-server-graceful-stop.pcapng": (GRPCJS, [
        Conn(51518, fin=[("client", 1.858), ("server", 1.859)], rst=[],
             goaways=[("server", 1, "NO_ERROR", ""), ("client", 0, "NO_ERROR", ""),
                      ("client", 0, "NO_ERROR", ""), ("server", 1, "NO_ERROR", "")],
             pings=(0, 0)),
    ]),
    "grpcjs-server-max-idle.pcapng": (GRPCJS, [
        Conn(45234, fin=[("server", 2.012), ("client", 2.014)], rst=[],
             goaways=[("server", 1, "NO_ERROR", ""), ("server", 1, "NO_ERROR", ""),
                      ("client", 0, "NO_ERROR", ""), ("client", 0, "NO_ERROR", "")],
             pings=(0, 0)),
    ]),
    "grpcjs-server-stop-immediate.pcapng": (GRPCJS, [
        Conn(51530, fin=[("client", 1.864), ("server", 1.864)], rst=[],
             goaways=[("server", 1, "NO_ERROR", ""), ("server", 1, "CANCEL", ""),
                      ("client", 0, "NO_ERROR", ""), ("client", 0, "NO_ERROR", "")],
             pings=(0, 0)),
    ]),
}

# README times are rounded to the millisecond.
TIME_TOLERANCE = 0.0011


def _generated_cases() -> list[tuple[str, Conn]]:
    return [(name, conn) for name, (_port, conns) in GENERATED_TRUTH.items() for conn in conns]


@pytest.mark.parametrize("name", sorted(GENERATED_TRUTH))
def test_generated_connection_count(name: str) -> None:
    port, conns = GENERATED_TRUTH[name]
    result = analyze(GENERATED / name, (port,))
    assert sorted(result.by_client_port()) == sorted(c.cport for c in conns)
    open_ports = sorted(r["orig_p"] for r in result.records if r["is_open"])
    assert open_ports == sorted(c.cport for c in conns if c.open_at_end)


@pytest.mark.parametrize("name,conn", _generated_cases(),
                         ids=[f"{n}:{c.cport}" for n, c in _generated_cases()])
def test_generated_connection_lifecycle(name: str, conn: Conn) -> None:
    port, _ = GENERATED_TRUTH[name]
    result = analyze(GENERATED / name, (port,))
    rec = result.by_client_port()[conn.cport]
    uid = rec["uid"]
    # SYN seen: a whole connection, oriented client -> server
    assert rec["resp_p"] == port and rec["mid_stream"] == 0 and rec["syn_ts"] is not None
    assert rec["orig_h"] == rec["resp_h"] == "127.0.0.1"

    def timeline(kind: str) -> list[tuple[str, float]]:
        return [(e.dir, e.ts - result.first_ts) for e in result.events_of(uid, kind)]

    for kind, expected in (("fin", conn.fin), ("rst", conn.rst)):
        got = timeline(kind)
        assert [d for d, _ in got] == [DIR[who] for who, _ in expected], kind
        for (_, t_got), (_, t_exp) in zip(got, expected, strict=True):
            assert abs(t_got - t_exp) <= TIME_TOLERANCE, (kind, t_got, t_exp)

    # The first FIN or RST decides; the README lists same-millisecond events in wire order
    # (a stable sort keeps it).
    closes = sorted([(t, f"{who}_fin") for who, t in conn.fin]
                    + [(t, f"{who}_rst") for who, t in conn.rst], key=lambda c: c[0])
    assert rec["close_kind"] == (closes[0][1] if closes else None)
    assert rec["is_open"] == int(conn.open_at_end)
    if conn.open_at_end:
        assert rec["end_reason"] == "open_at_end" and rec["close_ts"] is None

    expected_goaways = [(DIR[who], last, ERRORS[err], debug)
                        for who, last, err, debug in conn.goaways]
    assert goaways(result, uid) == expected_goaways
    assert rec["goaways"] == len(expected_goaways)
    if expected_goaways:
        first_sender = expected_goaways[0][0]
        final = [g for g in expected_goaways if g[0] == first_sender][-1]
        # The record keeps who spoke first and that side's final word (a server's
        # 2^31-1 announcement is followed by the real last stream id).
        assert (rec["goaway_sender"], rec["goaway_last_stream_id"], rec["goaway_error"],
                rec["goaway_debug"] or "") == final
    else:
        assert rec["goaway_sender"] is None

    assert (ping_frames(result, uid, "orig"), ping_frames(result, uid, "resp")) == conn.pings
    assert rec["pings_orig"] == len([e for e in result.events_of(uid, "ping") if e.dir == "orig"])
    assert rec["pings_resp"] == len([e for e in result.events_of(uid, "ping") if e.dir == "resp"])

    # every generated client made a unary RPC over h2c prior knowledge
    assert rec["protocol"] == "h2c" and rec["preface_ts"] is not None
    streams = request_streams(result, uid)
    assert streams and streams[0] == 1
    if conn.streams is not None:
        assert streams == conn.streams


def test_grpcio_client_leak_two_connections_stay_open_and_silent() -> None:
    result = analyze(GENERATED / "grpcio-client-leak.pcapng", (GRPCIO,))
    by_port = result.by_client_port()
    for cport in (38194, 38196):
        rec = by_port[cport]
        assert rec["is_open"] == 1 and rec["close_kind"] is None and rec["goaways"] == 0
        assert rec["conn_state"] == "S1"  # established, nothing closed


def test_shared_pool_is_one_connection_for_three_channels() -> None:
    grpcio = analyze(GENERATED / "grpcio-client-shared-pool.pcapng", (GRPCIO,))
    assert len(grpcio.records) == 1
    grpcjs = analyze(GENERATED / "grpcjs-client-shared-pool.pcapng", (GRPCJS,))
    rec = only(grpcjs)
    assert rec["streams"] == 3 and request_streams(grpcjs, rec["uid"]) == [1, 3, 5]


def test_keepalive_pings() -> None:
    # grpcio: a client keepalive PING at 1..5 s, each ACKed, plus the initial BDP PING.
    grpcio = analyze(GENERATED / "grpcio-client-keepalive.pcapng", (GRPCIO,))
    rec = only(grpcio)
    client_pings = [e for e in grpcio.events_of(rec["uid"], "ping") if e.dir == "orig"]
    keepalive = [e.ts - grpcio.first_ts for e in client_pings if e.ts - grpcio.first_ts > 0.5]
    assert [round(t) for t in keepalive] == [1, 2, 3, 4, 5]
    acked = {e.opaque for e in grpcio.events_of(rec["uid"], "ping_ack") if e.dir == "resp"}
    assert {e.opaque for e in client_pings} <= acked
    # grpc-js: a PING every 1.0 s (6), ACKed; no PINGs of its own otherwise.
    grpcjs = analyze(GENERATED / "grpcjs-client-keepalive.pcapng", (GRPCJS,))
    rec = only(grpcjs)
    assert rec["pings_orig"] == 6 and rec["pings_resp"] == 0


# -- external/ ------------------------------------------------------------------------------------


def test_connect_tunnel_http2_is_found_inside_the_tunnel() -> None:
    result = ext("sv-http2-errorcode-grpcjs-via-connect-proxy.pcap")
    by_port = result.by_client_port()
    assert sorted(by_port) == [63577, 63578]
    tunnel, direct = by_port[63577], by_port[63578]
    assert (tunnel["resp_p"], direct["resp_p"]) == (8888, 6233)
    method = "/helloworld.GreeterService/SayHello"

    # (a) CONNECT 127.0.0.1:6233, 200, then h2 inside the tunnel.
    uid = tunnel["uid"]
    http1 = [(e.name, getattr(e, "method", None), getattr(e, "target", None),
              getattr(e, "status", None))
             for e in result.events_of(uid) if e.name.startswith("http1")]
    assert http1 == [("http1_request", "CONNECT", "127.0.0.1:6233", None),
                     ("http1_response", None, None, 200)]
    assert tunnel["preface_ts"] is not None and tunnel["protocol"] == "h2c"
    assert tunnel["methods"] == {method: 1} and request_streams(result, uid) == [1]
    assert tunnel["user_agent"] == "grpc-node-js/1.10.7"
    # The tunnel relays the same GOAWAY frames (bytes 0000080700000000000000000000000002 and
    # 0000080700000000000000000100000000 in the client and proxy directions).
    assert goaways(result, uid) == [("orig", 0, 2, ""), ("resp", 1, 0, "")]
    # It ends with client FIN and then client RST.
    assert names_in_order(result, uid, {"fin", "rst"}) == [("fin", "orig"), ("rst", "orig")]
    assert tunnel["close_kind"] == "client_fin"

    # (b) proxy -> server: full h2c, client GOAWAY(0, INTERNAL_ERROR), server GOAWAY(1,
    # NO_ERROR), then FIN from both sides.
    uid = direct["uid"]
    assert direct["methods"] == {method: 1} and request_streams(result, uid) == [1]
    assert goaways(result, uid) == [("orig", 0, 2, ""), ("resp", 1, 0, "")]
    assert (direct["goaway_sender"], direct["goaway_last_stream_id"], direct["goaway_error"]) == (
        "orig", 0, 2)
    fins = names_in_order(result, uid, {"fin", "rst", "goaway"})
    assert sorted(fins[-2:]) == [("fin", "orig"), ("fin", "resp")]
    assert direct["conn_state"] == "SF" and direct["close_kind"] in ("client_fin", "server_fin")


def test_doh_post_firefox() -> None:
    result = ext("sv-doh-post-firefox-client-goaway.pcap")
    rec = only(result)
    assert rec["conn_state"] == "SF" and rec["syn_ts"] is not None
    assert abs(rec["duration"] - 55.8) < 0.1
    assert rec["streams"] == 34 and rec["methods"] == {"/dns-query": 34}
    assert goaways(result, rec["uid"]) == [("orig", 0, 0, "")]
    order = names_in_order(result, rec["uid"], {"fin", "goaway"})
    assert order[0] == ("goaway", "orig")
    assert sorted(order[1:]) == [("fin", "orig"), ("fin", "resp")]


def test_doh_get_chrome_pings_and_cancel() -> None:
    result = ext("sv-doh-get-chrome-ping-rststream.pcap")
    rec = only(result)
    uid = rec["uid"]
    assert rec["conn_state"] == "SF" and abs(rec["duration"] - 136) < 1
    assert all(m.startswith("/dns-query") for m in rec["methods"])
    server_pings = [e.opaque for e in result.events_of(uid, "ping") if e.dir == "resp"]
    client_acks = [e.opaque for e in result.events_of(uid, "ping_ack") if e.dir == "orig"]
    assert server_pings and client_acks == server_pings
    assert rec["pings_orig"] == 0
    resets = [(e.dir, e.stream_id, e.error_code) for e in result.events_of(uid, "rst_stream")]
    assert resets == [("orig", 7, ERRORS["CANCEL"])]
    assert rec["goaways"] == 0 and rec["goaway_sender"] is None
    fins = result.events_of(uid, "fin")
    assert fins[0].dir == "orig" and abs(fins[0].ts - result.first_ts - 136) < 1
    assert rec["close_kind"] == "client_fin"


def test_h2c_upgrade_curl_go_goaway_debug_then_rst() -> None:
    result = ext("sv-h2c-upgrade-curl-go-goaway-debugdata-rst.pcap")
    rec = only(result)
    uid = rec["uid"]
    assert rec["h2c_upgrade"] == 1
    ups = [e for e in result.events_of(uid) if e.name in ("http1_request", "http1_response")]
    assert [e.name for e in ups] == ["http1_request", "http1_response"]
    assert (ups[0].upgrade, ups[1].status) == ("h2c", 101)
    # RFC 7540 3.2: the upgraded request is stream 1.
    assert request_streams(result, uid) == [1]
    got = goaways(result, uid)
    assert [(d, last, err) for d, last, err, _ in got] == [("orig", 0, 0), ("resp", 1, 0)]
    debug = got[0][3]
    assert debug in ("shutdown\\x00", "shutdown\x00"), debug  # b"shutdown\0", stored printable
    assert names_in_order(result, uid, {"goaway", "fin", "rst"}) == [
        ("goaway", "orig"), ("fin", "orig"), ("goaway", "resp"), ("rst", "orig")]
    assert rec["close_kind"] == "client_fin"


def test_h2c_upgrade_five_connections_http1_is_not_http2() -> None:
    result = ext("sv-h2c-upgrade-range-5conns-h1-and-h2-rststream.pcap")
    recs = sorted(result.records, key=lambda r: r["ts"])
    assert len(recs) == 5
    for i, rec in enumerate(recs):
        uid = rec["uid"]
        assert rec["conn_state"] == "SF" and rec["syn_ts"] is not None
        assert sorted(d for _, d in names_in_order(result, uid, {"fin"})) == ["orig", "resp"]
        assert rec["goaways"] == 0
        resets = [(e.dir, e.stream_id, e.error_code) for e in result.events_of(uid, "rst_stream")]
        if i in (0, 2, 4):  # the README's streams 0, 2 and 4 upgrade to h2c
            assert rec["protocol"] == "h2c" and rec["h2c_upgrade"] == 1
            assert rec["streams"] == 1
            assert resets == [("resp", 1, 0)]
        else:  # plain HTTP/1.1: no HTTP/2 stream, no preface
            assert rec["protocol"] == "http1" and rec["h2c_upgrade"] == 0
            assert rec["streams"] == 0 and rec["preface_ts"] is None and resets == []
            assert rec["methods"] == {}


def test_continuation_frames() -> None:
    result = ext("sv-http2-continuation-rststream.pcap")
    rec = only(result)
    uid = rec["uid"]
    assert rec["conn_state"] == "SF" and rec["goaways"] == 0
    # HEADERS + 2 CONTINUATION decode to one request; its :path is /tata (read from the
    # bytes: the header block spans the three frames).
    assert request_streams(result, uid) == [1] and rec["methods"] == {"/tata": 1}
    resets = [(e.dir, e.stream_id, e.error_code) for e in result.events_of(uid, "rst_stream")]
    assert resets == [("resp", 1, 0)]


def test_h2c_upgrade_capture_started_after_the_handshake() -> None:
    result = ext("sv-h2c-upgrade-nosyn.pcap")
    rec = only(result)
    uid = rec["uid"]
    assert (rec["orig_p"], rec["resp_p"]) == (58038, 80)
    assert rec["syn_ts"] is None and rec["mid_stream"] == 1 and rec["conn_state"] == "OTH"
    assert rec["is_open"] == 1 and rec["close_kind"] is None
    assert not result.events_of(uid, "fin") and not result.events_of(uid, "rst")
    assert rec["preface_ts"] is not None and rec["client_settings_ts"] is not None
    assert rec["goaways"] == 0
    # the preface restarts HPACK: the request after it decodes
    assert rec["methods"].get("/humans.txt") == 1


def test_h2c_upgrade_seen_even_without_the_handshake() -> None:
    result = ext("sv-h2c-upgrade-nosyn.pcap")
    rec = only(result)
    assert rec["server_settings_ts"] is not None
    assert rec["h2c_upgrade"] == 1
    assert request_streams(result, rec["uid"]) == [1, 3]


def test_nghttp2_ipv6_client_goaway_server_fins_first() -> None:
    result = ext("sv-http2-nghttp2-ipv6-client-goaway.pcap")
    rec = only(result)
    uid = rec["uid"]
    assert rec["ip_version"] == 6 and rec["orig_h"] == rec["resp_h"] == "::1"
    assert rec["resp_p"] == 3000 and rec["conn_state"] == "SF"
    assert rec["streams"] == 6 and len(rec["methods"]) == 6
    assert goaways(result, uid) == [("orig", 0, 0, "")]
    assert names_in_order(result, uid, {"goaway", "fin"}) == [
        ("goaway", "orig"), ("fin", "resp"), ("fin", "orig")]
    assert rec["close_kind"] == "server_fin"


MID_STREAM = {
    # name: (client port, server port, packets)
    "ndpi-http2-go-sbi-midstream-server-goaway.pcapng": (37824, 29518, None),
    "deepflow-grpcgo-1.63-serverstream-midstream-loss.pcap": (59854, 9001, 8),
    "deepflow-grpcgo-midstream-stream928401.pcap": (53160, 7000, 3),
    "deepflow-grpc-midstream-interleaved-stream18131981.pcap": (37290, 3550, 2),
    "deepflow-grpcgo-1.22-hipstershop-midstream.pcap": (51578, 7070, 2),
    "deepflow-grpc-unary-midstream.pcap": (53790, 30035, 2),
}


@pytest.mark.parametrize("name", sorted(MID_STREAM))
def test_mid_stream_captures_are_oriented_and_open(name: str) -> None:
    cport, sport, packets = MID_STREAM[name]
    result = ext(name)
    rec = only(result)
    assert (rec["orig_p"], rec["resp_p"]) == (cport, sport)
    assert rec["conn_state"] == "OTH" and rec["mid_stream"] == 1 and rec["syn_ts"] is None
    assert rec["is_open"] == 1 and rec["close_kind"] is None
    if packets is not None:
        assert result.packets == packets
    assert result.events_of(rec["uid"], "mid_stream")


def test_ndpi_sbi_server_goaway() -> None:
    result = ext("ndpi-http2-go-sbi-midstream-server-goaway.pcapng")
    rec = only(result)
    uid = rec["uid"]
    assert rec["preface_ts"] is not None  # the preface is in the first packet
    assert request_streams(result, uid) == [3]
    assert rec["methods"] == {"/namf-comm/v1/subscriptions": 1}
    assert rec["user_agent"] == "OpenAPI-Generator/1.0.0/go"
    assert goaways(result, uid) == [("resp", 3, 0, "")]


def test_deepflow_grpcgo_164_client_stream_pings_and_fin() -> None:
    result = ext("deepflow-grpcgo-1.64-clientstream-ping-fin.pcap")
    rec = only(result)
    uid = rec["uid"]
    assert rec["conn_state"] == "SF" and abs(rec["duration"] - 5) < 0.5
    assert rec["methods"] == {"/StreamingService/ClientStreamRPC": 1}
    assert rec["user_agent"] == "grpc-go/1.64.0"
    server_pings = [e.opaque for e in result.events_of(uid, "ping") if e.dir == "resp"]
    client_acks = [e.opaque for e in result.events_of(uid, "ping_ack") if e.dir == "orig"]
    assert len(server_pings) >= 3 and client_acks == server_pings  # one after each message
    assert rec["trailers"] == 1
    # about 2 s idle, then the client FINs with no GOAWAY
    assert rec["goaways"] == 0 and rec["close_kind"] == "client_fin"
    assert [e.dir for e in result.events_of(uid, "fin")] == ["orig", "resp"]


def test_deepflow_grpcgo_163_server_stream_with_loss() -> None:
    result = ext("deepflow-grpcgo-1.63-serverstream-midstream-loss.pcap")
    rec = only(result)
    uid = rec["uid"]
    assert rec["missed_bytes"] > 0 and "g" in rec["history"].lower()
    assert request_streams(result, uid) == [1]
    assert rec["methods"] == {"/timeseriesquery.TimeSeriesQueryService/ServerStreamQuery": 1}
    assert ping_frames(result, uid, "orig") + ping_frames(result, uid, "resp") == 1


def test_deepflow_stream928401_unknown_method() -> None:
    result = ext("deepflow-grpcgo-midstream-stream928401.pcap")
    rec = only(result)
    assert request_streams(result, rec["uid"]) == [928401]
    # HPACK dynamic-table references cannot be resolved: no method name is invented.
    assert list(rec["methods"]) == ["unknown (pre-existing)"]


def test_deepflow_interleaved_high_stream_ids() -> None:
    result = ext("deepflow-grpc-midstream-interleaved-stream18131981.pcap")
    rec = only(result)
    uid = rec["uid"]
    assert request_streams(result, uid) == [18131981, 18131983]
    assert all(m.startswith("unknown") for m in rec["methods"])
    assert ping_frames(result, uid, "orig") + ping_frames(result, uid, "resp") >= 1
    assert rec["window_updates"] >= 1


def test_deepflow_hipstershop_get_cart() -> None:
    result = ext("deepflow-grpcgo-1.22-hipstershop-midstream.pcap")
    rec = only(result)
    uid = rec["uid"]
    assert request_streams(result, uid) == [1]
    assert rec["methods"] == {"/hipstershop.CartService/GetCart": 1}
    assert rec["user_agent"] == "grpc-go/1.22.0"
    # SETTINGS, PING and HEADERS on stream 1 in one client segment
    client = {e.name for e in result.events_of(uid) if e.dir == "orig"}
    assert client & {"settings", "settings_ack"} and client & {"ping", "ping_ack"}


def test_deepflow_unary() -> None:
    result = ext("deepflow-grpc-unary-midstream.pcap")
    rec = only(result)
    assert request_streams(result, rec["uid"]) == [1]
    assert rec["methods"] == {"/agent.Synchronizer/Sync": 1}


def test_arkime_tls_alpn_h2() -> None:
    result = ext("arkime-tls12-alpn-h2-handshake-ipv6.pcap")
    rec = only(result)
    uid = rec["uid"]
    assert rec["ip_version"] == 6 and rec["syn_ts"] is not None
    assert rec["is_open"] == 1 and not result.events_of(uid, "fin")
    assert rec["protocol"] == "tls" and rec["streams"] == 0 and rec["preface_ts"] is None
    hello = result.events_of(uid, "tls_client_hello")
    # SNI read from the ClientHello bytes (server_name extension).
    assert [(e.sni, e.alpn) for e in hello] == [("www.cloudflare.com", "h2,http/1.1")]
    assert [e.alpn for e in result.events_of(uid, "tls_server_hello")] == ["h2"]
    assert (rec["tls_sni"], rec["tls_alpn"]) == ("www.cloudflare.com", "h2")


def test_arkime_nghttp2_client_goaway_then_fin() -> None:
    result = ext("arkime-h2c-prior-knowledge-nghttp2-push-goaway.pcap")
    rec = only(result)
    uid = rec["uid"]
    assert rec["conn_state"] == "SF"
    # frame 95: 0000080700000000000000000200000000 = GOAWAY last_stream_id=2 NO_ERROR
    assert goaways(result, uid) == [("orig", 2, 0, "")]
    assert names_in_order(result, uid, {"goaway", "fin"}) == [
        ("goaway", "orig"), ("fin", "orig"), ("fin", "resp")]
    assert rec["close_kind"] == "client_fin"
