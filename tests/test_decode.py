"""The link layer / IP / TCP decoder (tracer.decode) against scapy's view of the same bytes.

Every frame is built with scapy, turned into bytes, and decoded twice: by the decoder under
test and by scapy's own dissector. The segment tuple must agree with scapy's fields.
"""

from __future__ import annotations

import random
import socket
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP, IPOption_RR
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw

from tracer.decode import (
    ACK,
    CWR,
    ECE,
    FIN,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    LINKTYPE_RAW_BSD,
    LINKTYPE_RAW_OPENBSD,
    NS,
    PSH,
    RST,
    SKIP_FRAGMENT,
    SKIP_LOOPBACK_OUTGOING,
    SKIP_NOT_IP,
    SKIP_NOT_TCP,
    SKIP_OTHER_PORT,
    SYN,
    URG,
    Malformed,
    Segment,
    key_addresses,
    make_decoder,
    make_ip_decoder,
    reverse_key,
)

SERVER_PORT = 50051
PORTS = frozenset({SERVER_PORT})
V4_SRC, V4_DST = "10.1.2.3", "192.168.7.9"
V6_SRC, V6_DST = "2001:db8::1", "2001:db8:ffff::42"

ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
PACKET_HOST = 0
PACKET_OUTGOING = 4


# -- helpers ------------------------------------------------------------------------------


def decode(linktype: int, frame: bytes, ports: frozenset[int] = PORTS) -> object:
    decoder = make_decoder(linktype, ports)
    assert decoder is not None, f"no fast decoder for link type {linktype}"
    return decoder(frame)


def segment(linktype: int, frame: bytes, ports: frozenset[int] = PORTS) -> Segment:
    result = decode(linktype, frame, ports)
    assert isinstance(result, tuple), f"expected a segment, got skip code {result!r}"
    return Segment(*result)


def malformed_reason(linktype: int, frame: bytes) -> str:
    with pytest.raises(Malformed) as info:
        decode(linktype, frame)
    return info.value.reason


def eth(**fields: object) -> Packet:
    # Explicit addresses: scapy would otherwise try to resolve them on this host.
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", **fields)


def tcp4(payload: bytes = b"", sport: int = 43210, dport: int = SERVER_PORT,
         **tcp: object) -> Packet:
    tcp.setdefault("seq", 1_000_000)
    tcp.setdefault("ack", 2_000_000)
    tcp.setdefault("flags", "PA")
    tcp.setdefault("window", 512)
    return IP(src=V4_SRC, dst=V4_DST) / TCP(sport=sport, dport=dport, **tcp) / Raw(payload)


def tcp6(payload: bytes = b"", *ext: Packet, sport: int = 43210, dport: int = SERVER_PORT,
         **tcp: object) -> Packet:
    tcp.setdefault("seq", 3_000_000_000)
    tcp.setdefault("ack", 17)
    tcp.setdefault("flags", "A")
    tcp.setdefault("window", 65535)
    pkt: Packet = IPv6(src=V6_SRC, dst=V6_DST)
    for header in ext:
        pkt = pkt / header
    return pkt / TCP(sport=sport, dport=dport, **tcp) / Raw(payload)


def raw_load(pkt: Packet) -> bytes:
    """The TCP payload as scapy sees it: the Raw layer, never the link layer Padding."""
    layer = pkt.getlayer(TCP).payload
    while layer is not None and layer.__class__.__name__ != "NoPayload":
        if type(layer) is Raw:
            return bytes(layer.load)
        layer = layer.payload
    return b""


