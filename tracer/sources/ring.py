"""The memory-mapped receive ring (TPACKET_V3) of one packet socket: the kernel fills blocks
of packets in memory shared with this process, so a block of packets costs one poll at
most instead of one system call per packet.

The ring is ``block_count`` blocks of ``block_size`` bytes. The kernel owns a block
(status TP_STATUS_KERNEL) until it is full or ``RETIRE_MS`` after its first packet,
then hands it over (TP_STATUS_USER); the reader walks the block's packet headers
(tpacket3_hdr: next offset, arrival time in seconds and nanoseconds, captured length,
offset of the network header), copies each packet out and hands the block back by
writing TP_STATUS_KERNEL into its status. When every block is the reader's, the kernel
drops what arrives and counts it (PACKET_STATISTICS, tpacket_stats_v3).

At light traffic a block is handed over RETIRE_MS after its first packet however full
it is, so the ring holds at least block_count * RETIRE_MS of traffic (256 * 1 ms with the
default 32 MiB) before a reader that stalls loses packets; under a flood blocks fill
first and it holds ring size / packet bytes. RETIRE_MS is short because a connection's
SYN must reach attribution while its socket still exists: with 5 ms, 28-34% of 2 ms calls
were attributed (benchmarks/attribution.py --hold-ms 2), with 1 ms 98-99%.

Memory is fixed when the ring is made: the kernel allocates every block then, and maps
them all into this process (they count in its resident size from the start).
"""

from __future__ import annotations

import mmap
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Literal, overload

from tracer.decode import LINKTYPE_RAW

SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1

RETIRE_MS = 1  # a partly filled block is handed over this long after its first packet
MAX_PACKET = 1 << 16  # the largest packet kept whole (the recv path reads at most this)
# Room in a block besides the packet: the block header (48 bytes), the packet's header
# (tpacket3_hdr, 48), the link-layer address (sockaddr_ll, 20, aligned) and alignment.
BLOCK_OVERHEAD = 256
FRAME_SIZE = 2048  # TPACKET_V3 keeps packets of any size in a block; the kernel still
# checks that blocks divide into frames of a valid size

_REQ3 = struct.Struct("=7I")  # tpacket_req3
_STATS3 = struct.Struct("=III")  # tpacket_stats_v3: packets, drops, freeze_q_cnt
# tpacket_block_desc from offset 8: block_status, num_pkts, offset_to_first_pkt
BLOCK_HEADER = struct.Struct("=III")
BLOCK_STATUS_AT = 8
# tpacket3_hdr: tp_next_offset, tp_sec, tp_nsec, tp_snaplen, (tp_len, tp_status,
# tp_mac skipped), tp_net
PACKET_HEADER = struct.Struct("=IIII10xH")
# The same with tp_len (the packet's length before the snap length cut it), for --write.
TAGGED_HEADER = struct.Struct("=IIIII6xH")
# After the packet header (TPACKET_ALIGN(sizeof(struct tpacket3_hdr))) the kernel writes
# the packet's sockaddr_ll (20 bytes): interface index, packet type, protocol, hardware
# type and address. Every packet it writes starts after it.
SOCKADDR_AT = 48
SOCKADDR_END = SOCKADDR_AT + 20
# struct sockaddr_ll: family, protocol (network byte order: kept as 2 bytes), interface
# index, hardware type, packet type, address length, address (its first 8 bytes)
SOCKADDR_LL = struct.Struct("=H2siHBB8s")
_KERNEL = struct.pack("=I", TP_STATUS_KERNEL)


class RingUnavailable(Exception):
    """The kernel refused the ring (too old, out of memory, not allowed): read with recv."""


