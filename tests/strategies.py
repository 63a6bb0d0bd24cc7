"""Byte builders and Hypothesis strategies for tests/test_properties.py.

Everything here is written from the wire formats (RFC 9113 frames, hpack's own encoder,
RFC 793/8200 headers, TLS 1.2/1.3 hellos, pcap and pcapng), not from tracer's parsers,
so the properties compare tracer against an outside model. Each generator also returns
what tracer should report for what it built (events, record fields, packets).
"""

from __future__ import annotations

import dataclasses
import gzip
import string
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import hpack
from hypothesis import strategies as st

from tracer.decode import ACK, FIN, NS, PSH, RST, SYN
from tracer.events import ORIG, RESP, settings_text

MASK = 0xFFFFFFFF
SERVER_PORT = 50051
PORTS = frozenset({SERVER_PORT})

# -- HTTP/2 wire format (RFC 9113) ----------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
END_STREAM = ACK_FLAG = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

MAX_FRAGMENT = 16000  # header block bytes per frame: room for padding and priority in 16384
UNKNOWN_LABELS = ("unknown (pre-existing)", "unknown (gap)", "unknown (hpack error)")
PRE_EXISTING = "unknown (pre-existing)"

# Printable ASCII: what tracer stores unchanged (its printable() escapes everything else).
TEXT = "".join(chr(c) for c in range(0x20, 0x7F))


def h2_frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | ftype, flags, sid) + payload


def settings_payload(settings: tuple[tuple[int, int], ...]) -> bytes:
    return b"".join(struct.pack(">HI", k, v) for k, v in settings)


def event_key(event: Any) -> tuple[Any, ...]:
    """An event without its timestamp, uid and ordinal: what must not depend on chunking."""
    skip = ("ts", "uid", "n", "dir")
    return (event.name, event.dir) + tuple(
        getattr(event, f.name) for f in dataclasses.fields(event) if f.name not in skip
    )


@dataclass
class Unit:
    """One frame (or the preface) at ``offset`` in its direction's byte stream."""

    offset: int
    length: int
    plausible: bool  # obeys tracer.http2.frames' documented resync rules (known type, ...)
    preface: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class Message:
    """Consecutive bytes one side sends before the other side says anything."""

    dir: str
    data: bytes = b""
    units: list[Unit] = field(default_factory=list)


@dataclass
class Expected:
    """An event key and the offset, in its direction's stream, of the frame that starts it."""

    key: tuple[Any, ...]
    offset: int


@dataclass
class Run:
    dir: str
    start: int  # offset of data[0] in the direction's stream
    data: bytes


@dataclass
class Conversation:
    messages: list[Message]
    expected: list[Expected]
    record: dict[str, Any]
    paths: dict[int, str]  # client stream id -> :path
    pings: set[tuple[str, str, int]]  # (event name, dir, opaque) of every PING sent
    goaways: set[tuple[str, int, int, str]]  # (dir, last stream id, code, debug text)

    def stream(self, direction: str) -> bytes:
        return b"".join(m.data for m in self.messages if m.dir == direction)

    def units(self, direction: str) -> list[Unit]:
        out: list[Unit] = []
        base = 0
        for m in self.messages:
            if m.dir != direction:
                continue
            out += [dataclasses.replace(u, offset=base + u.offset) for u in m.units]
            base += len(m.data)
        return out

    def runs(self) -> list[Run]:
        """Messages merged while the same side keeps talking."""
        runs: list[Run] = []
        sent = {ORIG: 0, RESP: 0}
        for m in self.messages:
            if not m.data:
                continue
            if runs and runs[-1].dir == m.dir:
                runs[-1].data += m.data
            else:
                runs.append(Run(m.dir, sent[m.dir], m.data))
            sent[m.dir] += len(m.data)
        return runs


