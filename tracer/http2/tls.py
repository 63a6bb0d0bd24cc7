"""TLS ClientHello and ServerHello parsing: the SNI and the ALPN protocols, nothing else."""

from __future__ import annotations

from dataclasses import dataclass

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
