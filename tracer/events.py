"""The events the core emits: connection lifecycle, HTTP/2 control frames, TLS and anomalies.

Small frozen dataclasses with past-tense names. ``name`` is the stable key they are stored
under; it never changes once released. Every connection event carries the connection
``uid``, its ordinal ``n`` within the connection (so re-importing a capture rewrites the
same rows) and ``dir``: ``"orig"`` for the client side (the one that sent the SYN),
``"resp"`` for the server side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

ORIG = "orig"
RESP = "resp"

Detail = str | None
Code = int | None


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    name: ClassVar[str] = "event"
    ts: float
    uid: str
    n: int
    dir: str

    def columns(self) -> tuple[Code, Code, Code, Detail]:
        """(stream_id, code, value, detail) as stored in the events table."""
        return (None, None, None, None)


# -- TCP lifecycle ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SynSent(ConnectionEvent):
    """The first SYN of a side (retries are counted in the connection's syn_retries)."""

    name: ClassVar[str] = "syn"


@dataclass(frozen=True, slots=True)
class SynAckSent(ConnectionEvent):
    name: ClassVar[str] = "syn_ack"


@dataclass(frozen=True, slots=True)
class HandshakeCompleted(ConnectionEvent):
    name: ClassVar[str] = "established"


@dataclass(frozen=True, slots=True)
class PickedUpMidStream(ConnectionEvent):
    """First packet of a connection whose SYN was not captured."""

    name: ClassVar[str] = "mid_stream"


@dataclass(frozen=True, slots=True)
class FinSent(ConnectionEvent):
    name: ClassVar[str] = "fin"


@dataclass(frozen=True, slots=True)
class ResetSent(ConnectionEvent):
    name: ClassVar[str] = "rst"


@dataclass(frozen=True, slots=True)
class ContentGapSkipped(ConnectionEvent):
    name: ClassVar[str] = "gap"
    missed: int = 0

    def columns(self) -> tuple[Code, Code, Code, Detail]:
        return (None, None, self.missed, None)


@dataclass(frozen=True, slots=True)
class PortReused(ConnectionEvent):
    """A new SYN on this 4-tuple ended the connection without a captured FIN or RST."""

    name: ClassVar[str] = "port_reused"


# -- HTTP/2 ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrefaceReceived(ConnectionEvent):
    name: ClassVar[str] = "preface"


@dataclass(frozen=True, slots=True)
class SettingsReceived(ConnectionEvent):
    name: ClassVar[str] = "settings"
    settings: tuple[tuple[int, int], ...] = ()
    first: bool = False  # the first SETTINGS from this side (the HTTP/2 preface's)

    def columns(self) -> tuple[Code, Code, Code, Detail]:
        return (0, None, None, settings_text(self.settings))


@dataclass(frozen=True, slots=True)
class SettingsAcknowledged(ConnectionEvent):
    name: ClassVar[str] = "settings_ack"
    first: bool = False


@dataclass(frozen=True, slots=True)
class RequestStarted(ConnectionEvent):
    """Client HEADERS that open a stream: one RPC."""

    name: ClassVar[str] = "request"
    stream_id: int = 0
    method: str = ""

    def columns(self) -> tuple[Code, Code, Code, Detail]:
        return (self.stream_id, None, None, self.method)


@dataclass(frozen=True, slots=True)
class TrailersReceived(ConnectionEvent):
    """Server HEADERS that end a stream, with the gRPC status when it could be decoded."""

    name: ClassVar[str] = "trailers"
    stream_id: int = 0
    grpc_status: int | None = None
    grpc_message: str | None = None

    def columns(self) -> tuple[Code, Code, Code, Detail]:
        return (self.stream_id, self.grpc_status, None, self.grpc_message)


@dataclass(frozen=True, slots=True)
class PingSent(ConnectionEvent):
    name: ClassVar[str] = "ping"
    opaque: int = 0

    def columns(self) -> tuple[Code, Code, Code, Detail]:
        # 64-bit opaque data does not fit SQLite's signed integers: stored as hex.
        return (0, None, None, f"{self.opaque:016x}")


@dataclass(frozen=True, slots=True)
class PingAcknowledged(ConnectionEvent):
    name: ClassVar[str] = "ping_ack"
    opaque: int = 0

    def columns(self) -> tuple[Code, Code, Code, Detail]:
        return (0, None, None, f"{self.opaque:016x}")


@dataclass(frozen=True, slots=True)
class GoawaySent(ConnectionEvent):
    name: ClassVar[str] = "goaway"
    last_stream_id: int = 0
    error_code: int = 0
    debug: str = ""

    def columns(self) -> tuple[Code, Code, Code, Detail]:
        return (0, self.error_code, self.last_stream_id, self.debug or None)


@dataclass(frozen=True, slots=True)
class StreamReset(ConnectionEvent):
    name: ClassVar[str] = "rst_stream"
    stream_id: int = 0
    error_code: int = 0

    def columns(self) -> tuple[Code, Code, Code, Detail]:
        return (self.stream_id, self.error_code, None, None)


@dataclass(frozen=True, slots=True)
class FramingLost(ConnectionEvent):
    """HTTP/2 frame boundaries are unknown after a gap or a mid-stream start."""

    name: ClassVar[str] = "framing_lost"


@dataclass(frozen=True, slots=True)
class FramingRegained(ConnectionEvent):
    name: ClassVar[str] = "framing_regained"


# -- other protocols on the port -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsClientHelloSeen(ConnectionEvent):
    name: ClassVar[str] = "tls_client_hello"
    sni: str = ""
    alpn: str = ""

    def columns(self) -> tuple[Code, Code, Code, Detail]:
        return (None, None, None, f"sni={self.sni} alpn={self.alpn}")


@dataclass(frozen=True, slots=True)
class TlsServerHelloSeen(ConnectionEvent):
    name: ClassVar[str] = "tls_server_hello"
    alpn: str = ""

    def columns(self) -> tuple[Code, Code, Code, Detail]:
        return (None, None, None, f"alpn={self.alpn}")


@dataclass(frozen=True, slots=True)
class Http1RequestSeen(ConnectionEvent):
    name: ClassVar[str] = "http1_request"
    method: str = ""
    target: str = ""
    upgrade: str = ""

    def columns(self) -> tuple[Code, Code, Code, Detail]:
        up = f" upgrade={self.upgrade}" if self.upgrade else ""
        return (None, None, None, f"{self.method} {self.target}{up}")


@dataclass(frozen=True, slots=True)
class Http1ResponseSeen(ConnectionEvent):
    name: ClassVar[str] = "http1_response"
    status: int = 0

    def columns(self) -> tuple[Code, Code, Code, Detail]:
        return (None, self.status, None, None)


# -- anomalies -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AnomalyFound:
    """Malformed or unexpected input; the analysis goes on. ``reason`` is a stable code."""

    name: ClassVar[str] = "anomaly"
    ts: float
    uid: str | None
    reason: str
    detail: str = ""


EVENT_TYPES: tuple[type[ConnectionEvent], ...] = (
    SynSent,
    SynAckSent,
    HandshakeCompleted,
    PickedUpMidStream,
    FinSent,
    ResetSent,
    ContentGapSkipped,
    PortReused,
    PrefaceReceived,
    SettingsReceived,
    SettingsAcknowledged,
    RequestStarted,
    TrailersReceived,
    PingSent,
    PingAcknowledged,
    GoawaySent,
    StreamReset,
    FramingLost,
    FramingRegained,
    TlsClientHelloSeen,
    TlsServerHelloSeen,
    Http1RequestSeen,
    Http1ResponseSeen,
)

# RFC 9113 section 6.5.2 and later registrations.
SETTINGS_NAMES = {
    1: "HEADER_TABLE_SIZE",
    2: "ENABLE_PUSH",
    3: "MAX_CONCURRENT_STREAMS",
    4: "INITIAL_WINDOW_SIZE",
    5: "MAX_FRAME_SIZE",
    6: "MAX_HEADER_LIST_SIZE",
    8: "ENABLE_CONNECT_PROTOCOL",
    9: "NO_RFC7540_PRIORITIES",
}

# RFC 9113 section 7.
ERROR_CODES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}


def error_name(code: int | None) -> str:
    """RFC 9113 name of an error code; unknown codes pass through as numbers."""
    if code is None:
        return ""
    return ERROR_CODES.get(code, f"0x{code:x}")


def settings_text(settings: tuple[tuple[int, int], ...]) -> str:
    return " ".join(f"{SETTINGS_NAMES.get(k, str(k))}={v}" for k, v in settings)
