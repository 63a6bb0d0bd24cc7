"""The crafted captures: one tiny, deterministic scapy-built capture per edge case.

Every packet is built here by hand: fixed addresses, ports, ISNs and timestamps (1 ms apart
unless a case waits on purpose), HTTP/2 frames packed with struct, header blocks from
hpack.Encoder. ``CASES`` maps a case name to the function that builds it; the expected
output of each is in golden/<name>.json.

Conventions in the packet lists: ``t.c(...)`` is a segment from the client (the
originator), ``t.s(...)`` one from the server; sequence and acknowledgment numbers follow
from what each side has sent so far unless a case sets them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import hpack
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop, PadN
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw

T0 = 1_700_000_000  # capture start, whole seconds since the epoch
PORT = 50051
STEP_US = 1000  # time between consecutive packets
MASK = 0xFFFFFFFF

CLIENT4, SERVER4 = "10.0.0.1", "10.0.0.2"
CLIENT6, SERVER6 = "2001:db8::1", "2001:db8::2"
CLIENT_MAC, SERVER_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
CLIENT_ISN = 1_000_000
SERVER_ISN = 2_000_000


# -- capture building -----------------------------------------------------------------


@dataclass
class Frame:
    usec: int  # offset from T0
    pkt: Packet
    snap: int | None = None  # captured length when the capture cut the frame


@dataclass
class Case:
    name: str
    about: str
    frames: list[Frame]
    port: int = PORT
    snaplen: int | None = None  # the capture's snap length, when it cut frames
    options: dict[str, Any] = field(default_factory=dict)
    # Byte strings that must never appear in any record, event or anomaly.
    secrets: tuple[str, ...] = ()


class Capture:
    """The frames of one case, with a clock that moves STEP_US per packet."""

    def __init__(self, snaplen: int | None = None) -> None:
        self.frames: list[Frame] = []
        self.usec = 0
        self.snaplen = snaplen

    def wait(self, seconds: float) -> None:
        self.usec += round(seconds * 1_000_000)

    def add(self, pkt: Packet) -> None:
        self.usec += STEP_US
        snap = None
        if self.snaplen is not None and len(bytes(pkt)) > self.snaplen:
            snap = self.snaplen
        self.frames.append(Frame(self.usec, pkt, snap))

    def case(self, name: str, about: str, **kwargs: Any) -> Case:
        return Case(name, about, self.frames, snaplen=self.snaplen, **kwargs)


class Tcp:
    """One TCP 4-tuple between the client and the server, tracking both sides' sequence."""

    def __init__(
        self,
        cap: Capture,
        *,
        cport: int = 40000,
        sport: int = PORT,
        client: str = CLIENT4,
        server: str = SERVER4,
        cisn: int = CLIENT_ISN,
        sisn: int = SERVER_ISN,
        vlan: int | None = None,
        hop_by_hop: bool = False,
    ) -> None:
        self.cap = cap
        self.cport = cport
        self.sport = sport
        self.client = client
        self.server = server
        self.vlan = vlan
        self.hop_by_hop = hop_by_hop
        self.ipv6 = ":" in client
        self.next = {True: cisn, False: sisn}  # next sequence number, by "from client"

    def _ip(self, from_client: bool) -> Packet:
        src, dst = (self.client, self.server) if from_client else (self.server, self.client)
        smac, dmac = (CLIENT_MAC, SERVER_MAC) if from_client else (SERVER_MAC, CLIENT_MAC)
        eth = Ether(src=smac, dst=dmac)
        if self.vlan is not None:
            eth = eth / Dot1Q(vlan=self.vlan)
        if self.ipv6:
            ip = IPv6(src=src, dst=dst, hlim=64)
            if self.hop_by_hop:
                ip = ip / IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\x00" * 4)])
            return eth / ip
        return eth / IP(src=src, dst=dst, ttl=64, id=0, flags="DF")

    def send(
        self,
        from_client: bool,
        flags: str,
        payload: bytes = b"",
        *,
        seq: int | None = None,
        ack: int | None = None,
        window: int = 65535,
        advance: bool = True,
    ) -> None:
        if seq is None:
            seq = self.next[from_client]
        if ack is None:
            ack = self.next[not from_client] if "A" in flags else 0
        sport, dport = (self.cport, self.sport) if from_client else (self.sport, self.cport)
        tcp = TCP(sport=sport, dport=dport, seq=seq & MASK, ack=ack & MASK, flags=flags,
                  window=window)
        pkt = self._ip(from_client) / tcp
        if payload:
            pkt = pkt / Raw(payload)
        self.cap.add(pkt)
        if advance:
            used = len(payload) + ("S" in flags) + ("F" in flags)
            self.next[from_client] = (seq + used) & MASK

    # Shorthands.
    def c(self, payload: bytes, **kw: Any) -> None:
        self.send(True, "PA", payload, **kw)

    def s(self, payload: bytes, **kw: Any) -> None:
        self.send(False, "PA", payload, **kw)

    def cack(self, **kw: Any) -> None:
        self.send(True, "A", **kw)

    def sack(self, **kw: Any) -> None:
        self.send(False, "A", **kw)

    def handshake(self) -> None:
        self.send(True, "S")
        self.send(False, "SA")
        self.send(True, "A")

    def close_by_client(self) -> None:
        """FIN from the client, FIN from the server, last ACK from the client."""
        self.send(True, "FA")
        self.send(False, "FA")
        self.send(True, "A")

    def close_by_server(self) -> None:
        self.send(False, "FA")
        self.send(True, "FA")
        self.send(False, "A")

    def skip(self, from_client: bool, payload: bytes) -> None:
        """Bytes sent on the wire but never captured."""
        self.next[from_client] = (self.next[from_client] + len(payload)) & MASK


