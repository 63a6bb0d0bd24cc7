"""Property tests of the sans-IO core: decoder, TCP flow table, HTTP/2 observer, TLS hello
parser and capture reader, fed the same input whole, one byte at a time, cut at random
points, reordered, mutated and picked up mid-stream.

Runs are reproducible: every test is derandomized and uses no example database. Set
TRACER_PROPERTY_SCALE=10 to run ten times more examples, TRACER_PROPERTY_RANDOM=1 to
explore with fresh random seeds.

Bugs these properties found are pinned by the regression tests at the end of the
file. Where a property would trip over one of them, its generator steps around it and
says so next to the step (search for "known bug"); undo the step with the fix.
"""

from __future__ import annotations

import io
import os
import ssl
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import hpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from strategies import (
    PORTS,
    PRE_EXISTING,
    PREFACE,
    SERVER_PORT,
    UNKNOWN_LABELS,
    Capture,
    ConnectionPlan,
    Conversation,
    Endpoints,
    H2Builder,
    Message,
    Piece,
    Unit,
    client_hello,
    conversations,
    endpoints,
    event_key,
    gzipped,
    h2_frame,
    header_blocks,
    hellos,
    in_records,
    ipv4_packet,
    ipv6_packet,
    isns,
    mutate,
    mutation_ops,
    other_conversations,
    paths,
    pcap_files,
    pcapng_files,
    run_cuts,
    segment_frame,
    tcp_header,
    tls_record,
    whole_cuts,
)
from support import FULL

from tracer.decode import (
    ACK,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NAMES,
    LINKTYPE_NULL,
    PSH,
    SKIP_FRAGMENT,
    SKIP_LOOPBACK_OUTGOING,
    SKIP_NAMES,
    SKIP_NOT_IP,
    SKIP_NOT_TCP,
    SKIP_OTHER_PORT,
    SKIP_OTHER_SHARD,
    SYN,
    Malformed,
    make_decoder,
)
from tracer.events import EVENT_TYPES, ORIG, RESP, ConnectionEvent, RequestStarted
from tracer.http2.hpack_memo import ALLOWED_HEADERS, HpackDirection, HpackError, HpackMemo
from tracer.http2.observer import MAX_BUFFERED, UNKNOWN_PRE_EXISTING, Http2Observer
from tracer.http2.tls import Hello, NeedMoreData, NotTls, parse_hello
from tracer.pipeline import Analyzer
from tracer.sources.pcapfile import CaptureFileError, CaptureReader
from tracer.tcp.flow import FlowTable
from tracer.tcp.state import CONN_STATES

HISTORY_LETTERS = "SHADFRGTWIQ"
MASK32 = 0xFFFFFFFF

SCALE = float(os.environ.get("TRACER_PROPERTY_SCALE", "1"))
RANDOM = os.environ.get("TRACER_PROPERTY_RANDOM", "") not in ("", "0")


