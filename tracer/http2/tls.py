"""TLS on a watched port: the ClientHello and ServerHello (the SNI and the ALPN protocols,
nothing else), then the record headers of what follows (application data records counted
each way; their bodies, encrypted, skipped). The stream functions work on one direction
(tracer.http2.observer.Direction) and its observer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tracer.events import TlsClientHelloSeen, TlsServerHelloSeen
from tracer.http2.modes import IGNORE, TLS_RECORDS

if TYPE_CHECKING:
    from tracer.http2.observer import Direction, Http2Observer

RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
HANDSHAKE_SERVER_HELLO = 2
EXT_SERVER_NAME = 0
EXT_ALPN = 16
MAX_HELLO = 1 << 16


class NeedMoreData(Exception):
    """The hello is not complete yet."""


class NotTls(Exception):
    """The bytes are not a TLS handshake we understand."""


@dataclass(frozen=True)
class Hello:
    kind: int  # HANDSHAKE_CLIENT_HELLO or HANDSHAKE_SERVER_HELLO
    sni: str
    alpn: tuple[str, ...]


def looks_like_tls(data: bytes) -> bool:
    return len(data) >= 3 and data[0] == RECORD_HANDSHAKE and data[1] == 3 and data[2] <= 4


def parse_hello(data: bytes) -> Hello:
    """Parse the first handshake message from the start of a TLS stream.

    Raises NeedMoreData when the message continues past ``data`` (it may span records and
    segments), NotTls when the bytes do not form a ClientHello or ServerHello."""
    handshake = bytearray()
    pos = 0
    n = len(data)
    while True:
        if pos + 5 > n:
            raise NeedMoreData()
        if data[pos] != RECORD_HANDSHAKE or data[pos + 1] != 3:
            raise NotTls("not a TLS handshake record")
        rlen = data[pos + 3] << 8 | data[pos + 4]
        if rlen == 0 or rlen > 18432:
            raise NotTls(f"bad TLS record length {rlen}")
        if pos + 5 + rlen > n:
            # Take what is there; it may already hold the whole hello.
            handshake += data[pos + 5:n]
            pos = n
        else:
            handshake += data[pos + 5:pos + 5 + rlen]
            pos += 5 + rlen
        if len(handshake) >= 4:
            hlen = handshake[1] << 16 | handshake[2] << 8 | handshake[3]
            if hlen > MAX_HELLO:
                raise NotTls(f"handshake message of {hlen} bytes")
            if len(handshake) >= 4 + hlen:
                return _parse_message(bytes(handshake[: 4 + hlen]))
        if pos >= n:
            raise NeedMoreData()


def _parse_message(msg: bytes) -> Hello:
    kind = msg[0]
    if kind not in (HANDSHAKE_CLIENT_HELLO, HANDSHAKE_SERVER_HELLO):
        raise NotTls(f"handshake type {kind} first")
    r = _Reader(msg, 4)
    r.skip(2 + 32)  # legacy version, random
    r.skip(r.u8())  # session id
    if kind == HANDSHAKE_CLIENT_HELLO:
        r.skip(r.u16())  # cipher suites
        r.skip(r.u8())  # compression methods
    else:
        r.skip(2 + 1)  # cipher suite, compression method
    sni = ""
    alpn: tuple[str, ...] = ()
    if r.remaining() < 2:
        return Hello(kind, sni, alpn)
    end = r.pos + r.u16()
    if end > len(msg):
        raise NotTls("extensions run past the hello")
    while r.pos + 4 <= end:
        etype = r.u16()
        elen = r.u16()
        body = _Reader(r.take(elen), 0)
        if etype == EXT_SERVER_NAME and kind == HANDSHAKE_CLIENT_HELLO and elen >= 2:
            list_end = 2 + body.u16()
            while body.pos + 3 <= min(list_end, elen):
                name_type = body.u8()
                name = body.take(body.u16())
                if name_type == 0:
                    sni = name.decode("ascii", "replace")
                    break
        elif etype == EXT_ALPN and elen >= 2:
            list_end = 2 + body.u16()
            protos = []
            while body.pos < min(list_end, elen):
                protos.append(body.take(body.u8()).decode("ascii", "replace"))
            alpn = tuple(protos)
    return Hello(kind, sni, alpn)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos + 1 > len(self.data):
            raise NotTls("hello cut short")
        v = self.data[self.pos]
        self.pos += 1
        return v

    def u16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise NotTls("hello cut short")
        v = self.data[self.pos] << 8 | self.data[self.pos + 1]
        self.pos += 2
        return v

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise NotTls("hello cut short")
        self.pos += n

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise NotTls("hello cut short")
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v


# -- the stream: the hello, then records ----------------------------------------------

MAX_TLS_HELLO = 1 << 16
# TLS record content types (RFC 8446 section 5.1); application data carries the RPCs.
TLS_CHANGE_CIPHER_SPEC = 20
TLS_HEARTBEAT = 24
TLS_APPLICATION_DATA = 23
MAX_TLS_RECORD = (1 << 14) + 2048  # TLSCiphertext.length at most 2^14 + 2048


def plausible_tls_records(data: bytes) -> bool:
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


def tls_records(d: Direction, obs: Http2Observer, ts: float, data: bytes) -> bool:
    """Walk TLS record headers: application data records are what the connection
    carries (RPCs are encrypted: how many records each way and when is all there is
    to see), and they make it active."""
    skip = d.skip
    n = len(data)
    pos = 0
    if skip:
        if skip >= n:
            d.skip = skip - n
            return False
        pos = skip
        d.skip = 0
    if d.pending:
        data = d.pending + data[pos:]
        d.pending = b""
        n = len(data)
        pos = 0
    app = 0
    while pos + 5 <= n:
        ctype = data[pos]
        length = data[pos + 3] << 8 | data[pos + 4]
        if (not TLS_CHANGE_CIPHER_SPEC <= ctype <= TLS_HEARTBEAT or data[pos + 1] != 3
                or length > MAX_TLS_RECORD):
            obs.anomaly(ts, "tls_record_desync",
                        f"{d.dir} record header {data[pos:pos + 5].hex()}")
            d.lose_sync(obs, ts)
            break
        if ctype == TLS_APPLICATION_DATA:
            app += 1
        end = pos + 5 + length
        if end > n:
            d.skip = end - n
            pos = n
            break
        pos = end
    if pos < n and d.mode == TLS_RECORDS:
        d.pending = data[pos:]
    if app:
        if d.is_client:
            obs.tls_records_orig += app
        else:
            obs.tls_records_resp += app
        return True
    return False


def tls_hello(d: Direction, obs: Http2Observer, ts: float, data: bytes) -> bool:
    buf = d.pending + data if d.pending else data
    d.pending = b""
    obs.protocol = "tls"
    try:
        hello = parse_hello(buf)
    except NeedMoreData:
        if len(buf) > MAX_TLS_HELLO:
            obs.anomaly(ts, "tls_hello_too_long", f"{d.dir} over {MAX_TLS_HELLO} bytes")
            d.set_mode(IGNORE)
        else:
            d.pending = buf
        return False
    except NotTls as exc:
        obs.anomaly(ts, "bad_tls_hello", f"{d.dir}: {exc}")
        d.set_mode(IGNORE)
        return False
    alpn = ",".join(hello.alpn)
    # From the start of what was buffered: the hello's own records are handshake
    # records, the ones after it are counted.
    d.set_mode(TLS_RECORDS)
    active = tls_records(d, obs, ts, buf)
    if hello.kind == HANDSHAKE_CLIENT_HELLO:
        obs.tls_sni = hello.sni or None
        if obs.tls_alpn is None:
            obs.tls_alpn = alpn or None
        obs.budget.emit(TlsClientHelloSeen, ts, d.dir, hello.sni, alpn)
    else:
        if alpn:
            obs.tls_alpn = alpn  # the server's choice beats the client's offer
        obs.budget.emit(TlsServerHelloSeen, ts, d.dir, alpn)
    return active