# -- HTTP/2 by hand -------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
F_DATA, F_HEADERS, F_RST_STREAM, F_SETTINGS = 0x0, 0x1, 0x3, 0x4
F_PING, F_GOAWAY, F_WINDOW_UPDATE, F_CONTINUATION = 0x6, 0x7, 0x8, 0x9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", ftype, flags, sid) + payload


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(F_SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


SETTINGS_ACK = frame(F_SETTINGS, ACK, 0)
CLIENT_SETTINGS_PAIRS = ((2, 0), (4, 4194304))  # ENABLE_PUSH=0, INITIAL_WINDOW_SIZE
SERVER_SETTINGS_PAIRS = ((3, 100), (4, 1048576))  # MAX_CONCURRENT_STREAMS, INITIAL_WINDOW
CLIENT_SETTINGS = settings(*CLIENT_SETTINGS_PAIRS)  # 21 bytes
SERVER_SETTINGS = settings(*SERVER_SETTINGS_PAIRS)  # 21 bytes


def ping(opaque: int, ack: bool = False) -> bytes:
    return frame(F_PING, ACK if ack else 0, 0, struct.pack(">Q", opaque))


def window_update(sid: int, increment: int) -> bytes:
    return frame(F_WINDOW_UPDATE, 0, sid, struct.pack(">I", increment))


def rst_stream(sid: int, code: int) -> bytes:
    return frame(F_RST_STREAM, 0, sid, struct.pack(">I", code))


def goaway(last: int, code: int, debug: bytes = b"") -> bytes:
    return frame(F_GOAWAY, 0, 0, struct.pack(">II", last, code) + debug)


def headers(sid: int, block: bytes, *, end_stream: bool = False, end_headers: bool = True) -> bytes:
    flags = (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
    return frame(F_HEADERS, flags, sid, block)


def continuation(sid: int, block: bytes, *, end_headers: bool) -> bytes:
    return frame(F_CONTINUATION, END_HEADERS if end_headers else 0, sid, block)


def data(sid: int, payload: bytes, *, end_stream: bool = False) -> bytes:
    return frame(F_DATA, END_STREAM if end_stream else 0, sid, payload)


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(body)) + body


METHOD = "/pkg.Svc/Method"
AUTHORITY = "grpc.example:50051"
USER_AGENT = "grpc-python/1.60.0"


def request_headers(path: str = METHOD, extra: Iterable[tuple[str, str]] = ()) -> list[Any]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", AUTHORITY),
        ("content-type", "application/grpc"),
        ("user-agent", USER_AGENT),
        ("te", "trailers"),
        *extra,
    ]


RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]


def trailer_headers(status: int, message: str | None = None) -> list[Any]:
    fields = [("grpc-status", str(status))]
    if message is not None:
        fields.append(("grpc-message", message))
    return fields


def h2_open(t: Tcp) -> None:
    """Preface and SETTINGS both ways, with both ACKs (the usual start)."""
    t.c(PREFACE + CLIENT_SETTINGS)  # 45 bytes
    t.s(SERVER_SETTINGS + SETTINGS_ACK)  # 30 bytes
    t.c(SETTINGS_ACK)  # 9 bytes


def unary_call(t: Tcp, cenc: hpack.Encoder, senc: hpack.Encoder, sid: int,
               path: str = METHOD, status: int = 0) -> None:
    """One unary RPC: request HEADERS+DATA in one segment, response in one segment."""
    t.c(headers(sid, cenc.encode(request_headers(path)))
        + data(sid, grpc_message(b"\x08\x01"), end_stream=True))
    t.s(headers(sid, senc.encode(RESPONSE_HEADERS))
        + data(sid, grpc_message(b"\x08\x02"))
        + headers(sid, senc.encode(trailer_headers(status)), end_stream=True))


