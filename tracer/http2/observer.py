"""HTTP/2 observer: both byte streams of one connection in; preface, SETTINGS, HEADERS (method,
grpc-status), PING, RST_STREAM, GOAWAY, TLS hello and HTTP/1 upgrade events out, plus the
connection's protocol summary.

Each direction walks frames across segment boundaries. DATA, WINDOW_UPDATE, PRIORITY and
unknown frames are counted and skipped without copying; control frames and header blocks
are buffered up to ``MAX_BUFFERED`` bytes. Header blocks go through one HPACK context per
direction (see hpack_memo). Only allow-listed header values are kept.

A direction that starts mid-stream or loses bytes to a gap regains frame sync at the next
segment that starts with a plausible chain of frame headers (or the client preface). A gap
that falls inside a frame's payload costs nothing but that frame.
"""

from __future__ import annotations

import re
from typing import Any

from tracer.events import (
    ORIG,
    RESP,
    FramingLost,
    FramingRegained,
    GoawaySent,
    Http1RequestSeen,
    Http1ResponseSeen,
    PingAcknowledged,
    PingSent,
    PrefaceReceived,
    RequestStarted,
    SettingsAcknowledged,
    SettingsReceived,
    StreamReset,
    TlsClientHelloSeen,
    TlsServerHelloSeen,
    TrailersReceived,
)
from tracer.http2.frames import (
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_ACK,
    FLAG_END_HEADERS,
    FLAG_END_STREAM,
    FLAG_PADDED,
    FLAG_PRIORITY,
    FRAME_HEADER,
    FRAME_NAMES,
    GOAWAY,
    HEADERS,
    MAX_FRAME_SIZE_LIMIT,
    PING,
    PREFACE,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_MAX_FRAME_SIZE,
    WINDOW_UPDATE,
    plausible_chain,
)
from tracer.http2.hpack_memo import Fields, HpackDirection, HpackError, HpackMemo, TableState
from tracer.http2.tls import (
    HANDSHAKE_CLIENT_HELLO,
    NeedMoreData,
    NotTls,
    looks_like_tls,
    parse_hello,
)
from tracer.outbox import Budget, Outbox
from tracer.sleep import BIG, BYTE, COUNT, FLAG, FLOAT, REF, SEQ, Layout
from tracer.tcp.flow import StreamObserver

MAX_BUFFERED = 1 << 16  # largest control frame or header block kept for decoding
MAX_HTTP1_HEAD = 1 << 14
MAX_TLS_HELLO = 1 << 16
MAX_METHODS = 32  # distinct methods remembered per connection; the rest are "(other)"
MAX_STATUSES = 32  # distinct grpc-status values counted per connection (0..16 are defined)
MAX_REQUEST_TEXTS = 4096
MAX_TEXT = 256
GOAWAY_DEBUG_BYTES = 64

UNKNOWN_PRE_EXISTING = "unknown (pre-existing)"
NO_PATH = "(no :path)"
UNKNOWN_GAP = "unknown (gap)"
UNKNOWN_HPACK = "unknown (hpack error)"
OTHER_METHODS = "(other)"

# Parser modes.
DETECT = 0  # start of a stream: look at the first bytes
FRAMES = 1  # in frame sync
RESYNC = 2  # frame boundaries unknown: wait for a segment that starts on one
HTTP1 = 3  # inside an HTTP/1.x head or body
TLS = 4  # collecting a TLS hello
IGNORE = 5  # nothing more to learn from this direction
TLS_RECORDS = 6  # inside TLS after the hello: record headers counted, bodies skipped
MODE_NAMES = ("DETECT", "FRAMES", "RESYNC", "HTTP1", "TLS", "IGNORE", "TLS_RECORDS")

# Every mode change a direction's parser makes, and why. A direction starts in DETECT;
# a change not listed here is a bug (Direction._set_mode asserts it).
TRANSITIONS: dict[tuple[int, int], str] = {
    (DETECT, FRAMES): "the client preface, or the server's first frames",
    (DETECT, HTTP1): "an HTTP/1 request or status line",
    (DETECT, TLS): "a TLS record",
    (DETECT, IGNORE): "none of these (or an HTTP/1 body that cannot be followed)",
    (DETECT, RESYNC): "picked up mid-stream, or bytes lost before the start was read",
    (FRAMES, RESYNC): "bytes lost across a frame header",
    (RESYNC, FRAMES): "a segment that starts a plausible chain of frames, or a preface",
    (RESYNC, DETECT): "a client preface cut across segments",
    (RESYNC, HTTP1): "a whole HTTP/1 request or status line at a segment start",
    (RESYNC, TLS_RECORDS): "TLS application data records at a segment start",
    (HTTP1, DETECT): "after a 101 or a CONNECT's 2xx, or bytes that are not HTTP/1",
    (HTTP1, IGNORE): "a chunked or unreadable body, a head too long, or bytes lost",
    (TLS, TLS_RECORDS): "the hello read: the records after it are counted",
    (TLS, IGNORE): "a hello too long, or not TLS after all",
    (TLS, RESYNC): "bytes lost inside the hello",
    (TLS_RECORDS, RESYNC): "bytes lost across a record header, or a header that is not TLS",
}

# TLS record content types (RFC 8446 section 5.1); application data carries the RPCs.
TLS_CHANGE_CIPHER_SPEC = 20
TLS_HEARTBEAT = 24
TLS_APPLICATION_DATA = 23
MAX_TLS_RECORD = (1 << 14) + 2048  # TLSCiphertext.length at most 2^14 + 2048