def scapy_view(ip_bytes: bytes) -> Segment:
    """The segment tuple built from scapy's dissection of an IP packet (wire_len from the
    IP length fields, as the decoder must do)."""
    version = ip_bytes[0] >> 4
    pkt = IP(ip_bytes) if version == 4 else IPv6(ip_bytes)
    tcp = pkt.getlayer(TCP)
    assert tcp is not None
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    key = (socket.inet_pton(family, pkt.src) + socket.inet_pton(family, pkt.dst)
           + struct.pack(">HH", tcp.sport, tcp.dport))
    if version == 4:
        segment_len = pkt.len - pkt.ihl * 4
    else:
        # plen counts the extension headers too: the TCP segment starts where scapy put it.
        segment_len = pkt.plen - (len(bytes(pkt.payload)) - len(bytes(tcp)))
    wire = segment_len - tcp.dataofs * 4
    return Segment(key, tcp.sport, tcp.dport, tcp.seq, tcp.ack, int(tcp.flags), tcp.window,
                   raw_load(pkt), wire)


def check(linktype: int, frame: bytes, ip_bytes: bytes) -> Segment:
    got = segment(linktype, frame)
    assert got == scapy_view(ip_bytes)
    return got


# -- Ethernet and VLAN ----------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"x", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                                     bytes(range(256)) * 5])
@pytest.mark.parametrize("flags", ["S", "SA", "A", "PA", "FA", "R", "RA", "SEC", "FSRPAUECN"])
def test_ethernet_ipv4(payload: bytes, flags: str) -> None:
    ip = tcp4(payload, flags=flags)
    frame = bytes(eth() / ip)
    got = check(LINKTYPE_ETHERNET, frame, bytes(ip))
    assert got.key == socket.inet_aton(V4_SRC) + socket.inet_aton(V4_DST) + struct.pack(
        ">HH", 43210, SERVER_PORT)
    assert got.payload == payload and got.wire_len == len(payload)


def test_tcp_flag_bits_match_scapy() -> None:
    expect = {"F": FIN, "S": SYN, "R": RST, "P": PSH, "A": ACK, "U": URG, "E": ECE, "C": CWR,
              "N": NS}
    for letter, bit in expect.items():
        got = segment(LINKTYPE_RAW, bytes(tcp4(flags=letter)))
        assert got.flags == bit, letter


def test_ethernet_ipv6() -> None:
    ip = tcp6(b"hello", sport=SERVER_PORT, dport=40000)
    got = check(LINKTYPE_ETHERNET, bytes(eth() / ip), bytes(ip))
    assert len(got.key) == 36
    assert key_addresses(got.key) == (socket.inet_pton(socket.AF_INET6, V6_SRC),
                                      socket.inet_pton(socket.AF_INET6, V6_DST))


def test_tcp_options_are_not_payload() -> None:
    ip = tcp4(b"data", options=[("MSS", 1460), ("NOP", None), ("WScale", 7),
                                ("Timestamp", (123, 456)), ("SAckOK", b"")])
    got = check(LINKTYPE_RAW, bytes(ip), bytes(ip))
    assert got.payload == b"data"


@pytest.mark.parametrize("tags", [
    [Dot1Q(vlan=10)],
    [Dot1AD(vlan=100), Dot1Q(vlan=10)],  # QinQ, 802.1ad outer tag
    [Dot1Q(vlan=100), Dot1Q(vlan=10)],  # QinQ with two 0x8100 tags
], ids=["802.1Q", "QinQ-88a8", "QinQ-8100"])
@pytest.mark.parametrize("ipv", [4, 6])
def test_vlan(tags: list[Packet], ipv: int) -> None:
    ip = tcp4(b"abc") if ipv == 4 else tcp6(b"abc")
    pkt: Packet = eth()
    for tag in tags:
        pkt = pkt / tag
    frame = bytes(pkt / ip)
    # scapy sees the same IP packet behind the tags
    parsed = Ether(frame)
    assert bytes(parsed.getlayer(IP if ipv == 4 else IPv6)) == bytes(ip)
    check(LINKTYPE_ETHERNET, frame, bytes(ip))


def _tagged(n: int, ip: bytes) -> bytes:
    frame = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01" + b"\x91\x00"
    for i in range(n):
        inner = 0x8100 if i < n - 1 else 0x0800
        frame += struct.pack(">HH", i + 1, inner)
    return frame + ip


