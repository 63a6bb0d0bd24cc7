"""Live packets from AF_PACKET sockets: (timestamp, LINKTYPE_RAW, IP packet), kernel-filtered.

Cooked (SOCK_DGRAM) packet sockets: every interface, loopback and tunnels included, hands
over the packet from its network header, so one decoder serves all of them. The kernel
runs a classic BPF program built here (no libpcap needed) that keeps TCP segments to or
from the watched ports and drops the second copy of each loopback packet (the outgoing
one: on `lo` every packet passes twice). A user filter (``--filter``, any BPF text) is
compiled by libpcap through scapy when libpcap is installed and runs after ours.

Timestamps are taken when a packet is read (microsecond clock, not the kernel's arrival
time); under load they trail arrival by the time spent in the queue, which is bounded by
the socket buffer. Kernel drop counters come from PACKET_STATISTICS.
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

from tracer.decode import LINKTYPE_RAW

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
    outgoing copy of loopback packets."""
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
    ) -> None:
        self.interfaces = interfaces or ["any"]
        self.received = 0
        self.dropped = 0
        self.sockets: list[socket.socket] = []
        loopback = None
        with contextlib.suppress(OSError):
            loopback = socket.if_nametoindex("lo")
        program = port_filter(ports, snaplen, loopback)
        if user_filter:
            program = chain(program, compile_user_filter(user_filter))
        try:
            for name in self.interfaces:
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM,
                                     socket.htons(ETH_P_ALL))
                self.sockets.append(sock)
                attach(sock, program)
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
                _drain(sock)
        except PermissionError as exc:
            self.close()
            raise permission_error(exc) from None
        except OSError as exc:
            self.close()
            if exc.errno == errno.ENODEV:
                raise CaptureError(f"no such interface among {self.interfaces}") from None
            raise CaptureError(f"cannot capture on {self.interfaces}: {exc}") from None
        self.statistics()  # the kernel counted what came before the filter: start from 0
        self.received = self.dropped = 0
        self._poll = select.poll()
        for sock in self.sockets:
            self._poll.register(sock.fileno(), select.POLLIN)
        self._by_fd = {s.fileno(): s for s in self.sockets}

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets = []

    def __enter__(self) -> LiveCapture:  # not typing.Self: that needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_buffer(self, size: int) -> None:
        """Shrink or grow the kernel receive buffer (tests make it tiny to force drops)."""
        for sock in self.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def statistics(self) -> tuple[int, int]:
        """Packets the filter passed and packets the kernel dropped, since the start."""
        for sock in self.sockets:
            raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            packets, drops = struct.unpack("II", raw)  # the kernel resets them on read
            self.received += packets
            self.dropped += drops
        return self.received, self.dropped

    def packets(self, turn: float) -> Iterator[tuple[float, int, bytes] | None]:
        """Packets as they come, and None at least every ``turn`` seconds whatever the
        traffic (none, a trickle or a flood): the caller gets control back on time to
        flush, tick, show its status and check for signals. The clock is read for each
        packet's timestamp anyway, so the deadline costs one comparison."""
        clock = time.time
        poll = self._poll.poll
        by_fd = self._by_fd
        raw = LINKTYPE_RAW
        sockets = self.sockets
        next_turn = clock() + turn
        while True:
            # One socket is drained straight away; several, those that have packets.
            for sock in sockets if len(sockets) == 1 else [by_fd[fd] for fd, _ in poll(0)]:
                recv = sock.recv
                try:
                    while True:
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
            if now >= next_turn or not poll(max(1, int((next_turn - now) * 1000) + 1)):
                next_turn = clock() + turn
                yield None


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