class H2Builder:
    """Builds both directions of one connection and what tracer must report about them."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.expected: list[Expected] = []
        self.enc = {ORIG: hpack.Encoder(), RESP: hpack.Encoder()}
        self.next_sid = 1
        self.open_streams: list[int] = []  # requested, not yet answered
        self.all_streams: list[int] = []
        self.unacked_pings: dict[str, list[int]] = {ORIG: [], RESP: []}
        self.paths: dict[int, str] = {}
        self.pings: set[tuple[str, str, int]] = set()
        self.goaways: set[tuple[str, int, int, str]] = set()
        self.settings_seen = {ORIG: False, RESP: False}
        self.settings_acked = {ORIG: False, RESP: False}
        self.rec: dict[str, Any] = {
            "protocol": "h2c",
            "streams": 0,
            "first_method": None,
            "authority": None,
            "user_agent": None,
            "pings_orig": 0,
            "pings_resp": 0,
            "goaways": 0,
            "goaway_sender": None,
            "goaway_last_stream_id": None,
            "goaway_error": None,
            "goaway_debug": None,
            "rst_streams": 0,
            "trailers": 0,
            "grpc_errors": 0,
            "data_frames": 0,
            "window_updates": 0,
            "client_settings": None,
            "server_settings": None,
            "methods": {},
        }

    # -- plumbing -----------------------------------------------------------------------

    def message(self, direction: str) -> Message:
        m = Message(direction)
        self.messages.append(m)
        return m

    def _offset(self, m: Message) -> int:
        return sum(len(x.data) for x in self.messages[:-1] if x.dir == m.dir)

    def add(self, m: Message, raw: bytes, plausible: bool = True, preface: bool = False) -> int:
        """Append one unit to message ``m``; return its offset in the direction stream."""
        assert m is self.messages[-1]
        offset = self._offset(m) + len(m.data)
        m.units.append(Unit(len(m.data), len(raw), plausible, preface))
        m.data += raw
        return offset

    def expect(self, offset: int, *key: Any) -> None:
        self.expected.append(Expected(tuple(key), offset))

    def count_method(self, method: str) -> None:
        rec = self.rec
        rec["streams"] += 1
        if rec["first_method"] is None:
            rec["first_method"] = method
        methods = rec["methods"]
        if method in methods or len(methods) < 32:
            methods[method] = methods.get(method, 0) + 1
        else:
            methods["(other)"] = methods.get("(other)", 0) + 1

    # -- frames -------------------------------------------------------------------------

    def preface(self) -> None:
        m = self.message(ORIG)
        off = self.add(m, PREFACE, preface=True)
        self.expect(off, "preface", ORIG)

    def settings(self, direction: str, settings: tuple[tuple[int, int], ...]) -> None:
        m = self.message(direction)
        off = self.add(m, h2_frame(SETTINGS, 0, 0, settings_payload(settings)))
        first = not self.settings_seen[direction]
        self.expect(off, "settings", direction, settings, first)
        if first:
            self.settings_seen[direction] = True
            key = "client_settings" if direction == ORIG else "server_settings"
            self.rec[key] = settings_text(settings)

    def settings_ack(self, direction: str) -> None:
        m = self.message(direction)
        off = self.add(m, h2_frame(SETTINGS, ACK_FLAG, 0, b""))
        first = not self.settings_acked[direction]
        self.settings_acked[direction] = True
        self.expect(off, "settings_ack", direction, first)

    def header_block(
        self,
        m: Message,
        sid: int,
        block: bytes,
        *,
        end_stream: bool,
        splits: list[int],
        pad: int | None,
        priority: bool,
    ) -> int:
        """HEADERS (+ CONTINUATION) carrying ``block``; returns the HEADERS frame's offset."""
        cuts = {c for c in splits if 0 < c < len(block)}
        cuts |= set(range(MAX_FRAGMENT, len(block), MAX_FRAGMENT))  # frames stay <= 16 KiB
        points = sorted(cuts)
        pieces = [block[a:b] for a, b in pairwise([0, *points, len(block)])]
        flags = END_STREAM if end_stream else 0
        if len(pieces) == 1:
            flags |= END_HEADERS
        payload = pieces[0]
        if priority:
            flags |= PRIORITY_FLAG
            payload = struct.pack(">IB", 0x80000000 | (sid + 2), 15) + payload
        if pad is not None:
            flags |= PADDED
            payload = bytes([pad]) + payload + b"\0" * pad
        first = self.add(m, h2_frame(HEADERS, flags, sid, payload))
        for i, piece in enumerate(pieces[1:], start=2):
            last = i == len(pieces)
            self.add(m, h2_frame(CONTINUATION, END_HEADERS if last else 0, sid, piece))
        return first

    def data(
        self, m: Message, sid: int, payload: bytes, *, end_stream: bool, pad: int | None
    ) -> None:
        flags = END_STREAM if end_stream else 0
        if pad is not None:
            flags |= PADDED
            payload = bytes([pad]) + payload + b"\0" * pad
        self.add(m, h2_frame(DATA, flags, sid, payload))
        self.rec["data_frames"] += 1

    def ping(self, direction: str, opaque: int, ack: bool) -> None:
        m = self.message(direction)
        off = self.add(m, h2_frame(PING, ACK_FLAG if ack else 0, 0, opaque.to_bytes(8, "big")))
        name = "ping_ack" if ack else "ping"
        self.expect(off, name, direction, opaque)
        self.pings.add((name, direction, opaque))
        if not ack:
            self.rec["pings_orig" if direction == ORIG else "pings_resp"] += 1

    def goaway(self, direction: str, last: int, code: int, debug: str) -> None:
        m = self.message(direction)
        payload = struct.pack(">II", last, code) + debug.encode()
        off = self.add(m, h2_frame(GOAWAY, 0, 0, payload))
        text = debug[:64]
        self.expect(off, "goaway", direction, last, code, text)
        self.goaways.add((direction, last, code, text))
        rec = self.rec
        rec["goaways"] += 1
        if rec["goaway_sender"] is None:
            rec["goaway_sender"] = direction
        if rec["goaway_sender"] == direction:
            rec["goaway_last_stream_id"] = last
            rec["goaway_error"] = code
            rec["goaway_debug"] = text or None

    def rst_stream(self, direction: str, sid: int, code: int) -> None:
        m = self.message(direction)
        off = self.add(m, h2_frame(RST_STREAM, 0, sid, struct.pack(">I", code)))
        self.expect(off, "rst_stream", direction, sid, code)
        self.rec["rst_streams"] += 1

    def window_update(self, direction: str, sid: int, increment: int) -> None:
        m = self.message(direction)
        self.add(m, h2_frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", increment)))
        self.rec["window_updates"] += 1

    def priority(self, direction: str, sid: int) -> None:
        m = self.message(direction)
        self.add(m, h2_frame(PRIORITY, 0, sid, struct.pack(">IB", 0, 16)))

    def extension(
        self, direction: str, ftype: int, flags: int, sid: int, payload: bytes
    ) -> None:
        # Unknown frame types must be ignored (RFC 9113 4.1); tracer counts nothing for them
        # and, by design, does not resync on them.
        m = self.message(direction)
        self.add(m, h2_frame(ftype, flags, sid, payload), plausible=False)

    def conversation(self) -> Conversation:
        return Conversation(
            self.messages, self.expected, self.rec, self.paths, self.pings, self.goaways
        )


# -- HTTP/2 strategies -----------------------------------------------------------------------

SETTING_KEYS = st.sampled_from([1, 2, 3, 4, 5, 6, 8, 9]) | st.integers(0, 0xFFFF)
settings_lists = st.lists(st.tuples(SETTING_KEYS, st.integers(0, MASK)), max_size=5).map(tuple)
opaques = st.integers(0, (1 << 64) - 1)
codes = st.sampled_from([0, 1, 2, 8, 0xB]) | st.integers(0, MASK)
paths = st.sampled_from(["/pkg.Svc/Get", "/pkg.Svc/List", "/grpc.health.v1.Health/Check"]) | (
    st.text(TEXT, min_size=0, max_size=60).map(lambda s: "/" + s)
)
authorities = st.sampled_from(["svc.local:50051", "localhost:50051"]) | st.text(
    string.ascii_lowercase + ".-:0123456789", min_size=1, max_size=30
)
header_names = st.sampled_from(["grpc-timeout", "x-request-id", "grpc-accept-encoding"]) | st.text(
    string.ascii_lowercase + "-", min_size=1, max_size=12
)
header_values = st.sampled_from(["1S", "gzip", "abc"]) | st.text(TEXT, max_size=40)
small_pads = st.none() | st.integers(0, 20)


@st.composite
def payloads(draw: st.DrawFn, max_size: int) -> bytes:
    """Mostly small DATA payloads; one in twenty up to a full 16 KiB frame."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(min_size=2000, max_size=16384 - 256))
    return draw(st.binary(max_size=max_size))


@st.composite
def header_blocks(draw: st.DrawFn, enc: hpack.Encoder, headers: list[tuple[str, str]]) -> bytes:
    """Encode ``headers`` (plus random extras) with ``enc``, as a real HPACK encoder would."""
    extra = draw(st.lists(st.tuples(header_names, header_values), max_size=3))
    if draw(st.integers(0, 29)) == 0:
        # A header block larger than one frame: CONTINUATION is required, not optional.
        extra.append(("x-large", "v" * draw(st.integers(16000, 24000))))
    fields: list[Any] = []
    for name, value in headers + extra:
        if draw(st.integers(0, 9)) == 0:
            fields.append(hpack.NeverIndexedHeaderTuple(name, value))
        else:
            fields.append((name, value))
    if draw(st.integers(0, 7)) == 0:
        enc.header_table_size = draw(st.sampled_from([0, 256, 1024, 4096, 8192]))
    block: bytes = enc.encode(fields, huffman=draw(st.booleans()))
    return block


def _splits(block_len: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, max(1, block_len - 1)), max_size=3)


@st.composite
def conversations(
    draw: st.DrawFn,
    *,
    max_actions: int = 14,
    data_max: int = 200,
    upgrade: bool | None = False,
    extensions: bool = True,
    client_trailers: bool = True,
) -> Conversation:
    """A valid HTTP/2 (h2c) connection: preface, SETTINGS, requests with CONTINUATION splits,
    DATA, responses with gRPC trailers, PING/ACK, WINDOW_UPDATE, RST_STREAM, GOAWAY."""
    b = H2Builder()
    if upgrade is None:
        upgrade = draw(st.booleans())
    if upgrade:
        # RFC 7540 3.2: HTTP/1.1 Upgrade: h2c; the upgraded request is stream 1.
        # tracer splits the start line at spaces: keep them out of the target.
        target = draw(paths).replace(" ", "")
        host = draw(authorities)
        m = b.message(ORIG)
        req = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        req += "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
        off = b.add(m, req.encode(), plausible=False)
        b.expect(off, "http1_request", ORIG, "GET", target, "h2c")
        b.expect(off, "request", ORIG, 1, target)
        b.paths[1] = target
        b.count_method(target)
        b.rec["authority"] = host
        b.next_sid = 3
        b.open_streams.append(1)
        b.all_streams.append(1)
        m = b.message(RESP)
        resp = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        off = b.add(m, resp, plausible=False)
        b.expect(off, "http1_response", RESP, 101)
        b.settings(RESP, draw(settings_lists))
        b.preface()
        b.settings(ORIG, draw(settings_lists))
    else:
        b.preface()
        b.settings(ORIG, draw(settings_lists))
        b.settings(RESP, draw(settings_lists))
    actions = [
        "request", "request", "request", "response", "response", "ping", "ping_ack",
        "settings_ack", "settings", "window_update", "rst_stream", "goaway", "priority",
        "client_trailers", "data",
    ]
    if extensions:
        actions.append("extension")
    if not client_trailers:
        actions.remove("client_trailers")
    for _ in range(draw(st.integers(0, max_actions))):
        action = draw(st.sampled_from(actions))
        side = draw(st.sampled_from([ORIG, RESP]))
        if action == "request":
            sid = b.next_sid
            b.next_sid += 2
            path = draw(paths)
            authority = draw(authorities)
            headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
                       (":authority", authority), ("content-type", "application/grpc"),
                       ("te", "trailers")]
            agent = draw(st.none() | st.sampled_from(["grpc-go/1.60", "grpc-node-js/1.9"]))
            if agent is not None:
                headers.append(("user-agent", agent))
            block = draw(header_blocks(b.enc[ORIG], headers))
            bodies = draw(st.lists(payloads(data_max), max_size=2))
            m = b.message(ORIG)
            off = b.header_block(
                m, sid, block, end_stream=not bodies, splits=draw(_splits(len(block))),
                pad=draw(small_pads), priority=draw(st.booleans()),
            )
            for i, body in enumerate(bodies):
                b.data(m, sid, body, end_stream=i == len(bodies) - 1, pad=draw(small_pads))
            b.expect(off, "request", ORIG, sid, path)
            b.paths[sid] = path
            b.count_method(path)
            if b.rec["authority"] is None:
                b.rec["authority"] = authority
            if agent is not None and b.rec["user_agent"] is None:
                b.rec["user_agent"] = agent
            b.open_streams.append(sid)
            b.all_streams.append(sid)
        elif action == "response" and b.open_streams:
            sid = b.open_streams.pop(draw(st.integers(0, len(b.open_streams) - 1)))
            status = draw(st.none() | st.integers(0, 16))
            message = draw(st.none() | st.text(TEXT, max_size=50))
            trailers = [(":status", "200"), ("content-type", "application/grpc")]
            m = b.message(RESP)
            trailers_only = draw(st.booleans())
            if not trailers_only:
                block = draw(header_blocks(b.enc[RESP], trailers))
                b.header_block(m, sid, block, end_stream=False, splits=draw(_splits(len(block))),
                               pad=draw(small_pads), priority=False)
                for body in draw(st.lists(payloads(data_max), max_size=2)):
                    b.data(m, sid, body, end_stream=False, pad=draw(small_pads))
                trailers = []
            if status is not None:
                trailers.append(("grpc-status", str(status)))
            if message is not None:
                trailers.append(("grpc-message", message))
            block = draw(header_blocks(b.enc[RESP], trailers))
            off = b.header_block(m, sid, block, end_stream=True, splits=draw(_splits(len(block))),
                                 pad=draw(small_pads), priority=draw(st.booleans()))
            b.expect(off, "trailers", RESP, sid, status, message)
            b.rec["trailers"] += 1
            if status:
                b.rec["grpc_errors"] += 1
        elif action == "client_trailers" and b.all_streams:
            # HEADERS on a stream the client already opened: decoded (the HPACK table moves
            # on) but not a new request.
            sid = draw(st.sampled_from(b.all_streams))
            block = draw(header_blocks(b.enc[ORIG], [("x-checksum", "1")]))
            m = b.message(ORIG)
            b.header_block(m, sid, block, end_stream=True, splits=draw(_splits(len(block))),
                           pad=None, priority=False)
        elif action == "data" and b.all_streams:
            sid = draw(st.sampled_from(b.all_streams))
            m = b.message(side)
            b.data(m, sid, draw(payloads(data_max)), end_stream=False,
                   pad=draw(small_pads))
        elif action == "ping":
            opaque = draw(opaques)
            b.ping(side, opaque, ack=False)
            b.unacked_pings[side].append(opaque)
        elif action == "ping_ack":
            other = RESP if side == ORIG else ORIG
            pending = b.unacked_pings[other]
            opaque = pending.pop(0) if pending else draw(opaques)
            b.ping(side, opaque, ack=True)
        elif action == "settings_ack":
            b.settings_ack(side)
        elif action == "settings":
            b.settings(side, draw(settings_lists))
        elif action == "window_update":
            sid = draw(st.sampled_from([0] + b.all_streams))
            b.window_update(side, sid, draw(st.integers(1, 0x7FFFFFFF)))
        elif action == "rst_stream":
            sid = draw(st.sampled_from(b.all_streams) if b.all_streams else st.just(1))
            b.rst_stream(side, sid, draw(codes))
        elif action == "goaway":
            last = draw(st.sampled_from(b.all_streams) | st.integers(0, 0x7FFFFFFF)
                        if b.all_streams else st.integers(0, 0x7FFFFFFF))
            b.goaway(side, last, draw(codes), draw(st.text(TEXT, max_size=80)))
        elif action == "priority":
            b.priority(side, draw(st.sampled_from(b.all_streams or [1])))
        elif action == "extension":
            b.extension(side, draw(st.integers(0x0A, 0xFF)), draw(st.integers(0, 0xFF)),
                        draw(st.integers(0, 0x7FFFFFFF)), draw(st.binary(max_size=40)))
    return b.conversation()


# -- other protocols on the port ---------------------------------------------------------

def tls_record(content: bytes, *, ctype: int = 22, minor: int = 1) -> bytes:
    return bytes([ctype, 3, minor]) + struct.pack(">H", len(content)) + content


def _ext(etype: int, body: bytes) -> bytes:
    return struct.pack(">HH", etype, len(body)) + body


def _u16_list(items: bytes) -> bytes:
    return struct.pack(">H", len(items)) + items


def client_hello(
    sni: str | None,
    alpn: list[str],
    *,
    session_id: bytes = b"",
    ciphers: bytes = b"\x13\x01\xc0\x2f",
    extra: Sequence[tuple[int, bytes]] = (),
    sni_last: bool = False,
) -> bytes:
    """A ClientHello handshake message (RFC 8446 4.1.2), without record framing."""
    exts: list[bytes] = [_ext(etype, body) for etype, body in extra]
    if sni is not None:
        name = sni.encode()
        entry = b"\x00" + struct.pack(">H", len(name)) + name
        sni_ext = _ext(0, _u16_list(entry))
        exts = exts + [sni_ext] if sni_last else [sni_ext] + exts
    if alpn:
        protos = b"".join(bytes([len(p)]) + p.encode() for p in alpn)
        exts.append(_ext(16, _u16_list(protos)))
    body = b"\x03\x03" + b"\x11" * 32 + bytes([len(session_id)]) + session_id
    body += _u16_list(ciphers) + b"\x01\x00"
    if exts:
        body += _u16_list(b"".join(exts))
    return b"\x01" + len(body).to_bytes(3, "big") + body


def server_hello(alpn: str | None, *, session_id: bytes = b"") -> bytes:
    exts = b""
    if alpn is not None:
        p = alpn.encode()
        exts += _ext(16, _u16_list(bytes([len(p)]) + p))
    body = b"\x03\x03" + b"\x22" * 32 + bytes([len(session_id)]) + session_id + b"\x13\x01\x00"
    if exts:
        body += _u16_list(exts)
    return b"\x02" + len(body).to_bytes(3, "big") + body


def in_records(message: bytes, cuts: list[int], minor: int = 1) -> bytes:
    """``message`` split into handshake records at ``cuts`` (no empty records)."""
    points = sorted({c for c in cuts if 0 < c < len(message)})
    parts = [message[a:b] for a, b in pairwise([0, *points, len(message)])]
    return b"".join(tls_record(p, minor=minor) for p in parts)


snis = st.text(string.ascii_lowercase + string.digits + ".-", min_size=1, max_size=40)
alpn_lists = st.lists(
    st.sampled_from(["h2", "http/1.1", "grpc-exp"]) | st.text(TEXT, min_size=1, max_size=12),
    max_size=3,
)
extensions_st = st.lists(
    st.tuples(st.integers(1, 0xFFFF).filter(lambda t: t not in (0, 16)), st.binary(max_size=24)),
    max_size=3,
)


@st.composite
def hellos(draw: st.DrawFn) -> tuple[bytes, int, tuple[int, str, tuple[str, ...]]]:
    """(record bytes, where the hello ends, (kind, sni, alpn)) of a ClientHello or ServerHello."""
    if draw(st.booleans()):
        sni = draw(st.none() | snis)
        alpn = draw(alpn_lists)
        msg = client_hello(
            sni, alpn, session_id=draw(st.binary(max_size=32)), extra=draw(extensions_st),
            sni_last=draw(st.booleans()),
        )
        want = (1, sni or "", tuple(alpn))
    else:
        proto = draw(st.none() | st.sampled_from(["h2", "http/1.1"]))
        msg = server_hello(proto, session_id=draw(st.binary(max_size=32)))
        want = (2, "", (proto,) if proto else ())
    data = in_records(msg, draw(st.lists(st.integers(1, len(msg) - 1), max_size=3)),
                      minor=draw(st.sampled_from([1, 3])))
    end = len(data)
    # What follows the hello: nothing, or a ChangeCipherSpec / application data record.
    data += draw(st.sampled_from([b"", tls_record(b"\x01", ctype=20),
                                  tls_record(b"x" * 9, ctype=23)]))
    return data, end, want


@st.composite
def other_conversations(draw: st.DrawFn) -> Conversation:
    """TLS, plain HTTP/1.1 and HTTP/1.1 CONNECT + TLS on the watched port."""
    b = H2Builder()
    kind = draw(st.sampled_from(["tls", "http1", "connect"]))
    rec: dict[str, Any] = {"protocol": "tls" if kind != "http1" else "http1"}
    if kind == "connect":
        m = b.message(ORIG)
        off = b.add(m, b"CONNECT backend:443 HTTP/1.1\r\nHost: backend:443\r\n\r\n", False)
        b.expect(off, "http1_request", ORIG, "CONNECT", "backend:443", "")
        m = b.message(RESP)
        off = b.add(m, b"HTTP/1.1 200 Connection established\r\n\r\n", False)
        b.expect(off, "http1_response", RESP, 200)
    if kind in ("tls", "connect"):
        sni = draw(st.none() | snis)
        alpn = draw(alpn_lists)
        msg = client_hello(sni, alpn, extra=draw(extensions_st))
        m = b.message(ORIG)
        off = b.add(m, in_records(msg, draw(st.lists(st.integers(1, len(msg) - 1), max_size=2))),
                    False)
        b.expect(off, "tls_client_hello", ORIG, sni or "", ",".join(alpn))
        proto = draw(st.none() | st.sampled_from(["h2", "http/1.1"]))
        m = b.message(RESP)
        off = b.add(m, in_records(server_hello(proto), []), False)
        b.expect(off, "tls_server_hello", RESP, proto or "")
        rec["tls_sni"] = sni or None
        rec["tls_alpn"] = proto or (",".join(alpn) or None)
        for _ in range(draw(st.integers(0, 3))):
            side = draw(st.sampled_from([ORIG, RESP]))
            m = b.message(side)
            b.add(m, tls_record(draw(st.binary(min_size=1, max_size=100)), ctype=23), False)
    else:
        for _ in range(draw(st.integers(1, 4))):
            method = draw(st.sampled_from(["GET", "POST", "PUT", "OPTIONS"]))
            target = draw(st.text(string.ascii_letters + "/-_.?=&", min_size=1, max_size=30))
            body = draw(st.binary(max_size=60))
            head = f"{method} {target} HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\n\r\n"
            m = b.message(ORIG)
            off = b.add(m, head.encode() + body, False)
            b.expect(off, "http1_request", ORIG, method, target, "")
            status = draw(st.sampled_from([200, 204, 404, 503]))
            rbody = b"" if status == 204 else draw(st.binary(max_size=60))
            head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(rbody)}\r\n\r\n"
            m = b.message(RESP)
            off = b.add(m, head.encode() + rbody, False)
            b.expect(off, "http1_response", RESP, status)
    b.rec = rec
    return b.conversation()


# -- TCP ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoints:
    v6: bool
    client_port: int

    def address(self, client: bool) -> bytes:
        if self.v6:
            return bytes(15) + (b"\x01" if client else b"\x02")
        return bytes([10, 0, 0, 1 if client else 2])

    def key(self, from_client: bool) -> bytes:
        src, dst = self.address(from_client), self.address(not from_client)
        sp, dp = (self.client_port, SERVER_PORT) if from_client else (SERVER_PORT, self.client_port)
        return src + dst + struct.pack(">HH", sp, dp)


@dataclass(frozen=True)
class Piece:
    """One segment to deliver, and which bytes of which direction's stream it carries."""

    ts: float
    seg: tuple[Any, ...]
    dir: str | None  # None: handshake or teardown without payload
    start: int = 0
    end: int = 0


class ConnectionPlan:
    """The segments of one connection: handshake, the conversation cut into segments,
    and an optional close."""

    def __init__(self, conv: Conversation, eps: Endpoints, isn_c: int, isn_s: int) -> None:
        self.conv = conv
        self.eps = eps
        self.isn = {ORIG: isn_c, RESP: isn_s}
        self.streams = {ORIG: conv.stream(ORIG), RESP: conv.stream(RESP)}

    def seg(self, direction: str, seq: int, ack: int, flags: int, payload: bytes = b"",
            wire: int | None = None) -> tuple[Any, ...]:
        client = direction == ORIG
        key = self.eps.key(client)
        sp, dp = struct.unpack(">HH", key[-4:])
        return (key, sp, dp, seq & MASK, ack & MASK, flags, 65535, payload,
                len(payload) if wire is None else wire)

    def data_piece(self, ts: float, direction: str, start: int, end: int, acked: int) -> Piece:
        """Stream bytes [start, end) of ``direction``; the peer has ``acked`` bytes."""
        other = RESP if direction == ORIG else ORIG
        seq = self.isn[direction] + 1 + start
        ack = self.isn[other] + 1 + acked
        payload = self.streams[direction][start:end]
        return Piece(ts, self.seg(direction, seq, ack, ACK | PSH, payload), direction, start, end)

    def handshake(self, ts: float) -> list[Piece]:
        c, s = self.isn[ORIG], self.isn[RESP]
        return [
            Piece(ts, self.seg(ORIG, c, 0, SYN), None),
            Piece(ts, self.seg(RESP, s, c + 1, SYN | ACK), None),
            Piece(ts, self.seg(ORIG, c + 1, s + 1, ACK), None),
        ]

    def body(self, cuts: list[list[int]], ts0: float) -> list[list[Piece]]:
        """The runs of the conversation, run i cut at the relative offsets ``cuts[i]``."""
        out: list[list[Piece]] = []
        sent = {ORIG: 0, RESP: 0}
        for i, run in enumerate(self.conv.runs()):
            other = RESP if run.dir == ORIG else ORIG
            given = cuts[i] if i < len(cuts) else []
            points = sorted({c for c in given if 0 < c < len(run.data)})
            ts = ts0 + 0.001 * (i + 1)
            pieces = [
                self.data_piece(ts, run.dir, run.start + a, run.start + b, sent[other])
                for a, b in pairwise([0, *points, len(run.data)])
            ]
            sent[run.dir] += len(run.data)
            out.append(pieces)
        return out

    def close(self, how: str, ts: float) -> list[Piece]:
        c = self.isn[ORIG] + 1 + len(self.streams[ORIG])
        s = self.isn[RESP] + 1 + len(self.streams[RESP])
        if how == "fin":
            return [
                Piece(ts, self.seg(ORIG, c, s, FIN | ACK), None),
                Piece(ts, self.seg(RESP, s, c + 1, FIN | ACK), None),
                Piece(ts, self.seg(ORIG, c + 1, s + 1, ACK), None),
            ]
        if how == "rst":
            return [Piece(ts, self.seg(ORIG, c, s, RST | ACK), None)]
        return []


endpoints = st.builds(Endpoints, v6=st.booleans(), client_port=st.integers(1024, 65535).filter(
    lambda p: p != SERVER_PORT))
isns = st.integers(0, MASK) | st.sampled_from([0, MASK, MASK - 5, 0x7FFFFFFF, 0x80000000])


MAX_SEGMENT = 60000  # one IP packet (a GRO/TSO super-segment) holds at most 64 KiB


def whole_cuts(runs: list[Run]) -> list[list[int]]:
    """Each run in as few segments as IP allows."""
    return [list(range(MAX_SEGMENT, len(r.data), MAX_SEGMENT)) for r in runs]


def run_cuts(runs: list[Run], mode: str) -> st.SearchStrategy[list[list[int]]]:
    """Cut points per run: ``whole`` (none), ``bytes`` (every byte) or ``random``."""
    if mode == "whole":
        return st.just(whole_cuts(runs))
    if mode == "bytes":
        return st.just([list(range(1, len(r.data))) for r in runs])
    return st.tuples(*[
        st.lists(st.integers(1, max(1, len(r.data) - 1)), max_size=min(12, len(r.data)))
        for r in runs
    ]).map(list)


# -- link layer -----------------------------------------------------------------------------

def tcp_header(sport: int, dport: int, seq: int, ack: int, flags: int, window: int,
               options: bytes = b"") -> bytes:
    assert len(options) % 4 == 0
    doff = (20 + len(options)) // 4
    offx = doff << 4 | (1 if flags & NS else 0)
    return struct.pack(">HHIIBBHHH", sport, dport, seq, ack, offx, flags & 0xFF, window, 0,
                       0) + options


def ipv4_packet(src: bytes, dst: bytes, proto: int, l4: bytes, *, options: bytes = b"",
                tso: bool = False, frag: int = 0) -> bytes:
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    total = 0 if tso else 4 * ihl + len(l4)
    return struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0, frag, 64, proto, 0, src, dst) \
        + options + l4