# -- TLS hellos by hand ---------------------------------------------------------------


def _ext(etype: int, body: bytes) -> bytes:
    return struct.pack(">HH", etype, len(body)) + body


def _alpn(*protocols: bytes) -> bytes:
    names = b"".join(bytes([len(p)]) + p for p in protocols)
    return _ext(16, struct.pack(">H", len(names)) + names)


def _handshake_record(kind: int, body: bytes) -> bytes:
    msg = bytes([kind]) + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack(">H", len(msg)) + msg


def client_hello(sni: bytes, *alpn: bytes) -> bytes:
    name = b"\x00" + struct.pack(">H", len(sni)) + sni
    server_name = _ext(0, struct.pack(">H", len(name)) + name)
    exts = server_name + _alpn(*alpn) + _ext(43, b"\x02\x03\x04")  # supported_versions
    body = (
        b"\x03\x03" + bytes(range(32))  # legacy version, random
        + b"\x00"  # session id
        + b"\x00\x04\x13\x01\x13\x02"  # cipher suites
        + b"\x01\x00"  # compression methods
        + struct.pack(">H", len(exts)) + exts
    )
    return _handshake_record(1, body)


def server_hello(alpn: bytes) -> bytes:
    exts = _alpn(alpn) + _ext(43, b"\x03\x04")
    body = (
        b"\x03\x03" + bytes(range(32, 64))
        + b"\x00"  # session id
        + b"\x13\x01"  # cipher suite
        + b"\x00"  # compression method
        + struct.pack(">H", len(exts)) + exts
    )
    return _handshake_record(2, body)


def tls_app_data(n: int) -> bytes:
    return b"\x17\x03\x03" + struct.pack(">H", n) + bytes((i * 37) & 0xFF for i in range(n))


# -- the cases --------------------------------------------------------------------------

CASES: dict[str, Callable[[], Case]] = {}


def case(fn: Callable[[], Case]) -> Callable[[], Case]:
    CASES[fn.__name__] = fn
    return fn


# TCP lifecycle ---------------------------------------------------------------------------


@case
def tcp_sf() -> Case:
    cap = Capture()
    t = Tcp(cap)
    t.handshake()
    h2_open(t)
    t.close_by_client()
    return cap.case("tcp_sf", "full handshake, data both ways, FIN each way: SF")


@case
def tcp_simultaneous_open() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40001)
    t.send(True, "S")
    t.send(False, "S")  # the server's SYN crosses the client's
    t.send(True, "SA", seq=CLIENT_ISN)
    t.send(False, "SA", seq=SERVER_ISN)
    h2_open(t)
    t.close_by_client()
    return cap.case(
        "tcp_simultaneous_open",
        "both sides send a SYN, then both a SYN-ACK with the same ISN; data; FIN each way",
    )


@case
def tcp_s2_client_fin_only() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40002)
    t.handshake()
    h2_open(t)
    t.send(True, "FA")
    t.sack()
    return cap.case("tcp_s2_client_fin_only", "client FIN, server ACKs it, then silence: S2")


@case
def tcp_s3_server_fin_only() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40003)
    t.handshake()
    h2_open(t)
    t.send(False, "FA")
    t.cack()
    return cap.case("tcp_s3_server_fin_only", "server FIN, client ACKs it, then silence: S3")


@case
def tcp_half_close() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40004)
    cenc, senc = hpack.Encoder(), hpack.Encoder()
    t.handshake()
    t.c(PREFACE + CLIENT_SETTINGS + headers(1, cenc.encode(request_headers()))
        + data(1, grpc_message(b"\x08\x01"), end_stream=True))
    t.send(True, "FA")  # the client is done sending
    t.s(SERVER_SETTINGS + SETTINGS_ACK + headers(1, senc.encode(RESPONSE_HEADERS)))
    t.s(data(1, grpc_message(b"\x08\x02" * 20)))
    t.cack()
    t.s(headers(1, senc.encode(trailer_headers(0)), end_stream=True))
    t.send(False, "FA")
    t.cack()
    return cap.case(
        "tcp_half_close",
        "client sends a request and its FIN; the server keeps sending the response after "
        "it, then closes: SF, and the response after the first FIN is still decoded",
    )


@case
def tcp_rsto() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40005)
    t.handshake()
    h2_open(t)
    t.send(True, "RA")
    return cap.case("tcp_rsto", "established, then the client aborts with RST: RSTO")


@case
def tcp_rstr() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40006)
    t.handshake()
    h2_open(t)
    t.send(False, "RA")
    return cap.case("tcp_rstr", "established, then the server aborts with RST: RSTR")