def test_vlan_tag_limit() -> None:
    ip = bytes(tcp4(b"z"))
    check(LINKTYPE_ETHERNET, _tagged(4, ip), ip)
    assert malformed_reason(LINKTYPE_ETHERNET, _tagged(5, ip)) == "too_many_vlan_tags"


def test_vlan_tag_cut_off() -> None:
    frame = bytes(eth() / Dot1Q(vlan=5) / tcp4())
    assert malformed_reason(LINKTYPE_ETHERNET, frame[:16]) == "truncated_link_header"


def test_ethernet_not_ip_and_not_tcp() -> None:
    assert decode(LINKTYPE_ETHERNET, bytes(eth() / ARP())) == SKIP_NOT_IP
    assert decode(LINKTYPE_ETHERNET, bytes(eth() / Dot1Q() / ARP())) == SKIP_NOT_IP
    assert decode(LINKTYPE_ETHERNET,
                  bytes(eth() / IP() / UDP(sport=SERVER_PORT, dport=SERVER_PORT))) == SKIP_NOT_TCP
    assert decode(LINKTYPE_ETHERNET,
                  bytes(eth() / IPv6() / UDP(sport=SERVER_PORT, dport=1))) == SKIP_NOT_TCP


@pytest.mark.parametrize("payload", [b"", b"\x00\x01", b"01234"])
def test_ethernet_padding_is_not_payload(payload: bytes) -> None:
    ip = bytes(tcp4(payload))
    frame = bytes(eth(type=0x0800)) + ip
    assert len(frame) < 60
    padded = frame + b"\xee" * (60 - len(frame))  # non-zero padding: must not leak in
    assert Ether(padded).getlayer("Padding") is not None  # scapy sees padding too
    got = check(LINKTYPE_ETHERNET, padded, ip)
    assert got.payload == payload and got.wire_len == len(payload)


def test_ethernet_padding_ipv6() -> None:
    ip = bytes(tcp6(b""))
    assert len(ip) == 60
    got = segment(LINKTYPE_ETHERNET, bytes(eth(type=0x86DD)) + ip + b"\xee" * 8)
    assert got.payload == b"" and got.wire_len == 0


# -- Linux cooked capture (SLL, SLL2) ---------------------------------------------------------


@pytest.mark.parametrize("ipv", [4, 6])
def test_sll_incoming(ipv: int) -> None:
    ip = tcp4(b"in") if ipv == 4 else tcp6(b"in")
    frame = bytes(CookedLinux(pkttype=PACKET_HOST, lladdrtype=ARPHRD_LOOPBACK, lladdrlen=6,
                              proto=0x0800 if ipv == 4 else 0x86DD) / ip)
    assert bytes(CookedLinux(frame).payload) == bytes(ip)
    check(LINKTYPE_LINUX_SLL, frame, bytes(ip))


def test_sll_loopback_outgoing_copy_is_skipped() -> None:
    ip = tcp4(b"twice")
    out = bytes(CookedLinux(pkttype=PACKET_OUTGOING, lladdrtype=ARPHRD_LOOPBACK, proto=0x0800) / ip)
    assert CookedLinux(out).pkttype == PACKET_OUTGOING
    assert decode(LINKTYPE_LINUX_SLL, out) == SKIP_LOOPBACK_OUTGOING
    # Outgoing on a real interface is the only copy: it is decoded.
    eth_out = bytes(CookedLinux(pkttype=PACKET_OUTGOING, lladdrtype=ARPHRD_ETHER,
                                proto=0x0800) / ip)
    check(LINKTYPE_LINUX_SLL, eth_out, bytes(ip))


def test_sll_not_ip_and_short() -> None:
    assert decode(LINKTYPE_LINUX_SLL, bytes(CookedLinux(proto=0x0806) / ARP())) == SKIP_NOT_IP
    frame = bytes(CookedLinux(proto=0x0800) / tcp4())
    assert malformed_reason(LINKTYPE_LINUX_SLL, frame[:15]) == "truncated_link_header"


