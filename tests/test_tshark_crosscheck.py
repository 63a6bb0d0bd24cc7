"""tracer against tshark on the shared captures: per connection and direction, the HTTP/2
control frames each of them sees.

tshark decodes every capture with the README's decode-as options (`-d tcp.port==P,http2`,
none for the h2c-upgrade captures) into PDML; the HTTP/2 frames it finds are counted per
connection and direction (GOAWAY, PING, PING ACK, SETTINGS, SETTINGS ACK, RST_STREAM, client
HEADERS that open a new stream) and compared with tracer's events, together with the
GOAWAY and RST_STREAM contents, the :path of each new stream and TLS SNI/ALPN.
"""

from __future__ import annotations

import collections
import functools
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from support import FULL, shared_captures

from tracer.pipeline import Analyzer
from tracer.sources.pcapfile import CaptureReader

TSHARK = shutil.which("tshark")

if TSHARK is None:
    pytest.skip("tshark is not installed (make system-deps installs it)", allow_module_level=True)
CAPTURES = shared_captures()


@dataclass(frozen=True)
class Case:
    server_ports: tuple[int, ...]
    decode_as: tuple[int, ...]  # README "decode" column: ports forced to http2 in tshark
    tshark_blind: tuple[int, ...] = ()  # client ports whose HTTP/2 tshark cannot see
    skip: str = ""
    xfail: str = ""



CASES: dict[str, Case] = {
    "external/sv-http2-errorcode-grpcjs-via-connect-proxy.pcap": Case(
        (8888, 6233), (8888, 6233), tshark_blind=(63577,)),
    "external/sv-doh-post-firefox-client-goaway.pcap": Case((80,), ()),
    "external/sv-doh-get-chrome-ping-rststream.pcap": Case((80,), ()),
    "external/sv-h2c-upgrade-curl-go-goaway-debugdata-rst.pcap": Case((8080,), ()),
    "external/sv-h2c-upgrade-range-5conns-h1-and-h2-rststream.pcap": Case((8080,), ()),
    "external/sv-http2-continuation-rststream.pcap": Case((8080,), (8080,)),
    "external/sv-h2c-upgrade-nosyn.pcap": Case((80,), ()),
    "external/sv-http2-nghttp2-ipv6-client-goaway.pcap": Case((3000,), (3000,)),
    "external/ndpi-http2-go-sbi-midstream-server-goaway.pcapng": Case((29518,), (29518,)),
    "external/deepflow-grpcgo-1.64-clientstream-ping-fin.pcap": Case((38888,), (38888,)),
    "external/deepflow-grpcgo-1.63-serverstream-midstream-loss.pcap": Case((9001,), (9001,)),
    "external/deepflow-grpcgo-midstream-stream928401.pcap": Case(
        (7000,), (7000,),
        skip="README: tshark 4.0 hits a gRPC dissector assertion on this file "
             "(packet-grpc.c: 'grpc_ctx->content_type && grpc_ctx->path')"),
    "external/deepflow-grpc-midstream-interleaved-stream18131981.pcap": Case((3550,), (3550,)),
    "external/deepflow-grpcgo-1.22-hipstershop-midstream.pcap": Case((7070,), (7070,)),
    "external/deepflow-grpc-unary-midstream.pcap": Case((30035,), (30035,)),
    "external/arkime-tls12-alpn-h2-handshake-ipv6.pcap": Case((443,), ()),
    # README: with default settings tshark gives up reassembly before the last GOAWAY.
    "external/arkime-h2c-prior-knowledge-nghttp2-push-goaway.pcap": Case((80,), (80,)),
}
for _path in sorted((CAPTURES / "generated").glob("*.pcapng")):
    _port = 50051 if _path.name.startswith("grpcio") or "vs-grpcio" in _path.name else 50052
    CASES[f"generated/{_path.name}"] = Case((_port,), (_port,))

KINDS = ("goaway", "ping", "ping_ack", "settings", "settings_ack", "rst_stream", "new_stream")
Key = tuple[int, int]  # (client port, server port)


@dataclass
class View:
    """What one tool saw of one connection."""

    counts: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    goaways: list[tuple[str, int, int, str]] = field(default_factory=list)
    resets: list[tuple[str, int, int]] = field(default_factory=list)
    paths: list[tuple[int, str | None]] = field(default_factory=list)
    tls: dict[str, list[str]] = field(default_factory=dict)


# -- tshark's side ---------------------------------------------------------------------------


def _direction(sport: int, dport: int, server_ports: tuple[int, ...]) -> tuple[Key, str]:
    if dport in server_ports:
        return (sport, dport), "orig"
    return (dport, sport), "resp"


