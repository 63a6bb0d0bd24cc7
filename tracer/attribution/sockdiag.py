"""NETLINK_SOCK_DIAG: the kernel's TCP sockets of a network namespace, without /proc text.

Reading /proc/net/tcp walks every bucket of the kernel's socket hash and formats text:
milliseconds even when a handful of sockets exist, too slow to catch the socket of a
short call. sock_diag answers an exact 4-tuple lookup from the hash in microseconds, and
dumps the table in binary (filtered by port in the kernel). A netlink socket answers for
the network namespace it was created in: this process's, or another one's when it is
created by a thread that entered that namespace first (``SockDiag.inside``: needs
CAP_SYS_ADMIN; without it other namespaces are read from /proc/PID/net/tcp, sockets.py).

Each answer carries the socket's owner uid, inode, cookie (a 64-bit id unique on the
host while it lives) and cgroup (INET_DIAG_CGROUP_ID: the cgroup v2 directory of the
process that created it). ``DestroyWatch`` joins the SKNLGRP_INET_TCP_DESTROY groups: the
kernel then sends one message for every TCP socket it destroys in that namespace, with
its 4-tuple and cookie (on this kernel uid and inode are 0 there, and no cgroup comes
with it), a classic BPF filter on the socket keeping only those whose remote port is a
watched one.

``SockDiag.sockets`` dumps with each socket's tcp_info (how long since it last sent or
received data) and the exact id the kernel knows it by; ``SockDiag.destroy`` sends
SOCK_DESTROY for that one socket (what `ss -K` does: a TCP socket is aborted, its peer
gets a RST). The kernel answers EOPNOTSUPP when it was built without
CONFIG_INET_DIAG_DESTROY, EPERM without CAP_NET_ADMIN, ENOENT when the socket is gone
and ESTALE when its 4-tuple now belongs to another socket (the cookie differs).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tracer.attribution.sockets import SocketEntry

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
ALL_STATES = 0xFFF
NOCOOKIE = 0xFFFFFFFF
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_INFO = 2  # a request's ext bit (1 << (2 - 1)) and the answer's attribute
INET_DIAG_CGROUP_ID = 21
# inet_diag_bc_op codes (include/uapi/linux/inet_diag.h)
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_D_EQ = 8
# Multicast groups of NETLINK_SOCK_DIAG (include/uapi/linux/sock_diag.h).
SKNLGRP_INET_TCP_DESTROY = 1
SKNLGRP_INET6_TCP_DESTROY = 3
CLONE_NEWNET = 0x40000000
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
DESTROY_RCVBUF = 4 << 20  # bytes of destroy messages the kernel may queue for us
DRAIN_LIMIT = 20000  # messages read per drain at most (the rest wait for the next)

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then the socket id.
_REQ = struct.Struct("=BBBBI")
# inet_diag_sockid: sport, dport (big endian), src[16], dst[16], if, cookie[2]; this
# struct stops after cookie[0] (a request packs the cookie on its own: _COOKIE).
_SOCKID = struct.Struct(">HH16s16sII")
_COOKIE = struct.Struct("=II")
# inet_diag_msg after family, state, timer, retrans and the id: expires, rqueue,
# wqueue, uid, inode.
_MSG_TAIL = struct.Struct("=IIIII")
_ATTR = struct.Struct("=HH")
_U64 = struct.Struct("=Q")
_MSG_SIZE = 4 + _SOCKID.size + 4 + _MSG_TAIL.size  # struct inet_diag_msg (72 bytes)
_COOKIE_AT = 4 + 4 + 32 + 4  # where the id's cookie starts in an inet_diag_msg
_DPORT_AT = _NLMSGHDR.size + 6  # a message's destination port, from the netlink header

# struct tcp_info: after 8 bytes of u8 fields, u32s; tcpi_last_data_sent is the tenth
# (offset 44) and tcpi_last_data_recv the twelfth (offset 52), milliseconds ago.
_TCPI_LAST_DATA_SENT = 44
_TCPI_LAST_DATA_RECV = 52
_U32 = struct.Struct("=I")
_ERRNO = struct.Struct("=i")

T = TypeVar("T")


@dataclass(frozen=True)
class DiagSocket:
    """One TCP socket as sock_diag gave it, with what it takes to name it exactly again
    (family, raw addresses, interface, cookie) and how long it has been silent."""

    family: int
    state: int  # TCP_ESTABLISHED = 1, ...
    local: tuple[str, int]
    remote: tuple[str, int]
    raw_local: bytes  # 16 bytes, as the kernel keeps them (IPv4 in the first 4)
    raw_remote: bytes
    ifindex: int
    cookie: int
    uid: int
    inode: int
    netns: int
    # Milliseconds since it last sent or received data (tcp_info), None when not given.
    last_data_ms: int | None

    def sockid(self) -> bytes:
        """Its inet_diag_sockid, cookie included: a request for exactly this socket."""
        return (struct.pack(">HH", self.local[1], self.remote[1]) + self.raw_local
                + self.raw_remote + _U32.pack(self.ifindex)
                + _COOKIE.pack(self.cookie & 0xFFFFFFFF, self.cookie >> 32))


class SockDiag:
    """A netlink socket for sock_diag requests (no privileges needed to query)."""

    def __init__(self, sock: socket.socket | None = None, netns: int | None = None) -> None:
        self.sock = sock if sock is not None else socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self.sock.settimeout(2.0)
        self.netns = netns if netns is not None else _own_netns()
        self.seq = 0

    @classmethod
    def inside(cls, pid: int | str, netns: int) -> SockDiag:
        """A socket answering for the network namespace of process ``pid`` (whose inode
        is ``netns``). OSError when that cannot be entered (no CAP_SYS_ADMIN, the process
        is gone, or it has moved to another namespace meanwhile)."""
        return cls(in_namespace(pid, netns, _diag_socket), netns)

    def close(self) -> None:
        self.sock.close()

    def _request(self, family: int, flags: int, sport: int = 0, dport: int = 0,
                 src: bytes = b"", dst: bytes = b"", cookie: int = 0,
                 bytecode: bytes = b"") -> list[SocketEntry]:
        body = request_body(family, ALL_STATES, sport, dport, src, dst, cookie)
        if bytecode:
            body += _ATTR.pack(_ATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
        return self.exchange(body, flags, parse_message)

    def exchange(self, body: bytes, flags: int,
                 parse: Callable[[bytes, int, int, int], T | None]) -> list[T]:
        """Send one SOCK_DIAG_BY_FAMILY request and read its answer (all its parts, for a
        dump): ``parse(data, pos, end, netns)`` of each message of this request."""
        self.seq += 1
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                                      flags, self.seq, 0) + body)
        out: list[T] = []
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
                    entry = parse(data, pos + _NLMSGHDR.size, pos + length, self.netns)
                    if entry is not None:
                        out.append(entry)
                pos += (length + 3) & ~3
            if not flags & NLM_F_DUMP:
                return out

    def sockets(self, ports: frozenset[int]) -> list[DiagSocket]:
        """Every TCP socket of this namespace with a local or remote port in ``ports``,
        with its tcp_info and exact id (for ``destroy``)."""
        out: list[DiagSocket] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            body = (_REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0,
                              ALL_STATES)
                    + bytes(_SOCKID.size - 4) + _COOKIE.pack(NOCOOKIE, NOCOOKIE))
            out.extend(e for e in self.exchange(body, NLM_F_REQUEST | NLM_F_DUMP,
                                                parse_detail)
                       if e.local[1] in ports or e.remote[1] in ports)
        return out

    def destroy(self, sock: DiagSocket) -> int:
        """SOCK_DESTROY of exactly ``sock`` (its 4-tuple and cookie): 0 when the kernel
        destroyed it, else the errno it answered (see the module's docstring)."""
        body = _REQ.pack(sock.family, socket.IPPROTO_TCP, 0, 0, ALL_STATES) + sock.sockid()
        self.seq += 1
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DESTROY,
                                      NLM_F_REQUEST | NLM_F_ACK, self.seq, 0) + body)
        for _ in range(16):  # answers of earlier requests may still be queued: bounded
            data = self.sock.recv(1 << 16)
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                length, mtype, _f, seq, _pid = _NLMSGHDR.unpack_from(data, pos)
                if length < _NLMSGHDR.size:
                    break
                if seq == self.seq and mtype == NLMSG_ERROR and \
                        pos + _NLMSGHDR.size + _ERRNO.size <= len(data):
                    code: int = _ERRNO.unpack_from(data, pos + _NLMSGHDR.size)[0]
                    return -code
                pos += (length + 3) & ~3
        raise OSError(errno.EPROTO, "no answer to SOCK_DESTROY from the kernel")

    def _parse(self, data: bytes, pos: int) -> SocketEntry | None:
        return parse_message(data, pos, len(data), self.netns)

    def dump(self, ports: frozenset[int]) -> list[SocketEntry]:
        """Every TCP socket of this namespace with a local or remote port in ``ports``."""
        out: list[SocketEntry] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            out.extend(e for e in self._request(family, NLM_F_REQUEST | NLM_F_DUMP)
                       if e.local[1] in ports or e.remote[1] in ports)
        return out

    def dump_clients(self, ports: frozenset[int]) -> list[SocketEntry]:
        """The sockets of this namespace whose remote port is in ``ports`` (the client
        ends of connections to them), filtered by the kernel: one dump instead of a
        lookup per connection."""
        code = dport_bytecode(ports)
        out: list[SocketEntry] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            out.extend(e for e in self._request(family, NLM_F_REQUEST | NLM_F_DUMP,
                                                bytecode=code)
                       if e.remote[1] in ports)
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


