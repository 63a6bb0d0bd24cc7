"""Link layer, IPv4/IPv6 and TCP header decoding: frame bytes in, one TCP segment tuple out.

Pure and struct based: the hot path of every capture goes through here, so each link type
gets one closure that does the whole job without allocating anything but the result.

A decoder returns one of:
- a segment tuple ``(key, sport, dport, seq, ack, flags, window, payload, wire_len)``:
  ``key`` is the raw source address, destination address, source port and destination
  port (12 bytes for IPv4, 36 for IPv6), ``payload`` the captured TCP payload and
  ``wire_len`` its length on the wire (longer than ``payload`` when the capture's snap
  length cut the packet);
- an ``int`` skip code (``SKIP_*``): traffic that is not ours (not TCP, other ports, the
  outgoing copy of a loopback packet, ...);
- or it raises ``Malformed`` with a stable reason code.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

# Link types (https://www.tcpdump.org/linktypes.html)
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_BSD = 12  # DLT_RAW on most BSDs
LINKTYPE_RAW_OPENBSD = 14
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

LINKTYPE_NAMES = {
    LINKTYPE_NULL: "NULL",
    LINKTYPE_ETHERNET: "EN10MB",
    LINKTYPE_RAW_BSD: "RAW",
    LINKTYPE_RAW_OPENBSD: "RAW",
    LINKTYPE_RAW: "RAW",
    LINKTYPE_LOOP: "LOOP",
    LINKTYPE_LINUX_SLL: "LINUX_SLL",
    LINKTYPE_IPV4: "IPV4",
    LINKTYPE_IPV6: "IPV6",
    LINKTYPE_LINUX_SLL2: "LINUX_SLL2",
}

# TCP flag bits as they sit in the header (NS is moved to bit 8).
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80
NS = 0x100

# Skip codes: why a frame is not a segment of ours. Not anomalies.
SKIP_NOT_IP = 1
SKIP_NOT_TCP = 2
SKIP_OTHER_PORT = 3
SKIP_LOOPBACK_OUTGOING = 4
SKIP_FRAGMENT = 5
SKIP_UNSUPPORTED_LINKTYPE = 6
SKIP_OTHER_SHARD = 7  # a segment of ours that another worker process handles
SKIP_NAMES = {
    SKIP_NOT_IP: "not IP",
    SKIP_NOT_TCP: "not TCP",
    SKIP_OTHER_PORT: "other ports",
    SKIP_LOOPBACK_OUTGOING: "loopback outgoing copies",
    SKIP_FRAGMENT: "non-first IP fragments",
    SKIP_UNSUPPORTED_LINKTYPE: "unsupported link types",
    SKIP_OTHER_SHARD: "handled by another worker",
}

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
_VLAN_TYPES = (0x8100, 0x88A8, 0x9100)
_MAX_VLAN_TAGS = 4
_MAX_IPV6_EXTENSIONS = 8
# IPv6 extension headers whose length is (hdr_ext_len + 1) * 8.
_IPV6_EXT_8 = frozenset((0, 43, 60, 135, 139, 140))
_IPV6_FRAGMENT = 44
_IPV6_AH = 51
# sll_pkttype PACKET_OUTGOING and ARPHRD_LOOPBACK: loopback packets appear twice on "any".
_PACKET_OUTGOING = 4
_ARPHRD_LOOPBACK = 772
# BSD loopback address family values: AF_INET is 2 everywhere, AF_INET6 differs per OS.
_AF_INET = 2
_AF_INET6 = frozenset((10, 23, 24, 28, 30))


class Malformed(Exception):
    """A frame that claims to be ours but cannot be decoded; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


SegmentTuple = tuple[bytes, int, int, int, int, int, int, bytes, int]
DecodeResult = SegmentTuple | int
Decoder = Callable[[bytes], DecodeResult]


class Segment(NamedTuple):
    """Named view of a segment tuple, for tests and slow paths."""

    key: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes
    wire_len: int