def _fields(elem: ET.Element) -> dict[str, ET.Element]:
    out: dict[str, ET.Element] = {}
    for f in elem.iter("field"):
        out.setdefault(f.get("name", ""), f)
    return out


def tshark_views(rel: str) -> tuple[dict[Key, View], str]:
    case = CASES[rel]
    cmd = [str(TSHARK), "-n", "-r", str(CAPTURES / rel), "-T", "pdml"]
    for port in case.decode_as:
        cmd += ["-d", f"tcp.port=={port},http2"]
    proc = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    root = ET.fromstring(proc.stdout)
    views: dict[Key, View] = collections.defaultdict(View)
    max_sid: dict[Key, int] = collections.defaultdict(int)
    upgrade: dict[Key, list[Any]] = collections.defaultdict(lambda: [None, False])
    for packet in root.iter("packet"):
        tcp = packet.find("proto[@name='tcp']")
        if tcp is None:
            continue
        t = _fields(tcp)
        key, d = _direction(int(t["tcp.srcport"].get("show", "0")),
                            int(t["tcp.dstport"].get("show", "0")), case.server_ports)
        view = views[key]
        for proto in packet.findall("proto"):
            name = proto.get("name")
            if name == "http2":
                for frame in proto.findall("field[@name='http2.stream']"):
                    f = _fields(frame)
                    if "http2.type" not in f:
                        continue  # the connection preface
                    ftype = int(f["http2.type"].get("show", "-1"))
                    flags = int(f["http2.flags"].get("show", "0"), 16)
                    sid = int(f["http2.streamid"].get("show", "0"))
                    if ftype == 7:
                        view.counts[d, "goaway"] += 1
                        debug = f.get("http2.goaway.addata")
                        view.goaways.append((
                            d, int(f["http2.goaway.last_stream_id"].get("show", "-1")),
                            int(f["http2.goaway.error"].get("show", "-1"), 0),
                            bytes.fromhex(debug.get("value", "")).decode("utf-8", "replace")
                            if debug is not None else ""))
                    elif ftype == 6:
                        view.counts[d, "ping_ack" if flags & 1 else "ping"] += 1
                    elif ftype == 4:
                        view.counts[d, "settings_ack" if flags & 1 else "settings"] += 1
                    elif ftype == 3:
                        view.counts[d, "rst_stream"] += 1
                        code = int(f["http2.rst_stream.error"].get("show", "-1"), 0)
                        view.resets.append((d, sid, code))
                    elif ftype == 1 and d == "orig" and sid & 1 and sid > max_sid[key]:
                        max_sid[key] = sid
                        view.counts[d, "new_stream"] += 1
                        path = f.get("http2.headers.path")
                        view.paths.append((sid, path.get("show") if path is not None else None))
            elif name == "http":
                f = _fields(proto)
                up = f.get("http.upgrade")
                if d == "orig" and up is not None and "h2c" in up.get("show", "").lower():
                    uri = f.get("http.request.uri")
                    upgrade[key][0] = uri.get("show") if uri is not None else None
                if d == "resp" and f.get("http.response.code") is not None and \
                        f["http.response.code"].get("show") == "101":
                    upgrade[key][1] = True
            elif name == "tls":
                for f in proto.iter("field"):
                    n = f.get("name")
                    if n == "tls.handshake.extensions_server_name":
                        view.tls.setdefault("sni", []).append(f.get("show", ""))
                    elif n == "tls.handshake.extensions_alpn_str":
                        view.tls.setdefault(f"{d}_alpn", []).append(f.get("show", ""))
    # RFC 7540 3.2: an HTTP/1.1 request upgraded to h2c (101) is stream 1.
    for key, (uri, switched) in upgrade.items():
        if uri is not None and switched:
            views[key].counts["orig", "new_stream"] += 1
            views[key].paths.insert(0, (1, uri))
    return dict(views), proc.stderr.decode(errors="replace")


# -- tracer's side ----------------------------------------------------------------------------