def request_body(family: int, states: int, sport: int = 0, dport: int = 0, src: bytes = b"",
                 dst: bytes = b"", cookie: int = 0) -> bytes:
    """An inet_diag_req_v2 for TCP sockets in ``states`` (a bit per TCP state)."""
    return (_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states)
            + _SOCKID.pack(sport, dport, src.ljust(16, b"\0"), dst.ljust(16, b"\0"), 0, 0)[:-4]
            + _COOKIE.pack(cookie, cookie))


def parse_message(data: bytes, pos: int, end: int, netns: int) -> SocketEntry | None:
    """One inet_diag_msg at ``pos`` (after its netlink header; the message ends at
    ``end``) and its INET_DIAG_CGROUP_ID attribute."""
    end = min(end, len(data))
    if pos + _MSG_SIZE > end:
        return None
    family, state = data[pos], data[pos + 1]
    sport, dport, src, dst, _if, _c0 = _SOCKID.unpack_from(data, pos + 4)
    low, high = _COOKIE.unpack_from(data, pos + _COOKIE_AT)
    tail = pos + 4 + _SOCKID.size + 4  # the id's second cookie word
    _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(data, tail)
    cgroup = None
    at = pos + _MSG_SIZE
    while at + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, at)
        if length < _ATTR.size or at + length > end:
            break  # malformed or cut short: what was read so far stands
        if kind == INET_DIAG_CGROUP_ID and length >= _ATTR.size + _U64.size:
            cgroup = _U64.unpack_from(data, at + _ATTR.size)[0]
        at += (length + 3) & ~3
    return SocketEntry((_address(family, src), sport), (_address(family, dst), dport),
                       state, uid, inode, netns, low | high << 32, cgroup)