@case
def tcp_fin_then_rst() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40007)
    t.handshake()
    h2_open(t)
    t.send(True, "FA")
    t.send(False, "RA")
    return cap.case(
        "tcp_fin_then_rst",
        "client FIN, the server answers with RST: RSTR, closed first by the client's FIN",
    )


@case
def tcp_rej() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40008)
    t.send(True, "S")
    t.send(False, "RA", seq=0)
    return cap.case("tcp_rej", "SYN answered by RST-ACK (nothing listening): REJ")


@case
def tcp_rstos0() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40009)
    t.send(True, "S")
    t.send(True, "R")
    return cap.case("tcp_rstos0", "SYN, then a RST from the originator, no SYN-ACK: RSTOS0")


@case
def tcp_syn_retries() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40010)
    t.send(True, "S")
    for backoff in (1, 2, 4):  # three retransmissions of the same SYN
        cap.wait(backoff)
        t.send(True, "S", seq=CLIENT_ISN)
    t.send(False, "SA")
    t.send(True, "A")
    h2_open(t)
    t.close_by_client()
    return cap.case(
        "tcp_syn_retries",
        "the SYN is retried 3 times with the same ISN, then answered: one S, syn_retries 3, "
        "syn_ts is the first SYN",
    )


@case
def tcp_s0() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40011)
    t.send(True, "S")
    return cap.case("tcp_s0", "a SYN never answered: S0, still an attempt at the end")


@case
def tcp_retransmit() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40012)
    t.handshake()
    h2_open(t)
    t.c(ping(0x1111111111111111))
    t.c(ping(0x1111111111111111), seq=t.next[True] - 17, advance=False)  # the same segment
    t.s(ping(0x1111111111111111, ack=True))
    t.close_by_client()
    return cap.case(
        "tcp_retransmit",
        "a data segment retransmitted whole: history T, retransmits 1, the PING counted once",
    )


@case
def tcp_retransmit_overlap() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40025)
    t.handshake()
    h2_open(t)
    first, second = ping(0x1212121212121212), ping(0x3434343434343434)
    t.c(first)
    t.c(first + second, seq=t.next[True] - 17)  # retransmitted, coalesced with new data
    t.s(ping(0x1212121212121212, ack=True) + ping(0x3434343434343434, ack=True))
    t.close_by_client()
    return cap.case(
        "tcp_retransmit_overlap",
        "a retransmission that repeats a segment and carries new data after it: history T, "
        "retransmits 1, the old PING counted once and the new one delivered",
    )


@case
def tcp_out_of_order() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40013)
    t.handshake()
    h2_open(t)
    stream = ping(0xB1B1B1B1B1B1B1B1) + ping(0xB2B2B2B2B2B2B2B2) + ping(0xB3B3B3B3B3B3B3B3)
    base = t.next[True]
    # Three segments cut through frame headers; the second arrives before the first.
    t.c(stream[20:40], seq=base + 20, advance=False)
    t.sack()  # duplicate ACK: the server still waits for the first segment
    t.c(stream[0:20], seq=base, advance=False)
    t.c(stream[40:], seq=base + 40, advance=False)
    t.next[True] = base + len(stream)
    t.s(ping(0xB1B1B1B1B1B1B1B1, ack=True) + ping(0xB2B2B2B2B2B2B2B2, ack=True)
        + ping(0xB3B3B3B3B3B3B3B3, ack=True))
    t.close_by_client()
    return cap.case(
        "tcp_out_of_order",
        "a later segment arrives before the one it follows (frames cut across them): the "
        "PINGs still decode in order, nothing missed, no retransmission",
    )


@case
def tcp_gap() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40014)
    t.handshake()
    h2_open(t)
    p1, p2, p3, p4 = (ping(int.from_bytes(bytes([b]) * 8, "big")) for b in (0xA1, 0xA2, 0xA3, 0xA4))
    t.c(p1)
    t.s(ping(0xA1A1A1A1A1A1A1A1, ack=True))
    t.skip(True, p2 + p3[:8])  # 25 bytes on the wire, never captured
    t.s(ping(0xA2A2A2A2A2A2A2A2, ack=True))  # the server got them: it ACKs past the hole
    t.c(p3[8:])  # the rest of PING 3: not on a frame boundary
    t.c(p4)  # starts on a frame boundary: framing regained
    t.s(ping(0xA3A3A3A3A3A3A3A3, ack=True) + ping(0xA4A4A4A4A4A4A4A4, ack=True))
    t.close_by_client()
    return cap.case(
        "tcp_gap",
        "a client segment is never captured and the server ACKs past it: 25 missed bytes, "
        "history G, HTTP/2 resyncs at the next segment that starts on a frame",
    )