def tracer_views(rel: str) -> dict[Key, View]:
    case = CASES[rel]
    a = Analyzer(frozenset(case.server_ports), FULL)
    with CaptureReader.open(str(CAPTURES / rel)) as r:
        it = iter(r)
        while a.feed(it, 10000):
            pass
    a.finish()
    d = a.drain()
    keys = {rec["uid"]: (rec["orig_p"], rec["resp_p"]) for rec in d.records}
    views: dict[Key, View] = {k: View() for k in keys.values()}
    kind = {"goaway": "goaway", "ping": "ping", "ping_ack": "ping_ack", "settings": "settings",
            "settings_ack": "settings_ack", "rst_stream": "rst_stream", "request": "new_stream"}
    for e in d.events:
        k = kind.get(e.name)
        if k is None:
            continue
        view = views[keys[e.uid]]
        view.counts[e.dir, k] += 1
        if k == "goaway":
            view.goaways.append((e.dir, e.last_stream_id, e.error_code,
                                 _unescape(e.debug)))
        elif k == "rst_stream":
            view.resets.append((e.dir, e.stream_id, e.error_code))
        elif k == "new_stream":
            view.paths.append((e.stream_id, e.method))
    for rec in d.records:
        view = views[(rec["orig_p"], rec["resp_p"])]
        if rec["tls_sni"]:
            view.tls["sni"] = [rec["tls_sni"]]
        for ev in d.events:
            if ev.uid == rec["uid"] and ev.name == "tls_client_hello":
                view.tls["orig_alpn"] = ev.alpn.split(",") if ev.alpn else []
            elif ev.uid == rec["uid"] and ev.name == "tls_server_hello":
                view.tls["resp_alpn"] = ev.alpn.split(",") if ev.alpn else []
    return views


def _unescape(text: str) -> str:
    # tracer stores GOAWAY debug data as printable text, control bytes as \xNN
    return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


# -- the comparison ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def all_tshark_views() -> dict[str, tuple[dict[Key, View], str]]:
    # tshark runs are independent processes: run them side by side.
    names = sorted(CASES)
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(names, pool.map(tshark_views, names), strict=True))


def _params() -> list[Any]:
    out = []
    for rel, case in sorted(CASES.items()):
        marks = []
        if case.skip:
            marks.append(pytest.mark.skip(reason=case.skip))
        if case.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
        out.append(pytest.param(rel, marks=marks, id=rel))
    return out


def _method_matches(tracer_method: str | None, tshark_path: str | None) -> bool:
    if tshark_path is None:
        # tshark could not decode the header block (HPACK state from before the capture):
        # tracer must not invent a name either.
        return tracer_method is not None and tracer_method.startswith("unknown")
    return tracer_method == tshark_path


@pytest.mark.parametrize("rel", _params())
def test_http2_control_frames_match_tshark(rel: str) -> None:
    case = CASES[rel]
    shark, _stderr = all_tshark_views()[rel]
    ours = tracer_views(rel)
    # tshark also lists connections on which it found no HTTP/2; tracer lists every one.
    missing = set(shark) - set(ours)
    assert not missing, f"tshark saw connections tracer did not: {missing}"
    compared = 0
    for key, mine in sorted(ours.items()):
        if key[0] in case.tshark_blind:
            continue
        theirs = shark.get(key, View())
        where = f"{rel} client port {key[0]}"
        for direction in ("orig", "resp"):
            for kind in KINDS:
                assert mine.counts[direction, kind] == theirs.counts[direction, kind], (
                    f"{where}: {direction} {kind}: tracer {mine.counts[direction, kind]}, "
                    f"tshark {theirs.counts[direction, kind]}")
        assert mine.goaways == theirs.goaways, where
        assert mine.resets == theirs.resets, where
        assert [sid for sid, _ in mine.paths] == [sid for sid, _ in theirs.paths], where
        for (sid, method), (_, path) in zip(mine.paths, theirs.paths, strict=True):
            assert _method_matches(method, path), f"{where} stream {sid}: {method!r} vs {path!r}"
        if theirs.tls:
            assert mine.tls == theirs.tls, where
        compared += 1
    assert compared


def test_tshark_does_not_see_inside_the_connect_tunnel() -> None:
    # The README's note, checked: tracer's findings in the tunnel (test_shared_captures) have
    # no tshark counterpart, which is why that connection is left out above.
    rel = "external/sv-http2-errorcode-grpcjs-via-connect-proxy.pcap"
    shark, _ = all_tshark_views()[rel]
    tunnel = shark.get((63577, 8888), View())
    assert sum(tunnel.counts.values()) == 0
    assert tracer_views(rel)[(63577, 8888)].counts["orig", "new_stream"] == 1


def test_arkime_h2c_last_goaway_needs_decode_as() -> None:
    # README: with default settings tshark does not decode the client's last GOAWAY (its
    # reassembly gives up); with -d tcp.port==80,http2 it does, and then agrees with tracer.
    rel = "external/arkime-h2c-prior-knowledge-nghttp2-push-goaway.pcap"
    shark, _ = all_tshark_views()[rel]
    assert shark[(49570, 80)].goaways == [("orig", 2, 0, "")]
