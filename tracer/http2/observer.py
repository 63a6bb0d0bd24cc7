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

from typing import Any

from tracer.events import (
    ORIG,
    RESP,
    FramingLost,
    FramingRegained,
    GoawaySent,
    PingAcknowledged,
    PingSent,
    PrefaceReceived,
    RequestStarted,
    SettingsAcknowledged,
    SettingsReceived,
    StreamReset,
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
from tracer.http2.http1 import (
    HTTP1_REQUEST,
    HTTP1_REQUEST_LINE,
    HTTP1_STATUS_LINE,
    UNKNOWN_PRE_EXISTING,
    http1_data,
)
from tracer.http2.modes import (
    DETECT,
    FRAMES,
    HTTP1,
    IGNORE,
    MODE_NAMES,
    RESYNC,
    TLS,
    TLS_RECORDS,
    TRANSITIONS,
)
from tracer.http2.text import printable
from tracer.http2.tls import looks_like_tls, plausible_tls_records, tls_hello, tls_records
from tracer.outbox import Budget, Outbox
from tracer.sleep import BIG, BYTE, COUNT, FLAG, FLOAT, REF, SEQ, Layout
from tracer.tcp.flow import StreamObserver

MAX_BUFFERED = 1 << 16  # largest control frame or header block kept for decoding
MAX_METHODS = 32  # distinct methods remembered per connection; the rest are "(other)"
MAX_STATUSES = 32  # distinct grpc-status values counted per connection (0..16 are defined)
MAX_REQUEST_TEXTS = 4096
GOAWAY_DEBUG_BYTES = 64

NO_PATH = "(no :path)"
UNKNOWN_GAP = "unknown (gap)"
UNKNOWN_HPACK = "unknown (hpack error)"
OTHER_METHODS = "(other)"

# Frame types counted and skipped without reading their payload: PRIORITY, WINDOW_UPDATE
# and every extension type.
_COUNTED_ONLY = frozenset([PRIORITY, WINDOW_UPDATE, *range(CONTINUATION + 1, 256)])
_HEADER_BLOCK_TYPES = frozenset([HEADERS, CONTINUATION, PUSH_PROMISE])


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
            return tls_records(self, obs, ts, data)
        if mode == DETECT:
            return self.detect(obs, ts, data)
        if mode == RESYNC:
            return self._resync(obs, ts, data)
        if mode == HTTP1:
            return http1_data(self, obs, ts, data)
        if mode == TLS:
            return tls_hello(self, obs, ts, data)
        return False  # IGNORE

    def set_mode(self, mode: int) -> None:
        """Change mode: only along TRANSITIONS (a change not listed there is a bug)."""
        if mode != self.mode:
            assert (self.mode, mode) in TRANSITIONS, (MODE_NAMES[self.mode], MODE_NAMES[mode])
            self.mode = mode

    def lost_start(self, ts: float) -> None:
        self.set_mode(RESYNC)
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
                            self.count_request(obs, ts, sid & 0x7FFFFFFF, UNKNOWN_GAP)
                        self._drop_block(obs, ts, UNKNOWN_GAP)
                    return
            self.lose_sync(obs, ts)
        elif mode == HTTP1:
            if self.body_left >= missed and not self.pending:
                self.body_left -= missed
            else:
                self.set_mode(IGNORE)
        elif mode == TLS_RECORDS:
            if self.skip >= missed and not self.pending:
                self.skip -= missed  # inside one record's body: the records hold
            else:
                self.pending = b""
                self.lose_sync(obs, ts)
        elif mode in (DETECT, TLS):
            self.pending = b""
            self.lose_sync(obs, ts)

    def finish(self, ts: float) -> None:
        self.pending = b""

    # -- helpers ----------------------------------------------------------------------

    def lose_table(self, label: str) -> None:
        if self.hpack is not None:
            self.hpack.reset()
        self.unknown_label = label

    def _drop_block(self, obs: Http2Observer, ts: float, label: str) -> None:
        """A header block (or the rest of one) is lost: the request still counts, the HPACK
        table is unknown from here."""
        if self.hblock is not None and self.htype == HEADERS and self.is_client:
            self.count_request(obs, ts, self.hstream, label)
        self.hblock = None
        self.lose_table(label)

    def lose_sync(self, obs: Http2Observer, ts: float) -> None:
        self.set_mode(RESYNC)
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

    def count_request(self, obs: Http2Observer, ts: float, sid: int, method: str) -> bool:
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

    def detect(self, obs: Http2Observer, ts: float, data: bytes) -> bool:
        buf = self.pending + data if self.pending else data
        self.pending = b""
        if self.is_client:
            if buf.startswith(PREFACE):
                self._preface(obs, ts)
                self.set_mode(FRAMES)
                if len(buf) > len(PREFACE):
                    return self._frames(obs, ts, buf[len(PREFACE):])
                return False
            if (PREFACE.startswith(buf) or (len(buf) < 12 and buf.isalpha() and buf.isupper())
                    or (len(buf) < 3 and buf[:1] == b"\x16")):
                self.pending = buf  # a preface, an HTTP method or a TLS record still arriving
                return False
            if HTTP1_REQUEST.match(buf):
                self.set_mode(HTTP1)
                return http1_data(self, obs, ts, buf)
        else:
            if buf.startswith(b"HTTP/"):
                self.set_mode(HTTP1)
                return http1_data(self, obs, ts, buf)
            if len(buf) < 9 and not looks_like_tls(buf):
                self.pending = buf  # a frame header or a status line still arriving
                return False
            if not looks_like_tls(buf):
                lt, _flags, sid = FRAME_HEADER.unpack_from(buf, 0)
                if (lt & 0xFF == SETTINGS and not sid) or plausible_chain(buf, self.max_frame):
                    self.set_mode(FRAMES)
                    obs.saw_frames()
                    return self._frames(obs, ts, buf)
        if looks_like_tls(buf):
            self.set_mode(TLS)
            return tls_hello(self, obs, ts, buf)
        if obs.protocol is None:
            obs.protocol = "unknown"
        self.set_mode(IGNORE)
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
            self.set_mode(FRAMES)
            if len(data) > len(PREFACE):
                return self._frames(obs, ts, data[len(PREFACE):])
            return False
        if self.is_client and PREFACE.startswith(data):
            self.set_mode(DETECT)  # a preface cut across segments
            self.pending = data
            return False
        if (self.is_client and HTTP1_REQUEST_LINE.match(data)) or (
            not self.is_client and HTTP1_STATUS_LINE.match(data)
        ):
            # A whole HTTP/1 request or status line at a segment start (an h2c upgrade or
            # a CONNECT picked up mid-stream): it starts a stream of its own.
            self.set_mode(HTTP1)
            return http1_data(self, obs, ts, data)
        if plausible_tls_records(data):
            # TLS picked up mid-stream (or after a gap): its records are still counted.
            obs.protocol = "tls"
            self.set_mode(TLS_RECORDS)
            obs.budget.emit_frequent(FramingRegained, ts, self.dir)
            return tls_records(self, obs, ts, data)
        if plausible_chain(data, self.max_frame):
            self.set_mode(FRAMES)
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

    def _too_big(
        self, obs: Http2Observer, ts: float, ftype: int, flags: int, sid: int, length: int
    ) -> None:
        obs.anomaly(
            ts, "frame_too_large_to_inspect",
            f"{self.dir} {FRAME_NAMES.get(ftype, ftype)} frame of {length} bytes skipped",
        )
        if ftype in (HEADERS, CONTINUATION, PUSH_PROMISE):
            if ftype == HEADERS and self.is_client:
                self.count_request(obs, ts, sid, UNKNOWN_HPACK)
            self._drop_block(obs, ts, UNKNOWN_HPACK)

    def _continuation_broken(self, obs: Http2Observer, ts: float, ftype: int) -> None:
        obs.anomaly(
            ts, "continuation_expected",
            f"{self.dir} {FRAME_NAMES.get(ftype, ftype)} frame inside a header block "
            f"on stream {self.hstream}",
        )
        self._drop_block(obs, ts, UNKNOWN_HPACK)

    def _headers(
        self, obs: Http2Observer, ts: float, ftype: int, flags: int, sid: int, data: bytes,
        start: int, end: int,
    ) -> None:
        p = start
        e = end
        if flags & FLAG_PADDED:
            if e - p < 1 or data[p] > e - p - 1:
                obs.anomaly(ts, "bad_padding", f"{self.dir} {FRAME_NAMES[ftype]} padding")
                self.lose_table(UNKNOWN_HPACK)
                return
            e -= data[p]
            p += 1
        if ftype == PUSH_PROMISE:
            p += 4
        elif flags & FLAG_PRIORITY:
            p += 5
        if p > e:
            obs.anomaly(ts, "bad_headers_frame", f"{self.dir} {FRAME_NAMES[ftype]} too short")
            self.lose_table(UNKNOWN_HPACK)
            return
        fragment = data[p:e]
        if not flags & FLAG_END_HEADERS:
            self.hblock = fragment
            self.hstream = sid
            self.hflags = flags
            self.htype = ftype
            return
        self._header_block(obs, ts, ftype, flags, sid, fragment)

    def _continuation(
        self, obs: Http2Observer, ts: float, flags: int, sid: int, fragment: bytes
    ) -> None:
        if self.hblock is None or sid != self.hstream:
            obs.anomaly(
                ts, "unexpected_continuation", f"{self.dir} CONTINUATION on stream {sid}"
            )
            self.lose_table(UNKNOWN_HPACK)
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

    def _header_block(
        self, obs: Http2Observer, ts: float, ftype: int, flags: int, sid: int, block: bytes
    ) -> None:
        fields = self._decode(obs, ts, block)
        if ftype == PUSH_PROMISE:
            return
        if self.is_client:
            if fields is None:
                self.count_request(obs, ts, sid, self.unknown_label or UNKNOWN_HPACK)
                return
            request = obs.ctx.requests.get(fields)
            if request is None:
                request = obs.ctx.request_text(fields)
            method, authority, agent = request
            if flags & FLAG_END_STREAM and method == NO_PATH:
                return  # client trailers on a stream opened earlier, not a request
            if self.count_request(obs, ts, sid, method):
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

    def _settings(
        self, obs: Http2Observer, ts: float, flags: int, data: bytes, start: int, end: int
    ) -> None:
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

    def _ping(
        self, obs: Http2Observer, ts: float, flags: int, data: bytes, start: int, end: int
    ) -> None:
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

    def _rst_stream(
        self, obs: Http2Observer, ts: float, sid: int, data: bytes, start: int, end: int
    ) -> None:
        if end - start != 4:
            obs.anomaly(ts, "bad_rst_stream_length", f"{self.dir} RST_STREAM of {end - start}")
            return
        obs.rst_streams += 1
        code = int.from_bytes(data[start:end], "big")
        obs.budget.emit_frequent(StreamReset, ts, self.dir, sid, code)