_HTTP1_REQUEST = re.compile(rb"[A-Z]{3,10} ")
# While resyncing, a segment must show a whole request or status line to count as HTTP/1:
# DATA payloads may well begin with a capital word and a space.
_HTTP1_REQUEST_LINE = re.compile(
    rb"(?:GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH) \S+ HTTP/1\.[01]\r\n")
_HTTP1_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5]\d\d[ \r]")
# Frame types counted and skipped without reading their payload: PRIORITY, WINDOW_UPDATE
# and every extension type.
_COUNTED_ONLY = frozenset([PRIORITY, WINDOW_UPDATE, *range(CONTINUATION + 1, 256)])
_HEADER_BLOCK_TYPES = frozenset([HEADERS, CONTINUATION, PUSH_PROMISE])


def _plausible_tls_records(data: bytes) -> bool:
    """A segment that starts with a TLS application data record (an HTTP/2 frame header
    cannot: its length would be over a megabyte), followed by another record or by the
    end of the segment."""
    if len(data) < 5 or data[0] != TLS_APPLICATION_DATA or data[1] != 3 or data[2] > 4:
        return False
    end = 5 + (data[3] << 8 | data[4])
    if end > MAX_TLS_RECORD + 5:
        return False
    if end >= len(data):
        return True
    nxt = data[end:end + 3]
    return len(nxt) < 3 or (TLS_CHANGE_CIPHER_SPEC <= nxt[0] <= TLS_HEARTBEAT and nxt[1] == 3)