@pytest.mark.parametrize("ipv", [4, 6])
def test_sll2_incoming(ipv: int) -> None:
    ip = tcp6(b"v2") if ipv == 6 else tcp4(b"v2")
    frame = bytes(CookedLinuxV2(proto=0x86DD if ipv == 6 else 0x0800, ifindex=1,
                                lladdrtype=ARPHRD_LOOPBACK, pkttype=PACKET_HOST, lladdrlen=6) / ip)
    assert bytes(CookedLinuxV2(frame).payload) == bytes(ip)
    check(LINKTYPE_LINUX_SLL2, frame, bytes(ip))


def test_sll2_loopback_outgoing_copy_is_skipped() -> None:
    ip = tcp6(b"twice")
    out = bytes(CookedLinuxV2(proto=0x86DD, ifindex=1, lladdrtype=ARPHRD_LOOPBACK,
                              pkttype=PACKET_OUTGOING) / ip)
    assert CookedLinuxV2(out).pkttype == PACKET_OUTGOING
    assert decode(LINKTYPE_LINUX_SLL2, out) == SKIP_LOOPBACK_OUTGOING
    eth_out = bytes(CookedLinuxV2(proto=0x86DD, ifindex=2, lladdrtype=ARPHRD_ETHER,
                                  pkttype=PACKET_OUTGOING) / ip)
    check(LINKTYPE_LINUX_SLL2, eth_out, bytes(ip))
    assert malformed_reason(LINKTYPE_LINUX_SLL2, out[:19]) == "truncated_link_header"


# -- raw IP link types -----------------------------------------------------------------------


@pytest.mark.parametrize("linktype", [LINKTYPE_RAW, LINKTYPE_RAW_BSD, LINKTYPE_RAW_OPENBSD])
@pytest.mark.parametrize("ipv", [4, 6])
def test_raw_ip(linktype: int, ipv: int) -> None:
    ip = bytes(tcp4(b"raw") if ipv == 4 else tcp6(b"raw"))
    check(linktype, ip, ip)


def test_linktype_ipv4_and_ipv6_only() -> None:
    v4, v6 = bytes(tcp4(b"4")), bytes(tcp6(b"6"))
    check(LINKTYPE_IPV4, v4, v4)
    check(LINKTYPE_IPV6, v6, v6)
    assert malformed_reason(LINKTYPE_IPV4, v6) == "bad_ip_version"
    assert malformed_reason(LINKTYPE_IPV6, v4) == "bad_ip_version"


def test_raw_not_ip_and_empty() -> None:
    assert decode(LINKTYPE_RAW, b"\x50" + bytes(39)) == SKIP_NOT_IP
    assert malformed_reason(LINKTYPE_RAW, b"") == "truncated_ip_header"


# -- BSD loopback (NULL) and OpenBSD LOOP -------------------------------------------------------


@pytest.mark.parametrize("order", ["little", "big"])
@pytest.mark.parametrize("family,ipv", [(2, 4), (24, 6), (28, 6), (30, 6)])
def test_bsd_null(order: str, family: int, ipv: int) -> None:
    ip = bytes(tcp4(b"lo") if ipv == 4 else tcp6(b"lo"))
    frame = family.to_bytes(4, order) + ip  # host byte order of the capturing machine
    check(LINKTYPE_NULL, frame, ip)


@pytest.mark.parametrize("family,ipv", [(2, 4), (24, 6), (28, 6), (30, 6)])
def test_loop_is_network_byte_order(family: int, ipv: int) -> None:
    ip = bytes(tcp4(b"lo") if ipv == 4 else tcp6(b"lo"))
    check(LINKTYPE_LOOP, family.to_bytes(4, "big") + ip, ip)
    assert decode(LINKTYPE_LOOP, family.to_bytes(4, "little") + ip) == SKIP_NOT_IP