def parse_detail(data: bytes, pos: int, end: int, netns: int) -> DiagSocket | None:
    """One inet_diag_msg at ``pos`` with its id as the kernel keeps it and its tcp_info."""
    end = min(end, len(data))
    if pos + _MSG_SIZE > end:
        return None
    family, state = data[pos], data[pos + 1]
    sport, dport, src, dst, _if, _c0 = _SOCKID.unpack_from(data, pos + 4)
    ifindex = _U32.unpack_from(data, pos + 4 + 36)[0]  # host order, unlike the ports
    low, high = _COOKIE.unpack_from(data, pos + _COOKIE_AT)
    _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(data, pos + 4 + _SOCKID.size + 4)
    last: int | None = None
    at = pos + _MSG_SIZE
    while at + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, at)
        if length < _ATTR.size or at + length > end:
            break
        info = at + _ATTR.size
        if kind == INET_DIAG_INFO and length >= _ATTR.size + _TCPI_LAST_DATA_RECV + 4:
            sent = _U32.unpack_from(data, info + _TCPI_LAST_DATA_SENT)[0]
            received = _U32.unpack_from(data, info + _TCPI_LAST_DATA_RECV)[0]
            last = min(sent, received)
        at += (length + 3) & ~3
    return DiagSocket(family, state, (_address(family, src), sport),
                      (_address(family, dst), dport), src, dst, ifindex, low | high << 32,
                      uid, inode, netns, last)


