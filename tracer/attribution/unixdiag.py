"""NETLINK_SOCK_DIAG for AF_UNIX: the Unix stream sockets of a path, their peers and queues.

A gRPC server on a Unix socket (a container runtime, a CSI driver, a device plugin) sends
no packet a sniffer could see, but the kernel lists every Unix socket of the network
namespace (linux/unix_diag.h): its inode, its type and state, the name it is bound to
(UNIX_DIAG_NAME), the inode of its peer (UNIX_DIAG_PEER), its queues (UNIX_DIAG_RQLEN:
for a listening socket the accept queue and its backlog, else the bytes not read yet and
the bytes sent and not yet read by the peer), the sockets waiting in a listener's accept
queue (UNIX_DIAG_ICONS), the file it is bound to (UNIX_DIAG_VFS) and its owner
(UNIX_DIAG_UID). Measured on this kernel: a socket the server accepted carries the
listener's name; the client's socket has no name and its peer is the accepted socket's
inode (and the accepted socket's peer is the client's); an abstract name starts with a NUL
byte (written ``@name`` here, as `ss -x` does).

The dump has no kernel filter by path: every Unix socket of the namespace in the states
asked for comes back. ``UnixDiag.snapshot`` asks only for the stream sockets' states that
matter (ESTABLISHED, LISTEN) and the attributes read, and ``scan_dump`` reads each message
at fixed offsets, building nothing for a socket that is neither bound to a followed name
(or file) nor an unnamed established socket, and only a tuple of ints for those (the
client ends: which are peers of ours is known once the whole dump is read; benchmarks/
unix.py measures the cost). ``parse_unix_message`` is pure: bytes in, one ``UnixSocket``
or the reason it is malformed; the scan reads the attributes it uses as strictly (the
same reasons), and frames, without reading them, the attributes of the sockets it skips.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from dataclasses import dataclass

from tracer.attribution.sockdiag import (
    NETLINK_SOCK_DIAG,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOCK_DIAG_BY_FAMILY,
)

UDIAG_SHOW_NAME = 0x01
UDIAG_SHOW_VFS = 0x02
UDIAG_SHOW_PEER = 0x04
UDIAG_SHOW_ICONS = 0x08
UDIAG_SHOW_RQLEN = 0x10
UDIAG_SHOW_UID = 0x40
SHOW = (UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS
        | UDIAG_SHOW_RQLEN | UDIAG_SHOW_UID)
UNIX_DIAG_NAME = 0
UNIX_DIAG_VFS = 1
UNIX_DIAG_PEER = 2
UNIX_DIAG_ICONS = 3
UNIX_DIAG_RQLEN = 4
UNIX_DIAG_UID = 7
# Socket states as unix_diag reports them (the TCP names, include/net/tcp_states.h).
UNIX_ESTABLISHED = 1
UNIX_CLOSE = 7
UNIX_LISTEN = 10
STATES = (1 << UNIX_ESTABLISHED) | (1 << UNIX_LISTEN) | (1 << UNIX_CLOSE)
# What a poll asks for: a connection is ESTABLISHED at both ends, a listener LISTEN; the
# owner's uid of the client end, the queues, the names, files and peers.
POLL_STATES = (1 << UNIX_ESTABLISHED) | (1 << UNIX_LISTEN)
POLL_SHOW = (UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS
             | UDIAG_SHOW_RQLEN | UDIAG_SHOW_UID)
MAX_ICONS = 65536  # inodes of one accept queue kept at most (the rest are counted)
MAX_NAME = 108  # sun_path's size: a longer name is malformed

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBHIIIII")  # unix_diag_req
_MSG = struct.Struct("=BBBBIII")  # unix_diag_msg: family, type, state, pad, ino, cookie[2]
_ATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_PAIR = struct.Struct("=II")
_HEAD = struct.Struct("=BBBBI")  # unix_diag_msg up to its inode
_NLMSG_MSG = _NLMSGHDR.size + _MSG.size


@dataclass(frozen=True)
class UnixSocket:
    """One Unix socket as unix_diag gave it. ``name`` is None when it has none (a client's
    socket), ``@``-prefixed when abstract; ``peer`` is 0 when it has none; ``rqueue`` and
    ``wqueue`` are None when the kernel did not say."""

    inode: int
    type: int  # socket.SOCK_STREAM, SOCK_SEQPACKET, SOCK_DGRAM
    state: int  # UNIX_ESTABLISHED, UNIX_LISTEN, UNIX_CLOSE
    cookie: int
    name: str | None = None
    peer: int = 0
    rqueue: int | None = None
    wqueue: int | None = None
    uid: int | None = None
    vfs: tuple[int, int] | None = None  # (device, inode) of the file it is bound to
    icons: tuple[int, ...] = ()  # a listener's sockets waiting to be accepted


class Malformed(ValueError):
    """A unix_diag message that cannot be read; ``reason`` is the anomaly's key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def request(states: int = STATES, show: int = SHOW) -> bytes:
    """A unix_diag_req dumping every socket in ``states`` with the ``show`` attributes."""
    return _REQ.pack(socket.AF_UNIX, 0, 0, states, 0, show, 0xFFFFFFFF, 0xFFFFFFFF)