def test_null_other_family_and_short() -> None:
    assert decode(LINKTYPE_NULL, (7).to_bytes(4, "little") + bytes(tcp4())) == SKIP_NOT_IP
    assert malformed_reason(LINKTYPE_NULL, b"\x02\x00\x00") == "truncated_link_header"
    assert malformed_reason(LINKTYPE_LOOP, b"\x00\x00") == "truncated_link_header"


# -- IPv6 extension headers ---------------------------------------------------------------------


@pytest.mark.parametrize("ext", [
    [IPv6ExtHdrHopByHop()],
    [IPv6ExtHdrRouting(addresses=["2001:db8::7", "2001:db8::8"])],
    [IPv6ExtHdrDestOpt()],
    [IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(addresses=["2001:db8::9"]),
     IPv6ExtHdrDestOpt()],
], ids=["hbh", "routing", "destopt", "chain"])
def test_ipv6_extension_headers(ext: list[Packet]) -> None:
    ip = bytes(tcp6(b"ext", *ext))
    parsed = IPv6(ip)
    assert parsed.getlayer(TCP) is not None
    got = check(LINKTYPE_RAW, ip, ip)
    assert got.payload == b"ext"
    # The flow key is the addresses and ports, whatever headers sit in between.
    assert got.key == segment(LINKTYPE_RAW, bytes(tcp6(b"ext"))).key


def test_ipv6_ah_header() -> None:
    tcp = bytes(TCP(sport=1111, dport=SERVER_PORT, flags="PA") / Raw(b"ah"))
    # AH: next header, payload length in 4-octet units minus 2, reserved, SPI, seq, 12-byte ICV
    ah = struct.pack(">BBHII", 6, 4, 0, 0x100, 1) + bytes(12)
    ip = bytes(IPv6(src=V6_SRC, dst=V6_DST, nh=51, plen=len(ah) + len(tcp))) + ah + tcp
    got = segment(LINKTYPE_RAW, ip)
    assert (got.sport, got.dport, got.payload, got.wire_len) == (1111, SERVER_PORT, b"ah", 2)


def test_ipv6_fragments() -> None:
    later = bytes(tcp6(b"x" * 16, IPv6ExtHdrFragment(offset=100, m=0, id=7)))
    assert decode(LINKTYPE_RAW, later) == SKIP_FRAGMENT
    first = bytes(tcp6(b"x" * 16, IPv6ExtHdrFragment(offset=0, m=1, id=7)))
    assert malformed_reason(LINKTYPE_RAW, first) == "ip_fragment"


def test_ipv6_atomic_fragment_is_a_whole_packet() -> None:
    ip = bytes(tcp6(b"whole", IPv6ExtHdrFragment(offset=0, m=0, id=9)))
    assert IPv6(ip).getlayer(TCP) is not None  # scapy sees the whole segment
    check(LINKTYPE_RAW, ip, ip)


def test_ipv6_extension_chain_limits() -> None:
    nine = bytes(tcp6(b"", *[IPv6ExtHdrDestOpt() for _ in range(9)]))
    assert malformed_reason(LINKTYPE_RAW, nine) == "bad_ipv6_extension_chain"
    eight = bytes(tcp6(b"", *[IPv6ExtHdrDestOpt() for _ in range(8)]))
    check(LINKTYPE_RAW, eight, eight)
    # An extension header that claims to run past the end of the payload.
    ip = bytearray(bytes(tcp6(b"", IPv6ExtHdrDestOpt())))
    ip[41] = 200
    assert malformed_reason(LINKTYPE_RAW, bytes(ip)) == "bad_ipv6_extension_chain"
    # cut inside the extension header
    cut = bytes(tcp6(b"", IPv6ExtHdrHopByHop()))[:41]
    assert malformed_reason(LINKTYPE_RAW, cut) == "truncated_ip_header"


def test_ipv6_no_next_header() -> None:
    ip = bytes(IPv6(src=V6_SRC, dst=V6_DST, nh=59))
    assert decode(LINKTYPE_RAW, ip) == SKIP_NOT_TCP