def dport_bytecode(ports: frozenset[int]) -> bytes:
    """inet_diag filter bytecode: the socket's remote port is one of ``ports``.

    Each condition is a D_EQ op (4 bytes) and the port in the ``no`` field of a second
    op; a match jumps to the end of the program (accepted: the kernel accepts when the
    program ends exactly at its last byte), a miss falls to the next condition, and the
    last miss jumps 4 bytes past the end (rejected)."""
    op = struct.Struct("=BBH")
    n = len(ports)
    out = b""
    for i, port in enumerate(sorted(ports)):
        left = (n - i) * 8  # bytes from this condition to the program's end
        miss = 8 if i < n - 1 else left + 4
        out += op.pack(INET_DIAG_BC_D_EQ, left, miss) + op.pack(0, 0, port)
    return out


class DestroyWatch:
    """The client ends of connections to ``ports`` the kernel destroyed in one network
    namespace, as the kernel announces them (needs CAP_NET_ADMIN to join the group)."""

    def __init__(self, ports: frozenset[int], sock: socket.socket | None = None,
                 netns: int | None = None) -> None:
        self.sock = sock if sock is not None else _destroy_socket()
        self.netns = netns if netns is not None else _own_netns()
        self.overruns = 0  # the kernel had more than the socket's buffer: some were lost
        self.filtered = _attach_dport_filter(self.sock, ports)
        self.ports = ports

    @classmethod
    def inside(cls, pid: int | str, netns: int, ports: frozenset[int]) -> DestroyWatch:
        return cls(ports, in_namespace(pid, netns, _destroy_socket), netns)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> list[SocketEntry]:
        """The destroyed sockets announced since the last drain (without blocking)."""
        out: list[SocketEntry] = []
        read = 0
        while read < DRAIN_LIMIT:
            try:
                data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                length, mtype, _f, _seq, _pid = _NLMSGHDR.unpack_from(data, pos)
                if length < _NLMSGHDR.size:
                    break
                read += 1
                if mtype == SOCK_DIAG_BY_FAMILY:
                    entry = parse_message(data, pos + _NLMSGHDR.size, pos + length, self.netns)
                    if entry is not None and entry.remote[1] in self.ports:
                        out.append(entry)
                pos += (length + 3) & ~3
        return out


def _diag_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)


def _destroy_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    try:
        for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, DESTROY_RCVBUF)
                break
            except OSError:
                continue
        groups = (1 << (SKNLGRP_INET_TCP_DESTROY - 1)) | (1 << (SKNLGRP_INET6_TCP_DESTROY - 1))
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


def _attach_dport_filter(sock: socket.socket, ports: frozenset[int]) -> bool:
    """A classic BPF program on the socket: a message whose destination port is not one
    of ``ports`` is dropped by the kernel before it is queued. False when it could not
    be attached (then every message is read, and filtered here)."""
    n = len(ports)
    if not 0 < n <= 250:
        return False
    ins = struct.Struct("=HBBI")
    prog = [ins.pack(0x28, 0, 0, _DPORT_AT)]  # ldh [dport]
    for i, port in enumerate(sorted(ports)):
        prog.append(ins.pack(0x15, n - i, 0, port))  # jeq #port, accept
    prog.append(ins.pack(0x06, 0, 0, 0))  # ret #0: dropped
    prog.append(ins.pack(0x06, 0, 0, 0x40000))  # accept: the whole message
    code = ctypes.create_string_buffer(b"".join(prog))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(code))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


_libc: ctypes.CDLL | None = None


def in_namespace(pid: int | str, netns: int, make: Callable[[], T]) -> T:
    """``make()`` run by a thread that entered the network namespace of ``pid`` first, so
    that the socket it makes belongs to that namespace (a socket keeps its namespace
    for life, and keeps the namespace alive: close it when the namespace's processes are
    gone). The thread ends there; this one never moves. OSError when the namespace
    cannot be entered, or ``pid`` is no longer in ``netns``."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    libc = _libc
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_ino != netns:
            raise OSError(errno.ESRCH, f"process {pid} is no longer in namespace {netns}")
        result: list[T] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns: {os.strerror(code)}")
                result.append(make())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                failure.append(exc)

        thread = threading.Thread(target=run, name="tracer-netns", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if failure:
        raise failure[0]
    return result[0]


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _own_netns() -> int:
    link = os.readlink("/proc/self/ns/net")
    return int(link[link.index("[") + 1:-1])