@case
def tcp_keepalive() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40015)
    t.handshake()
    h2_open(t)
    cap.wait(45)
    t.send(True, "A", seq=t.next[True] - 1, advance=False)  # 0-byte keepalive probe
    t.sack()
    cap.wait(45)
    t.send(True, "A", b"\x00", seq=t.next[True] - 1, advance=False)  # 1-byte probe
    t.sack()
    return cap.case(
        "tcp_keepalive",
        "TCP keepalive probes (seq = next-1, with 0 and with 1 byte) on an idle connection: "
        "keepalives 2, not retransmissions, nothing delivered",
    )


@case
def tcp_zero_window() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40016)
    t.handshake()
    h2_open(t)
    for i in range(10):
        t.c(ping(0xD0D0D0D0D0D0D000 + i))
        t.sack(window=0)  # the server's receive buffer is full
    t.sack()  # and opens again
    t.close_by_client()
    return cap.case(
        "tcp_zero_window",
        "the server advertises a zero window 10 times: zero_windows 10, history w at 1 and 10",
    )


@case
def tcp_port_reuse_after_close() -> Case:
    cap = Capture()
    first = Tcp(cap, cport=40017)
    first.handshake()
    h2_open(first)
    first.close_by_client()
    cap.wait(10)
    second = Tcp(cap, cport=40017, cisn=CLIENT_ISN + 500_000, sisn=SERVER_ISN + 700_000)
    second.handshake()
    h2_open(second)
    second.close_by_client()
    return cap.case(
        "tcp_port_reuse_after_close",
        "a connection closes; 10 s later a new SYN with a new ISN on the same 4-tuple: two "
        "connections, the first ended by its own close",
    )


@case
def tcp_port_reuse_while_open() -> Case:
    cap = Capture()
    first = Tcp(cap, cport=40018)
    first.handshake()
    h2_open(first)
    cap.wait(2)
    second = Tcp(cap, cport=40018, cisn=CLIENT_ISN + 500_000, sisn=SERVER_ISN + 700_000)
    second.handshake()
    h2_open(second)
    second.close_by_client()
    return cap.case(
        "tcp_port_reuse_while_open",
        "a new SYN with a new ISN on the 4-tuple of a connection still open: the old one is "
        "closed as 'reused', the new one is a connection of its own",
    )


@case
def tcp_mid_stream_server_first() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40019)
    t.s(ping(0xC1C1C1C1C1C1C1C1))  # the capture starts with a server keepalive PING
    t.c(ping(0xC1C1C1C1C1C1C1C1, ack=True))
    t.sack()
    return cap.case(
        "tcp_mid_stream_server_first",
        "a connection already open when the capture starts, first packet from the server: "
        "OTH, mid_stream, no syn_ts, oriented by the server port",
    )


@case
def tcp_mid_stream_at_synack() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40020)
    t.next[True] = CLIENT_ISN + 1  # the client's SYN went by before the capture started
    t.send(False, "SA")
    t.send(True, "A")
    h2_open(t)
    t.close_by_client()
    return cap.case(
        "tcp_mid_stream_at_synack",
        "the capture starts at the SYN-ACK: oriented by it, no syn_ts, the HTTP/2 stream "
        "is whole",
    )


@case
def tcp_seq_wraparound() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40021, cisn=0xFFFFFFE0, sisn=0xFFFFFFF0)
    t.handshake()
    h2_open(t)  # both directions' sequence numbers wrap inside these segments
    t.c(ping(0xE1E1E1E1E1E1E1E1))
    t.s(ping(0xE1E1E1E1E1E1E1E1, ack=True))
    t.close_by_client()
    return cap.case(
        "tcp_seq_wraparound",
        "ISNs just below 2^32: sequence numbers wrap mid-stream, nothing missed or repeated",
    )


@case
def tcp_ipv6_hop_by_hop() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40022, client=CLIENT6, server=SERVER6, hop_by_hop=True)
    cenc, senc = hpack.Encoder(), hpack.Encoder()
    t.handshake()
    h2_open(t)
    unary_call(t, cenc, senc, 1)
    t.close_by_client()
    return cap.case(
        "tcp_ipv6_hop_by_hop",
        "IPv6 with a hop-by-hop extension header before TCP, one unary call, SF",
    )


@case
def tcp_vlan() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=40023, vlan=100)
    cenc, senc = hpack.Encoder(), hpack.Encoder()
    t.handshake()
    h2_open(t)
    unary_call(t, cenc, senc, 1)
    t.close_by_client()
    return cap.case("tcp_vlan", "802.1Q VLAN-tagged frames, one unary call, SF")


