"""Live packets from AF_PACKET sockets: (timestamp, LINKTYPE_RAW, IP packet), kernel-filtered.

Cooked (SOCK_DGRAM) packet sockets: every interface, loopback and tunnels included, hands
over the packet from its network header, so one decoder serves all of them. The kernel
runs a classic BPF program built here (no libpcap needed) that keeps TCP segments to or
from the watched ports and drops the second copy of each loopback packet (the outgoing
one: on `lo` every packet passes twice). A user filter (``--filter``, any BPF text) is
compiled by libpcap through scapy when libpcap is installed and runs after ours.

With ``tagged_packets`` (what `--write` reads) each packet also carries its sockaddr_ll:
the interface it was seen on, its packet type (incoming, outgoing, ...), protocol and
hardware address, as libpcap keeps them in a LINUX_SLL2 header. From the ring that costs
a 20-byte copy per packet; without it, recvfrom() where recv() would do, and with it one
more system call per packet (Python asks the kernel for the interface's name).

Packets are read through a memory-mapped receive ring (tracer.sources.ring, TPACKET_V3)
where the kernel allows one: no system call per packet, and each packet carries its
arrival time from the kernel (nanoseconds). Where the ring cannot be set up (an old
kernel, no memory for it) or is turned off (``ring=False``, `tracer capture --no-ring`),
each packet is one recv() and its timestamp is taken when it is read (microsecond clock);
under load that trails arrival by the time spent in the queue, bounded by the socket
buffer. ``receive`` says which path is in use and why. Kernel drop counters come from
PACKET_STATISTICS either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from typing import Literal, overload

from tracer.decode import LINKTYPE_RAW
from tracer.sources.ring import (
    SOCKADDR_LL,
    Packet,
    Ring,
    RingUnavailable,
    TaggedPacket,
    ring_packets,
)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
DLT_RAW = 12  # libpcap's number for raw IP, offsets from the IP header

# Classic BPF opcodes (linux/filter.h).
BPF_LD_W_ABS = 0x20
BPF_LD_H_ABS = 0x28
BPF_LD_B_ABS = 0x30
BPF_LD_H_IND = 0x48
BPF_LDX_B_MSH = 0xB1
BPF_ALU_AND_K = 0x54
BPF_JEQ_K = 0x15
BPF_JSET_K = 0x45
BPF_RET_K = 0x06
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE = 4
SKF_AD_IFINDEX = 8
PACKET_OUTGOING = 4

# The kernel's room for packets not yet read: the ring's size, or the socket's receive
# buffer without the ring. Measured on the benchmark's replay at 100,000 packets/s with
# attribution, on a host shared with other work: an 8 MiB ring dropped where 32 MiB
# (and the 32 MiB socket buffer before the ring) did not.
DEFAULT_BUFFER = 32 << 20
READ_SIZE = 1 << 16

Insn = tuple[int, int, int, int]


class CaptureError(Exception):
    """Live capture cannot start; the message says how to fix it."""


def _assemble(program: list[tuple[int, object, object, int]]) -> list[Insn]:
    """Resolve label jumps: entries are (code, jt, jf, k) where jt/jf are offsets or label
    names, and ("label", name) markers stand alone as (-1, name, None, 0)."""
    labels: dict[str, int] = {}
    pos = 0
    for code, jt, _jf, _k in program:
        if code == -1:
            labels[str(jt)] = pos
        else:
            pos += 1
    def rel(target: object, pos: int) -> int:
        if isinstance(target, int):
            return target
        offset = labels[str(target)] - pos - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"BPF jump to {target} out of range")
        return offset

    out: list[Insn] = []
    for code, jt, jf, k in program:
        if code == -1:
            continue
        pos = len(out)
        out.append((code, rel(jt, pos), rel(jf, pos), k & 0xFFFFFFFF))
    return out


def port_filter(ports: frozenset[int], snaplen: int, loopback_ifindex: int | None) -> list[Insn]:
    """BPF for cooked packets: TCP to or from any of ``ports``, IPv4 or IPv6, minus the
    outgoing copy of loopback packets.

    Nothing more is dropped in the kernel, because every remaining packet can change a
    result: pure ACKs move the TCP state and count zero windows, keepalives and
    retransmits; payload bytes carry the HTTP/2 frames (cut short, they count as missed
    bytes and lose frame boundaries); outgoing packets on other interfaces are the
    local client's own. What only the analyzer can tell (a packet seen twice on "any",
    on a bridge and on its port, say) needs connection state a classic BPF program
    does not have."""
    accept = "accept"
    prog: list[tuple[int, object, object, int]] = []
    if loopback_ifindex is not None:
        prog += [
            (BPF_LD_W_ABS, 0, 0, SKF_AD_OFF + SKF_AD_IFINDEX),
            (BPF_JEQ_K, 0, "ip", loopback_ifindex),
            (BPF_LD_W_ABS, 0, 0, SKF_AD_OFF + SKF_AD_PKTTYPE),
            (BPF_JEQ_K, "drop", 0, PACKET_OUTGOING),
        ]
    prog += [
        (-1, "ip", None, 0),
        (BPF_LD_B_ABS, 0, 0, 0),
        (BPF_ALU_AND_K, 0, 0, 0xF0),
        (BPF_JEQ_K, 0, "v6", 0x40),
        # IPv4: TCP, first fragment only (later ones carry no ports).
        (BPF_LD_B_ABS, 0, 0, 9),
        (BPF_JEQ_K, 0, "drop", 6),
        (BPF_LD_H_ABS, 0, 0, 6),
        (BPF_JSET_K, "drop", 0, 0x1FFF),
        (BPF_LDX_B_MSH, 0, 0, 0),
        (BPF_LD_H_IND, 0, 0, 0),
        *[(BPF_JEQ_K, accept, 0, p) for p in sorted(ports)],
        (BPF_LD_H_IND, 0, 0, 2),
        *[(BPF_JEQ_K, accept, 0, p) for p in sorted(ports)],
        (BPF_RET_K, 0, 0, 0),
        (-1, "v6", None, 0),
        (BPF_JEQ_K, 0, "drop", 0x60),
        (BPF_LD_B_ABS, 0, 0, 6),
        (BPF_JEQ_K, "tcp6", 0, 6),
        # Extension headers before TCP: let the decoder walk them.
        *[(BPF_JEQ_K, accept, 0, nh) for nh in (0, 43, 44, 51, 60)],
        (BPF_RET_K, 0, 0, 0),
        (-1, "tcp6", None, 0),
        (BPF_LD_H_ABS, 0, 0, 40),
        *[(BPF_JEQ_K, accept, 0, p) for p in sorted(ports)],
        (BPF_LD_H_ABS, 0, 0, 42),
        *[(BPF_JEQ_K, accept, 0, p) for p in sorted(ports)],
        (-1, "drop", None, 0),
        (BPF_RET_K, 0, 0, 0),
        (-1, accept, None, 0),
        (BPF_RET_K, 0, 0, snaplen),
    ]
    return _assemble(prog)


def compile_user_filter(expression: str) -> list[Insn]:
    """Compile BPF text with libpcap (through scapy) for raw IP packets."""
    try:
        from scapy.arch.common import compile_filter
        from scapy.error import Scapy_Exception
    except ImportError as exc:  # pragma: no cover - scapy is a dependency
        raise CaptureError(f"--filter needs scapy: {exc}") from None
    try:
        program = compile_filter(expression, linktype=DLT_RAW)
    except ImportError:
        raise CaptureError(
            "--filter needs libpcap to compile the expression, and it is not installed "
            "(Debian: apt-get install libpcap0.8); without --filter, tracer filters on "
            "--port by itself"
        ) from None
    except (Scapy_Exception, OSError) as exc:
        raise CaptureError(f"--filter {expression!r}: {exc}") from None
    return [(i.code, i.jt, i.jf, i.k) for i in program.bf_insns[: program.bf_len]]


def chain(first: list[Insn], second: list[Insn]) -> list[Insn]:
    """Run ``second`` only on what ``first`` accepts (ANDed filters)."""
    out: list[Insn] = []
    n = len(first)
    for i, (code, jt, jf, k) in enumerate(first):
        if code == BPF_RET_K and k != 0:
            # An accept becomes "continue with the second program". Written as an
            # always-taken jump (ja) to the start of ``second``.
            out.append((0x05, 0, 0, n - i - 1))
        else:
            out.append((code, jt, jf, k))
    return out + second


def attach(sock: socket.socket, program: list[Insn]) -> None:
    if len(program) > 4096:
        raise CaptureError(f"filter of {len(program)} instructions is too long")
    blob = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(blob)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(1)
        except BlockingIOError:
            return


def _interface_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise CaptureError(
            f"no network interface {name!r} (see `ip link`; `any` captures on all)"
        ) from None


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 1 << 20 else f"{n / 1024:g} KiB"


def permission_error(exc: OSError) -> CaptureError:
    return CaptureError(
        f"cannot open a packet socket ({exc.strerror}): live capture needs root or the "
        "CAP_NET_RAW capability. Run it with sudo, or grant the capability to the "
        "interpreter once: sudo setcap cap_net_raw,cap_net_admin+eip "
        "$(readlink -f $(command -v python3))"
    )


class LiveCapture:
    """Packet sockets on one or more interfaces ("any" for all), read as one stream."""

    def __init__(
        self,
        interfaces: list[str],
        ports: frozenset[int],
        *,
        snaplen: int = 262144,
        buffer_bytes: int = DEFAULT_BUFFER,
        user_filter: str | None = None,
        ring: bool = True,
    ) -> None:
        """``buffer_bytes``: the kernel's room for packets not yet read, per socket: the
        ring's size, or the socket's receive buffer without the ring."""
        self.interfaces = interfaces or ["any"]
        self.received = 0
        self.dropped = 0
        self.ring_full = 0  # times a ring was full (the kernel dropped while it was)
        self.sockets: list[socket.socket] = []
        self.rings: list[Ring] = []
        self.ring_refused = False  # the ring was wanted and the kernel refused it
        loopback = None
        with contextlib.suppress(OSError):
            loopback = socket.if_nametoindex("lo")
        program = port_filter(ports, snaplen, loopback)
        if user_filter:
            program = chain(program, compile_user_filter(user_filter))
        if ring:
            try:
                self._open(program, snaplen, buffer_bytes, ring=True)
                first = self.rings[0]
                self.receive = (f"receive ring: {_size(len(self.rings) * first.size)} "
                                f"({first.block_count} blocks of {_size(first.block_size)}"
                                + (f" on each of {len(self.rings)} sockets" if
                                   len(self.rings) > 1 else "") + ")")
            except RingUnavailable as exc:
                self.close()
                ring = False
                self.ring_refused = True
                self.receive = (f"no receive ring ({exc}): reading one packet per system "
                                f"call, which takes more CPU per packet")
        else:
            self.receive = ("receive ring off: reading one packet per system call, which "
                            "takes more CPU per packet")
        if not ring:
            self._open(program, snaplen, buffer_bytes, ring=False)
        self.statistics()  # the kernel counted what came before the filter: start from 0
        self.received = self.dropped = self.ring_full = 0
        self._poll = select.poll()
        for sock in self.sockets:
            self._poll.register(sock.fileno(), select.POLLIN)
        self._by_fd = {s.fileno(): s for s in self.sockets}

    def _open(self, program: list[Insn], snaplen: int, buffer_bytes: int, *,
              ring: bool) -> None:
        try:
            for name in self.interfaces:
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM,
                                     socket.htons(ETH_P_ALL))
                self.sockets.append(sock)
                attach(sock, program)
                if not ring:  # with the ring, the ring holds the packets
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer_bytes)
                    except PermissionError:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
                if name != "any":
                    _interface_index(name)
                    sock.bind((name, ETH_P_ALL))
                sock.setblocking(False)
                # The socket received from its creation until the filter and the bind:
                # throw that away (as libpcap does), only filtered packets are read.
                # (Setting up the ring would also discard them.)
                _drain(sock)
                if ring:
                    self.rings.append(Ring(sock, buffer_bytes, snaplen))
        except PermissionError as exc:
            self.close()
            raise permission_error(exc) from None
        except OSError as exc:
            self.close()
            if exc.errno == errno.ENODEV:
                raise CaptureError(f"no such interface among {self.interfaces}") from None
            raise CaptureError(f"cannot capture on {self.interfaces}: {exc}") from None

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
        self.rings = []
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets = []

    def __enter__(self) -> LiveCapture:  # not typing.Self: that needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_buffer(self, size: int) -> None:
        """Shrink or grow the socket's receive buffer (the recv path; a ring's size is set
        when it is made)."""
        for sock in self.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def statistics(self) -> tuple[int, int]:
        """Packets the filter passed and packets the kernel dropped, since the start."""
        if self.rings:
            for ring in self.rings:
                packets, drops, full = ring.statistics()
                self.received += packets
                self.dropped += drops
                self.ring_full += full
            return self.received, self.dropped
        for sock in self.sockets:
            raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            packets, drops = struct.unpack("II", raw)  # the kernel resets them on read
            self.received += packets
            self.dropped += drops
        return self.received, self.dropped

    @property
    def ring_malformed(self) -> int:
        """Blocks of a ring cut short at a packet header pointing outside the block."""
        return sum(ring.malformed for ring in self.rings)

    @property
    def ring_bytes(self) -> int:
        """Bytes of receive ring in use (0: one recv per packet)."""
        return sum(ring.size for ring in self.rings)

    def packets(self, turn: float) -> Iterator[Packet | None]:
        """Packets as they come, and None at least every ``turn`` seconds whatever the
        traffic (none, a trickle or a flood): the caller gets control back on time to
        flush, tick, show its status and check for signals. Also None before each wait for
        the kernel: the caller acts at once on what it has (new connections to attribute)."""
        if self.rings:
            return ring_packets(self.rings, turn, self._socket_error)
        return self._received(turn, False)

    def tagged_packets(self, turn: float) -> Iterator[TaggedPacket | None]:
        """As ``packets``, each with its sockaddr_ll (tracer.sources.ring.TaggedPacket)."""
        if self.rings:
            return ring_packets(self.rings, turn, self._socket_error, True)
        return self._received(turn, True)

    def _socket_error(self, ring: Ring, error: int) -> None:
        if error == errno.ENETDOWN:
            raise CaptureError(f"interface {self.interfaces} went down")
        raise CaptureError(f"capture on {self.interfaces} failed: "
                           f"{os.strerror(error) if error else 'the socket closed'}")

    @overload
    def _received(self, turn: float, tagged: Literal[False]) -> Iterator[Packet | None]: ...

    @overload
    def _received(self, turn: float, tagged: Literal[True]
                  ) -> Iterator[TaggedPacket | None]: ...

    def _received(self, turn: float, tagged: bool
                  ) -> Iterator[Packet | TaggedPacket | None]:
        """One recv per packet (recvfrom when ``tagged``). The clock is read for each
        packet's timestamp anyway, so the deadline costs one comparison."""
        clock = time.time
        poll = self._poll.poll
        by_fd = self._by_fd
        raw = LINKTYPE_RAW
        sockets = self.sockets
        link = _SockaddrLL()
        next_turn = clock() + turn
        while True:
            # One socket is drained straight away; several, those that have packets.
            for sock in sockets if len(sockets) == 1 else [by_fd[fd] for fd, _ in poll(0)]:
                recv = sock.recv
                recvfrom = sock.recvfrom
                try:
                    while True:
                        if tagged:
                            data, address = recvfrom(READ_SIZE)
                            now = clock()
                            yield now, raw, data, link.pack(address), len(data)
                        else:
                            data = recv(READ_SIZE)
                            now = clock()
                            yield now, raw, data
                        if now >= next_turn:
                            next_turn = now + turn
                            yield None
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno == errno.ENETDOWN:
                        raise CaptureError(f"interface {self.interfaces} went down") from None
                    raise
            now = clock()
            if now < next_turn:
                yield None  # nothing more for now (the turn goes on)
                now = clock()
            if now >= next_turn or not poll(max(1, int((next_turn - now) * 1000) + 1)):
                next_turn = clock() + turn
                yield None


class _SockaddrLL:
    """recvfrom's address of a packet socket (interface name, protocol, packet type,
    hardware type, address) back into the sockaddr_ll the kernel gave, as the ring
    carries it. Python turned the interface index into its name (empty when the interface
    was gone by then: index 0, unknown); names are looked up once."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {"": 0}

    def pack(self, address: tuple[str, int, int, int, bytes]) -> bytes:
        name, protocol, pkttype, hatype, hwaddr = address
        index = self._index.get(name)
        if index is None:
            if len(self._index) >= 4096:  # names of interfaces long gone: start again
                self._index = {"": 0}
            try:
                index = socket.if_nametoindex(name)
            except OSError:
                index = 0  # renamed or gone since the kernel named it
            self._index[name] = index
        return SOCKADDR_LL.pack(socket.AF_PACKET, protocol.to_bytes(2, "big"), index, hatype,
                                pkttype, len(hwaddr), hwaddr)


def drop_privileges(user: str) -> None:
    """Become ``user`` (after the sockets are open): no more root for the rest."""
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise CaptureError(f"--user {user}: no such user") from None
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