def ipv6_packet(src: bytes, dst: bytes, proto: int, l4: bytes, *,
                ext: Sequence[tuple[int, bytes]] = (), jumbo: bool = False) -> bytes:
    """``ext``: (header type, body) pairs; bodies are padded to the header's unit."""
    chain = b""
    types = [t for t, _ in ext] + [proto]
    for (etype, body), nxt in zip(ext, types[1:], strict=True):
        if etype == 51:  # AH: length in 4-byte units minus 2
            body = body.ljust(6, b"\0")
            body = body + b"\0" * (-(len(body) + 2) % 4)
            size = (len(body) + 2) // 4 - 2
            chain += bytes([nxt, size]) + body
        elif etype == 44:
            chain += bytes([nxt, 0]) + body[:6].ljust(6, b"\0")
        else:
            body = body + b"\0" * (-(len(body) + 2) % 8)
            chain += bytes([nxt, (len(body) + 2) // 8 - 1]) + body
    first = types[0]
    plen = 0 if jumbo else len(chain) + len(l4)
    return struct.pack(">IHBB16s16s", 0x60000000, plen, first, 64, src, dst) + chain + l4


def segment_frame(seg: tuple[Any, ...]) -> bytes:
    """An Ethernet frame carrying a segment tuple (the inverse of tracer's decoder)."""
    key, sport, dport, seq, ack, flags, win, payload, _wire = seg
    l4 = tcp_header(sport, dport, seq, ack, flags, win) + payload
    if len(key) == 12:
        return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ipv4_packet(key[0:4], key[4:8], 6, l4)
    return b"\x02" * 6 + b"\x04" * 6 + b"\x86\xdd" + ipv6_packet(key[0:16], key[16:32], 6, l4)


# -- captures -----------------------------------------------------------------------------

@dataclass
class Capture:
    data: bytes
    packets: list[tuple[float, int, bytes]]
    ends: list[int]  # where each packet's record ends
    boundaries: list[int]  # offsets where the file may end cleanly
    header_end: int  # bytes of the file header (pcap) or first block (pcapng)


@st.composite
def pcap_files(draw: st.DrawFn) -> Capture:
    endian = draw(st.sampled_from("<>"))
    nano = draw(st.booleans())
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    divisor = 1_000_000_000 if nano else 1_000_000
    network = draw(st.sampled_from([1, 101, 113, 276]) | st.integers(0, 0xFFFFFFFF))
    linktype = network & 0x03FFFFFF
    data = struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, draw(st.integers(0, MASK)), network)
    packets = []
    ends = []
    boundaries = [len(data)]
    for frame in draw(st.lists(st.binary(max_size=80), max_size=6)):
        sec = draw(st.integers(0, MASK))
        frac = draw(st.integers(0, divisor - 1))
        data += struct.pack(endian + "IIII", sec, frac, len(frame), len(frame) + 10) + frame
        packets.append((sec + frac / divisor, linktype, frame))
        ends.append(len(data))
        boundaries.append(len(data))
    return Capture(data, packets, ends, boundaries, 24)


def _options(endian: str, options: list[tuple[int, bytes]]) -> bytes:
    if not options:
        return b""
    out = b""
    for code, value in options:
        out += struct.pack(endian + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)
    return out + struct.pack(endian + "HH", 0, 0)


def _block(endian: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    blen = 12 + len(body)
    return struct.pack(endian + "II", btype, blen) + body + struct.pack(endian + "I", blen)


@st.composite
def pcapng_files(draw: st.DrawFn) -> Capture:
    data = b""
    packets: list[tuple[float, int, bytes]] = []
    ends: list[int] = []
    boundaries: list[int] = []
    header_end = 0
    for _section in range(draw(st.integers(1, 2))):
        endian = draw(st.sampled_from("<>"))
        shb_opts = draw(st.sampled_from([[], [(4, b"tracer-test")]]))
        data += _block(endian, 0x0A0D0D0A,
                       struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1)
                       + _options(endian, shb_opts))
        header_end = header_end or len(data)
        boundaries.append(len(data))
        interfaces: list[tuple[int, int, Callable[..., float]]] = []
        for _ in range(draw(st.integers(0, 7))):
            kind = draw(st.sampled_from(["idb", "epb", "epb", "spb", "isb", "other", "pb"]))
            if kind == "idb" or (kind in ("epb", "spb", "isb", "pb") and not interfaces):
                linktype = draw(st.sampled_from([1, 101, 113, 276]) | st.integers(0, 0xFFFF))
                snaplen = draw(st.sampled_from([0, 65535, 262144]))
                opts: list[tuple[int, bytes]] = []
                res = draw(st.none() | st.integers(0, 9) | st.sampled_from([0x80 | 10, 0x80 | 30]))
                if res is not None:
                    opts.append((9, bytes([res])))
                offset = draw(st.none() | st.integers(-(2**40), 2**40))
                if offset is not None:
                    opts.append((14, struct.pack(endian + "q", offset)))
                if draw(st.booleans()):
                    opts.append((2, b"lo"))

                def clock(units: int, res: int | None = res, offset: int | None = offset) -> float:
                    if res is not None and res & 0x80:
                        ts = units * 2.0 ** -(res & 0x7F)
                    else:
                        ts = units / (10 ** res if res is not None else 1_000_000)
                    return ts + (offset or 0)

                data += _block(endian, 1, struct.pack(endian + "HHI", linktype, 0, snaplen)
                               + _options(endian, opts))
                interfaces.append((linktype, snaplen, clock))
                boundaries.append(len(data))
                continue
            if kind in ("epb", "pb"):
                iface = draw(st.integers(0, len(interfaces) - 1))
                units = draw(st.integers(0, (1 << 64) - 1))
                frame = draw(st.binary(max_size=80))
                hi, lo = units >> 32, units & MASK
                if kind == "epb":
                    body = struct.pack(endian + "IIIII", iface, hi, lo, len(frame), len(frame))
                else:
                    body = struct.pack(endian + "HHIIII", iface, 0, hi, lo, len(frame), len(frame))
                body += frame + b"\0" * (-len(frame) % 4)
                if draw(st.booleans()):
                    body += _options(endian, [(1, b"comment")])
                data += _block(endian, 6 if kind == "epb" else 2, body)
                linktype, _snap, clock = interfaces[iface]
                packets.append((clock(units), linktype, frame))
                ends.append(len(data))
            elif kind == "spb":
                frame = draw(st.binary(max_size=80))
                data += _block(endian, 3, struct.pack(endian + "I", len(frame)) + frame)
                linktype, snaplen, _clock = interfaces[0]
                packets.append((0.0, linktype, frame[:snaplen] if snaplen else frame))
                ends.append(len(data))
            elif kind == "isb":
                body = struct.pack(endian + "III", draw(st.integers(0, len(interfaces))), 0, 0)
                body += _options(endian, [(5, struct.pack(endian + "Q", draw(st.integers(0, 99))))])
                data += _block(endian, 5, body)
            else:
                btype = draw(st.sampled_from([4, 0xBAD, 0x40000BAD, 0x80000001]))
                data += _block(endian, btype, draw(st.binary(max_size=40)))
            boundaries.append(len(data))
    return Capture(data, packets, ends, boundaries, header_end)


def gzipped(capture: Capture) -> bytes:
    return gzip.compress(capture.data, mtime=0)


# -- generic mutation -----------------------------------------------------------------------

mutation_ops = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
        st.tuples(st.just("set"), st.integers(0, 1 << 16), st.sampled_from([0, 0xFF, 0x7F, 0x80])),
        st.tuples(st.just("truncate"), st.integers(0, 1 << 16), st.just(0)),
        st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 8)),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    buf = bytearray(data)
    for op, pos, arg in ops:
        if not buf and op != "insert":
            continue
        if op == "flip":
            buf[pos % len(buf)] ^= arg
        elif op == "set":
            buf[pos % len(buf)] = arg
        elif op == "truncate":
            del buf[pos % (len(buf) + 1):]
        elif op == "insert":
            i = pos % (len(buf) + 1)
            buf[i:i] = arg
        elif op == "delete":
            i = pos % len(buf)
            del buf[i:i + arg]
    return bytes(buf)