@case
def tcp_snaplen_truncated() -> Case:
    cap = Capture(snaplen=96)  # 14 + 20 + 20 header bytes: at most 42 payload bytes kept
    t = Tcp(cap, cport=40024)
    big_settings = settings((1, 4096), (2, 0), (3, 100), (4, 4194304), (5, 16384), (6, 8192))
    t.handshake()
    t.c(PREFACE)
    t.c(big_settings)  # 45 bytes: the last 3 are cut
    t.s(SERVER_SETTINGS + SETTINGS_ACK)
    t.c(SETTINGS_ACK)
    t.c(data(1, b"\x00" * 200))  # 209 bytes: 167 cut, all inside the DATA frame
    t.c(ping(0xF1F1F1F1F1F1F1F1))
    t.s(ping(0xF1F1F1F1F1F1F1F1, ack=True))
    t.close_by_client()
    return cap.case(
        "tcp_snaplen_truncated",
        "snaplen 96: two client segments are cut (3 and 167 bytes) inside one frame each: "
        "missed_bytes 170, the frame sync holds, later frames decode",
    )


# HTTP/2 -----------------------------------------------------------------------------------


@case
def h2_settings_exchange() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41000)
    t.handshake()
    t.s(SERVER_SETTINGS)  # the server's SETTINGS reach the wire first
    t.c(PREFACE + CLIENT_SETTINGS)
    t.c(SETTINGS_ACK)
    t.s(SETTINGS_ACK)
    return cap.case(
        "h2_settings_exchange",
        "server SETTINGS first, then the client preface and SETTINGS, both ACKs; left open",
    )


@case
def h2_preface_split() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41001)
    t.handshake()
    t.c(PREFACE[:16])
    t.c(PREFACE[16:] + CLIENT_SETTINGS)
    t.s(SERVER_SETTINGS + SETTINGS_ACK)
    t.c(SETTINGS_ACK)
    t.close_by_client()
    return cap.case("h2_preface_split", "the client preface split across two segments")


@case
def h2_frames_split() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41002)
    cenc, senc = hpack.Encoder(), hpack.Encoder()
    t.handshake()
    h2_open(t)
    stream = (headers(1, cenc.encode(request_headers()))
              + data(1, grpc_message(b"\x08\x01"), end_stream=True))
    hlen = 9 + (int.from_bytes(stream[:3], "big"))
    cuts = [0, 5, 20, hlen + 4, len(stream)]  # inside a frame header, a block, a header
    for a, b in pairwise(cuts):
        t.c(stream[a:b])
    ping_ack = ping(0x5555555555555555, ack=True)
    t.s(headers(1, senc.encode(RESPONSE_HEADERS)) + data(1, grpc_message(b"\x08\x02"))
        + headers(1, senc.encode(trailer_headers(0)), end_stream=True) + ping_ack[:4])
    t.s(ping_ack[4:])
    t.close_by_client()
    return cap.case(
        "h2_frames_split",
        "a request's frames cut across 4 segments (inside a frame header, inside the block), "
        "a PING ACK cut after 4 bytes of its header",
    )


@case
def h2_continuation() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41003)
    cenc = hpack.Encoder()
    t.handshake()
    h2_open(t)
    block = cenc.encode(request_headers())
    a, b = len(block) // 3, 2 * len(block) // 3
    t.c(headers(1, block[:a], end_headers=False))
    t.c(continuation(1, block[a:b], end_headers=False)
        + continuation(1, block[b:], end_headers=True)
        + data(1, grpc_message(b"\x08\x01"), end_stream=True))
    t.close_by_client()
    return cap.case(
        "h2_continuation",
        "HEADERS without END_HEADERS, then 2 CONTINUATION frames: the method is decoded",
    )


@case
def h2_ping() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41004)
    t.handshake()
    h2_open(t)
    t.c(ping(0x0102030405060708))
    t.s(ping(0x0102030405060708, ack=True))
    t.s(ping(0xFEDCBA9876543210))
    t.c(ping(0xFEDCBA9876543210, ack=True))
    return cap.case("h2_ping", "PING and PING ACK each way; left open")


@case
def h2_window_update() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41005)
    cenc = hpack.Encoder()
    t.handshake()
    h2_open(t)
    t.c(window_update(0, 983041))
    t.c(headers(1, cenc.encode(request_headers())))
    t.s(window_update(1, 5) + window_update(0, 5))
    t.close_by_client()
    return cap.case(
        "h2_window_update",
        "WINDOW_UPDATE on the connection (client) and on stream 1 and the connection (server)",
    )


@case
def h2_rst_stream() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41006)
    cenc = hpack.Encoder()
    t.handshake()
    h2_open(t)
    t.c(headers(1, cenc.encode(request_headers())))
    t.c(rst_stream(1, 8))  # CANCEL
    t.close_by_client()
    return cap.case("h2_rst_stream", "a request cancelled with RST_STREAM(CANCEL)")