def name_text(raw: bytes) -> str:
    """A bound name as people write it: a path as it is, an abstract name as ``@name``
    (its bytes after the NUL; others than printable ASCII as \\xHH)."""
    if raw[:1] == b"\0":
        return "@" + raw[1:].decode("ascii", "backslashreplace")
    return raw.rstrip(b"\0").decode("utf-8", "backslashreplace")


def parse_unix_message(data: bytes, pos: int, end: int) -> UnixSocket:
    """One unix_diag_msg at ``pos`` (after its netlink header) ending at ``end``, with its
    attributes. Malformed says why it cannot be read: the message is cut short, or an
    attribute's length points outside it or is too short for its kind."""
    if end > len(data):
        raise Malformed("unix_diag_truncated")
    if pos + _MSG.size > end:
        raise Malformed("unix_diag_short_message")
    family, kind, state, _pad, inode, low, high = _MSG.unpack_from(data, pos)
    if family != socket.AF_UNIX:
        raise Malformed("unix_diag_wrong_family")
    name: str | None = None
    peer = 0
    rqueue: int | None = None
    wqueue: int | None = None
    uid: int | None = None
    vfs: tuple[int, int] | None = None
    icons: tuple[int, ...] = ()
    at = pos + _MSG.size
    while at + _ATTR.size <= end:
        length, attr = _ATTR.unpack_from(data, at)
        if length < _ATTR.size or at + length > end:
            raise Malformed("unix_diag_bad_attribute_length")
        body = at + _ATTR.size
        size = length - _ATTR.size
        if attr == UNIX_DIAG_NAME:
            if size == 0 or size > MAX_NAME:
                raise Malformed("unix_diag_bad_name")
            name = name_text(data[body:body + size])
        elif attr == UNIX_DIAG_PEER:
            if size < _U32.size:
                raise Malformed("unix_diag_short_attribute")
            peer = _U32.unpack_from(data, body)[0]
        elif attr == UNIX_DIAG_RQLEN:
            if size < _PAIR.size:
                raise Malformed("unix_diag_short_attribute")
            rqueue, wqueue = _PAIR.unpack_from(data, body)
        elif attr == UNIX_DIAG_UID:
            if size < _U32.size:
                raise Malformed("unix_diag_short_attribute")
            uid = _U32.unpack_from(data, body)[0]
        elif attr == UNIX_DIAG_VFS:
            if size < _PAIR.size:
                raise Malformed("unix_diag_short_attribute")
            ino, dev = _PAIR.unpack_from(data, body)
            vfs = (dev, ino)
        elif attr == UNIX_DIAG_ICONS:
            if size % _U32.size:
                raise Malformed("unix_diag_bad_icons")
            n = min(size // _U32.size, MAX_ICONS)
            icons = struct.unpack_from(f"={n}I", data, body)
        at += (length + 3) & ~3  # other kinds (MEMINFO, SHUTDOWN, newer ones) pass
    return UnixSocket(inode, kind, state, low | high << 32, name, peer, rqueue, wqueue, uid,
                      vfs, icons)


@dataclass
class DumpResult:
    """One dump: the sockets kept, how many the kernel listed, the malformed by reason."""

    sockets: list[UnixSocket]
    listed: int = 0
    malformed: dict[str, int] | None = None


@dataclass(frozen=True)
class Targets:
    """The listening sockets followed: abstract names (``@name``, and paths as bound, when
    known) and the (device, inode) of each path's socket file (a path may have been bound
    by a relative name: the kernel reports the name as given to bind)."""

    names: frozenset[str] = frozenset()
    files: frozenset[tuple[int, int]] = frozenset()

    def holds(self, sock: UnixSocket) -> bool:
        return sock.name in self.names or (sock.vfs is not None and sock.vfs in self.files)


def kernel_dev(st_dev: int) -> int:
    """A stat's st_dev as unix_diag writes a device (the kernel's own dev_t: major << 20 |
    minor)."""
    return os.major(st_dev) << 20 | os.minor(st_dev)


def parse_dump(chunks: list[bytes], seq: int, keep: Targets) -> tuple[DumpResult, bool]:
    """The messages of a dump's answer (``chunks``, each one recv), keeping the sockets
    ``keep`` holds and every socket with no name (a client's: which ones are the peers of
    ours is known once the whole dump is read). True when the answer's end (NLMSG_DONE or
    an error) was met."""
    out = DumpResult([])
    done = False
    bad: dict[str, int] = {}
    for data in chunks:
        pos = 0
        while pos + _NLMSGHDR.size <= len(data):
            length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, pos)
            if length < _NLMSGHDR.size or pos + length > len(data):
                bad["unix_diag_bad_netlink_length"] = \
                    bad.get("unix_diag_bad_netlink_length", 0) + 1
                break  # the rest of this chunk cannot be framed
            if mtype in (NLMSG_DONE, NLMSG_ERROR):
                done = True
                break
            if mseq == seq and mtype == SOCK_DIAG_BY_FAMILY:
                out.listed += 1
                try:
                    sock = parse_unix_message(data, pos + _NLMSGHDR.size, pos + length)
                except Malformed as exc:
                    bad[exc.reason] = bad.get(exc.reason, 0) + 1
                else:
                    if sock.name is None or keep.holds(sock):
                        out.sockets.append(sock)
            pos += (length + 3) & ~3
    out.malformed = bad or None
    return out, done


