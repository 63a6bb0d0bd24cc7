"""Generate a realistic gRPC capture for the benchmark: many clients, leaks, pools, churn.

Every connection is a real TCP conversation (handshake, sequence and acknowledgment numbers,
delayed ACKs, FIN or RST) carrying real HTTP/2: client preface, SETTINGS both ways and their
ACKs, HEADERS encoded by a per-connection hpack Encoder (so later requests reuse the dynamic
table like real clients), DATA, WINDOW_UPDATE, BDP PINGs, trailers, RST_STREAM and GOAWAY.

Mix (fractions of connections):
- leaked:   1 RPC, then open and silent until the end of the capture (never closed)
- pooled:   long-lived, many RPCs and keepalive PINGs, open at the end
- closing:  a few RPCs, then client FIN (grpcio/grpc-go style)
- grpc-js:  a few RPCs, client GOAWAY x2, then FIN
- recycled: server max-connection-age: GOAWAY(2^31-1) + PING, GOAWAY(last), FIN
- reset:    a few RPCs, then RST
- health:   TCP connect and close, no HTTP/2

Written with struct as Ethernet/IPv4/TCP pcap, in timestamp order. Deterministic per seed.
"""

from __future__ import annotations

import argparse
import heapq
import random
import struct
import sys
from collections.abc import Iterator

from hpack import Encoder

SERVER_IP = bytes([10, 0, 0, 1])
SERVER_PORT = 9090
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MSS = 1448

METHODS = [
    "/capmvm.v1.Controller/GetVM",
    "/capmvm.v1.Controller/ListVMs",
    "/inventory.Inventory/Lookup",
    "/auth.Tokens/Validate",
]


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(
        ">I", sid
    ) + payload


def settings(pairs: list[tuple[int, int]]) -> bytes:
    return frame(4, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def grpc_message(size: int, rng: random.Random) -> bytes:
    body = rng.randbytes(size)
    return b"\x00" + struct.pack(">I", size) + body


class Conversation:
    """One TCP connection's packets, with correct sequence numbers."""

    def __init__(self, client_ip: bytes, client_port: int, start: float, rng: random.Random):
        self.cip = client_ip
        self.cport = client_port
        self.t = start
        self.rng = rng
        self.cseq = rng.getrandbits(32)
        self.sseq = rng.getrandbits(32)
        self.packets: list[tuple[float, bytes]] = []
        self.ipid = rng.getrandbits(16)

    def _pkt(self, from_client: bool, flags: int, payload: bytes = b"") -> None:
        if from_client:
            src, dst, sp, dp = self.cip, SERVER_IP, self.cport, SERVER_PORT
            seq, ack = self.cseq, self.sseq
        else:
            src, dst, sp, dp = SERVER_IP, self.cip, SERVER_PORT, self.cport
            seq, ack = self.sseq, self.cseq
        tcp = struct.pack(">HHIIBBHHH", sp, dp, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                          0x50, flags, 65535 if flags != 0x04 else 0, 0, 0)
        total = 20 + len(tcp) + len(payload)
        self.ipid = (self.ipid + 1) & 0xFFFF
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, self.ipid, 0x4000, 64, 6, 0, src, dst)
        eth = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
        self.packets.append((self.t, eth + ip + tcp + payload))
        advance = len(payload) + (1 if flags & 0x03 else 0)
        if from_client:
            self.cseq += advance
        else:
            self.sseq += advance

    def wait(self, seconds: float) -> None:
        self.t += seconds

    def handshake(self) -> None:
        self._pkt(True, 0x02)
        self.wait(0.0001)
        self._pkt(False, 0x12)
        self.wait(0.0001)
        self._pkt(True, 0x10)

    def send(self, from_client: bool, data: bytes, ack_back: bool = True) -> None:
        for i in range(0, len(data), MSS):
            self._pkt(from_client, 0x18, data[i:i + MSS])
            self.wait(0.00002)
        if ack_back:
            self.wait(0.00004)
            self._pkt(not from_client, 0x10)

    def fin(self, from_client: bool) -> None:
        self._pkt(from_client, 0x11)
        self.wait(0.0001)
        self._pkt(not from_client, 0x11)
        self.wait(0.0001)
        self._pkt(from_client, 0x10)

    def rst(self, from_client: bool) -> None:
        self._pkt(from_client, 0x14)