def key_addresses(key: bytes) -> tuple[bytes, bytes]:
    """Source and destination address bytes of a flow key."""
    if len(key) == 12:
        return key[0:4], key[4:8]
    return key[0:16], key[16:32]


def reverse_key(key: bytes) -> bytes:
    """The key of the same flow seen from the other direction."""
    if len(key) == 12:
        return key[4:8] + key[0:4] + key[10:12] + key[8:10]
    return key[16:32] + key[0:16] + key[34:36] + key[32:34]


def make_decoder(
    linktype: int, ports: frozenset[int], shard: tuple[int, int] = (0, 1)
) -> Decoder | None:
    """The decoder for one link type, or None when the fast path does not know it.

    ``shard`` = (index, count) splits the connections among ``count`` workers by the sum
    of the two ports (the same from both directions): segments of the other workers'
    connections come back as SKIP_OTHER_SHARD, before anything is copied."""
    unpack_tcp = struct.Struct(">HHIIBBH").unpack_from
    shard_index, shard_count = shard

    def tcp(frame: bytes, ip: int, t: int, end: int, n: int, addr_end: int) -> DecodeResult:
        if n < t + 20:
            raise Malformed("truncated_tcp_header", f"{n - t} bytes captured")
        sport, dport, seq, ack, offx, flags, win = unpack_tcp(frame, t)
        if sport not in ports and dport not in ports:
            return SKIP_OTHER_PORT
        if shard_count > 1 and (sport + dport) % shard_count != shard_index:
            return SKIP_OTHER_SHARD
        doff = (offx >> 4) << 2
        if doff < 20:
            raise Malformed("bad_tcp_data_offset", f"data offset {doff}")
        p = t + doff
        if p > end:
            raise Malformed("tcp_header_beyond_ip_length", f"header {doff}, segment {end - t}")
        key = frame[ip:t + 4] if addr_end == t else frame[ip:addr_end] + frame[t:t + 4]
        if offx & 1:
            flags |= NS
        if p == end:
            return (key, sport, dport, seq, ack, flags, win, b"", 0)
        return (key, sport, dport, seq, ack, flags, win, frame[p:end], end - p)

    def ipv4(frame: bytes, off: int) -> DecodeResult:
        n = len(frame)
        if n < off + 20:
            raise Malformed("truncated_ip_header", f"{n - off} bytes captured")
        vihl = frame[off]
        if vihl >> 4 != 4:
            raise Malformed("bad_ip_version", f"version {vihl >> 4} in an IPv4 frame")
        ihl = (vihl & 15) << 2
        if ihl < 20:
            raise Malformed("bad_ip_header_length", f"header length {ihl}")
        if frame[off + 9] != 6:
            return SKIP_NOT_TCP
        total = frame[off + 2] << 8 | frame[off + 3]
        if total < ihl + 20:
            if total == 0:
                # TCP segmentation offload: the kernel hands the capture a super-segment
                # whose length field is still zero; the captured bytes are the packet.
                total = n - off
            if total < ihl + 20:
                raise Malformed("bad_ip_total_length", f"total length {total}")
        frag = (frame[off + 6] & 0x3F) << 8 | frame[off + 7]
        if frag:
            if frag & 0x1FFF:
                return SKIP_FRAGMENT
            raise Malformed("ip_fragment", "first fragment of a fragmented TCP segment")
        return tcp(frame, off + 12, off + ihl, off + total, n, off + 20)

    def ipv6(frame: bytes, off: int) -> DecodeResult:
        n = len(frame)
        if n < off + 40:
            raise Malformed("truncated_ip_header", f"{n - off} bytes captured")
        if frame[off] >> 4 != 6:
            raise Malformed("bad_ip_version", f"version {frame[off] >> 4} in an IPv6 frame")
        plen = frame[off + 4] << 8 | frame[off + 5]
        nh = frame[off + 6]
        t = off + 40
        end = t + plen if plen else n
        hops = 0
        while nh != 6:
            if nh in _IPV6_EXT_8 or nh == _IPV6_AH:
                if n < t + 2:
                    raise Malformed("truncated_ip_header", "IPv6 extension header cut off")
                step = (frame[t + 1] + 2) * 4 if nh == _IPV6_AH else (frame[t + 1] + 1) * 8
                nh = frame[t]
                t += step
            elif nh == _IPV6_FRAGMENT:
                if n < t + 8:
                    raise Malformed("truncated_ip_header", "IPv6 fragment header cut off")
                offset_flags = frame[t + 2] << 8 | frame[t + 3]
                if offset_flags & 0xFFF8:
                    return SKIP_FRAGMENT
                if offset_flags & 1:
                    raise Malformed("ip_fragment", "first fragment of a fragmented TCP segment")
                # An atomic fragment (offset 0, no more fragments; RFC 6946) is whole.
                nh = frame[t]
                t += 8
            else:
                return SKIP_NOT_TCP
            hops += 1
            if hops > _MAX_IPV6_EXTENSIONS or t > end:
                raise Malformed("bad_ipv6_extension_chain", f"{hops} headers, offset {t - off}")
        return tcp(frame, off + 8, t, end, n, off + 40)

    def by_ethertype(frame: bytes, etype: int, off: int) -> DecodeResult:
        if etype == ETHERTYPE_IPV4:
            return ipv4(frame, off)
        if etype == ETHERTYPE_IPV6:
            return ipv6(frame, off)
        return SKIP_NOT_IP

    def by_version(frame: bytes, off: int) -> DecodeResult:
        if len(frame) <= off:
            raise Malformed("truncated_ip_header", "empty packet")
        version = frame[off] >> 4
        if version == 4:
            return ipv4(frame, off)
        if version == 6:
            return ipv6(frame, off)
        return SKIP_NOT_IP

    def ethernet(frame: bytes) -> DecodeResult:
        # Fast path for the common frame: IPv4 without options or fragmentation, a TCP
        # header in full, consistent lengths. Anything else takes the general path below,
        # which makes the same decisions with more checks.
        if (
            len(frame) >= 54
            and frame[12] == 8
            and frame[13] == 0
            and frame[14] == 0x45
            and frame[23] == 6
            and not frame[20] & 0x3F
            and not frame[21]
        ):
            sport, dport, seq, ack, offx, flags, win = unpack_tcp(frame, 34)
            if sport not in ports and dport not in ports:
                return SKIP_OTHER_PORT
            if shard_count > 1 and (sport + dport) % shard_count != shard_index:
                return SKIP_OTHER_SHARD
            end = 14 + (frame[16] << 8 | frame[17])
            p = 34 + ((offx >> 4) << 2)
            if offx >= 0x50 and end >= p:
                if offx & 1:
                    flags |= NS
                if p == end:
                    return (frame[26:38], sport, dport, seq, ack, flags, win, b"", 0)
                return (frame[26:38], sport, dport, seq, ack, flags, win, frame[p:end], end - p)
        if len(frame) < 14:
            raise Malformed("truncated_link_header", f"{len(frame)}-byte Ethernet frame")
        etype = frame[12] << 8 | frame[13]
        if etype == ETHERTYPE_IPV4:
            return ipv4(frame, 14)
        off = 14
        tags = 0
        while etype in _VLAN_TYPES:
            if tags == _MAX_VLAN_TAGS:
                raise Malformed("too_many_vlan_tags", f"more than {_MAX_VLAN_TAGS} 802.1Q tags")
            if len(frame) < off + 4:
                raise Malformed("truncated_link_header", "802.1Q tag cut off")
            etype = frame[off + 2] << 8 | frame[off + 3]
            off += 4
            tags += 1
        return by_ethertype(frame, etype, off)

    def linux_sll(frame: bytes) -> DecodeResult:
        if len(frame) < 16:
            raise Malformed("truncated_link_header", f"{len(frame)}-byte SLL header")
        if frame[1] == _PACKET_OUTGOING and frame[0] == 0 and (
            frame[2] << 8 | frame[3]
        ) == _ARPHRD_LOOPBACK:
            return SKIP_LOOPBACK_OUTGOING
        return by_ethertype(frame, frame[14] << 8 | frame[15], 16)

    def linux_sll2(frame: bytes) -> DecodeResult:
        if len(frame) < 20:
            raise Malformed("truncated_link_header", f"{len(frame)}-byte SLL2 header")
        if frame[10] == _PACKET_OUTGOING and (frame[8] << 8 | frame[9]) == _ARPHRD_LOOPBACK:
            return SKIP_LOOPBACK_OUTGOING
        return by_ethertype(frame, frame[0] << 8 | frame[1], 20)

    def raw(frame: bytes) -> DecodeResult:
        return by_version(frame, 0)

    def null(frame: bytes) -> DecodeResult:
        # The family is in the byte order of the host that captured.
        if len(frame) < 4:
            raise Malformed("truncated_link_header", f"{len(frame)}-byte loopback header")
        family = int.from_bytes(frame[0:4], "little")
        if family > 0xFFFF:
            family = int.from_bytes(frame[0:4], "big")
        return _by_family(frame, family)

    def loop(frame: bytes) -> DecodeResult:
        if len(frame) < 4:
            raise Malformed("truncated_link_header", f"{len(frame)}-byte loopback header")
        return _by_family(frame, int.from_bytes(frame[0:4], "big"))

    def _by_family(frame: bytes, family: int) -> DecodeResult:
        if family == _AF_INET:
            return ipv4(frame, 4)
        if family in _AF_INET6:
            return ipv6(frame, 4)
        return SKIP_NOT_IP

    def ipv4_only(frame: bytes) -> DecodeResult:
        return ipv4(frame, 0)

    def ipv6_only(frame: bytes) -> DecodeResult:
        return ipv6(frame, 0)

    table: dict[int, Decoder] = {
        LINKTYPE_ETHERNET: ethernet,
        LINKTYPE_LINUX_SLL: linux_sll,
        LINKTYPE_LINUX_SLL2: linux_sll2,
        LINKTYPE_RAW: raw,
        LINKTYPE_RAW_BSD: raw,
        LINKTYPE_RAW_OPENBSD: raw,
        LINKTYPE_NULL: null,
        LINKTYPE_LOOP: loop,
        LINKTYPE_IPV4: ipv4_only,
        LINKTYPE_IPV6: ipv6_only,
    }
    return table.get(linktype)