# -- IPv4 options and fragments -------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    [IPOption_NOP()] * 4,
    [IPOption_RR(routers=["1.2.3.4", "5.6.7.8"])],
    [IPOption_NOP()] * 40,  # IHL 15, the largest header
], ids=["ihl6", "record-route", "ihl15"])
def test_ipv4_options_key_is_addresses_and_ports(options: list[Packet]) -> None:
    ip = (IP(src=V4_SRC, dst=V4_DST, options=options) / TCP(sport=40000, dport=SERVER_PORT)
          / Raw(b"opt"))
    raw = bytes(ip)
    assert IP(raw).ihl > 5
    got = check(LINKTYPE_RAW, raw, raw)
    assert got.key == (socket.inet_aton(V4_SRC) + socket.inet_aton(V4_DST)
                       + struct.pack(">HH", 40000, SERVER_PORT))
    assert got.key == segment(LINKTYPE_RAW, bytes(tcp4(b"opt", sport=40000))).key


def test_ipv4_fragments() -> None:
    later = IP(src=V4_SRC, dst=V4_DST, frag=10, proto=6) / Raw(b"x" * 40)
    assert decode(LINKTYPE_RAW, bytes(later)) == SKIP_FRAGMENT
    first = IP(src=V4_SRC, dst=V4_DST, flags="MF") / TCP(dport=SERVER_PORT) / Raw(b"x" * 40)
    assert malformed_reason(LINKTYPE_RAW, bytes(first)) == "ip_fragment"
    df = bytes(IP(src=V4_SRC, dst=V4_DST, flags="DF") / TCP(dport=SERVER_PORT) / Raw(b"df"))
    check(LINKTYPE_RAW, df, df)


# -- snap length, ports, malformed ----------------------------------------------------------------


@pytest.mark.parametrize("ipv", [4, 6])
def test_snaplen_truncated_frame(ipv: int) -> None:
    payload = bytes(range(200))
    ip = bytes(tcp4(payload) if ipv == 4 else tcp6(payload))
    frame = bytes(eth(type=0x0800 if ipv == 4 else 0x86DD)) + ip
    header = 14 + (20 if ipv == 4 else 40) + 20
    cut = frame[:header + 30]
    got = segment(LINKTYPE_ETHERNET, cut)
    assert got.payload == payload[:30]
    assert got.wire_len == len(payload)
    # exactly the headers, nothing of the payload
    got = segment(LINKTYPE_ETHERNET, frame[:header])
    assert got.payload == b"" and got.wire_len == len(payload)
    # cut inside the TCP header: cannot be a segment
    assert malformed_reason(LINKTYPE_ETHERNET, frame[:header - 1]) == "truncated_tcp_header"
    # cut inside the IP header
    assert malformed_reason(LINKTYPE_ETHERNET, frame[:14 + 10]) == "truncated_ip_header"


def test_other_ports_are_skipped() -> None:
    ip = bytes(tcp4(b"x", sport=1234, dport=443))
    assert decode(LINKTYPE_RAW, ip) == SKIP_OTHER_PORT
    assert decode(LINKTYPE_RAW, ip, frozenset({443})) != SKIP_OTHER_PORT
    # the server's side of the conversation (source port is ours) is decoded too
    back = bytes(tcp4(b"y", sport=SERVER_PORT, dport=1234))
    check(LINKTYPE_RAW, back, back)
    # several ports
    ports = frozenset({1, 2, 443})
    assert isinstance(decode(LINKTYPE_RAW, ip, ports), tuple)
    assert decode(LINKTYPE_RAW, bytes(tcp6(sport=80, dport=8080)), ports) == SKIP_OTHER_PORT