@case
def h2_goaway_server() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41007)
    cenc, senc = hpack.Encoder(), hpack.Encoder()
    t.handshake()
    h2_open(t)
    unary_call(t, cenc, senc, 1)
    t.s(goaway(1, 2, b"connection idle"))  # INTERNAL_ERROR
    t.close_by_server()
    return cap.case(
        "h2_goaway_server",
        "server GOAWAY(last_stream_id=1, INTERNAL_ERROR, debug 'connection idle'), then FIN",
    )


@case
def h2_client_goaway_twice() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41008)
    cenc, senc = hpack.Encoder(), hpack.Encoder()
    t.handshake()
    h2_open(t)
    unary_call(t, cenc, senc, 1)
    t.c(goaway(0, 0))
    t.c(goaway(0, 0))
    t.close_by_client()
    return cap.case(
        "h2_client_goaway_twice",
        "grpc-js close: the client sends GOAWAY(last_stream_id=0) twice, then FIN",
    )


@case
def h2_server_graceful_stop() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41009)
    cenc, senc = hpack.Encoder(), hpack.Encoder()
    t.handshake()
    h2_open(t)
    unary_call(t, cenc, senc, 1)
    t.s(goaway(0x7FFFFFFF, 0) + ping(0x0000000000000001))
    t.c(ping(0x0000000000000001, ack=True))
    t.s(goaway(1, 0))
    t.close_by_server()
    return cap.case(
        "h2_server_graceful_stop",
        "grpcio graceful stop: GOAWAY(2^31-1) + PING, PING ACK, GOAWAY(last_stream_id=1), FIN",
    )


@case
def h2_hpack_dynamic_ref() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41010)
    cenc, senc = hpack.Encoder(), hpack.Encoder()
    t.handshake()
    h2_open(t)
    unary_call(t, cenc, senc, 1, "/pkg.Svc/Alpha")
    unary_call(t, cenc, senc, 3, "/pkg.Svc/Beta")
    unary_call(t, cenc, senc, 5, "/pkg.Svc/Alpha")  # every field from the dynamic table
    t.close_by_client()
    return cap.case(
        "h2_hpack_dynamic_ref",
        "three calls on one connection; the third's :path is a dynamic-table reference to "
        "an entry that is not the newest: methods Alpha x2, Beta x1",
    )


@case
def h2_mid_stream_dynamic_ref() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41011)
    cenc, senc = hpack.Encoder(), hpack.Encoder()
    # Before the capture: streams 1 and 3 filled both tables.
    cenc.encode(request_headers())
    senc.encode(RESPONSE_HEADERS)
    senc.encode(trailer_headers(0))
    t.c(headers(5, cenc.encode(request_headers()))
        + data(5, grpc_message(b"\x08\x01"), end_stream=True))
    t.s(headers(5, senc.encode(RESPONSE_HEADERS)) + data(5, grpc_message(b"\x08\x02"))
        + headers(5, senc.encode(trailer_headers(0)), end_stream=True))
    t.cack()
    return cap.case(
        "h2_mid_stream_dynamic_ref",
        "picked up mid-stream; the request's header block refers to the dynamic table: "
        "method 'unknown (pre-existing)', no anomaly",
    )


@case
def h2_mid_stream_literals() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41012)
    cenc = hpack.Encoder()  # nothing in its table yet: the first block has only literals
    t.c(headers(7, cenc.encode(request_headers()))
        + data(7, grpc_message(b"\x08\x01"), end_stream=True))
    t.sack()
    # The second block refers to the entries the first one inserted: still decodable.
    t.c(headers(9, cenc.encode(request_headers()))
        + data(9, grpc_message(b"\x08\x01"), end_stream=True))
    t.sack()
    return cap.case(
        "h2_mid_stream_literals",
        "picked up mid-stream; the first captured header block uses only literals and "
        "static entries, the next refers to what it inserted: both methods decoded",
    )


def _trailers_case(name: str, decode: bool) -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41013 if decode else 41014)
    cenc, senc = hpack.Encoder(), hpack.Encoder()
    t.handshake()
    h2_open(t)
    t.c(headers(1, cenc.encode(request_headers()))
        + data(1, grpc_message(b"\x08\x01"), end_stream=True))
    t.s(headers(1, senc.encode(RESPONSE_HEADERS)))
    t.s(headers(1, senc.encode(trailer_headers(5, "no such item")), end_stream=True))
    t.close_by_client()
    how = "decoded" if decode else "not decoded (decode_server_headers=False)"
    return cap.case(
        name,
        f"trailers-only failure grpc-status 5 'no such item'; server headers {how}",
        options={"decode_server_headers": decode},
    )