def connections_of(sockets: list[UnixSocket], targets: Targets
                   ) -> dict[int, tuple[UnixSocket, UnixSocket | None]]:
    """The connections accepted on the sockets ``targets`` holds: the accepted socket's
    inode -> (the accepted socket, its peer, the client's socket, when listed: None when
    it is in another network namespace or already gone)."""
    unnamed = {s.inode: s for s in sockets if s.name is None}
    out: dict[int, tuple[UnixSocket, UnixSocket | None]] = {}
    for s in sockets:
        if s.state == UNIX_ESTABLISHED and s.type == socket.SOCK_STREAM and s.name is not None \
                and targets.holds(s):
            out[s.inode] = (s, unnamed.get(s.peer) if s.peer else None)
    return out


def raw_name(label: str) -> bytes:
    """The bytes the kernel reports for a name written as ``name_text`` writes it (an
    abstract ``@name`` as a NUL and the name)."""
    if label.startswith("@"):
        return b"\0" + label[1:].encode("utf-8", "surrogateescape")
    return label.encode("utf-8", "surrogateescape")


def file_key(dev: int, ino: int) -> int:
    """A socket file's (kernel device, inode) as one int, the scan's key."""
    return dev << 32 | ino


@dataclass
class Snapshot:
    """One poll's dump, scanned: the followed sockets' accepted connections as
    (server inode, client inode, server's unread bytes, client's unread bytes or -1,
    client's owner uid or -1, index of the target), their listeners (parsed whole, with
    the index of their target), how many messages the kernel listed, the malformed by
    reason, and whether the answer's end was met."""

    conns: list[tuple[int, int, int, int, int, int]]
    listeners: list[tuple[UnixSocket, int]]
    listed: int = 0
    malformed: dict[str, int] | None = None
    done: bool = False