def geometry(ring_bytes: int, snaplen: int) -> tuple[int, int]:
    """(block size, block count) for a ring of at most ``ring_bytes`` (at least one page):
    blocks big enough for the largest packet kept, as many as fit."""
    page = mmap.PAGESIZE
    need = min(snaplen, MAX_PACKET) + BLOCK_OVERHEAD
    block = page
    while block < need:
        block *= 2
    total = max(page, ring_bytes // page * page)
    if total < block:  # a ring smaller than one packet: one block, packets cut to fit
        return total, 1
    return block, total // block


class Ring:
    """The receive ring of ``sock`` (already filtered and bound); raises RingUnavailable."""

    def __init__(self, sock: socket.socket, ring_bytes: int, snaplen: int) -> None:
        self.block_size, self.block_count = geometry(ring_bytes, snaplen)
        self.size = self.block_size * self.block_count
        frame = min(FRAME_SIZE, self.block_size)
        req = _REQ3.pack(self.block_size, self.block_count,
                         self.block_size // frame * self.block_count, frame,
                         RETIRE_MS, 0, 0)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        except OSError as exc:
            raise RingUnavailable(f"TPACKET_V3 receive ring of {self.size:,} bytes refused "
                                  f"({exc.strerror or exc})") from None
        try:
            self.map = mmap.mmap(sock.fileno(), self.size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise RingUnavailable(f"cannot map the receive ring ({exc.strerror or exc})") \
                from None
        self.sock = sock
        self.current = 0  # the next block to read, in the kernel's order
        self.malformed = 0  # blocks cut short: a packet header pointing outside its block

    def statistics(self) -> tuple[int, int, int]:
        """Packets the filter passed, packets dropped, times the ring was full (the
        kernel resets them on read)."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS3.size)
        packets, drops, frozen = _STATS3.unpack(raw.ljust(_STATS3.size, b"\0"))
        return packets, drops, frozen

    def close(self) -> None:
        self.map.close()


Packet = tuple[float, int, bytes]
# A packet with where it was seen: its sockaddr_ll as the kernel wrote it (host byte order
# but for the protocol), and its length on the wire (more than the bytes when cut short).
TaggedPacket = tuple[float, int, bytes, bytes, int]


@overload
def ring_packets(rings: list[Ring], turn: float, on_error: Callable[[Ring, int], None],
                 tagged: Literal[False] = False) -> Iterator[Packet | None]: ...


@overload
def ring_packets(rings: list[Ring], turn: float, on_error: Callable[[Ring, int], None],
                 tagged: Literal[True]) -> Iterator[TaggedPacket | None]: ...


def ring_packets(rings: list[Ring], turn: float, on_error: Callable[[Ring, int], None],
                 tagged: bool = False) -> Iterator[Packet | TaggedPacket | None]:
    """Packets of every ring as (arrival time, LINKTYPE_RAW, IP packet), or ``tagged``
    with their sockaddr_ll and length on the wire as well (TaggedPacket, what --write
    keeps), and None at least every ``turn`` seconds whatever the traffic, and before
    every wait for the kernel.

    The clock is read once per block and at every wait; a block holds at most
    block_size / 64 packets, so a turn is late by one block's work at most. A packet
    header that points outside its block (never seen from a kernel) is counted in
    ``Ring.malformed`` and the rest of that block skipped. ``on_error`` is told of a
    socket error (an interface gone down) with the socket's error number, and raises.
    The block status is read before the packets it covers: x86's store order makes the
    kernel's writes visible in that order."""
    clock = time.time
    poller = select.poll()
    by_fd = {}
    for ring in rings:
        poller.register(ring.sock.fileno(), select.POLLIN)
        by_fd[ring.sock.fileno()] = ring
    poll = poller.poll
    unpack_packet = PACKET_HEADER.unpack_from
    unpack_tagged = TAGGED_HEADER.unpack_from
    unpack_block = BLOCK_HEADER.unpack_from
    raw = LINKTYPE_RAW
    status_at = BLOCK_STATUS_AT
    header = SOCKADDR_END  # a packet header and its sockaddr_ll
    sockaddr_at = SOCKADDR_AT
    kernel = _KERNEL
    next_turn = clock() + turn
    while True:
        for ring in rings:
            mm = ring.map
            size = ring.block_size
            count = ring.block_count
            for _ in range(count):  # one lap of a ring at most, then the next ring
                base = ring.current * size
                status, npkts, first = unpack_block(mm, base + status_at)
                if not status & TP_STATUS_USER:
                    break
                end = base + size
                at = base + first
                # Two copies of the walk, so the analyzer's path pays no test per packet.
                if not tagged:
                    for _ in range(npkts):
                        step, sec, nsec, snaplen, net = unpack_packet(mm, at)
                        start = at + net
                        stop = start + snaplen
                        if stop > end or net < header:
                            ring.malformed += 1
                            break
                        yield sec + nsec * 1e-9, raw, mm[start:stop]
                        if not step:
                            break
                        at += step
                        if at + header > end:
                            ring.malformed += 1
                            break
                else:
                    for _ in range(npkts):
                        step, sec, nsec, snaplen, wirelen, net = unpack_tagged(mm, at)
                        start = at + net
                        stop = start + snaplen
                        if stop > end or net < header:
                            ring.malformed += 1
                            break
                        yield (sec + nsec * 1e-9, raw, mm[start:stop],
                               mm[at + sockaddr_at:at + header], wirelen)
                        if not step:
                            break
                        at += step
                        if at + header > end:
                            ring.malformed += 1
                            break
                mm[base + status_at:base + status_at + 4] = kernel
                ring.current = (ring.current + 1) % count
                now = clock()
                if now >= next_turn:
                    next_turn = now + turn
                    yield None
        now = clock()
        if now >= next_turn:
            next_turn = now + turn
            yield None
            continue
        if any(_ready(ring) for ring in rings):
            continue
        yield None  # nothing more for now: the caller acts on what it has before the wait
        if any(_ready(ring) for ring in rings):
            continue
        now = clock()
        for fd, events in poll(max(1, int((next_turn - now) * 1000) + 1)):
            if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                ring = by_fd[fd]
                on_error(ring, ring.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))


def _ready(ring: Ring) -> bool:
    base = ring.current * ring.block_size + BLOCK_STATUS_AT
    return bool(ring.map[base] & TP_STATUS_USER)