@case
def h2_trailers_decoded() -> Case:
    return _trailers_case("h2_trailers_decoded", True)


@case
def h2_trailers_not_decoded() -> Case:
    return _trailers_case("h2_trailers_not_decoded", False)


@case
def h2_tls() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41015)
    t.handshake()
    t.c(client_hello(b"grpc.example.com", b"h2", b"http/1.1"))
    t.s(server_hello(b"h2") + b"\x14\x03\x03\x00\x01\x01" + tls_app_data(40))
    t.c(tls_app_data(60))
    t.s(tls_app_data(30))
    t.close_by_client()
    return cap.case(
        "h2_tls",
        "TLS ClientHello (SNI, ALPN h2,http/1.1) and ServerHello selecting h2",
    )


@case
def h2_h2c_upgrade() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41016)
    senc = hpack.Encoder()
    t.handshake()
    t.c(b"GET /pkg.Svc/Upgraded HTTP/1.1\r\nHost: grpc.example:50051\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAIAAAAA\r\n\r\n")
    t.s(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        + SERVER_SETTINGS)
    t.c(PREFACE + CLIENT_SETTINGS + SETTINGS_ACK)
    t.s(SETTINGS_ACK + headers(1, senc.encode(RESPONSE_HEADERS))
        + headers(1, senc.encode(trailer_headers(0)), end_stream=True))
    t.close_by_client()
    return cap.case(
        "h2_h2c_upgrade",
        "HTTP/1.1 Upgrade: h2c, 101, then HTTP/2: stream 1 is the upgraded request",
    )


@case
def h2_http1_plain() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41017)
    t.handshake()
    t.c(b"GET /healthz HTTP/1.1\r\nHost: grpc.example:50051\r\nUser-Agent: curl/8.5.0\r\n\r\n")
    t.s(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    t.close_by_client()
    return cap.case(
        "h2_http1_plain",
        "plain HTTP/1.1 on the port: protocol http1, no HTTP/2 stream counted",
    )


@case
def h2_health_check() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41018)
    t.handshake()
    t.close_by_client()
    return cap.case("h2_health_check", "TCP health check: connect and close, no payload")


@case
def h2_health_check_rst() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41021)
    t.handshake()
    t.send(True, "RA")
    return cap.case(
        "h2_health_check_rst",
        "TCP health check that aborts with RST right after the handshake: RSTO, no payload",
    )


@case
def h2_malformed() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41019)
    t.handshake()
    h2_open(t)
    t.c(frame(F_PING, 0, 0, b"\x00\x00\x00\x01"))  # PING of 4 bytes
    t.c(frame(F_SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00"))  # SETTINGS of 5 bytes
    t.c(ping(0x0A0A0A0A0A0A0A0A))
    t.s(ping(0x0A0A0A0A0A0A0A0A, ack=True))
    t.close_by_client()
    return cap.case(
        "h2_malformed",
        "a PING of length 4 and a SETTINGS of length 5: anomaly rows, neither counted as a "
        "PING or a SETTINGS, and the valid PING after them decodes",
    )


@case
def h2_secret_headers() -> Case:
    cap = Capture()
    t = Tcp(cap, cport=41020)
    # No Huffman coding, so the secrets sit in the capture verbatim (the test checks).
    cenc, senc = hpack.Encoder(), hpack.Encoder()
    secret_req = request_headers(extra=[
        ("authorization", "Bearer s3cr3t-t0ken"),
        ("cookie", "session=hunter2-cookie"),
    ])
    t.handshake()
    h2_open(t)
    for sid in (1, 3):  # the second time the secrets are dynamic-table references
        t.c(headers(sid, cenc.encode(secret_req, huffman=False))
            + data(sid, grpc_message(b"\x08\x01"), end_stream=True))
        t.s(headers(sid, senc.encode(RESPONSE_HEADERS + [("set-cookie", "srv=server-s3cret")],
                                     huffman=False))
            + headers(sid, senc.encode(trailer_headers(0), huffman=False), end_stream=True))
    t.close_by_client()
    return cap.case(
        "h2_secret_headers",
        "authorization and cookie (and a server set-cookie) never reach records or events; "
        ":path, :authority and user-agent do",
        secrets=("s3cr3t-t0ken", "hunter2-cookie", "server-s3cret"),
    )


def build(name: str) -> Case:
    return CASES[name]()


# Cases whose golden file holds the correct expectation while the code still disagrees:
# tests/test_crafted.py marks them xfail(strict=True), so fixing the bug turns them into
# an XPASS failure that asks for the entry to be removed here.
KNOWN_BUGS: dict[str, str] = {}