def test_malformed_ipv4_header_fields() -> None:
    good = bytearray(bytes(tcp4(b"abc")))
    bad = bytearray(good)
    bad[0] = 0x44  # IHL 4 = 16 bytes
    assert malformed_reason(LINKTYPE_RAW, bytes(bad)) == "bad_ip_header_length"
    bad = bytearray(good)
    bad[2:4] = (30).to_bytes(2, "big")  # shorter than IP + TCP headers
    assert malformed_reason(LINKTYPE_RAW, bytes(bad)) == "bad_ip_total_length"
    bad = bytearray(good)
    bad[0] = 0x65
    assert malformed_reason(LINKTYPE_IPV4, bytes(bad)) == "bad_ip_version"
    # Ethernet says IPv4 but the header says 6
    v6_as_v4 = bytes(eth(type=0x0800)) + bytes(tcp6())
    assert malformed_reason(LINKTYPE_ETHERNET, v6_as_v4) == "bad_ip_version"


def test_tso_zero_total_length_uses_captured_bytes() -> None:
    # With segmentation offload the capture sees a super-segment whose length field is 0.
    frame = bytearray(bytes(tcp4(b"S" * 3000)))
    frame[2:4] = b"\x00\x00"
    got = segment(LINKTYPE_RAW, bytes(frame))
    assert got.payload == b"S" * 3000 and got.wire_len == 3000


def test_malformed_tcp_data_offset() -> None:
    good = bytearray(bytes(tcp4(b"abcdef")))
    bad = bytearray(good)
    bad[20 + 12] = 4 << 4  # data offset 16 bytes
    assert malformed_reason(LINKTYPE_RAW, bytes(bad)) == "bad_tcp_data_offset"
    bad = bytearray(good)
    bad[20 + 12] = 15 << 4  # 60-byte header in a 26-byte segment
    assert malformed_reason(LINKTYPE_RAW, bytes(bad)) == "tcp_header_beyond_ip_length"


@pytest.mark.parametrize("linktype,minimum", [
    (LINKTYPE_ETHERNET, 14), (LINKTYPE_LINUX_SLL, 16), (LINKTYPE_LINUX_SLL2, 20),
    (LINKTYPE_NULL, 4), (LINKTYPE_LOOP, 4),
])
def test_truncated_link_headers(linktype: int, minimum: int) -> None:
    for n in range(minimum):
        assert malformed_reason(linktype, bytes(n)) == "truncated_link_header"


def test_unknown_linktype_has_no_fast_decoder() -> None:
    assert make_decoder(127, PORTS) is None  # radiotap: the scapy fallback's job
    ip = bytes(tcp4(b"ip"))
    assert make_ip_decoder(PORTS)(ip) == decode(LINKTYPE_RAW, ip)


def test_reverse_key() -> None:
    fwd = segment(LINKTYPE_RAW, bytes(tcp4(b"", sport=1000, dport=SERVER_PORT)))
    back = segment(LINKTYPE_RAW,
                   bytes(IP(src=V4_DST, dst=V4_SRC) / TCP(sport=SERVER_PORT, dport=1000)))
    assert reverse_key(fwd.key) == back.key and reverse_key(back.key) == fwd.key
    fwd6 = segment(LINKTYPE_RAW, bytes(tcp6(b"", sport=1000)))
    back6 = segment(LINKTYPE_RAW,
                    bytes(IPv6(src=V6_DST, dst=V6_SRC) / TCP(sport=SERVER_PORT, dport=1000)))
    assert reverse_key(fwd6.key) == back6.key


# -- robustness: nothing but a result or Malformed ------------------------------------------------


def _frames() -> list[tuple[int, bytes]]:
    ip4 = bytes(tcp4(b"payload" * 3, options=[("MSS", 1460)]))
    ip6 = bytes(tcp6(b"payload", IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()))
    return [
        (LINKTYPE_ETHERNET, bytes(eth() / Dot1Q() / Dot1Q(type=0x0800)) + ip4),
        (LINKTYPE_ETHERNET, bytes(eth(type=0x86DD)) + ip6),
        (LINKTYPE_LINUX_SLL, bytes(CookedLinux(proto=0x0800)) + ip4),
        (LINKTYPE_LINUX_SLL2, bytes(CookedLinuxV2(proto=0x86DD)) + ip6),
        (LINKTYPE_NULL, (30).to_bytes(4, "little") + ip6),
        (LINKTYPE_LOOP, (2).to_bytes(4, "big") + ip4),
        (LINKTYPE_RAW, ip4),
        (LINKTYPE_IPV6, ip6),
    ]