class _Scan:
    """What a scan has gathered so far, chunk after chunk."""

    def __init__(self) -> None:
        self.servers: list[tuple[int, int, int, int]] = []  # inode, peer, rqueue, target
        self.unnamed: dict[int, tuple[int, int]] = {}  # inode -> (rqueue or -1, uid or -1)
        self.listeners: list[tuple[UnixSocket, int]] = []
        self.listed = 0
        self.bad: dict[str, int] = {}
        self.done = False

    def count(self, reason: str) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + 1


_LITTLE = sys.byteorder == "little"  # netlink fields are in the host's byte order


def _u16(data: bytes, at: int) -> int:
    if _LITTLE:
        return data[at] | data[at + 1] << 8
    return data[at] << 8 | data[at + 1]


def _u32(data: bytes, at: int) -> int:
    if _LITTLE:
        return data[at] | data[at + 1] << 8 | data[at + 2] << 16 | data[at + 3] << 24
    return data[at] << 24 | data[at + 1] << 16 | data[at + 2] << 8 | data[at + 3]


def scan_chunk(data: bytes, seq: int, names: dict[bytes, int], files: dict[int, int],
               scan: _Scan) -> None:
    """The messages of one recv of a dump's answer into ``scan`` (see scan_dump)."""
    # The per-socket loop of a poll (20,000 messages with 10,000 connections open),
    # compiled with mypyc: fields read byte by byte (_u16, _u32: no tuple per field),
    # offsets noted, values read only for the sockets kept.
    servers = scan.servers
    unnamed = scan.unnamed
    stream = socket.SOCK_STREAM
    size = len(data)
    pos = 0
    while pos + 16 <= size:
        length, mtype, mseq = _u32(data, pos), _u16(data, pos + 4), _u32(data, pos + 8)
        if length < 16 or pos + length > size:
            scan.count("unix_diag_bad_netlink_length")
            return  # the rest of this chunk cannot be framed
        if mtype in (NLMSG_DONE, NLMSG_ERROR):
            scan.done = True
            return
        end = pos + length
        at = pos + _NLMSG_MSG
        msg = pos + 16
        pos += (length + 3) & ~3
        if mseq != seq or mtype != SOCK_DIAG_BY_FAMILY:
            continue
        scan.listed += 1
        if at > end:
            scan.count("unix_diag_short_message")
            continue
        family, kind, state, inode = data[msg], data[msg + 1], data[msg + 2], \
            _u32(data, msg + 4)
        if family != socket.AF_UNIX:
            scan.count("unix_diag_wrong_family")
            continue
        if kind != stream or (state != UNIX_ESTABLISHED and state != UNIX_LISTEN):
            continue  # a gRPC connection is a stream
        name_at = vfs_at = peer_at = rq_at = uid_at = -1
        name_size = 0
        framed = True
        while at + 4 <= end:
            alen, akind = _u16(data, at), _u16(data, at + 2)
            if alen < 4 or at + alen > end:
                framed = False
                break
            if akind == UNIX_DIAG_PEER:
                peer_at = at + 4 if alen >= 8 else -2
            elif akind == UNIX_DIAG_RQLEN:
                rq_at = at + 4 if alen >= 12 else -2
            elif akind == UNIX_DIAG_UID:
                uid_at = at + 4 if alen >= 8 else -2
            elif akind == UNIX_DIAG_NAME:
                name_at = at + 4
                name_size = alen - 4
            elif akind == UNIX_DIAG_VFS:
                vfs_at = at + 4 if alen >= 12 else -2
            at += (alen + 3) & ~3
        if not framed:
            scan.count("unix_diag_bad_attribute_length")
            continue
        if name_at < 0:  # unnamed: a client end, maybe one of ours
            if state == UNIX_ESTABLISHED and peer_at >= 0:
                if rq_at == -2 or uid_at == -2:
                    scan.count("unix_diag_short_attribute")
                    continue
                unnamed[inode] = (_u32(data, rq_at) if rq_at >= 0 else -1,
                                  _u32(data, uid_at) if uid_at >= 0 else -1)
            continue
        target = -1
        if 0 < name_size <= MAX_NAME:
            raw = data[name_at:name_at + name_size]
            target = names.get(raw if raw[0] == 0 else raw.rstrip(b"\0"), -1)
        if target < 0 and vfs_at >= 0:
            ino, dev = _u32(data, vfs_at), _u32(data, vfs_at + 4)
            target = files.get(file_key(dev, ino), -1)
        if target < 0:
            continue  # bound to another name: not ours
        if state == UNIX_LISTEN or name_size == 0 or name_size > MAX_NAME or \
                vfs_at == -2 or peer_at == -2 or rq_at == -2 or uid_at == -2:
            try:  # a listener, or one of ours that is malformed: read whole
                sock = parse_unix_message(data, msg, end)
            except Malformed as exc:
                scan.count(exc.reason)
            else:
                if state == UNIX_LISTEN:
                    scan.listeners.append((sock, target))
            continue
        servers.append((inode, _u32(data, peer_at) if peer_at >= 0 else 0,
                        _u32(data, rq_at) if rq_at >= 0 else 0, target))