Prefilter = Callable[[int, bytes, int, int], bool]


def make_shard_prefilter(ports: frozenset[int], shard: tuple[int, int]) -> Prefilter:
    """For a capture reader: False for a record that is certainly another worker's segment.

    Looks at the record in the reader's own buffer (``buf[start:end]``) before any copy is
    made: only the common frame (Ethernet, IPv4 without options or fragmentation, TCP) is
    recognised; everything else is kept, and the decoder decides."""
    index, count = shard
    unpack_ports = struct.Struct(">HH").unpack_from

    def keep(linktype: int, buf: bytes, start: int, end: int) -> bool:
        if (
            linktype != LINKTYPE_ETHERNET
            or end - start < 54
            or buf[start + 12] != 8
            or buf[start + 13] != 0
            or buf[start + 14] != 0x45
            or buf[start + 23] != 6
        ):
            return True
        sport, dport = unpack_ports(buf, start + 34)
        if sport not in ports and dport not in ports:
            return True  # not ours at all: the decoder counts it
        mine: bool = (sport + dport) % count == index
        return mine

    return keep


def make_ip_decoder(ports: frozenset[int], shard: tuple[int, int] = (0, 1)) -> Decoder:
    """Decoder for a bare IPv4 or IPv6 packet (used after another layer found the IP header)."""
    decoder = make_decoder(LINKTYPE_RAW, ports, shard)
    assert decoder is not None
    return decoder
