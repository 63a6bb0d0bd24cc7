"""NETLINK_SOCK_DIAG: the kernel's TCP sockets of this network namespace, without /proc text.

Reading /proc/net/tcp walks every bucket of the kernel's socket hash and formats text:
milliseconds even when a handful of sockets exist, too slow to catch the socket of a
short call. sock_diag answers an exact 4-tuple lookup from the hash in microseconds, and
dumps the table in binary. Only the namespace this process lives in; other namespaces
are read from /proc/PID/net/tcp (sockets.py).
"""

from __future__ import annotations

import socket
import struct

from tracer.attribution.sockets import SocketEntry

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
ALL_STATES = 0xFFF
NOCOOKIE = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then the socket id.
_REQ = struct.Struct("=BBBBI")
# inet_diag_sockid: sport, dport (big endian), src[16], dst[16], if, cookie[2].
_SOCKID = struct.Struct(">HH16s16sII")
_COOKIE = struct.Struct("=II")
# inet_diag_msg after family, state, timer, retrans and the id: expires, rqueue,
# wqueue, uid, inode.
_MSG_TAIL = struct.Struct("=IIIII")


class SockDiag:
    """A netlink socket for sock_diag requests (no privileges needed to query)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self.sock.settimeout(2.0)
        self.netns = _own_netns()
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def _request(self, family: int, flags: int, sport: int = 0, dport: int = 0,
                 src: bytes = b"", dst: bytes = b"", cookie: int = 0) -> list[SocketEntry]:
        self.seq += 1
        body = (_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, ALL_STATES)
                + _SOCKID.pack(sport, dport, src.ljust(16, b"\0"), dst.ljust(16, b"\0"), 0, 0)
                [:-4]
                + _COOKIE.pack(cookie, cookie))
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                                      flags, self.seq, 0) + body)
        out: list[SocketEntry] = []
        while True:
            data = self.sock.recv(1 << 16)
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                length, mtype, _f, seq, _pid = _NLMSGHDR.unpack_from(data, pos)
                if length < _NLMSGHDR.size:
                    return out
                if mtype in (NLMSG_DONE, NLMSG_ERROR):
                    return out
                if seq == self.seq:
                    entry = self._parse(data, pos + _NLMSGHDR.size)
                    if entry is not None:
                        out.append(entry)
                pos += (length + 3) & ~3
            if not flags & NLM_F_DUMP:
                return out

    def _parse(self, data: bytes, pos: int) -> SocketEntry | None:
        if pos + 4 + _SOCKID.size + _MSG_TAIL.size > len(data):
            return None
        family, state = data[pos], data[pos + 1]
        sport, dport, src, dst, _if, _c0 = _SOCKID.unpack_from(data, pos + 4)
        tail = pos + 4 + _SOCKID.size + 4  # the id's second cookie word
        _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(data, tail)
        return SocketEntry((_address(family, src), sport), (_address(family, dst), dport),
                           state, uid, inode, self.netns)

    def dump(self, ports: frozenset[int]) -> list[SocketEntry]:
        """Every TCP socket of this namespace with a local or remote port in ``ports``."""
        out: list[SocketEntry] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            out.extend(e for e in self._request(family, NLM_F_REQUEST | NLM_F_DUMP)
                       if e.local[1] in ports or e.remote[1] in ports)
        return out

    def lookup(self, local: tuple[str, int], remote: tuple[str, int]) -> SocketEntry | None:
        """The socket whose local end is ``local`` and remote end ``remote``, if any (an
        IPv4 pair is also looked up as IPv4-mapped IPv6, for dual-stack sockets)."""
        if ":" in local[0]:
            attempts = [(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, local[0]),
                         socket.inet_pton(socket.AF_INET6, remote[0]))]
        else:
            a, b = socket.inet_aton(local[0]), socket.inet_aton(remote[0])
            mapped = b"\0" * 10 + b"\xff\xff"
            attempts = [(socket.AF_INET, a, b), (socket.AF_INET6, mapped + a, mapped + b)]
        for family, src, dst in attempts:
            found = self._request(family, NLM_F_REQUEST, local[1], remote[1], src, dst,
                                  NOCOOKIE)
            if found:
                return found[0]
        return None


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _own_netns() -> int:
    import os

    link = os.readlink("/proc/self/ns/net")
    return int(link[link.index("[") + 1:-1])