def scan_dump(chunks: list[bytes], seq: int, names: dict[bytes, int],
              files: dict[int, int]) -> Snapshot:
    """A dump's answer (``chunks``, each one recv) scanned for the connections accepted on
    the followed sockets: ``names`` maps the raw names they are bound to (raw_name), and
    ``files`` their socket files (file_key), to a target's index. A socket bound to a name
    neither holds is skipped after its attributes are framed; an unnamed one is kept as
    two ints until the end, when those that are peers of ours are joined to them."""
    scan = _Scan()
    for data in chunks:
        scan_chunk(data, seq, names, files, scan)
    return _snapshot(scan)


def _snapshot(scan: _Scan) -> Snapshot:
    conns: list[tuple[int, int, int, int, int, int]] = []
    unnamed = scan.unnamed
    for inode, peer, rq, target in scan.servers:
        client = unnamed.get(peer) if peer else None
        if client is None:
            conns.append((inode, peer, rq, -1, -1, target))
        else:
            conns.append((inode, peer, rq, client[0], client[1], target))
    return Snapshot(conns, scan.listeners, scan.listed, scan.bad or None, scan.done)


class UnixDiag:
    """A netlink socket dumping the Unix sockets of this network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self.sock.settimeout(2.0)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def snapshot(self, names: dict[bytes, int], files: dict[int, int],
                 max_chunks: int = 1 << 16) -> Snapshot:
        """One dump of the established and listening stream sockets, scanned (scan_dump);
        at most ``max_chunks`` reads."""
        self.seq += 1
        body = request(POLL_STATES, POLL_SHOW)
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                                      NLM_F_REQUEST | NLM_F_DUMP, self.seq, 0) + body)
        scan = _Scan()
        for _ in range(max_chunks):
            chunk = self.sock.recv(1 << 17)
            scan_chunk(chunk, self.seq, names, files, scan)
            if scan.done or not chunk:
                break
        return _snapshot(scan)

    def dump(self, names: Targets, max_chunks: int = 1 << 16) -> DumpResult:
        """The sockets ``names`` holds and every unnamed stream socket (see
        parse_dump), from one dump; at most ``max_chunks`` reads (a bound: 10,000 sockets
        fill about 80)."""
        self.seq += 1
        body = request()
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                                      NLM_F_REQUEST | NLM_F_DUMP, self.seq, 0) + body)
        total = DumpResult([])
        bad: dict[str, int] = {}
        for _ in range(max_chunks):
            chunk = self.sock.recv(1 << 17)
            part, done = parse_dump([chunk], self.seq, names)
            total.sockets.extend(part.sockets)
            total.listed += part.listed
            for reason, n in (part.malformed or {}).items():
                bad[reason] = bad.get(reason, 0) + n
            if done or not chunk:
                break
        total.malformed = bad or None
        return total


def display_name(target: str) -> str:
    """The name the kernel reports for a --unix argument: a path made absolute, ``@name``
    for an abstract one (given as ``@name`` or ``unix-abstract:name``), ``unix:`` taken
    off a path given as a gRPC target."""
    if target.startswith("unix-abstract:"):
        return "@" + target[len("unix-abstract:"):]
    if target.startswith("@"):
        return target
    if target.startswith("unix://"):
        target = target[len("unix://"):]
    elif target.startswith("unix:"):
        target = target[len("unix:"):]
    return os.path.abspath(target)