def printable(raw: bytes, limit: int = MAX_TEXT) -> str:
    """Text for storage: UTF-8 where it decodes, control characters escaped, bounded."""
    text = raw[:limit].decode("utf-8", "replace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class Http2Context:
    """What all connections of one run share: options, the HPACK memo, the run's outbox."""

    def __init__(self, outbox: Outbox, *, decode_server_headers: bool = False):
        self.outbox = outbox
        self.decode_server_headers = decode_server_headers
        self.memo = HpackMemo()
        # Decoded request fields -> (method, authority, user-agent) as stored text. The
        # memo hands out the same field tuples again and again.
        self.requests: dict[Fields, tuple[str, str | None, str | None]] = {}
        self.settings: dict[bytes, tuple[tuple[int, int], ...]] = {}

    def settings_values(self, payload: bytes) -> tuple[tuple[int, int], ...]:
        """The (identifier, value) pairs of a SETTINGS payload, shared between connections:
        every client of one implementation sends the same ones, and an open connection
        keeps them (a tuple of tuples of ints costs about 300 bytes each time)."""
        values = self.settings.get(payload)
        if values is None:
            values = tuple(
                (payload[i] << 8 | payload[i + 1], int.from_bytes(payload[i + 2:i + 6], "big"))
                for i in range(0, len(payload) - 5, 6)
            )
            if len(self.settings) >= MAX_REQUEST_TEXTS:
                self.settings.clear()
            self.settings[payload] = values
        return values

    def request_text(self, fields: Fields) -> tuple[str, str | None, str | None]:
        path = authority = agent = None
        for name, value in fields:
            if name == b":path":
                path = printable(value)
            elif name == b":authority":
                authority = printable(value)
            elif name == b"user-agent":
                agent = printable(value)
        text = (path if path is not None else NO_PATH, authority, agent)
        if len(self.requests) >= MAX_REQUEST_TEXTS:
            self.requests.clear()
        self.requests[fields] = text
        return text

    def observer(self, budget: Budget) -> Http2Observer:
        """A new connection's observer (tracer.tcp.flow.ObserverFactory)."""
        return Http2Observer(self, budget)


class Http2Observer(StreamObserver):
    """Both directions of one connection and what they said: the summary the record is
    built from. It holds the run's context and the connection's event budget, and nothing
    that points back at the connection or the table."""

    __slots__ = (
        "authority",
        "budget",
        "client_settings",
        "client_settings_ack_ts",
        "client_settings_ts",
        "connect_pending",
        "ctx",
        "data_frames",
        "first_method",
        "first_rpc_ts",
        "goaway_debug",
        "goaway_error",
        "goaway_last_stream_id",
        "goaway_sender",
        "goaway_ts",
        "goaways",
        "grpc_errors",
        "grpc_statuses",
        "last_rpc_ts",
        "methods",
        "orig",
        "pings_orig",
        "pings_resp",
        "preface_ts",
        "protocol",
        "resp",
        "rst_streams",
        "server_settings",
        "server_settings_ack_ts",
        "server_settings_ts",
        "streams",
        "tls_alpn",
        "tls_records_orig",
        "tls_records_resp",
        "tls_sni",
        "trailers",
        "upgraded",
        "user_agent",
        "window_updates",
    )

    def __init__(self, ctx: Http2Context, budget: Budget) -> None:
        self.ctx = ctx
        self.budget = budget
        self.protocol: str | None = None  # h2c, tls, http1, unknown
        self.preface_ts: float | None = None
        self.client_settings_ts: float | None = None
        self.server_settings_ts: float | None = None
        self.client_settings: tuple[tuple[int, int], ...] | None = None
        self.server_settings: tuple[tuple[int, int], ...] | None = None
        self.client_settings_ack_ts: float | None = None  # the client acknowledging the server's
        self.server_settings_ack_ts: float | None = None
        self.streams = 0
        self.first_rpc_ts: float | None = None
        self.last_rpc_ts: float | None = None
        self.first_method: str | None = None
        self.methods: dict[str, int] | None = None
        self.authority: str | None = None
        self.user_agent: str | None = None
        self.pings_orig = 0
        self.pings_resp = 0
        self.goaways = 0
        self.goaway_sender: str | None = None
        self.goaway_ts: float | None = None
        self.goaway_last_stream_id: int | None = None
        self.goaway_error: int | None = None
        self.goaway_debug: str | None = None
        self.rst_streams = 0
        self.trailers = 0
        self.grpc_errors = 0
        self.grpc_statuses: dict[int, int] | None = None  # decoded grpc-status -> count
        self.data_frames = 0
        self.window_updates = 0
        self.tls_sni: str | None = None
        self.tls_alpn: str | None = None
        self.tls_records_orig = 0  # application data records each way
        self.tls_records_resp = 0
        self.upgraded = False
        self.connect_pending = False
        self.orig = Direction(True, True)
        self.resp = Direction(False, ctx.decode_server_headers)

    # -- StreamObserver ---------------------------------------------------------------

    def data(self, from_client: bool, ts: float, payload: bytes) -> bool:
        return (self.orig if from_client else self.resp).feed(self, ts, payload)

    def gap(self, from_client: bool, ts: float, missed: int) -> None:
        (self.orig if from_client else self.resp).gap(self, ts, missed)

    def lost_start(self, ts: float) -> None:
        self.orig.lost_start(ts)
        self.resp.lost_start(ts)

    def finish(self, ts: float) -> None:
        for d in (self.orig, self.resp):
            d.pending = b""
            d.hblock = None

    def can_sleep(self) -> bool:
        return all(not d.pending and not d.skip and d.hblock is None
                   for d in (self.orig, self.resp))

    def sleep_state(self) -> tuple[bytes, tuple[Any, ...]]:
        blob, refs = _OBSERVER_LAYOUT.pack(self)
        parts = [blob]
        for d in (self.orig, self.resp):
            b, r = _DIRECTION_LAYOUT.pack(d)
            parts.append(b)
            # A shared HPACK table state is all a sleeping direction needs to keep.
            hp = d.hpack
            refs += r + ((hp.state if hp is not None and hp.state is not None else hp),)
        return b"".join(parts), refs

    def wake_state(self, blob: bytes, offset: int, refs: tuple[Any, ...],
                   ref_offset: int) -> None:
        offset, ref_offset = _OBSERVER_LAYOUT.unpack(self, blob, offset, refs, ref_offset)
        for d in (self.orig, self.resp):
            offset, ref_offset = _DIRECTION_LAYOUT.unpack(d, blob, offset, refs, ref_offset)
            hp = refs[ref_offset]
            ref_offset += 1
            if isinstance(hp, TableState):
                hp = HpackDirection(self.ctx.memo, hp)
            d.hpack = hp

    def anomaly(self, ts: float, reason: str, detail: str = "") -> None:
        self.ctx.outbox.anomaly(ts, self.budget.uid, reason, detail)

    def add_method(self, method: str) -> None:
        """Count one request's method. While every request had the first method, no dict
        is kept (``methods`` None: the streams count says how many)."""
        if self.first_method is None:
            self.first_method = method
            return
        methods = self.methods
        if methods is None:
            if method == self.first_method:
                return
            self.methods = {self.first_method: self.streams - 1, method: 1}
        elif method in methods:
            methods[method] += 1
        elif len(methods) < MAX_METHODS:
            methods[method] = 1
        else:
            methods[OTHER_METHODS] = methods.get(OTHER_METHODS, 0) + 1

    def saw_frames(self) -> None:
        if self.protocol != "h2c":
            self.protocol = "h2c"


_OBSERVER_LAYOUT = Layout([
    ("preface_ts", FLOAT), ("client_settings_ts", FLOAT), ("server_settings_ts", FLOAT),
    ("client_settings_ack_ts", FLOAT), ("server_settings_ack_ts", FLOAT), ("streams", COUNT),
    ("pings_orig", COUNT), ("pings_resp", COUNT), ("goaways", COUNT), ("goaway_ts", FLOAT),
    ("goaway_last_stream_id", SEQ), ("goaway_error", SEQ), ("rst_streams", COUNT),
    ("trailers", COUNT), ("grpc_errors", COUNT), ("data_frames", BIG), ("window_updates", BIG),
    ("upgraded", FLAG), ("connect_pending", FLAG), ("first_rpc_ts", FLOAT),
    ("tls_records_orig", BIG), ("tls_records_resp", BIG),
    ("last_rpc_ts", FLOAT), ("grpc_statuses", REF), ("protocol", REF),
    ("client_settings", REF), ("server_settings", REF),
    ("first_method", REF), ("methods", REF), ("authority", REF), ("user_agent", REF),
    ("goaway_sender", REF), ("goaway_debug", REF), ("tls_sni", REF), ("tls_alpn", REF),
])
# Not packed: pending (empty), skip (0) and hblock (None) are what can_sleep requires.
_DIRECTION_LAYOUT = Layout([
    ("mode", BYTE), ("skip_type", BYTE), ("max_frame", COUNT), ("hstream", COUNT),
    ("hflags", BYTE), ("htype", BYTE), ("last_sid", COUNT), ("body_left", BIG),
    ("settings_seen", FLAG), ("settings_acked", FLAG), ("size_warned", FLAG),
    ("unknown_label", REF),
])

class Direction:
    """One direction's parser: mode, partial frame, skip count, header block, HPACK context."""

    __slots__ = (
        "body_left",
        "decode_headers",
        "dir",
        "hblock",
        "hflags",
        "hpack",
        "hstream",
        "htype",
        "is_client",
        "last_sid",
        "max_frame",
        "mode",
        "pending",
        "settings_acked",
        "settings_seen",
        "size_warned",
        "skip",
        "skip_type",
        "unknown_label",
    )

    def __init__(self, is_client: bool, decode_headers: bool) -> None:
        self.is_client = is_client
        self.dir = ORIG if is_client else RESP
        self.mode = DETECT
        self.pending = b""
        self.skip = 0
        self.skip_type = DATA
        # Largest frame this side may send: the peer's SETTINGS_MAX_FRAME_SIZE.
        self.max_frame = DEFAULT_MAX_FRAME_SIZE
        self.hpack: HpackDirection | None = None
        self.unknown_label: str | None = None  # None while the HPACK table is known
        self.decode_headers = decode_headers
        self.hblock: bytes | None = None  # header block collected across CONTINUATION
        self.hstream = 0
        self.hflags = 0
        self.htype = HEADERS
        self.last_sid = 0
        self.body_left = 0
        self.settings_seen = False
        self.settings_acked = False
        self.size_warned = False

    # -- the stream, by mode -------------------------------------------------------------

    def feed(self, obs: Http2Observer, ts: float, data: bytes) -> bool:
        """In-order bytes of this direction, to the parser of the current mode; True when
        they were activity (see StreamObserver.data)."""
        mode = self.mode
        if mode == FRAMES:
            return self._frames(obs, ts, data)
        if mode == TLS_RECORDS:
            return self._tls_records(obs, ts, data)
        if mode == DETECT:
            return self._detect(obs, ts, data)
        if mode == RESYNC:
            return self._resync(obs, ts, data)
        if mode == HTTP1:
            return self._http1(obs, ts, data)
        if mode == TLS:
            return self._tls(obs, ts, data)
        return False  # IGNORE

    def _set_mode(self, mode: int) -> None:
        """Change mode: only along TRANSITIONS (a change not listed there is a bug)."""
        if mode != self.mode:
            assert (self.mode, mode) in TRANSITIONS, (MODE_NAMES[self.mode], MODE_NAMES[mode])
            self.mode = mode

    def lost_start(self, ts: float) -> None:
        self._set_mode(RESYNC)
        self.unknown_label = UNKNOWN_PRE_EXISTING

    def gap(self, obs: Http2Observer, ts: float, missed: int) -> None:
        mode = self.mode
        if mode == FRAMES:
            if self.skip >= missed:
                self.skip -= missed
                return
            pending = self.pending
            if len(pending) >= 9:
                lt, _flags, sid = FRAME_HEADER.unpack_from(pending, 0)
                remaining = 9 + (lt >> 8) - len(pending)
                if missed <= remaining:
                    # Only this frame's payload is lost; framing holds.
                    self.pending = b""
                    self.skip = remaining - missed
                    ftype = lt & 0xFF
                    if ftype in (HEADERS, CONTINUATION, PUSH_PROMISE):
                        if ftype == HEADERS and self.is_client:
                            self._count_request(obs, ts, sid & 0x7FFFFFFF, UNKNOWN_GAP)
                        self._drop_block(obs, ts, UNKNOWN_GAP)
                    return
            self._lose_sync(obs, ts)
        elif mode == HTTP1:
            if self.body_left >= missed and not self.pending:
                self.body_left -= missed
            else:
                self._set_mode(IGNORE)
        elif mode == TLS_RECORDS:
            if self.skip >= missed and not self.pending:
                self.skip -= missed  # inside one record's body: the records hold
            else:
                self.pending = b""
                self._lose_sync(obs, ts)
        elif mode in (DETECT, TLS):
            self.pending = b""
            self._lose_sync(obs, ts)

    def finish(self, ts: float) -> None:
        self.pending = b""

    # -- helpers ----------------------------------------------------------------------

    def _lose_table(self, label: str) -> None:
        if self.hpack is not None:
            self.hpack.reset()
        self.unknown_label = label

    def _drop_block(self, obs: Http2Observer, ts: float, label: str) -> None:
        """A header block (or the rest of one) is lost: the request still counts, the HPACK
        table is unknown from here."""
        if self.hblock is not None and self.htype == HEADERS and self.is_client:
            self._count_request(obs, ts, self.hstream, label)
        self.hblock = None
        self._lose_table(label)

    def _lose_sync(self, obs: Http2Observer, ts: float) -> None:
        self._set_mode(RESYNC)
        self.pending = b""
        self.skip = 0
        self._drop_block(obs, ts, UNKNOWN_GAP)
        obs.budget.emit_frequent(FramingLost, ts, self.dir)

    def _decode(self, obs: Http2Observer, ts: float, block: bytes) -> Fields | None:
        hp = self.hpack
        if hp is None:
            hp = self.hpack = HpackDirection(obs.ctx.memo)
        try:
            return hp.decode(block)
        except HpackError as exc:
            if self.unknown_label is None:
                obs.anomaly(ts, "hpack_error", f"{self.dir} header block: {exc}")
                self.unknown_label = UNKNOWN_HPACK
            return None

    def _count_request(self, obs: Http2Observer, ts: float, sid: int, method: str) -> bool:
        """Count client HEADERS that open a new stream; False for trailers on an old one."""
        if sid <= self.last_sid or not sid & 1:
            return False
        self.last_sid = sid
        obs.streams += 1
        if obs.first_rpc_ts is None:
            obs.first_rpc_ts = ts
        obs.last_rpc_ts = ts
        obs.add_method(method)
        obs.budget.emit_frequent(RequestStarted, ts, self.dir, sid, method)
        return True

    # -- start of stream --------------------------------------------------------------

    def _detect(self, obs: Http2Observer, ts: float, data: bytes) -> bool:
        buf = self.pending + data if self.pending else data
        self.pending = b""
        if self.is_client:
            if buf.startswith(PREFACE):
                self._preface(obs, ts)
                self._set_mode(FRAMES)
                if len(buf) > len(PREFACE):
                    return self._frames(obs, ts, buf[len(PREFACE):])
                return False
            if (PREFACE.startswith(buf) or (len(buf) < 12 and buf.isalpha() and buf.isupper())
                    or (len(buf) < 3 and buf[:1] == b"\x16")):
                self.pending = buf  # a preface, an HTTP method or a TLS record still arriving
                return False
            if _HTTP1_REQUEST.match(buf):
                self._set_mode(HTTP1)
                return self._http1(obs, ts, buf)
        else:
            if buf.startswith(b"HTTP/"):
                self._set_mode(HTTP1)
                return self._http1(obs, ts, buf)
            if len(buf) < 9 and not looks_like_tls(buf):
                self.pending = buf  # a frame header or a status line still arriving
                return False
            if not looks_like_tls(buf):
                lt, _flags, sid = FRAME_HEADER.unpack_from(buf, 0)
                if (lt & 0xFF == SETTINGS and not sid) or plausible_chain(buf, self.max_frame):
                    self._set_mode(FRAMES)
                    obs.saw_frames()
                    return self._frames(obs, ts, buf)
        if looks_like_tls(buf):
            self._set_mode(TLS)
            return self._tls(obs, ts, buf)
        if obs.protocol is None:
            obs.protocol = "unknown"
        self._set_mode(IGNORE)
        return False

    def _preface(self, obs: Http2Observer, ts: float) -> None:
        if obs.preface_ts is None:
            obs.preface_ts = ts
        obs.saw_frames()
        # A preface is the start of the HTTP/2 stream: the HPACK table is known from here.
        self.unknown_label = None
        if self.hpack is not None:
            self.hpack.reset()
        obs.budget.emit(PrefaceReceived, ts, self.dir)

    def _resync(self, obs: Http2Observer, ts: float, data: bytes) -> bool:
        if self.is_client and data.startswith(PREFACE):
            self._preface(obs, ts)
            self._set_mode(FRAMES)
            if len(data) > len(PREFACE):
                return self._frames(obs, ts, data[len(PREFACE):])
            return False
        if self.is_client and PREFACE.startswith(data):
            self._set_mode(DETECT)  # a preface cut across segments
            self.pending = data
            return False
        if (self.is_client and _HTTP1_REQUEST_LINE.match(data)) or (
            not self.is_client and _HTTP1_STATUS_LINE.match(data)
        ):
            # A whole HTTP/1 request or status line at a segment start (an h2c upgrade or
            # a CONNECT picked up mid-stream): it starts a stream of its own.
            self._set_mode(HTTP1)
            return self._http1(obs, ts, data)
        if _plausible_tls_records(data):
            # TLS picked up mid-stream (or after a gap): its records are still counted.
            obs.protocol = "tls"
            self._set_mode(TLS_RECORDS)
            obs.budget.emit_frequent(FramingRegained, ts, self.dir)
            return self._tls_records(obs, ts, data)
        if plausible_chain(data, self.max_frame):
            self._set_mode(FRAMES)
            obs.saw_frames()
            obs.budget.emit_frequent(FramingRegained, ts, self.dir)
            return self._frames(obs, ts, data)
        return False

    # -- frames -----------------------------------------------------------------------

    def _frames(self, obs: Http2Observer, ts: float, data: bytes) -> bool:
        skip = self.skip
        if skip:
            n = len(data)
            if skip >= n:
                self.skip = skip - n
                return self.skip_type == DATA
            data = data[skip:]
            self.skip = 0
        if self.pending:
            data = self.pending + data
            self.pending = b""
        n = len(data)
        pos = 0
        unpack = FRAME_HEADER.unpack_from
        active = False
        max_frame = self.max_frame
        decode_headers = self.decode_headers
        while n - pos >= 9:
            lt, flags, sid = unpack(data, pos)
            length = lt >> 8
            ftype = lt & 0xFF
            end = pos + 9 + length
            if length > max_frame or self.hblock is not None:
                if length > max_frame and not self.size_warned:
                    self._oversized(obs, ts, ftype, length)
                if self.hblock is not None and ftype != CONTINUATION:
                    self._continuation_broken(obs, ts, ftype)
            if ftype == DATA:
                obs.data_frames += 1
                active = True
                if sid > self.last_sid and self.is_client and sid & 1:
                    # A stream opened before the capture or a gap: its next client
                    # HEADERS are trailers, not a request.
                    self.last_sid = sid & 0x7FFFFFFF
            elif ftype in _COUNTED_ONLY:
                if ftype == WINDOW_UPDATE:
                    obs.window_updates += 1
                active = True
            elif ftype in _HEADER_BLOCK_TYPES and not decode_headers:
                active = True
                if ftype == HEADERS:
                    self._headers_not_decoded(obs, ts, flags, sid & 0x7FFFFFFF)
            elif length > MAX_BUFFERED:
                self._too_big(obs, ts, ftype, flags, sid & 0x7FFFFFFF, length)
                active = True
            elif end > n:
                break  # a frame we read, still arriving: kept in pending below
            else:
                if ftype == HEADERS:
                    self._headers(obs, ts, ftype, flags, sid & 0x7FFFFFFF, data, pos + 9, end)
                    active = True
                elif ftype == PING:
                    self._ping(obs, ts, flags, data, pos + 9, end)
                elif ftype == SETTINGS:
                    self._settings(obs, ts, flags, data, pos + 9, end)
                    active = True
                elif ftype == CONTINUATION:
                    self._continuation(obs, ts, flags, sid & 0x7FFFFFFF, data[pos + 9:end])
                    active = True
                elif ftype == GOAWAY:
                    self._goaway(obs, ts, data, pos + 9, end)
                    active = True
                elif ftype == RST_STREAM:
                    self._rst_stream(obs, ts, sid & 0x7FFFFFFF, data, pos + 9, end)
                    active = True
                else:  # PUSH_PROMISE
                    self._headers(obs, ts, ftype, flags, sid & 0x7FFFFFFF, data, pos + 9, end)
                    active = True
                pos = end
                continue
            # A frame that is counted and skipped, not read.
            if end > n:
                self.skip = end - n
                self.skip_type = ftype
                pos = n
                break
            pos = end
        if pos < n:
            self.pending = data[pos:]
        return active

    def _oversized(self, obs: Http2Observer, ts: float, ftype: int, length: int) -> None:
        self.size_warned = True
        obs.anomaly(
            ts, "frame_exceeds_max_frame_size",
            f"{self.dir} {FRAME_NAMES.get(ftype, ftype)} frame of {length} bytes, "
            f"peer allows {self.max_frame}",
        )

    def _too_big(self, obs: Http2Observer, ts: float, ftype: int, flags: int, sid: int, length: int) -> None:
        obs.anomaly(
            ts, "frame_too_large_to_inspect",
            f"{self.dir} {FRAME_NAMES.get(ftype, ftype)} frame of {length} bytes skipped",
        )
        if ftype in (HEADERS, CONTINUATION, PUSH_PROMISE):
            if ftype == HEADERS and self.is_client:
                self._count_request(obs, ts, sid, UNKNOWN_HPACK)
            self._drop_block(obs, ts, UNKNOWN_HPACK)

    def _continuation_broken(self, obs: Http2Observer, ts: float, ftype: int) -> None:
        obs.anomaly(
            ts, "continuation_expected",
            f"{self.dir} {FRAME_NAMES.get(ftype, ftype)} frame inside a header block "
            f"on stream {self.hstream}",
        )
        self._drop_block(obs, ts, UNKNOWN_HPACK)

    def _headers(
        self, obs: Http2Observer, ts: float, ftype: int, flags: int, sid: int, data: bytes, start: int, end: int
    ) -> None:
        p = start
        e = end
        if flags & FLAG_PADDED:
            if e - p < 1 or data[p] > e - p - 1:
                obs.anomaly(ts, "bad_padding", f"{self.dir} {FRAME_NAMES[ftype]} padding")
                self._lose_table(UNKNOWN_HPACK)
                return
            e -= data[p]
            p += 1
        if ftype == PUSH_PROMISE:
            p += 4
        elif flags & FLAG_PRIORITY:
            p += 5
        if p > e:
            obs.anomaly(ts, "bad_headers_frame", f"{self.dir} {FRAME_NAMES[ftype]} too short")
            self._lose_table(UNKNOWN_HPACK)
            return
        fragment = data[p:e]
        if not flags & FLAG_END_HEADERS:
            self.hblock = fragment
            self.hstream = sid
            self.hflags = flags
            self.htype = ftype
            return
        self._header_block(obs, ts, ftype, flags, sid, fragment)

    def _continuation(self, obs: Http2Observer, ts: float, flags: int, sid: int, fragment: bytes) -> None:
        if self.hblock is None or sid != self.hstream:
            obs.anomaly(
                ts, "unexpected_continuation", f"{self.dir} CONTINUATION on stream {sid}"
            )
            self._lose_table(UNKNOWN_HPACK)
            self.hblock = None
            return
        block = self.hblock + fragment
        if len(block) > MAX_BUFFERED:
            obs.anomaly(
                ts, "frame_too_large_to_inspect",
                f"{self.dir} header block of over {MAX_BUFFERED} bytes skipped",
            )
            self._drop_block(obs, ts, UNKNOWN_HPACK)
            return
        if flags & FLAG_END_HEADERS:
            self.hblock = None
            self._header_block(obs, ts, self.htype, self.hflags, sid, block)
        else:
            self.hblock = block

    def _header_block(self, obs: Http2Observer, ts: float, ftype: int, flags: int, sid: int, block: bytes) -> None:
        fields = self._decode(obs, ts, block)
        if ftype == PUSH_PROMISE:
            return
        if self.is_client:
            if fields is None:
                self._count_request(obs, ts, sid, self.unknown_label or UNKNOWN_HPACK)
                return
            request = obs.ctx.requests.get(fields)
            if request is None:
                request = obs.ctx.request_text(fields)
            method, authority, agent = request
            if flags & FLAG_END_STREAM and method == NO_PATH:
                return  # client trailers on a stream opened earlier, not a request
            if self._count_request(obs, ts, sid, method):
                if obs.authority is None:
                    obs.authority = authority
                if obs.user_agent is None:
                    obs.user_agent = agent
            return
        if not flags & FLAG_END_STREAM:
            return
        status: int | None = None
        message: str | None = None
        if fields is not None:
            for name, value in fields:
                if name == b"grpc-status":
                    try:
                        status = int(value)
                    except ValueError:
                        obs.anomaly(ts, "bad_grpc_status", printable(value, 32))
                elif name == b"grpc-message":
                    message = printable(value)
        obs.trailers += 1
        if status is not None:
            statuses = obs.grpc_statuses
            if statuses is None:
                statuses = obs.grpc_statuses = {}
            if status in statuses or len(statuses) < MAX_STATUSES:
                statuses[status] = statuses.get(status, 0) + 1
        if status:
            obs.grpc_errors += 1
        obs.budget.emit_frequent(TrailersReceived, ts, self.dir, sid, status, message)

    def _headers_not_decoded(self, obs: Http2Observer, ts: float, flags: int, sid: int) -> None:
        # Trailers are counted; without decoding there is no status, and no event.
        if flags & FLAG_END_STREAM and not self.is_client:
            obs.trailers += 1

    def _settings(self, obs: Http2Observer, ts: float, flags: int, data: bytes, start: int, end: int) -> None:
        if flags & FLAG_ACK:
            if self.settings_acked:
                obs.budget.emit_frequent(SettingsAcknowledged, ts, self.dir)
                return
            self.settings_acked = True
            if self.is_client:
                obs.client_settings_ack_ts = ts
            else:
                obs.server_settings_ack_ts = ts
            obs.budget.emit(SettingsAcknowledged, ts, self.dir, True)
            return
        length = end - start
        if length % 6:
            obs.anomaly(ts, "bad_settings_length", f"{self.dir} SETTINGS of {length} bytes")
            return
        values = obs.ctx.settings_values(data[start:end])
        peer = obs.resp if self.is_client else obs.orig
        for key, value in values:
            if key == SETTINGS_MAX_FRAME_SIZE and 16384 <= value <= MAX_FRAME_SIZE_LIMIT:
                peer.max_frame = value
        if self.settings_seen or self.unknown_label == UNKNOWN_PRE_EXISTING:
            obs.budget.emit_frequent(SettingsReceived, ts, self.dir, values)
            return
        # The preface's SETTINGS (a direction picked up mid-stream never saw it).
        self.settings_seen = True
        if self.is_client:
            obs.client_settings = values
            obs.client_settings_ts = ts
        else:
            obs.server_settings = values
            obs.server_settings_ts = ts
        obs.budget.emit(SettingsReceived, ts, self.dir, values, True)

    def _ping(self, obs: Http2Observer, ts: float, flags: int, data: bytes, start: int, end: int) -> None:
        if end - start != 8:
            obs.anomaly(ts, "bad_ping_length", f"{self.dir} PING of {end - start} bytes")
            return
        opaque = int.from_bytes(data[start:end], "big")
        if flags & FLAG_ACK:
            obs.budget.emit_frequent(PingAcknowledged, ts, self.dir, opaque)
            return
        if self.is_client:
            obs.pings_orig += 1
        else:
            obs.pings_resp += 1
        obs.budget.emit_frequent(PingSent, ts, self.dir, opaque)

    def _goaway(self, obs: Http2Observer, ts: float, data: bytes, start: int, end: int) -> None:
        if end - start < 8:
            obs.anomaly(ts, "bad_goaway_length", f"{self.dir} GOAWAY of {end - start} bytes")
            return
        last = int.from_bytes(data[start:start + 4], "big") & 0x7FFFFFFF
        code = int.from_bytes(data[start + 4:start + 8], "big")
        debug = printable(data[start + 8:min(end, start + 8 + GOAWAY_DEBUG_BYTES)])
        obs.goaways += 1
        if obs.goaway_sender is None:
            obs.goaway_sender = self.dir
            obs.goaway_ts = ts
        if obs.goaway_sender == self.dir:
            obs.goaway_last_stream_id = last
            obs.goaway_error = code
            obs.goaway_debug = debug or None
        obs.budget.emit(GoawaySent, ts, self.dir, last, code, debug)

    def _rst_stream(self, obs: Http2Observer, ts: float, sid: int, data: bytes, start: int, end: int) -> None:
        if end - start != 4:
            obs.anomaly(ts, "bad_rst_stream_length", f"{self.dir} RST_STREAM of {end - start}")
            return
        obs.rst_streams += 1
        code = int.from_bytes(data[start:end], "big")
        obs.budget.emit_frequent(StreamReset, ts, self.dir, sid, code)

    # -- HTTP/1.x (h2c upgrade, CONNECT tunnels, plain HTTP/1 on the port) --------------

    def _http1(self, obs: Http2Observer, ts: float, data: bytes) -> bool:
        buf = self.pending + data if self.pending else data
        self.pending = b""
        while buf:
            if self.body_left:
                take = min(self.body_left, len(buf))
                self.body_left -= take
                buf = buf[take:]
                continue
            if not self._starts_http1(buf):
                # Not another HTTP/1 message: whatever follows (an HTTP/2 preface after an
                # upgrade, a server's SETTINGS) starts a stream of its own.
                self._set_mode(DETECT)
                return self._detect(obs, ts, buf)
            idx = buf.find(b"\r\n\r\n")
            if idx < 0:
                if len(buf) > MAX_HTTP1_HEAD:
                    obs.anomaly(
                        ts, "http1_head_too_long", f"{self.dir} head over {MAX_HTTP1_HEAD} bytes"
                    )
                    self._set_mode(IGNORE)
                else:
                    self.pending = buf
                return False
            head, buf = buf[:idx], buf[idx + 4:]
            if self.is_client:
                self._http1_request(obs, ts, head)
            else:
                self._http1_response(obs, ts, head)
            if self.mode == IGNORE:
                return False
            if self.mode == DETECT:
                # After a 101 or a CONNECT's 2xx: a new stream starts right here.
                return self._detect(obs, ts, buf) if buf else False
        return False

    def _new_stream(self) -> None:
        """What follows starts a stream of its own (after a 101, in a CONNECT tunnel): its
        beginning is known, even on a connection picked up mid-stream."""
        self._set_mode(DETECT)
        self._lose_table(UNKNOWN_PRE_EXISTING)
        self.unknown_label = None

    def _starts_http1(self, buf: bytes) -> bool:
        """Whether ``buf`` can be (the start of) the next HTTP/1 message of this side."""
        if self.is_client:
            if PREFACE.startswith(buf[:len(PREFACE)]):
                return False
            return bool(_HTTP1_REQUEST.match(buf)) or (
                len(buf) < 11 and buf.isalpha() and buf.isupper())
        return buf.startswith(b"HTTP/"[:len(buf)]) if len(buf) < 5 else buf.startswith(b"HTTP/")

    def _http1_headers(self, head: bytes) -> tuple[list[bytes], dict[bytes, bytes]]:
        lines = head.split(b"\r\n")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return lines[0].split(b" ", 2), headers

    def _body(self, obs: Http2Observer, ts: float, headers: dict[bytes, bytes]) -> None:
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self._set_mode(IGNORE)
            return
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = -1
        if length < 0:
            obs.anomaly(ts, "bad_content_length", f"{self.dir} HTTP/1 head")
            self._set_mode(IGNORE)
            return
        self.body_left = length

    def _http1_request(self, obs: Http2Observer, ts: float, head: bytes) -> None:
        start, headers = self._http1_headers(head)
        method = printable(start[0], 16)
        target = printable(start[1]) if len(start) > 1 else ""
        upgrade = headers.get(b"upgrade", b"").lower()
        h2c = b"h2c" in upgrade
        obs.budget.emit(Http1RequestSeen, ts, self.dir, method, target, printable(upgrade, 32))
        if obs.protocol is None:
            obs.protocol = "http1"
        if b"host" in headers and obs.authority is None:
            obs.authority = printable(headers[b"host"])
        if b"user-agent" in headers and obs.user_agent is None:
            obs.user_agent = printable(headers[b"user-agent"])
        if method == "CONNECT":
            obs.connect_pending = True
            self._new_stream()  # the tunnel's first bytes follow
        elif h2c:
            # RFC 7540 3.2: the upgraded request is stream 1.
            obs.upgraded = True
            self._count_request(obs, ts, 1, target)
        self._body(obs, ts, headers)

    def _http1_response(self, obs: Http2Observer, ts: float, head: bytes) -> None:
        start, headers = self._http1_headers(head)
        try:
            status = int(start[1]) if len(start) > 1 else 0
        except ValueError:
            status = 0
        obs.budget.emit(Http1ResponseSeen, ts, self.dir, status)
        if status == 101:
            self._new_stream()  # HTTP/2 frames follow (server preface first)
            return
        if 100 <= status < 200:
            return  # 100 Continue: the real response follows
        if obs.connect_pending and 200 <= status < 300:
            obs.connect_pending = False
            self._new_stream()  # a tunnel: whatever follows starts a new stream
            return
        if status in (204, 304):
            return
        self._body(obs, ts, headers)

    # -- TLS --------------------------------------------------------------------------

    def _tls_records(self, obs: Http2Observer, ts: float, data: bytes) -> bool:
        """Walk TLS record headers: application data records are what the connection
        carries (RPCs are encrypted: how many records each way and when is all there is
        to see), and they make it active."""
        skip = self.skip
        n = len(data)
        pos = 0
        if skip:
            if skip >= n:
                self.skip = skip - n
                return False
            pos = skip
            self.skip = 0
        if self.pending:
            data = self.pending + data[pos:]
            self.pending = b""
            n = len(data)
            pos = 0
        app = 0
        while pos + 5 <= n:
            ctype = data[pos]
            length = data[pos + 3] << 8 | data[pos + 4]
            if (not TLS_CHANGE_CIPHER_SPEC <= ctype <= TLS_HEARTBEAT or data[pos + 1] != 3
                    or length > MAX_TLS_RECORD):
                obs.anomaly(ts, "tls_record_desync",
                            f"{self.dir} record header {data[pos:pos + 5].hex()}")
                self._lose_sync(obs, ts)
                break
            if ctype == TLS_APPLICATION_DATA:
                app += 1
            end = pos + 5 + length
            if end > n:
                self.skip = end - n
                pos = n
                break
            pos = end
        if pos < n and self.mode == TLS_RECORDS:
            self.pending = data[pos:]
        if app:
            if self.is_client:
                obs.tls_records_orig += app
            else:
                obs.tls_records_resp += app
            return True
        return False

    def _tls(self, obs: Http2Observer, ts: float, data: bytes) -> bool:
        buf = self.pending + data if self.pending else data
        self.pending = b""
        obs.protocol = "tls"
        try:
            hello = parse_hello(buf)
        except NeedMoreData:
            if len(buf) > MAX_TLS_HELLO:
                obs.anomaly(ts, "tls_hello_too_long", f"{self.dir} over {MAX_TLS_HELLO} bytes")
                self._set_mode(IGNORE)
            else:
                self.pending = buf
            return False
        except NotTls as exc:
            obs.anomaly(ts, "bad_tls_hello", f"{self.dir}: {exc}")
            self._set_mode(IGNORE)
            return False
        alpn = ",".join(hello.alpn)
        # From the start of what was buffered: the hello's own records are handshake
        # records, the ones after it are counted.
        self._set_mode(TLS_RECORDS)
        active = self._tls_records(obs, ts, buf)
        if hello.kind == HANDSHAKE_CLIENT_HELLO:
            obs.tls_sni = hello.sni or None
            if obs.tls_alpn is None:
                obs.tls_alpn = alpn or None
            obs.budget.emit(TlsClientHelloSeen, ts, self.dir, hello.sni, alpn)
        else:
            if alpn:
                obs.tls_alpn = alpn  # the server's choice beats the client's offer
            obs.budget.emit(TlsServerHelloSeen, ts, self.dir, alpn)
        return active