def test_every_prefix_and_random_damage_gives_a_result_or_malformed() -> None:
    rng = random.Random(20240517)
    for linktype, frame in _frames():
        decoder = make_decoder(linktype, PORTS)
        assert decoder is not None
        candidates = [frame[:n] for n in range(len(frame) + 1)]
        for _ in range(400):
            b = bytearray(frame)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            candidates.append(bytes(b[:rng.randint(0, len(b))]))
        for c in candidates:
            try:
                result = decoder(c)
            except Malformed as exc:
                assert exc.reason and exc.reason.isidentifier()
                continue
            if isinstance(result, tuple):
                seg = Segment(*result)
                assert len(seg.key) in (12, 36)
                assert len(seg.payload) <= seg.wire_len
                assert SERVER_PORT in (seg.sport, seg.dport)
            else:
                assert isinstance(result, int) and result > 0


def _outcome(linktype: int, frame: bytes) -> object:
    try:
        return decode(linktype, frame)
    except Malformed as exc:
        return ("Malformed", exc.reason)


def test_ethernet_ipv4_agrees_with_the_general_ip_path() -> None:
    # Ethernet/IPv4 has its own fused fast path: whatever it decides must be what the plain
    # IP decoder decides for the same IP bytes.
    rng = random.Random(7)
    bases = [bytes(tcp4(b"x" * n, options=opts)) for n in (0, 1, 40)
             for opts in ([], [("MSS", 1460), ("NOP", None), ("NOP", None)])]
    bases.append(bytes(IP(src=V4_SRC, dst=V4_DST, options=[IPOption_NOP()] * 4)
                       / TCP(dport=SERVER_PORT) / Raw(b"opt")))
    checked = 0
    for ip in bases:
        variants = [ip, ip + b"\xee" * 6, ip[:-1], ip[:40], ip[:54]]
        for _ in range(300):
            b = bytearray(ip)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(min(len(b), 60))] = rng.randrange(256)
            variants.append(bytes(b))
        for v in variants:
            assert _outcome(LINKTYPE_ETHERNET, bytes(eth(type=0x0800)) + v) == \
                _outcome(LINKTYPE_RAW, v) or v[0] >> 4 != 4, v.hex()
            checked += 1
    assert checked > 1000


def test_shard_prefilter_agrees_with_the_decoder() -> None:
    """The reader's prefilter drops only what the decoder would hand to another worker,
    and the workers' shares cover every segment exactly once."""
    from tracer.decode import SKIP_OTHER_SHARD, make_shard_prefilter

    ports = frozenset({9090})
    frames = [bytes(eth() / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=p, dport=9090))
              for p in range(40000, 40064)]
    frames += [bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=9090, dport=p))
               for p in range(40000, 40064)]
    frames += [bytes(eth() / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=1, dport=2)),
               bytes(eth() / Dot1Q(vlan=3) / IP() / TCP(sport=40001, dport=9090)),
               b"\x00" * 20]
    for count in (2, 3, 4):
        owners = [0] * len(frames)
        for index in range(count):
            keep = make_shard_prefilter(ports, (index, count))
            decoder = make_decoder(LINKTYPE_ETHERNET, ports, (index, count))
            assert decoder is not None
            for i, f in enumerate(frames):
                try:
                    result = decoder(f)
                except Malformed:
                    result = None
                if not keep(LINKTYPE_ETHERNET, f, 0, len(f)):
                    assert result == SKIP_OTHER_SHARD, i
                if isinstance(result, tuple):
                    owners[i] += 1
        for i in range(min(len(frames), 128)):
            assert owners[i] == 1, i