def props(max_examples: int) -> settings:
    """Reproducible settings: derandomized and without an example database. The deadline
    only guards against runaway (quadratic) parsing: the slowest example takes well under
    a second, so a slow CI machine does not make it flaky."""
    return settings(
        max_examples=max(1, int(max_examples * SCALE)),
        derandomize=not RANDOM,
        database=None,
        deadline=timedelta(seconds=10),
        print_blob=RANDOM,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


T0 = 1000.0
T_END = 1001.0
CLOSES = st.sampled_from(["fin", "rst", "open"])
# Record fields that count packets: they depend on segmentation by definition.
PACKET_COUNTS = ("orig_pkts", "resp_pkts")


# -- harness -------------------------------------------------------------------------------


@dataclass
class Outcome:
    events: list[tuple[Any, ...]]
    anomalies: list[tuple[str, str]]
    records: list[dict[str, Any]]
    raw_events: list[ConnectionEvent]


Check = Callable[[Analyzer, Piece], None]


def deliver(
    pieces: list[Piece], *, frames: bool = False, check: Check | None = None, **options: Any
) -> Outcome:
    """Feed segments through a real Analyzer (flow table + HTTP/2 observer): as segment
    tuples straight into the flow table, or as Ethernet frames through the decoder."""
    an = Analyzer(PORTS, FULL.replace(**options))
    if frames:
        an.feed(iter([(p.ts, LINKTYPE_ETHERNET, segment_frame(p.seg)) for p in pieces]), 1 << 30)
        an.finish()
    else:
        table = an.table
        last = None
        for p in pieces:
            table.segment(p.ts, p.seg)
            if p.ts != last:
                table.tick(p.ts)
                last = p.ts
            if check is not None:
                check(an, p)
        table.close(last if last is not None else T0)
    d = an.drain()
    records = [{k: v for k, v in r.items() if k not in PACKET_COUNTS} for r in d.records]
    return Outcome(
        [event_key(e) for e in d.events],
        [(a.reason, a.detail) for a in d.anomalies],
        records,
        d.events,
    )


def flat(runs: list[list[Piece]]) -> list[Piece]:
    return [p for run in runs for p in run]


def whole_connection(plan: ConnectionPlan, body: list[list[Piece]], close: str) -> list[Piece]:
    """The handshake at T0, ``body`` in order, and the ``close`` at T_END."""
    return plan.handshake(T0) + flat(body) + plan.close(close, T_END)


# Lifecycle events are compared by name and direction only: their other fields are the
# flow table's business (its own tests); the model here is about HTTP/2.
TCP_EVENTS = frozenset(("syn", "syn_ack", "established", "mid_stream", "fin", "rst", "gap",
                        "port_reused"))


def lifecycle_by_name(keys: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [k[:2] if k[0] in TCP_EVENTS else k for k in keys]


def tcp_events(close: str, before: bool) -> list[tuple[Any, ...]]:
    if before:
        return [("syn", ORIG), ("syn_ack", RESP), ("established", ORIG)]
    return {"fin": [("fin", ORIG), ("fin", RESP)], "rst": [("rst", ORIG)], "open": []}[close]


def expected_events(conv: Conversation, close: str) -> list[tuple[Any, ...]]:
    return tcp_events(close, True) + [e.key for e in conv.expected] + tcp_events(close, False)


def check_record(conv: Conversation, rec: dict[str, Any], close: str) -> None:
    for key, want in conv.record.items():
        assert rec[key] == want, key
    assert rec["missed_bytes"] == 0
    assert rec["mid_stream"] == 0
    assert rec["orig_bytes"] == len(conv.stream(ORIG))
    assert rec["resp_bytes"] == len(conv.stream(RESP))
    assert rec["conn_state"] == {"fin": "SF", "rst": "RSTO", "open": "S1"}[close]
    data = "ShAD" + ("d" if conv.stream(RESP) else "")
    assert rec["history"] == data + {"fin": "Ff", "rst": "R", "open": ""}[close]


# -- 1. decoder ----------------------------------------------------------------------------

SUPPORTED_LINKTYPES = sorted(LINKTYPE_NAMES)


def test_every_named_link_type_has_a_decoder() -> None:
    for linktype in SUPPORTED_LINKTYPES:
        assert make_decoder(linktype, PORTS) is not None, linktype


IPV6_EXT = st.sampled_from([0, 43, 60, 51])


@st.composite
def link_frames(draw: st.DrawFn, linktype: int) -> tuple[bytes, Any]:
    """A frame of ``linktype`` and what the decoder must return for it: a segment tuple, a
    skip code, or ("malformed", reason)."""
    if linktype == LINKTYPE_IPV4:
        v6 = False
    elif linktype == LINKTYPE_IPV6:
        v6 = True
    else:
        v6 = draw(st.booleans())
    alen = 16 if v6 else 4
    src = draw(st.binary(min_size=alen, max_size=alen))
    dst = draw(st.binary(min_size=alen, max_size=alen))
    ours = draw(st.integers(0, 9))
    sport = draw(st.integers(0, 0xFFFF))
    dport = draw(st.integers(0, 0xFFFF))
    if ours < 4:
        dport = SERVER_PORT
    elif ours < 8:
        sport = SERVER_PORT
    seq, ack = draw(st.integers(0, MASK32)), draw(st.integers(0, MASK32))
    flags = draw(st.integers(0, 0x1FF))
    window = draw(st.integers(0, 0xFFFF))
    topts = draw(st.integers(0, 10)) * 4
    options = draw(st.binary(min_size=topts, max_size=topts))
    payload = draw(st.binary(max_size=100))
    tcp = tcp_header(sport, dport, seq, ack, flags, window, options) + payload
    proto = draw(st.sampled_from([6, 6, 6, 6, 17]))
    l4 = tcp if proto == 6 else struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload
    whole_capture = False  # the IP length says "everything captured" (TSO, jumbo)
    frag_result: Any = None
    if v6:
        exts = draw(st.lists(st.tuples(IPV6_EXT, st.binary(max_size=20)), max_size=3))
        frag = draw(st.none() | st.integers(0, 0xFFFF))
        if frag is not None:
            exts.append((44, struct.pack(">HI", frag, 7)))
            # The IPv6 chain is walked before the protocol is known: any protocol. An
            # atomic fragment (offset 0, M clear; RFC 6946) is a whole packet.
            if frag & 0xFFF8:
                frag_result = SKIP_FRAGMENT
            elif frag & 1:
                frag_result = ("malformed", "ip_fragment")
        whole_capture = draw(st.integers(0, 5)) == 0
        packet = ipv6_packet(src, dst, proto, l4, ext=exts, jumbo=whole_capture)
        header_len = len(packet) - len(l4)
    else:
        iopts = draw(st.integers(0, 10)) * 4
        whole_capture = draw(st.integers(0, 5)) == 0
        frag = draw(st.sampled_from([0, 0, 0, 0x2000, 0x0010, 0x4000]))
        if frag & 0x3FFF and proto == 6:
            frag_result = SKIP_FRAGMENT if frag & 0x1FFF else ("malformed", "ip_fragment")
        packet = ipv4_packet(src, dst, proto, l4, options=bytes(iopts), tso=whole_capture,
                             frag=frag)
        header_len = 20 + iopts
    # What the link layer adds in front (and, for short Ethernet frames, behind).
    etype = b"\x86\xdd" if v6 else b"\x08\x00"
    skip: Any = None
    trailer = b""
    if linktype == LINKTYPE_ETHERNET:
        tags = b"".join(
            draw(st.sampled_from([b"\x81\x00", b"\x88\xa8"])) + b"\x00\x05"
            for _ in range(draw(st.integers(0, 2)))
        )
        if draw(st.integers(0, 9)) == 0:
            etype, skip = b"\x08\x06", SKIP_NOT_IP
        head = b"\x02" * 6 + b"\x04" * 6 + tags + etype
        if not whole_capture and len(head) + len(packet) < 60:
            trailer = bytes(60 - len(head) - len(packet))
    elif linktype == LINKTYPE_LINUX_SLL:
        pkttype = draw(st.sampled_from([0, 4]))
        arphrd = draw(st.sampled_from([1, 772]))
        head = struct.pack(">HHH8s", pkttype, arphrd, 6, b"\x02" * 6) + etype
        if pkttype == 4 and arphrd == 772:
            skip = SKIP_LOOPBACK_OUTGOING
    elif linktype == LINKTYPE_LINUX_SLL2:
        pkttype = draw(st.sampled_from([0, 4]))
        arphrd = draw(st.sampled_from([1, 772]))
        head = etype + struct.pack(">HIHBB8s", 0, 1, arphrd, pkttype, 6, b"\x02" * 6)
        if pkttype == 4 and arphrd == 772:
            skip = SKIP_LOOPBACK_OUTGOING
    elif linktype == LINKTYPE_NULL:
        family = draw(st.sampled_from([10, 24, 28, 30])) if v6 else 2
        head = struct.pack(draw(st.sampled_from(["<I", ">I"])), family)
    elif linktype == LINKTYPE_LOOP:
        head = struct.pack(">I", draw(st.sampled_from([10, 24, 28, 30])) if v6 else 2)
    else:
        head = b""
    frame = head + packet + trailer
    tcp_start = len(head) + header_len
    payload_start = tcp_start + 20 + topts
    # A snap length that cuts the payload short (never into the headers).
    captured = len(frame)
    if proto == 6 and not whole_capture and not trailer and payload \
            and draw(st.integers(0, 4)) == 0:
        captured = draw(st.integers(payload_start, len(frame) - 1))
        frame = frame[:captured]
    if skip is not None:
        return frame, skip
    if frag_result is not None:
        return frame, frag_result
    if proto != 6:
        return frame, SKIP_NOT_TCP
    if sport not in PORTS and dport not in PORTS:
        return frame, SKIP_OTHER_PORT
    got = frame[payload_start:payload_start + len(payload)]
    key = src + dst + struct.pack(">HH", sport, dport)
    wire = len(payload)
    return frame, (key, sport, dport, seq, ack, flags, window, got if wire else b"", wire)



def decode_outcome(decoder: Callable[[bytes], Any], frame: bytes) -> Any:
    try:
        return decoder(frame)
    except Malformed as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return ("malformed", exc.reason)


def check_decoded_shape(result: Any, frame: bytes) -> None:
    if isinstance(result, int):
        assert result in SKIP_NAMES
        return
    if result[0] == "malformed":
        return
    key, sport, dport, seq, ack, flags, window, payload, wire = result
    assert isinstance(key, bytes) and len(key) in (12, 36)
    assert key[-4:] == struct.pack(">HH", sport, dport)
    assert sport in PORTS or dport in PORTS
    assert 0 <= seq <= MASK32 and 0 <= ack <= MASK32
    assert 0 <= flags <= 0x1FF and 0 <= window <= 0xFFFF
    assert isinstance(payload, bytes) and payload in frame
    assert wire >= len(payload) >= 0


@pytest.mark.parametrize("linktype", SUPPORTED_LINKTYPES)
@props(100)
@given(data=st.data())
def test_decoder_valid_frames_decode_to_what_was_encoded(linktype: int,
                                                         data: st.DataObject) -> None:
    frame, want = data.draw(link_frames(linktype))
    decoder = make_decoder(linktype, PORTS)
    assert decoder is not None
    assert decode_outcome(decoder, frame) == want


@pytest.mark.parametrize("linktype", SUPPORTED_LINKTYPES)
@props(150)
@given(data=st.data())
def test_decoder_never_raises_anything_but_malformed(linktype: int, data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        frame = data.draw(st.binary(max_size=200))
    else:
        frame, _ = data.draw(link_frames(linktype))
        frame = mutate(frame, data.draw(mutation_ops))
    decoder = make_decoder(linktype, PORTS)
    assert decoder is not None
    check_decoded_shape(decode_outcome(decoder, frame), frame)


@props(500)
@given(data=st.data())
def test_ethernet_fast_path_agrees_with_the_general_ipv4_path(data: st.DataObject) -> None:
    """The Ethernet decoder's IPv4 fast path makes the same decisions as the IPv4 decoder."""
    if data.draw(st.booleans()):
        frame, _ = data.draw(link_frames(LINKTYPE_ETHERNET))
        frame = mutate(frame, data.draw(mutation_ops))
    else:
        frame = b"\x02" * 12 + b"\x08\x00\x45" + data.draw(st.binary(max_size=120))
    if frame[12:14] != b"\x08\x00":
        return
    ethernet = make_decoder(LINKTYPE_ETHERNET, PORTS)
    ipv4 = make_decoder(LINKTYPE_IPV4, PORTS)
    assert ethernet is not None and ipv4 is not None
    assert decode_outcome(ethernet, frame) == decode_outcome(ipv4, frame[14:])


@pytest.mark.parametrize("count", [2, 3, 5])
@props(100)
@given(data=st.data())
def test_shards_partition_segments_without_changing_them(count: int, data: st.DataObject) -> None:
    """Each segment goes to exactly one of ``count`` workers, unchanged; the others skip it."""
    linktype = data.draw(st.sampled_from(SUPPORTED_LINKTYPES))
    frame, _ = data.draw(link_frames(linktype))
    if data.draw(st.booleans()):
        frame = mutate(frame, data.draw(mutation_ops))
    whole = make_decoder(linktype, PORTS)
    assert whole is not None
    want = decode_outcome(whole, frame)
    got = []
    for index in range(count):
        decoder = make_decoder(linktype, PORTS, (index, count))
        assert decoder is not None
        got.append(decode_outcome(decoder, frame))
    assert all(g in (want, SKIP_OTHER_SHARD) for g in got)
    if isinstance(want, tuple) and want[0] != "malformed":
        assert got.count(want) == 1
        assert got.index(want) == (want[1] + want[2]) % count
    elif want != SKIP_OTHER_SHARD:
        assert want in got


# -- 2. HTTP/2 observer under chunking -----------------------------------------------------


def whole_and_cut_alike(plan: ConnectionPlan, close: str, data: st.DataObject,
                        modes: tuple[str, ...]) -> Outcome:
    """The connection delivered in whole runs through the link-layer decoder, its lifecycle
    the model's and no anomaly; then cut as each of ``modes`` draws: the same outcome.
    The whole one, for the caller's own checks."""
    runs = plan.conv.runs()

    def pieces(cuts: list[list[int]]) -> list[Piece]:
        return whole_connection(plan, plan.body(cuts, T0), close)

    whole = deliver(pieces(whole_cuts(runs)), frames=True)
    assert lifecycle_by_name(whole.events) == expected_events(plan.conv, close)
    assert whole.anomalies == []
    for mode in modes:
        cuts = data.draw(run_cuts(runs, mode), label=mode)
        assert deliver(pieces(cuts)) == whole, mode
    return whole


@props(150)
@given(conv=conversations(upgrade=None), eps=endpoints, isn_c=isns, isn_s=isns, close=CLOSES,
       data=st.data())
def test_h2_events_are_the_same_whole_bytewise_and_cut_at_random(
    conv: Conversation, eps: Endpoints, isn_c: int, isn_s: int, close: str, data: st.DataObject
) -> None:
    # One byte at a time, and cut at random points (twice): identical.
    whole = whole_and_cut_alike(ConnectionPlan(conv, eps, isn_c, isn_s), close, data,
                                ("bytes", "random", "random"))
    assert len(whole.records) == 1
    check_record(conv, whole.records[0], close)
    requests = [e for e in whole.events if e[0] == "request"]
    assert [e[3] for e in requests] == [conv.paths[e[2]] for e in requests]
    assert [e[3] for e in requests] == list(conv.paths.values())


@props(100)
@given(conv=other_conversations(), eps=endpoints, isn_c=isns, isn_s=isns, close=CLOSES,
       data=st.data())
def test_tls_and_http1_events_are_the_same_whole_bytewise_and_cut_at_random(
    conv: Conversation, eps: Endpoints, isn_c: int, isn_s: int, close: str, data: st.DataObject
) -> None:
    whole = whole_and_cut_alike(ConnectionPlan(conv, eps, isn_c, isn_s), close, data,
                                ("bytes", "random"))
    for key, want in conv.record.items():
        assert whole.records[0][key] == want, key


# -- 3. reordering and retransmission ------------------------------------------------------

REORDER_SEGMENTS = 8
WINDOW = 5  # segments permuted together; with 2 retransmissions at most 6 wait in the buffer


def acked_of(plan: ConnectionPlan, p: Piece) -> int:
    other = RESP if p.dir == ORIG else ORIG
    return int(p.seg[4] - plan.isn[other] - 1) & MASK32


@props(150)
@given(conv=conversations(), eps=endpoints, isn_c=isns, isn_s=isns, close=CLOSES,
       data=st.data())
def test_reordering_within_the_buffer_and_retransmissions_do_not_change_events(
    conv: Conversation, eps: Endpoints, isn_c: int, isn_s: int, close: str, data: st.DataObject
) -> None:
    plan = ConnectionPlan(conv, eps, isn_c, isn_s)
    runs = conv.runs()
    body = plan.body(data.draw(run_cuts(runs, "random"), label="cuts"), T0)
    in_order = whole_connection(plan, body, close)
    shuffled = plan.handshake(T0)
    for run, pieces in zip(runs, body, strict=True):
        i = 0
        while i < len(pieces):
            w = data.draw(st.integers(1, WINDOW), label="window")
            window = list(data.draw(st.permutations(pieces[i:i + w]), label="order"))
            first = pieces[i]
            end = pieces[min(i + w, len(pieces)) - 1].end
            # Retransmissions with their own boundaries: of bytes up to this window's end
            # (some already delivered, some still ahead), and of earlier runs.
            for a, n in data.draw(st.lists(
                st.tuples(st.integers(0, max(0, end - 1)), st.integers(1, 60)), max_size=2
            ), label="retransmits"):
                dup = plan.data_piece(first.ts, run.dir, a, min(a + n, end), acked_of(plan, first))
                window.insert(data.draw(st.integers(0, len(window))), dup)
            shuffled += window
            i += w
    shuffled += plan.close(close, T_END)

    def comparable(o: Outcome) -> Outcome:
        for r in o.records:
            r["history"] = r["history"].replace("T", "").replace("t", "")
            r.pop("retransmits")
            r.pop("keepalives")
        return o

    base = comparable(deliver(in_order, reorder_segments=REORDER_SEGMENTS))
    assert lifecycle_by_name(base.events) == expected_events(conv, close)
    got = comparable(deliver(shuffled, reorder_segments=REORDER_SEGMENTS))
    assert got == base


# -- 4. mutation and bounded buffers ---------------------------------------------------------

MUT_SEGMENTS = 4
MUT_BYTES = 400
MUT_EVENTS = 16

piece_mutations = st.lists(
    st.one_of(
        st.tuples(st.just("payload"), st.integers(0, 1 << 16), mutation_ops),
        st.tuples(st.just("snaplen"), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
        st.tuples(st.just("garbage"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=300)),
        st.tuples(st.just("seq"), st.integers(0, 1 << 16), st.integers(0, MASK32)),
        st.tuples(st.just("seq_shift"), st.integers(0, 1 << 16), st.integers(-3000, 3000)),
        st.tuples(st.just("ack"), st.integers(0, 1 << 16), st.integers(0, MASK32)),
        st.tuples(st.just("flags"), st.integers(0, 1 << 16), st.integers(0, 0x1FF)),
        st.tuples(st.just("window"), st.integers(0, 1 << 16), st.just(0)),
        st.tuples(st.just("drop"), st.integers(0, 1 << 16), st.just(0)),
        st.tuples(st.just("dup"), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
        st.tuples(st.just("move"), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
    ),
    max_size=10,
)


def apply_piece_mutations(pieces: list[Piece], ops: list[tuple[Any, ...]]) -> list[Piece]:
    out = list(pieces)
    for op, i, arg in ops:
        if not out:
            break
        i %= len(out)
        p = out[i]
        seg = list(p.seg)
        if op == "payload":
            seg[7] = mutate(seg[7], arg)
            seg[8] = len(seg[7])
        elif op == "snaplen":  # captured shorter than on the wire
            seg[7] = seg[7][: arg % (len(seg[7]) + 1)]
        elif op == "garbage":
            seg[7] = arg
            seg[8] = len(arg)
        elif op == "seq":
            seg[3] = arg
        elif op == "seq_shift":
            seg[3] = (seg[3] + arg) & MASK32
        elif op == "ack":
            seg[4] = arg
        elif op == "flags":
            seg[5] = arg
        elif op == "window":
            seg[6] = 0
        elif op == "drop":
            del out[i]
            continue
        elif op == "dup":
            out.insert(arg % (len(out) + 1), p)
            continue
        elif op == "move":
            del out[i]
            out.insert(arg % (len(out) + 1), p)
            continue
        out[i] = Piece(p.ts, tuple(seg), p.dir, p.start, p.end)
    return out


def check_bounded(an: Analyzer, _piece: Piece) -> None:
    """Every buffer has a cap, after every segment."""
    table = an.table
    for conn in table.awake():
        assert conn.n <= 2 * table.max_events
        for ep in (conn.orig, conn.resp):
            ooo = ep.ooo or []
            assert len(ooo) <= table.reorder_segments
            assert ep.ooo_bytes == sum(len(item[1]) for item in ooo)
            assert ep.ooo_bytes <= table.reorder_bytes
        obs = conn.observer
        assert isinstance(obs, Http2Observer)
        for d in (obs.orig, obs.resp):
            assert len(d.pending) <= MAX_BUFFERED + 9
            assert d.hblock is None or len(d.hblock) <= MAX_BUFFERED
            assert d.skip >= 0
    assert len(table.outbox.anomalies) < 10_000


frame_mutations = st.lists(
    st.tuples(
        st.integers(0, 1 << 16),
        st.sampled_from(["payload", "truncate", "flags", "type", "sid", "length"]),
        mutation_ops,
        st.integers(0, MASK32),
    ),
    max_size=4,
)


def mutate_frames(conv: Conversation, ops: list[tuple[Any, ...]]) -> Conversation:
    """Structure-aware mutation: change one frame's payload, flags, type, stream id or length
    field, keeping every other frame (and, unless told, the length field) consistent."""
    frames = [(mi, ui) for mi, m in enumerate(conv.messages)
              for ui, u in enumerate(m.units) if not u.preface and u.length >= 9]
    raw = [[m.data[u.offset:u.end] for u in m.units] for m in conv.messages]
    for pick, kind, payload_ops, value in ops:
        if not frames:
            break
        mi, ui = frames[pick % len(frames)]
        frame = raw[mi][ui]
        lt, flags, sid = struct.unpack_from(">IBI", frame)
        ftype, payload = lt & 0xFF, frame[9:]
        length = None
        if kind == "payload":
            payload = mutate(payload, payload_ops)
        elif kind == "truncate":
            payload = payload[: value % (len(payload) + 1)]
        elif kind == "flags":
            flags = value & 0xFF
        elif kind == "type":
            ftype = value % 12
        elif kind == "sid":
            sid = value
        else:
            length = value & 0xFFFFFF
        if length is None:
            length = len(payload)
        raw[mi][ui] = struct.pack(">IBI", length << 8 | ftype, flags, sid) + payload
    messages = []
    for m, parts in zip(conv.messages, raw, strict=True):
        units, pos = [], 0
        for u, part in zip(m.units, parts, strict=True):
            units.append(Unit(pos, len(part), u.plausible, u.preface))
            pos += len(part)
        messages.append(Message(m.dir, b"".join(parts), units))
    return Conversation(messages, [], {}, {}, set(), set())


@props(500)
@given(conv=conversations(max_actions=10), eps=endpoints, isn_c=isns, isn_s=isns, close=CLOSES,
       frame_ops=frame_mutations, ops=piece_mutations, data=st.data())
def test_mutated_segments_give_only_events_and_anomalies_with_bounded_buffers(
    conv: Conversation, eps: Endpoints, isn_c: int, isn_s: int, close: str,
    frame_ops: list[tuple[Any, ...]], ops: list[tuple[Any, ...]], data: st.DataObject,
) -> None:
    conv = mutate_frames(conv, frame_ops)
    plan = ConnectionPlan(conv, eps, isn_c, isn_s)
    body = plan.body(data.draw(run_cuts(conv.runs(), "random"), label="cuts"), T0)
    pieces = apply_piece_mutations(whole_connection(plan, body, close), ops)
    out = deliver(pieces, check=check_bounded, reorder_segments=MUT_SEGMENTS,
                  reorder_bytes=MUT_BYTES, max_events=MUT_EVENTS)
    ordinals: dict[str, list[int]] = {}
    for e in out.raw_events:
        assert type(e) in EVENT_TYPES
        ordinals.setdefault(e.uid, []).append(e.n)
    for uid, ns in ordinals.items():
        assert ns == list(range(1, len(ns) + 1)), uid
    for reason, detail in out.anomalies:
        assert isinstance(reason, str) and reason and isinstance(detail, str)
    for rec in out.records:
        assert rec["conn_state"] in CONN_STATES
        assert set(rec["history"].lstrip("^")) <= set(HISTORY_LETTERS + HISTORY_LETTERS.lower())
        for key in ("orig_bytes", "resp_bytes", "missed_bytes", "streams", "data_frames",
                    "retransmits", "keepalives", "zero_windows", "events_dropped"):
            assert rec[key] >= 0, key
        assert rec["duration"] >= 0


@props(150)
@given(payloads=st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=400)),
                         max_size=12), eps=endpoints, isn_c=isns, isn_s=isns)
def test_arbitrary_payloads_give_only_events_and_anomalies(
    payloads: list[tuple[bool, bytes]], eps: Endpoints, isn_c: int, isn_s: int
) -> None:
    """Garbage on the port, in order: every parser mode (detect, frames, TLS, HTTP/1) sees it."""
    b = H2Builder()
    for client, payload in payloads:
        b.add(b.message(ORIG if client else RESP), payload, False)
    conv = b.conversation()
    plan = ConnectionPlan(conv, eps, isn_c, isn_s)
    pieces = plan.handshake(T0) + flat(plan.body(whole_cuts(conv.runs()), T0))
    deliver(pieces, check=check_bounded, reorder_segments=MUT_SEGMENTS, reorder_bytes=MUT_BYTES)


# -- 5. resync after a mid-stream start -------------------------------------------------------

RESYNC_KINDS = ("ping", "ping_ack", "goaway", "rst_stream", "settings", "settings_ack")


def without_first(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return key[:-1] if key[0] in ("settings", "settings_ack") else key


def clean_start(piece: Piece, units: dict[int, Unit]) -> bool:
    """The segment starts on a frame boundary and, by the documented rule, shows it: one
    plausible frame ending exactly at its end, or two plausible headers in a row."""
    u = units.get(piece.start)
    if u is None:
        return False
    if u.preface:
        return piece.end >= u.end
    count, pos = 0, piece.start
    while pos + 9 <= piece.end:
        u = units[pos]
        if not u.plausible:
            return False
        count += 1
        pos = u.end
    return (pos == piece.end and count >= 1) or count >= 2


@props(200)
@given(conv=conversations(data_max=700), eps=endpoints, isn_c=isns, isn_s=isns, data=st.data())
def test_mid_stream_pickup_regains_sync_and_reports_no_false_frames(
    conv: Conversation, eps: Endpoints, isn_c: int, isn_s: int, data: st.DataObject
) -> None:
    plan = ConnectionPlan(conv, eps, isn_c, isn_s)
    cuts = data.draw(run_cuts(conv.runs(), "random"), label="cuts")
    body = flat(plan.body(cuts, T0))
    units = {d: {u.offset: u for u in conv.units(d)} for d in (ORIG, RESP)}
    start: dict[str, int] = {}
    for d in (ORIG, RESP):
        size = len(conv.stream(d))
        if data.draw(st.booleans(), label=f"{d} starts on a frame"):
            start[d] = data.draw(st.sampled_from(sorted(units[d]) + [size]), label=d)
        else:
            start[d] = data.draw(st.integers(0, size), label=d)
    pieces: list[Piece] = []
    for p in body:
        assert p.dir is not None
        if p.end <= start[p.dir]:
            continue
        if p.start < start[p.dir]:
            p = plan.data_piece(p.ts, p.dir, start[p.dir], p.end, acked_of(plan, p))
        pieces.append(p)

    an = Analyzer(PORTS, FULL)
    table = an.table
    regained: dict[str, int] = {}  # direction -> index of the piece that regained sync
    seen = 0
    for i, p in enumerate(pieces):
        table.segment(p.ts, p.seg)
        for e in table.outbox.events[seen:]:
            if e.name in ("framing_regained", "preface") and e.dir not in regained:
                regained[e.dir] = i
        seen = len(table.outbox.events)
    table.close(T_END)
    events = [event_key(e) for e in an.drain().events]

    for d in (ORIG, RESP):
        mine = [i for i, p in enumerate(pieces) if p.dir == d]
        clean = [i for i in mine if clean_start(pieces[i], units[d])]
        if clean:
            assert d in regained and regained[d] <= clean[0], (d, clean[0], regained)
        if d not in regained:
            continue
        at = pieces[regained[d]].start
        if at not in units[d]:
            event("regained on a false boundary")
            continue  # only the soundness checks below apply
        event(f"{d} regained on a frame boundary")
        # From a true boundary on, every control frame is reported, in order. (SETTINGS'
        # ``first`` flag is left out: after a pick-up it marks the first one seen.)
        want = [without_first(x.key) for x in conv.expected
                if x.key[1] == d and x.offset >= at and x.key[0] in RESYNC_KINDS]
        got = [without_first(e) for e in events if e[1] == d and e[0] in RESYNC_KINDS]
        assert got == want
        want_sids = [x.key[2] for x in conv.expected
                     if x.key[1] == d and x.offset >= at and x.key[0] in ("request", "trailers")]
        # A client's HEADERS on a stream opened before the pick-up point, which cannot be
        # decoded (its table entries were never seen) and carries END_STREAM, may be a
        # body-less request or trailers: it may be reported as a request of unknown method
        # "(pre-existing)", never with a method.
        before = {x.key[2] for x in conv.expected
                  if x.key[:2] == ("request", d) and x.offset < at}
        got_sids = [e[2] for e in events if e[1] == d and e[0] in ("request", "trailers")
                    and not (e[0] == "request" and e[3] == UNKNOWN_PRE_EXISTING
                             and e[2] in before)]
        assert got_sids == want_sids
    # Soundness, whatever happened: nothing that was not sent.
    for e in events:
        if e[0] in ("ping", "ping_ack"):
            assert (e[0], e[1], e[2]) in conv.pings
        elif e[0] == "goaway":
            assert (e[1], e[2], e[3], e[4]) in conv.goaways
        elif e[0] == "request":
            assert e[3] == conv.paths.get(e[2]) or e[3] in UNKNOWN_LABELS, e
        elif e[0] == "trailers":
            sent = [x.key for x in conv.expected if x.key[0] == "trailers" and x.key[2] == e[2]]
            assert e in sent or e[3:] == (None, None), e


def frame_ends(conv: Conversation, direction: str) -> dict[int, int]:
    return {u.offset: u.end for u in conv.units(direction)}


def in_sync_after(units: list[Unit], gaps: list[tuple[int, int]], clean: list[int],
                  detect_end: int, at: int) -> bool:
    """Whether the observer must be in frame sync at offset ``at`` of a direction that
    lost ``gaps`` ([start, end) ranges, in order) and got clean segments at ``clean``:
    the documented rules (a gap inside one frame's payload, after its header, costs only
    that frame; otherwise sync returns at the next clean segment)."""
    sync = True
    for g_start, g_end in gaps:
        if g_start >= at:
            break
        inside = any(
            not u.preface and u.offset + 9 <= g_start and g_end <= u.end for u in units
        )
        if not (sync and inside and g_start >= detect_end):
            sync = any(g_end <= c <= at for c in clean)
        elif any(g_end <= c <= at for c in clean):
            sync = True
    return sync


@props(200)
@given(conv=conversations(data_max=400, client_trailers=False), eps=endpoints, isn_c=isns,
       isn_s=isns, close=CLOSES, data=st.data())
def test_gaps_cost_exactly_the_lost_bytes_and_framing_recovers(
    conv: Conversation, eps: Endpoints, isn_c: int, isn_s: int, close: str, data: st.DataObject
) -> None:
    plan = ConnectionPlan(conv, eps, isn_c, isn_s)
    runs = conv.runs()
    cuts = data.draw(run_cuts(runs, "random"), label="cuts")
    body = plan.body(cuts, T0)
    # The capture loses the tail of some runs (never a whole run); a later run of the same
    # side follows, after the peer acknowledged the lost bytes. (Segments buffered behind
    # a hole when the ACK reveals it: test_segment_buffered_behind_a_hole_survives_...)
    gaps: dict[str, list[tuple[int, int]]] = {ORIG: [], RESP: []}
    delivered: list[Piece] = plan.handshake(T0)
    for i, (run, pieces) in enumerate(zip(runs, body, strict=True)):
        lose = 0
        if i + 2 < len(runs) and len(pieces) > 1:
            lose = data.draw(st.integers(0, len(pieces) - 1), label=f"run {i} loses")
        kept = pieces[:len(pieces) - lose]
        delivered += kept
        if lose:
            gaps[run.dir].append((kept[-1].end, pieces[-1].end))
    delivered += plan.close(close, T_END)

    an = Analyzer(PORTS, FULL)
    table = an.table
    regained_at: dict[str, list[int]] = {ORIG: [], RESP: []}
    seen = 0
    for p in delivered:
        table.segment(p.ts, p.seg)
        for e in table.outbox.events[seen:]:
            if e.name == "framing_regained":
                regained_at[e.dir].append(p.start)
        seen = len(table.outbox.events)
    table.close(T_END)
    drained = an.drain()
    events = [event_key(e) for e in drained.events]
    lost = sum(b - a for d in gaps for a, b in gaps[d])
    assert drained.records[0]["missed_bytes"] == lost
    event(f"gaps: {min(3, len(gaps[ORIG]) + len(gaps[RESP]))}")
    event(f"regained: {min(3, len(regained_at[ORIG]) + len(regained_at[RESP]))}")

    for d in (ORIG, RESP):
        units = conv.units(d)
        starts = {u.offset: u for u in units}
        if any(at not in starts for at in regained_at[d]):
            continue  # regained on a false boundary (DATA bytes that look like frames)
        clean = [p.start for p in delivered if p.dir == d and clean_start(p, starts)]
        detect_end = len(PREFACE) if d == ORIG else 9
        ends = frame_ends(conv, d)

        def whole(x: Any, d: str = d, ends: dict[int, int] = ends) -> bool:
            end = ends[x.offset]
            return all(end <= a or x.offset >= b for a, b in gaps[d])

        want = [without_first(x.key) for x in conv.expected
                if x.key[1] == d and x.key[0] in RESYNC_KINDS and whole(x)
                and in_sync_after(units, gaps[d], clean, detect_end, x.offset)]
        got = [without_first(e) for e in events if e[1] == d and e[0] in RESYNC_KINDS]
        assert got == want, d
        lost_frames = len([x for x in conv.expected if x.key[1] == d
                           and x.key[0] in RESYNC_KINDS]) - len(want)
        event(f"control frames not expected after a gap: {min(2, lost_frames)}")
    for e in events:
        if e[0] in ("ping", "ping_ack"):
            assert (e[0], e[1], e[2]) in conv.pings
        elif e[0] == "goaway":
            assert (e[1], e[2], e[3], e[4]) in conv.goaways
        elif e[0] == "request":
            assert e[3] == conv.paths.get(e[2]) or e[3] in UNKNOWN_LABELS, e


# -- 6. HPACK soundness mid-stream ----------------------------------------------------------


@st.composite
def request_sequences(draw: st.DrawFn) -> tuple[Conversation, list[int]]:
    """A client stream of header blocks from one encoder; the HEADERS frame offsets."""
    b = H2Builder()
    b.preface()
    b.settings(ORIG, ())
    enc = b.enc[ORIG]
    offsets = []
    pool = draw(st.lists(paths, min_size=1, max_size=4))
    for i in range(draw(st.integers(1, 12))):
        path = draw(st.sampled_from(pool) | paths)
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
                   (":authority", draw(st.sampled_from(["a:1", "b:2"])))]
        block = draw(header_blocks(enc, headers))
        sid = 2 * i + 1
        m = b.message(ORIG)
        offsets.append(b.header_block(m, sid, block, end_stream=True, splits=[], pad=None,
                                      priority=False))
        b.expect(offsets[-1], "request", ORIG, sid, path)
        b.paths[sid] = path
    return b.conversation(), offsets


@props(200)
@given(seq=request_sequences(), k=st.integers(0, 11), gap=st.none() | st.integers(1, 11),
       fresh_first=st.booleans(), isn=isns)
def test_hpack_mid_stream_methods_are_exact_or_unknown(
    seq: tuple[Conversation, list[int]], k: int, gap: int | None, fresh_first: bool, isn: int
) -> None:
    conv, offsets = seq
    k %= len(offsets)
    lost = gap if gap is not None and gap < len(offsets) else None
    runs = conv.runs()
    assert len(runs) == 1
    cuts = [[u.offset for u in conv.units(ORIG) if u.offset]]  # a segment per frame
    bounds = offsets + [len(conv.stream(ORIG))]
    # Connection A from its SYN, optionally losing block ``lost`` (HEADERS and any
    # CONTINUATION) to a gap the server's ACK reveals; connection B picked up at block k.
    # Both share one HPACK memo.
    plan_a = ConnectionPlan(conv, Endpoints(False, 40001), isn, 7)
    pieces_a = plan_a.handshake(T0)
    for p in flat(plan_a.body(cuts, T0)):
        if lost is not None and bounds[lost] <= p.start < bounds[lost + 1]:
            if p.end == bounds[lost + 1]:
                acked = plan_a.isn[ORIG] + 1 + p.end
                pieces_a.append(Piece(p.ts, plan_a.seg(RESP, 8, acked, ACK), None))
            continue
        pieces_a.append(p)
    plan_b = ConnectionPlan(conv, Endpoints(False, 40002), isn ^ 0x5555, 9)
    pieces_b = [p for p in flat(plan_b.body(cuts, T0)) if p.start >= offsets[k]]
    an = Analyzer(PORTS, FULL)
    for p in (pieces_a + pieces_b) if fresh_first else (pieces_b + pieces_a):
        an.table.segment(p.ts, p.seg)
    an.table.close(T_END)
    d = an.drain()
    port_of = {r["uid"]: r["orig_p"] for r in d.records}
    by_port: dict[int, list[tuple[int, str]]] = {40001: [], 40002: []}
    for e in d.events:
        if isinstance(e, RequestStarted):
            by_port[port_of[e.uid]].append((e.stream_id, e.method))
    sids = [2 * i + 1 for i in range(len(offsets))]
    a = by_port[40001]
    if lost is None:
        assert a == [(s, conv.paths[s]) for s in sids]
    else:
        lost_sid = 2 * lost + 1
        assert [sid for sid, _ in a] == [s for s in sids if s != lost_sid]
        for sid, method in a:
            assert method == conv.paths[sid] or (sid > lost_sid and method == "unknown (gap)")
    b = by_port[40002]
    assert [sid for sid, _ in b] == sids[k:]
    for sid, method in b:
        assert method in (conv.paths[sid], PRE_EXISTING), (sid, method)


@props(500)
@given(blocks=st.lists(st.binary(max_size=60), min_size=1, max_size=4))
def test_hpack_arbitrary_blocks_raise_only_hpack_error(blocks: list[bytes]) -> None:
    memo = HpackMemo()
    hp = HpackDirection(memo)
    for block in blocks:
        try:
            fields = hp.decode(block)
        except HpackError:
            continue
        assert all(name in ALLOWED_HEADERS for name, _ in fields)


# -- 7. TLS hello parser ----------------------------------------------------------------------


def parse_outcome(data: bytes) -> Any:
    try:
        return parse_hello(data)
    except NeedMoreData:
        return NeedMoreData
    except NotTls as exc:
        return (NotTls, str(exc))


tls_like = st.one_of(
    st.binary(max_size=120),
    st.binary(max_size=200).map(lambda b: tls_record(b"\x01" + len(b).to_bytes(3, "big") + b)),
    st.tuples(st.binary(max_size=4), st.binary(max_size=150)).map(
        lambda t: bytes([22, 3, 1]) + t[0] + t[1]
    ),
)


@props(400)
@given(data=tls_like)
def test_parse_hello_arbitrary_bytes_raise_only_need_more_data_or_not_tls(data: bytes) -> None:
    result = parse_outcome(data)
    assert result is NeedMoreData or isinstance(result, (Hello, tuple))


@props(300)
@given(hello=hellos(), ops=mutation_ops)
def test_parse_hello_mutated_hellos_raise_only_need_more_data_or_not_tls(
    hello: tuple[bytes, int, Any], ops: list[tuple[Any, ...]]
) -> None:
    result = parse_outcome(mutate(hello[0], ops))
    assert result is NeedMoreData or isinstance(result, (Hello, tuple))


@props(100)
@given(hello=hellos())
def test_parse_hello_every_prefix_needs_more_data_until_complete(
    hello: tuple[bytes, int, tuple[int, str, tuple[str, ...]]]
) -> None:
    data, end, (kind, sni, alpn) = hello
    for cut in range(end):
        assert parse_outcome(data[:cut]) is NeedMoreData, cut
    for cut in range(end, len(data) + 1):
        assert parse_hello(data[:cut]) == Hello(kind, sni, alpn), cut


def openssl_client_hello(sni: str | None, alpn: list[str], maximum: ssl.TLSVersion) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = maximum
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(
    "sni, alpn, maximum",
    [
        ("svc.example", ["h2"], ssl.TLSVersion.TLSv1_3),
        ("a.b.c.example.internal", ["h2", "http/1.1"], ssl.TLSVersion.TLSv1_2),
        (None, [], ssl.TLSVersion.TLSv1_3),
        ("x" * 60 + ".example", ["grpc-exp", "h2"], ssl.TLSVersion.TLSv1_3),
    ],
)
def test_parse_hello_real_openssl_client_hellos_at_every_prefix(
    sni: str | None, alpn: list[str], maximum: ssl.TLSVersion
) -> None:
    data = openssl_client_hello(sni, alpn, maximum)
    for cut in range(len(data)):
        assert parse_outcome(data[:cut]) is NeedMoreData, cut
    assert parse_hello(data) == Hello(1, sni or "", tuple(alpn))
    # The same hello split over records, as some stacks send large hellos.
    msg = b"".join(data[i + 5:i + 5 + int.from_bytes(data[i + 3:i + 5], "big")]
                   for i in [0])
    split = in_records(msg, [1, 4, 50, len(msg) // 2])
    for cut in range(len(split)):
        assert parse_outcome(split[:cut]) is NeedMoreData, cut
    assert parse_hello(split) == Hello(1, sni or "", tuple(alpn))


# -- 8. capture reader ----------------------------------------------------------------------


def read_capture(data: bytes) -> tuple[list[tuple[float, int, bytes]], CaptureFileError | None]:
    """Packets, then the error; fails on any other exception or on a second error."""
    packets: list[tuple[float, int, bytes]] = []
    reader = CaptureReader(io.BytesIO(data), "test.pcap")
    try:
        it = iter(reader)
    except CaptureFileError as exc:
        return packets, exc
    try:
        packets.extend(it)  # keeps what was yielded before an error
    except CaptureFileError as exc:
        assert next(it, None) is None  # nothing after the error
        return packets, exc
    return packets, None


captures = st.one_of(pcap_files(), pcapng_files())


@props(80)
@given(capture=captures)
def test_capture_truncated_at_every_offset_yields_exactly_the_complete_packets(
    capture: Capture,
) -> None:
    data = capture.data
    assert read_capture(data) == (capture.packets, None)
    for cut in range(len(data)):
        packets, err = read_capture(data[:cut])
        assert packets == [p for p, end in zip(capture.packets, capture.ends, strict=True)
                           if end <= cut], cut
        if cut in capture.boundaries:
            assert err is None, cut
            continue
        assert err is not None, cut
        if cut < 4:
            assert err.offset is None
        else:
            assert err.offset == max([0] + [b for b in capture.boundaries if b <= cut]), cut


@props(40)
@given(capture=captures)
def test_gzip_capture_truncated_at_every_offset_yields_what_can_be_decompressed(
    capture: Capture,
) -> None:
    data = gzipped(capture)
    assert read_capture(data) == (capture.packets, None)
    for cut in range(len(data)):
        readable = len(zlib.decompressobj(31).decompress(data[:cut])) if cut > 3 else 0
        packets, err = read_capture(data[:cut])
        assert err is not None, cut
        assert packets == [p for p, end in zip(capture.packets, capture.ends, strict=True)
                           if end <= readable], cut


@props(400)
@given(capture=captures, ops=mutation_ops, compressed=st.booleans())
def test_mutated_captures_yield_packets_then_at_most_one_capture_file_error(
    capture: Capture, ops: list[tuple[Any, ...]], compressed: bool
) -> None:
    raw = gzipped(capture) if compressed else capture.data
    data = mutate(raw, ops)
    packets, _err = read_capture(data)
    for ts, linktype, frame in packets:
        assert isinstance(ts, float) and isinstance(linktype, int) and isinstance(frame, bytes)
    if not compressed and len(ops) == 1:
        # Everything before the first damaged byte is read.
        first = ops[0][1] % (len(raw) + (1 if ops[0][0] in ("truncate", "insert") else 0))
        before = [p for p, end in zip(capture.packets, capture.ends, strict=True) if end <= first]
        assert packets[:len(before)] == before


# -- regressions: bugs these properties found, each one minimal ------------------------------


def _client_stream(
    chunks: list[bytes], *, server: Sequence[bytes] = (), **options: Any
) -> Outcome:
    """A handshake, then the client's ``chunks`` (then the server's) as segments."""
    b = H2Builder()
    for c in chunks:
        b.add(b.message(ORIG), c, False)
    for c in server:
        b.add(b.message(RESP), c, False)
    conv = b.conversation()
    plan = ConnectionPlan(conv, Endpoints(False, 40000), 1000, 5000)
    runs = conv.runs()
    cuts = []
    for run in runs:
        sizes = [len(c) for c in (chunks if run.dir == ORIG else server)]
        points, acc = [], 0
        for s in sizes[:-1]:
            acc += s
            points.append(acc)
        cuts.append(points)
    return deliver(plan.handshake(T0) + flat(plan.body(cuts, T0)), **options)


@pytest.mark.parametrize("first", [1, 2])
def test_client_tls_hello_detected_when_first_segment_is_short(first: int) -> None:
    hello = in_records(client_hello("svc.example", ["h2"]), [])
    out = _client_stream([hello[:first], hello[first:]])
    assert ("tls_client_hello", ORIG, "svc.example", "h2") in out.events


def test_pipelined_http1_requests_do_not_overflow_the_stack() -> None:
    # 54 KB: one GRO/TSO segment on loopback.
    out = _client_stream([b"GET / HTTP/1.1\r\n\r\n" * 3000])
    assert out.events.count(("http1_request", ORIG, "GET", "/", "")) > 0


def test_reorder_buffer_never_holds_more_than_reorder_bytes() -> None:
    conv = H2Builder().conversation()
    plan = ConnectionPlan(conv, Endpoints(False, 40000), 0, 500)
    table = FlowTable(PORTS, None, FULL.replace(reorder_segments=8, reorder_bytes=100))
    for p in plan.handshake(T0):
        table.segment(p.ts, p.seg)

    def seg(rel: int, n: int) -> tuple[Any, ...]:
        return plan.seg(ORIG, 1 + rel, 501, ACK | PSH, b"x" * n)

    table.segment(T0, seg(10, 10))  # [10, 20): waits for [0, 10)
    table.segment(T0, seg(30, 80))  # [30, 110): 90 bytes buffered
    table.segment(T0, seg(200, 100))  # 190 > 100: the hole before 10 is skipped, once
    ep = table.awake()[0].orig
    assert ep.ooo_bytes <= table.reorder_bytes


def _pcapng_with(block: bytes) -> bytes:
    shb = struct.pack("<II", 0x0A0D0D0A, 28) + struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
    shb += struct.pack("<I", 28)
    idb = struct.pack("<IIHHII", 1, 20, 1, 0, 0, 20)
    return shb + idb + block


@pytest.mark.parametrize("btype, blen", [(6, 12), (6, 16), (6, 20), (2, 12), (2, 20)])
def test_short_packet_block_at_end_of_pcapng_is_a_capture_file_error(btype: int, blen: int) -> None:
    block = struct.pack("<II", btype, blen) + struct.pack("<I", blen) * ((blen - 8) // 4)
    packets, err = read_capture(_pcapng_with(block))
    assert packets == [] and err is not None


def test_short_simple_packet_block_is_a_capture_file_error() -> None:
    block = struct.pack("<III", 3, 12, 12)
    packets, err = read_capture(_pcapng_with(block))
    assert packets == [] and err is not None


def test_truncated_gzip_capture_yields_the_packets_before_the_damage() -> None:
    """Was a bug (fixed with read1 in _fill): GzipFile.read(1 MiB) raised EOFError and
    dropped what it had decompressed, so a cut .pcap.gz yielded no packets at all."""
    frames = [bytes([i]) * 300 for i in range(200)]
    pcap = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    pcap += b"".join(struct.pack("<IIII", i, 0, 300, 300) + f for i, f in enumerate(frames))
    gzip_data = gzipped(Capture(pcap, [], [], [], 24))
    cut = gzip_data[:-4]  # only the trailer's length field is missing
    readable = zlib.decompressobj(31).decompress(cut)
    assert readable == pcap  # all of it can be decompressed
    packets, err = read_capture(cut)
    assert err is not None
    assert [p[2] for p in packets] == frames


def test_syn_with_payload_tcp_fast_open() -> None:
    conv = H2Builder()
    conv.preface()
    conv.settings(ORIG, ())
    conv.settings(RESP, ())
    c = conv.conversation()
    plan = ConnectionPlan(c, Endpoints(False, 40000), 1000, 5000)
    stream = c.stream(ORIG)
    tfo = 24  # the preface rides on the SYN
    syn = plan.seg(ORIG, 1000, 0, SYN, stream[:tfo])
    synack = plan.seg(RESP, 5000, 1001 + tfo, SYN | ACK)
    ack = plan.seg(ORIG, 1001 + tfo, 5001, ACK)
    rest = [p for p in flat(plan.body([[tfo]], T0)) if p.start >= tfo or p.dir == RESP]
    pieces = [Piece(T0, syn, None), Piece(T0, synack, None), Piece(T0, ack, None)] + rest
    out = deliver(pieces)
    assert out.anomalies == []
    assert out.records[0]["missed_bytes"] == 0
    assert [e[0] for e in out.events] == ["syn", "preface", "syn_ack", "established",
                                          "settings", "settings"]


def test_negative_content_length_is_an_anomaly() -> None:
    out = _client_stream([b"POST /a HTTP/1.1\r\nContent-Length: -5\r\n\r\nGET /b HTTP/1.1\r\n\r\n"])
    assert "bad_content_length" in [a[0] for a in out.anomalies]


def test_client_trailers_after_mid_stream_pickup_are_not_a_request() -> None:
    enc = hpack.Encoder()
    request = h2_frame(0x1, 0x4, 1, enc.encode([(":method", "POST"), (":path", "/a/B")]))
    trailers = h2_frame(0x1, 0x5, 1, enc.encode([("x-checksum", "1")]))
    b = H2Builder()
    b.add(b.message(ORIG), request + trailers, False)
    conv = b.conversation()
    plan = ConnectionPlan(conv, Endpoints(False, 40000), 1000, 5000)
    # Picked up after the request HEADERS: the first segment is the trailers frame.
    out = deliver([p for p in flat(plan.body([[len(request)]], T0)) if p.start > 0])
    assert [e for e in out.events if e[0] == "request"] == []


def test_port_reuse_at_the_same_timestamp_gets_a_new_uid() -> None:
    plan1 = ConnectionPlan(H2Builder().conversation(), Endpoints(False, 40000), 1000, 5000)
    plan2 = ConnectionPlan(H2Builder().conversation(), Endpoints(False, 40000), 9000, 7000)
    pieces = plan1.handshake(0.0) + plan1.close("fin", 0.0) + plan2.handshake(0.0)
    out = deliver(pieces)
    assert len(out.records) == 2
    assert out.records[0]["uid"] != out.records[1]["uid"]


@pytest.mark.parametrize("block", [b"\x00", b"\x40", b"\x00\x01a", b"\x10\x01a", b"\x02",
                                   b"\x44"])
def test_header_block_ending_before_a_string_is_an_hpack_error(block: bytes) -> None:
    """Was a bug (found here, fixed): hpack_memo._string/_integer read block[pos] without a
    bounds check, and the IndexError escaped the observer: one HEADERS frame whose block
    ends where a string starts stopped the whole analysis."""
    out = _client_stream([PREFACE + h2_frame(0x4, 0, 0, b"") + h2_frame(0x1, 0x5, 1, block)])
    assert ("request", ORIG, 1, "unknown (hpack error)") in out.events


def _picked_up(chunks: list[bytes]) -> Outcome:
    """The client's ``chunks`` as segments of a connection whose handshake was missed."""
    b = H2Builder()
    for c in chunks:
        b.add(b.message(ORIG), c, False)
    conv = b.conversation()
    plan = ConnectionPlan(conv, Endpoints(False, 40000), 1000, 5000)
    cuts = [sum(len(c) for c in chunks[:i]) for i in range(1, len(chunks))]
    return deliver(flat(plan.body([cuts], T0)))


PING = h2_frame(0x6, 0, 0, b"12345678")


@pytest.mark.parametrize("first", [b"PRI ", b"INFO user logged in\n"], ids=["preface", "text"])
def test_mid_stream_segment_that_looks_like_http1_does_not_end_resync(first: bytes) -> None:
    rest = PREFACE[len(first):] + h2_frame(0x4, 0, 0, b"") if first == b"PRI " else PING
    out = _picked_up([first, rest, PING])
    assert ("ping", ORIG, int.from_bytes(b"12345678", "big")) in out.events
    assert not [e for e in out.events if e[0] == "http1_request"]


def test_segment_buffered_behind_a_hole_survives_the_ack_that_reveals_it() -> None:
    pings = [h2_frame(0x6, 0, 0, n.to_bytes(8, "big")) for n in (1, 2, 3)]
    b = H2Builder()
    b.add(b.message(ORIG), PREFACE + h2_frame(0x4, 0, 0, b""), False)
    b.add(b.message(RESP), h2_frame(0x4, 0, 0, b""), False)
    b.add(b.message(ORIG), b"".join(pings), False)
    conv = b.conversation()
    plan = ConnectionPlan(conv, Endpoints(False, 40000), 1000, 5000)
    hello, server, client = plan.body([[], [], [17, 34]], T0)
    everything = 1001 + len(conv.stream(ORIG))
    server_ack = Piece(T0, plan.seg(RESP, 5001 + 9, everything, ACK), None)
    # The capture misses PING 1; PING 2 waits for it; the server's ACK shows it was sent;
    # PING 3 arrives.
    out = deliver(plan.handshake(T0) + hello + server + [client[1], server_ack, client[2]])
    assert [e[2] for e in out.events if e[0] == "ping"] == [2, 3]
    assert out.records[0]["missed_bytes"] == 17


def test_regression_helpers_see_the_bugs_they_pin() -> None:
    """The xfail tests above fail for their stated reason, not for a broken helper: the same
    helpers pass on inputs that do not trigger the bug."""
    hello = in_records(client_hello("svc.example", ["h2"]), [])
    out = _client_stream([hello[:3], hello[3:]])
    assert ("tls_client_hello", ORIG, "svc.example", "h2") in out.events
    out = _client_stream([b"GET / HTTP/1.1\r\n\r\n" * 20])
    assert out.events.count(("http1_request", ORIG, "GET", "/", "")) == 20
    plan1 = ConnectionPlan(H2Builder().conversation(), Endpoints(False, 40000), 1000, 5000)
    plan2 = ConnectionPlan(H2Builder().conversation(), Endpoints(False, 40000), 9000, 7000)
    out = deliver(plan1.handshake(0.0) + plan1.close("fin", 0.0) + plan2.handshake(1.0))
    assert len({r["uid"] for r in out.records}) == 2
    frame = b"\x02" * 60
    block = struct.pack("<IIIIIII", 6, 32 + 60, 0, 0, 0, 60, 60) + frame + struct.pack("<I", 92)
    assert read_capture(_pcapng_with(block)) == ([(0.0, 1, frame)], None)
    out = _client_stream([b"POST /a HTTP/1.1\r\nContent-Length: x\r\n\r\n"])
    assert "bad_content_length" in [a[0] for a in out.anomalies]
    out = _picked_up([b"\x01\x02binary", PING, PING])
    assert ("ping", ORIG, int.from_bytes(b"12345678", "big")) in out.events