class H2:
    """HTTP/2 on top of a Conversation, with one hpack encoder per direction."""

    def __init__(self, conv: Conversation, rng: random.Random, agent: str) -> None:
        self.c = conv
        self.rng = rng
        self.cenc = Encoder()
        self.senc = Encoder()
        self.agent = agent
        self.next_sid = 1

    def open(self) -> None:
        self.c.send(True, PREFACE + settings([(2, 0), (4, 4194304), (6, 8192)]), ack_back=False)
        self.c.wait(0.0002)
        self.c.send(False, settings([(3, 100), (4, 4194304), (5, 16384)]) + frame(8, 0, 0,
                    struct.pack(">I", 4128769)), ack_back=False)
        self.c.send(True, frame(4, 1, 0), ack_back=False)
        self.c.send(False, frame(4, 1, 0))

    def rpc(self, method: str, status: int = 0, bdp_ping: bool = False) -> None:
        sid = self.next_sid
        self.next_sid += 2
        rng = self.rng
        headers = [
            (":method", "POST"), (":scheme", "http"), (":path", method),
            (":authority", "10.0.0.1:9090"), ("te", "trailers"),
            ("content-type", "application/grpc"), ("user-agent", self.agent),
            ("grpc-accept-encoding", "identity,deflate,gzip"),
            ("grpc-timeout", f"{rng.randint(900, 1000)}m"),
            ("authorization", "Bearer secret-token-must-never-be-stored"),
        ]
        req = frame(1, 4, sid, self.cenc.encode(headers)) + frame(
            0, 1, sid, grpc_message(rng.randint(20, 200), rng))
        self.c.send(True, req)
        self.c.wait(rng.uniform(0.0005, 0.003))
        resp_headers = self.senc.encode([(":status", "200"), ("content-type", "application/grpc"),
                                         ("grpc-accept-encoding", "identity,deflate,gzip")])
        trailers = self.senc.encode([("grpc-status", str(status)),
                                     ("grpc-message", "" if status == 0 else "not found")])
        body = grpc_message(rng.choice([60, 300, 2000, 6000]), rng)
        resp = frame(1, 4, sid, resp_headers) + frame(0, 0, sid, body) + frame(1, 5, sid, trailers)
        if bdp_ping:
            resp = frame(8, 0, 0, struct.pack(">I", len(body))) + resp + frame(
                6, 0, 0, rng.randbytes(8))
        self.c.send(False, resp)
        if bdp_ping:
            self.c.send(True, frame(8, 0, 0, struct.pack(">I", len(body))) + frame(
                6, 1, 0, b"\x00" * 8), ack_back=False)

    def ping(self, from_client: bool) -> None:
        opaque = self.rng.randbytes(8)
        self.c.send(from_client, frame(6, 0, 0, opaque), ack_back=False)
        self.c.wait(0.0002)
        self.c.send(not from_client, frame(6, 1, 0, opaque))

    def goaway(self, from_client: bool, last: int, code: int = 0, debug: bytes = b"") -> None:
        self.c.send(from_client, frame(7, 0, 0, struct.pack(">II", last, code) + debug))


def conversation(kind: str, client_ip: bytes, port: int, start: float, end: float,
                 rng: random.Random) -> list[tuple[float, bytes]]:
    conv = Conversation(client_ip, port, start, rng)
    conv.handshake()
    if kind == "health":
        conv.wait(0.001)
        conv.fin(True)
        return conv.packets
    agent = "grpc-node-js/1.14.7" if kind == "grpcjs" else "grpc-python/1.85.3 grpc-c/50.0.0"
    h2 = H2(conv, rng, agent)
    h2.open()
    method = rng.choice(METHODS)
    if kind == "leaked":
        h2.rpc(method, bdp_ping=True)
        return conv.packets  # open and silent until the end
    if kind == "pooled":
        t = conv.t
        while t < end:
            for _ in range(rng.randint(1, 4)):
                h2.rpc(rng.choice(METHODS), status=rng.choice([0, 0, 0, 0, 5]),
                       bdp_ping=rng.random() < 0.1)
                conv.wait(rng.uniform(0.05, 0.4))
            if rng.random() < 0.3:
                h2.ping(True)
            conv.wait(rng.uniform(0.5, 3.0))
            t = conv.t
        return conv.packets
    for _ in range(rng.randint(1, 4)):
        h2.rpc(method, status=rng.choice([0, 0, 0, 14]))
        conv.wait(rng.uniform(0.01, 0.2))
    conv.wait(rng.uniform(0.1, 2.0))
    if kind == "closing":
        conv.fin(True)
    elif kind == "grpcjs":
        h2.goaway(True, 0)
        h2.goaway(True, 0)
        conv.fin(True)
    elif kind == "recycled":
        h2.goaway(False, 2**31 - 1, 0, b"max_age")
        h2.ping(False)
        h2.goaway(False, h2.next_sid - 2, 0, b"max_age")
        conv.fin(False)
    elif kind == "reset":
        conv.rst(True)
    return conv.packets


MIX = [("leaked", 0.30), ("pooled", 0.01), ("closing", 0.30), ("grpcjs", 0.12),
       ("recycled", 0.10), ("reset", 0.07), ("health", 0.10)]


def generate(connections: int, duration: float, seed: int) -> Iterator[tuple[float, bytes]]:
    rng = random.Random(seed)
    t0 = 1_790_000_000.0
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    streams = []
    # Leaks come from a few client hosts; healthy traffic from many.
    for i in range(connections):
        kind = rng.choices(kinds, weights)[0]
        if kind == "leaked":
            ip = bytes([10, 1, 0, 1 + rng.randrange(3)])
        else:
            ip = bytes([10, 2, rng.randrange(4), 1 + rng.randrange(60)])
        start = t0 + rng.uniform(0, duration * 0.95)
        port = 20000 + (i % 40000)
        streams.append(conversation(kind, ip, port, start, t0 + duration, rng))
    return heapq.merge(*streams, key=lambda p: p[0])


def write_pcap(path: str, packets: Iterator[tuple[float, bytes]]) -> int:
    n = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        out = []
        for ts, data in packets:
            sec = int(ts)
            usec = round((ts - sec) * 1e6)
            if usec == 1_000_000:
                sec, usec = sec + 1, 0
            out.append(struct.pack("<IIII", sec, usec, len(data), len(data)))
            out.append(data)
            n += 1
            if len(out) > 20000:
                f.write(b"".join(out))
                out.clear()
        f.write(b"".join(out))
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--connections", type=int, default=6000)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    n = write_pcap(args.out, generate(args.connections, args.duration, args.seed))
    print(f"{args.out}: {n} packets, {args.connections} connections", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
