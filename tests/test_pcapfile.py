"""The streaming capture reader (tracer.sources.pcapfile) and `tracer capture --read`.

Capture files are written here byte by byte with struct, following the pcap format
(draft-ietf-opsawg-pcap) and pcapng (draft-ietf-opsawg-pcapng), so the reader is checked
against the specification rather than against another library's writer. Timestamps are
compared with the exact float nearest to the true value (computed with fractions).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from support import tracer

from tracer.sources.pcapfile import CaptureFileError, CaptureReader

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
SERVER_PORT = 50051


# -- pcap, written to the spec ---------------------------------------------------------------

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D


def pcap_header(endian: str, nano: bool, *, snaplen: int = 65535,
                network: int = LINKTYPE_ETHERNET, major: int = 2) -> bytes:
    """Magic, version 2.4, reserved (thiszone, sigfigs), snaplen, link type."""
    magic = PCAP_MAGIC_NS if nano else PCAP_MAGIC_US
    return struct.pack(endian + "IHHiIII", magic, major, 4, 0, 0, snaplen, network)


def pcap_record(endian: str, sec: int, frac: int, data: bytes,
                orig_len: int | None = None) -> bytes:
    """Timestamp seconds, fraction (us or ns), captured length, original length, data."""
    return struct.pack(endian + "IIII", sec, frac, len(data),
                       len(data) if orig_len is None else orig_len) + data


def exact(units: int, per_second: int, offset: int = 0) -> float:
    """The float nearest to units/per_second + offset seconds."""
    return float(Fraction(units, per_second) + offset)


# -- pcapng, written to the spec ---------------------------------------------------------------

BT_SHB = 0x0A0D0D0A
BT_IDB = 1
BT_PB = 2
BT_SPB = 3
BT_NRB = 4
BT_ISB = 5
BT_EPB = 6


def pad4(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 4)


def options(e: str, opts: list[tuple[int, bytes]]) -> bytes:
    if not opts:
        return b""
    out = b"".join(struct.pack(e + "HH", code, len(value)) + pad4(value) for code, value in opts)
    return out + struct.pack(e + "HH", 0, 0)  # opt_endofopt


def block(e: str, btype: int, body: bytes) -> bytes:
    body = pad4(body)
    total = 12 + len(body)
    return struct.pack(e + "II", btype, total) + body + struct.pack(e + "I", total)


def shb(e: str, opts: list[tuple[int, bytes]] | None = None) -> bytes:
    # byte-order magic, version 1.0, section length -1 (unknown)
    return block(e, BT_SHB, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1) + options(e, opts or []))


def idb(e: str, linktype: int, snaplen: int = 0, *, tsresol: int | None = None,
        tsoffset: int | None = None, name: str | None = None) -> bytes:
    opts: list[tuple[int, bytes]] = []
    if name is not None:
        opts.append((2, name.encode()))  # if_name
    if tsresol is not None:
        opts.append((9, bytes([tsresol])))  # if_tsresol
    if tsoffset is not None:
        opts.append((14, struct.pack(e + "q", tsoffset)))  # if_tsoffset, signed seconds
    return block(e, BT_IDB, struct.pack(e + "HHI", linktype, 0, snaplen) + options(e, opts))


def epb(e: str, iface: int, units: int, data: bytes, orig_len: int | None = None,
        comment: str | None = None) -> bytes:
    body = struct.pack(e + "IIIII", iface, units >> 32, units & 0xFFFFFFFF, len(data),
                       len(data) if orig_len is None else orig_len) + pad4(data)
    if comment is not None:
        body += options(e, [(1, comment.encode())])  # opt_comment
    return block(e, BT_EPB, body)


def spb(e: str, data: bytes, orig_len: int | None = None) -> bytes:
    wire = len(data) if orig_len is None else orig_len
    return block(e, BT_SPB, struct.pack(e + "I", wire) + data)


def pb(e: str, iface: int, units: int, data: bytes, drops: int = 0) -> bytes:
    """The obsolete Packet Block: 16-bit interface id and drops count."""
    return block(e, BT_PB, struct.pack(e + "HHIIII", iface, drops, units >> 32,
                                       units & 0xFFFFFFFF, len(data), len(data)) + data)


def isb(e: str, iface: int, units: int, ifdrop: int | None = None) -> bytes:
    opts = [] if ifdrop is None else [(5, struct.pack(e + "Q", ifdrop))]  # isb_ifdrop
    return block(e, BT_ISB, struct.pack(e + "III", iface, units >> 32, units & 0xFFFFFFFF)
                 + options(e, opts))


# -- helpers -----------------------------------------------------------------------------------


def read_all(path: Path | str) -> tuple[list[tuple[float, int, bytes]], CaptureReader]:
    with CaptureReader.open(str(path)) as reader:
        packets = list(reader)
    return packets, reader


def read_until_error(path: Path) -> tuple[list[tuple[float, int, bytes]], CaptureFileError]:
    got: list[tuple[float, int, bytes]] = []
    with CaptureReader.open(str(path)) as reader, pytest.raises(CaptureFileError) as info:
        # one by one: what came before the error must be kept
        for packet in reader:
            got.append(packet)
    return got, info.value


def frame(n: int) -> bytes:
    """A distinct frame of n bytes (content does not matter to the reader)."""
    return bytes((n * 7 + i) & 0xFF for i in range(n))


def stored_connections(db: Path) -> list[dict[str, Any]]:
    out = tracer("connections", "--format", "json", "--db", str(db), check=False)
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


# Two TCP connections to the server port, as Ethernet frames: one opens and closes (client
# FIN), the other opens and stays open.
def conversation() -> list[tuple[int, int, bytes]]:
    c, s = "10.0.0.1", "10.0.0.2"
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    back = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01")

    def to_server(sport: int, flags: str, seq: int, ack: int, data: bytes = b"") -> bytes:
        return bytes(eth / IP(src=c, dst=s) / TCP(sport=sport, dport=SERVER_PORT, flags=flags,
                                                  seq=seq, ack=ack) / Raw(data))

    def to_client(dport: int, flags: str, seq: int, ack: int, data: bytes = b"") -> bytes:
        return bytes(back / IP(src=s, dst=c) / TCP(sport=SERVER_PORT, dport=dport, flags=flags,
                                                   seq=seq, ack=ack) / Raw(data))

    pre = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    frames = [
        to_server(40001, "S", 100, 0),
        to_client(40001, "SA", 900, 101),
        to_server(40001, "A", 101, 901),
        to_server(40001, "PA", 101, 901, pre),
        to_client(40001, "A", 901, 101 + len(pre)),
        to_server(40002, "S", 5000, 0),
        to_client(40002, "SA", 7000, 5001),
        to_server(40001, "FA", 101 + len(pre), 901),
        to_client(40001, "FA", 901, 102 + len(pre)),
        to_server(40001, "A", 102 + len(pre), 902),
        to_server(40002, "A", 5001, 7001),
    ]
    return [(1_700_000_000 + i, 1000 * i, f) for i, f in enumerate(frames)]


def conversation_pcap(endian: str = "<") -> bytes:
    return pcap_header(endian, False) + b"".join(
        pcap_record(endian, sec, usec, data) for sec, usec, data in conversation())


# -- pcap -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("endian", ["<", ">"], ids=["little", "big"])
@pytest.mark.parametrize("nano", [False, True], ids=["us", "ns"])
def test_pcap_byte_orders_and_resolutions(tmp_path: Path, endian: str, nano: bool) -> None:
    per_second = 10**9 if nano else 10**6
    records = [
        (0, 0, frame(0)),
        (1, 1, frame(1)),
        (1_700_000_000, 123_456_789 if nano else 123_456, frame(61)),
        (1_234_567_890, per_second - 1, frame(1514)),
        (0xFFFFFFFF, per_second // 2, frame(3)),
        (1_000_000_000, 999_999_937 if nano else 999_937, frame(65535)),
    ]
    data = pcap_header(endian, nano, snaplen=65535, network=LINKTYPE_RAW) + b"".join(
        pcap_record(endian, sec, frac, f) for sec, frac, f in records)
    expected_magic = {("<", False): b"\xd4\xc3\xb2\xa1", (">", False): b"\xa1\xb2\xc3\xd4",
                      ("<", True): b"\x4d\x3c\xb2\xa1", (">", True): b"\xa1\xb2\x3c\x4d"}
    assert data[:4] == expected_magic[endian, nano]  # the file really is what the spec says
    path = tmp_path / "t.pcap"
    path.write_bytes(data)

    packets, reader = read_all(path)

    assert packets == [(exact(sec * per_second + frac, per_second), LINKTYPE_RAW, f)
                       for sec, frac, f in records]
    assert [type(ts) for ts, _, _ in packets] == [float] * len(records)
    # exact floats, spelled out for two of them
    assert packets[2][0] == (1700000000.1234567 if nano else 1700000000.123456)
    assert packets[4][0] == 4294967295.5
    info = reader.info
    assert (info.format, info.compressed, info.packets) == ("pcap", False, len(records))
    assert [(i.linktype, i.snaplen) for i in info.interfaces] == [(LINKTYPE_RAW, 65535)]
    assert info.drops is None
    assert reader.sha256() == hashlib.sha256(data).hexdigest()
    assert reader.bytes_read() == len(data)


def test_pcap_link_type_field_keeps_only_the_link_type(tmp_path: Path) -> None:
    # Upper bits of the field carry the FCS length and its presence flag (libpcap LT_FCS_*).
    network = (4 << 28) | 0x04000000 | LINKTYPE_ETHERNET
    path = tmp_path / "fcs.pcap"
    path.write_bytes(pcap_header("<", False, network=network) + pcap_record("<", 5, 6, frame(64)))
    packets, reader = read_all(path)
    assert packets == [(5.000006, LINKTYPE_ETHERNET, frame(64))]
    assert reader.info.linktypes == [LINKTYPE_ETHERNET]


def test_pcap_unsupported_version(tmp_path: Path) -> None:
    path = tmp_path / "v3.pcap"
    path.write_bytes(pcap_header("<", False, major=3))
    with pytest.raises(CaptureFileError, match="version"):
        read_all(path)


def test_pcap_header_only_is_an_empty_capture(tmp_path: Path) -> None:
    path = tmp_path / "empty.pcap"
    path.write_bytes(pcap_header(">", True))
    packets, reader = read_all(path)
    assert packets == [] and reader.info.format == "pcap"


def test_pcap_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "short.pcap"
    path.write_bytes(pcap_header("<", False)[:20])
    with pytest.raises(CaptureFileError) as info:
        read_all(path)
    assert str(path) in str(info.value)


# -- pcapng ---------------------------------------------------------------------------------------


def multi_section_pcapng() -> tuple[bytes, list[tuple[float, int, bytes]]]:
    le, be = "<", ">"
    ns_units = 1_700_000_000_123_456_789
    bin_units = (1_600_000_000 << 20) + 777_777  # 2^-20 s units
    us_units = 1_500_000_000_654_321
    ms_units = 1_400_000_000_999
    data = b"".join([
        shb(le, [(4, b"tests/test_pcapfile.py")]),  # shb_userappl
        idb(le, LINKTYPE_ETHERNET, 65535, tsresol=9, name="eth0"),
        idb(le, LINKTYPE_LINUX_SLL, 262144, tsresol=0x80 | 20, tsoffset=1000, name="any"),
        idb(le, LINKTYPE_RAW, 64, tsoffset=-3600),  # default resolution: microseconds
        epb(le, 0, ns_units, frame(60), comment="first"),
        epb(le, 1, bin_units, frame(61), orig_len=1000),
        block(le, BT_NRB, struct.pack(le + "HH", 0, 0)),  # name resolution: skipped
        epb(le, 2, us_units, frame(62)),
        spb(le, frame(63)),
        pb(le, 1, bin_units + 1, frame(64), drops=2),
        block(le, 0x40000BAD, b"custom block, must be skipped"),
        isb(le, 0, ns_units + 1, ifdrop=5),
        isb(le, 1, bin_units + 2, ifdrop=3),
        isb(le, 0, ns_units + 2, ifdrop=7),  # a later statistic for the same interface wins
        # A second section, in the other byte order, with its own interfaces.
        shb(be),
        idb(be, LINKTYPE_NULL, 0, tsresol=3),  # milliseconds
        epb(be, 0, ms_units, frame(5)),
        isb(be, 0, ms_units, ifdrop=11),
        isb(be, 0, ms_units),  # no drop counter: does not erase the known one
    ])
    expected = [
        (exact(ns_units, 10**9), LINKTYPE_ETHERNET, frame(60)),
        (exact(bin_units, 2**20, 1000), LINKTYPE_LINUX_SLL, frame(61)),
        (exact(us_units, 10**6, -3600), LINKTYPE_RAW, frame(62)),
        (0.0, LINKTYPE_ETHERNET, frame(63)),  # a simple packet block carries no timestamp
        (exact(bin_units + 1, 2**20, 1000), LINKTYPE_LINUX_SLL, frame(64)),
        (exact(ms_units, 10**3), LINKTYPE_NULL, frame(5)),
    ]
    return data, expected


def test_pcapng_interfaces_resolutions_sections_and_statistics(tmp_path: Path) -> None:
    data, expected = multi_section_pcapng()
    assert data[8:12] == b"\x4d\x3c\x2b\x1a"  # little-endian byte-order magic
    path = tmp_path / "multi.pcapng"
    path.write_bytes(data)

    packets, reader = read_all(path)

    assert packets == expected
    # spelled out: 2^-20 resolution plus a 1000 s offset, and nanoseconds
    assert packets[1][0] == 1600001000.741746
    assert packets[0][0] == 1700000000.1234567
    info = reader.info
    assert (info.format, info.compressed, info.packets) == ("pcapng", False, 6)
    assert [(i.linktype, i.snaplen) for i in info.interfaces] == [
        (LINKTYPE_ETHERNET, 65535), (LINKTYPE_LINUX_SLL, 262144), (LINKTYPE_RAW, 64),
        (LINKTYPE_NULL, 0)]
    assert [i.name for i in info.interfaces] == ["eth0", "any", "", ""]
    assert info.linktypes == [LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL]
    assert info.drops == 7 + 3 + 11
    assert reader.sha256() == hashlib.sha256(data).hexdigest()


def test_pcapng_big_endian_first(tmp_path: Path) -> None:
    be = ">"
    data = shb(be) + idb(be, LINKTYPE_RAW, 0, tsresol=6) + epb(be, 0, 1_000_001, frame(9))
    assert data[8:12] == b"\x1a\x2b\x3c\x4d"
    path = tmp_path / "be.pcapng"
    path.write_bytes(data)
    packets, reader = read_all(path)
    assert packets == [(1.000001, LINKTYPE_RAW, frame(9))]
    assert reader.info.drops is None  # no statistics block: unknown, not zero


def test_pcapng_simple_packet_block_is_cut_to_snaplen(tmp_path: Path) -> None:
    le = "<"
    data = shb(le) + idb(le, LINKTYPE_RAW, 40) + spb(le, frame(40), orig_len=1500)
    path = tmp_path / "spb.pcapng"
    path.write_bytes(data)
    packets, _ = read_all(path)
    assert packets == [(0.0, LINKTYPE_RAW, frame(40))]


def test_pcapng_packet_before_interface_or_unknown_interface(tmp_path: Path) -> None:
    le = "<"
    first = epb(le, 0, 1, frame(10))
    path = tmp_path / "noif.pcapng"
    path.write_bytes(shb(le) + idb(le, LINKTYPE_RAW) + first + epb(le, 1, 2, frame(11)))
    got, err = read_until_error(path)
    assert got == [(1e-6, LINKTYPE_RAW, frame(10))]
    assert err.name == str(path) and "interface 1" in err.reason
    assert err.offset == len(shb(le) + idb(le, LINKTYPE_RAW) + first)

    path.write_bytes(shb(le) + spb(le, frame(10)))
    got, err = read_until_error(path)
    assert got == [] and err.offset == len(shb(le))

    # A new section forgets the interfaces of the previous one.
    sec1 = shb(le) + idb(le, LINKTYPE_RAW) + idb(le, LINKTYPE_RAW) + epb(le, 1, 3, frame(12))
    path.write_bytes(sec1 + shb(">") + idb(">", LINKTYPE_RAW) + epb(">", 1, 4, frame(13)))
    got, err = read_until_error(path)
    assert [f for _, _, f in got] == [frame(12)]
    assert "interface 1" in err.reason


@pytest.mark.parametrize("kind", [
    "pcap",
    "pcapng",
])
def test_info_packets_counts_records_as_they_are_read(kind: str) -> None:
    """The count follows the reading (a buffer at a time, ahead of the consumer), not only
    the end of the file: an interrupted run still stores how far it got."""
    le = "<"
    if kind == "pcap":
        data = pcap_header(le, False) + b"".join(pcap_record(le, i, 0, frame(20)) for i in range(5))
    else:
        packets = b"".join(epb(le, 0, i, frame(20)) for i in range(5))
        data = shb(le) + idb(le, LINKTYPE_RAW) + packets
    reader = CaptureReader(io.BytesIO(data), "<memory>")
    it = iter(reader)
    for _ in range(3):
        next(it)
    assert 3 <= reader.info.packets <= 5
    assert sum(1 for _ in it) == 2
    assert reader.info.packets == 5


def test_pcapng_corrupt_option_length(tmp_path: Path) -> None:
    le = "<"
    head = shb(le)
    bad = bytearray(idb(le, LINKTYPE_RAW, 0, name="eth0"))
    bad[16 + 2:16 + 4] = struct.pack(le + "H", 200)  # if_name claims 200 bytes
    path = _write(tmp_path / "opt.pcapng", head + bytes(bad) + epb(le, 0, 1, frame(4)))
    got, err = read_until_error(path)
    assert got == [] and err.offset == len(head) and "option" in err.reason


def test_pcapng_bad_byte_order_magic(tmp_path: Path) -> None:
    data = bytearray(shb("<"))
    data[8:12] = b"\x00\x00\x00\x00"
    path = tmp_path / "bom.pcapng"
    path.write_bytes(bytes(data))
    got, err = read_until_error(path)
    assert got == [] and err.offset == 0


# -- gzip -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_gzip_compressed(tmp_path: Path, kind: str) -> None:
    if kind == "pcap":
        plain = conversation_pcap(">")
        expected, _ = read_all(_write(tmp_path / "plain.pcap", plain))
    else:
        plain, expected = multi_section_pcapng()
    compressed = gzip.compress(plain, mtime=0)
    path = _write(tmp_path / f"c.{kind}.gz", compressed)
    packets, reader = read_all(path)
    assert packets == expected
    assert (reader.info.format, reader.info.compressed) == (kind, True)
    assert reader.sha256() == hashlib.sha256(compressed).hexdigest()  # of the file as stored
    assert reader.bytes_read() == len(compressed)


def _truncated_gzip(tmp_path: Path) -> tuple[Path, list[tuple[float, int, bytes]]]:
    plain = pcap_header("<", False) + b"".join(
        pcap_record("<", i, 0, frame(200 + i % 7)) for i in range(300))
    compressed = gzip.compress(plain, mtime=0)
    path = _write(tmp_path / "cut.pcap.gz", compressed[: len(compressed) * 2 // 3])
    all_packets, _ = read_all(_write(tmp_path / "whole.pcap", plain))
    return path, all_packets


def test_gzip_truncated_is_reported(tmp_path: Path) -> None:
    path, all_packets = _truncated_gzip(tmp_path)
    got, err = read_until_error(path)
    assert got == all_packets[: len(got)]
    assert err.name == str(path) and "compressed" in err.reason and err.offset is not None


def test_gzip_truncated_keeps_the_records_before_the_damage(tmp_path: Path) -> None:
    path, all_packets = _truncated_gzip(tmp_path)
    got, err = read_until_error(path)
    # about two thirds of the file decompress; every complete record in it must come out
    assert len(got) >= len(all_packets) // 2
    assert got == all_packets[: len(got)]
    assert err.offset is not None and err.offset > 0


def test_gzip_bad_crc_after_all_records(tmp_path: Path) -> None:
    plain = conversation_pcap()
    compressed = bytearray(gzip.compress(plain, mtime=0))
    compressed[-8] ^= 0xFF  # CRC32 of the trailer
    path = _write(tmp_path / "crc.pcap.gz", bytes(compressed))
    expected, _ = read_all(_write(tmp_path / "ok.pcap", plain))
    got, err = read_until_error(path)
    assert got == expected[: len(got)]
    assert str(path) in str(err)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- damage: every packet before it, then an error naming the file and the offset -----------------


def _pcap_with_offsets(n: int = 5) -> tuple[bytes, list[int], list[tuple[float, int, bytes]]]:
    data = pcap_header("<", False)
    offsets = []
    expected = []
    for i in range(n):
        offsets.append(len(data))
        data += pcap_record("<", 100 + i, 10 * i, frame(40 + i))
        ts = exact((100 + i) * 10**6 + 10 * i, 10**6)
        expected.append((ts, LINKTYPE_ETHERNET, frame(40 + i)))
    return data, offsets, expected


@pytest.mark.parametrize("cut_into", ["record data", "record header"])
def test_pcap_truncated_in_a_record(tmp_path: Path, cut_into: str) -> None:
    data, offsets, expected = _pcap_with_offsets()
    cut = offsets[3] + (16 + 7 if cut_into == "record data" else 9)
    path = _write(tmp_path / "cut.pcap", data[:cut])
    got, err = read_until_error(path)
    assert got == expected[:3]
    assert err.name == str(path)
    assert err.offset == offsets[3]
    assert str(path) in str(err) and f"offset {offsets[3]}" in str(err)
    assert "truncated" in err.reason


def test_pcap_corrupt_length_field(tmp_path: Path) -> None:
    data, offsets, expected = _pcap_with_offsets()
    damaged = bytearray(data)
    damaged[offsets[2] + 8:offsets[2] + 12] = struct.pack("<I", 0xFFFFFF00)  # captured length
    path = _write(tmp_path / "len.pcap", bytes(damaged))
    got, err = read_until_error(path)
    assert got == expected[:2]
    assert err.offset == offsets[2] and "corrupt" in err.reason and str(path) in str(err)


@pytest.mark.parametrize("where", ["at a record", "in a record's data"])
def test_pcap_zero_filled_tail(tmp_path: Path, where: str) -> None:
    """A file whose end was never written (preallocated, then the writer died) is zeros from
    some point on. Nothing on a real link has original length 0: the zeros are damage, not
    millions of empty records."""
    data, offsets, expected = _pcap_with_offsets()
    if where == "at a record":
        written, at = offsets[3], offsets[3]
    else:
        # Record 3's header and 7 of its 43 bytes were written; its data ends in zeros, which
        # no reader can tell from a packet's. The next header is all zeros.
        written, at = offsets[3] + 16 + 7, offsets[4]
        ts, linktype, full = expected[3]
        expected[3] = (ts, linktype, full[:7] + bytes(len(full) - 7))
    path = _write(tmp_path / "zeros.pcap", data[:written] + bytes(1 << 16))
    got, err = read_until_error(path)
    assert got == expected[: 3 if where == "at a record" else 4]
    assert err.offset == at and f"offset {at}" in str(err) and str(path) in str(err)
    assert "original length 0" in err.reason and "zero bytes" in err.reason


def test_pcap_empty_records(tmp_path: Path) -> None:
    """A lone record of length 0 is read (the format allows it, wherever it is); two in a
    row, or one that captured bytes, are damage."""
    data, _offsets, expected = _pcap_with_offsets(3)
    empty = pcap_record("<", 200, 5, b"")
    path = _write(tmp_path / "last.pcap", data + empty)
    packets, _reader = read_all(path)
    assert packets == [*expected, (exact(200 * 10**6 + 5, 10**6), LINKTYPE_ETHERNET, b"")]

    path = _write(tmp_path / "two.pcap", data + empty + empty + pcap_record("<", 201, 0, b"x"))
    got, err = read_until_error(path)
    assert got == expected and err.offset == len(data)
    assert "original length 0, and the next one too" in err.reason

    path = _write(tmp_path / "bytes.pcap", data + pcap_record("<", 200, 5, b"abc", orig_len=0))
    got, err = read_until_error(path)
    assert got == expected and err.offset == len(data)
    assert "captured length 3, original length 0" in err.reason


def _pcapng_with_offsets() -> tuple[bytes, list[int], list[bytes]]:
    le = "<"
    data = shb(le) + idb(le, LINKTYPE_RAW, 0, tsresol=9)
    offsets = []
    frames = []
    for i in range(4):
        offsets.append(len(data))
        frames.append(frame(30 + i))
        data += epb(le, 0, 10**18 + i, frames[-1])
    return data, offsets, frames


@pytest.mark.parametrize("how", ["cut", "length not a multiple of 4", "length too small",
                                 "trailing length differs", "captured length too big"])
def test_pcapng_damage(tmp_path: Path, how: str) -> None:
    data, offsets, frames = _pcapng_with_offsets()
    bad = bytearray(data)
    at = offsets[2]
    if how == "cut":
        bad = bad[: at + 20]
    elif how == "length not a multiple of 4":
        bad[at + 4:at + 8] = struct.pack("<I", 45)
    elif how == "length too small":
        bad[at + 4:at + 8] = struct.pack("<I", 8)
    elif how == "trailing length differs":
        bad[offsets[3] - 4:offsets[3]] = struct.pack("<I", 1234)
    else:
        bad[at + 20:at + 24] = struct.pack("<I", 1000)  # EPB captured length
    path = _write(tmp_path / "bad.pcapng", bytes(bad))
    got, err = read_until_error(path)
    assert [f for _, _, f in got] == frames[:2]
    assert err.name == str(path) and err.offset == at
    assert f"offset {at}" in str(err)


def test_pcapng_zero_filled_tail(tmp_path: Path) -> None:
    data, _offsets, frames = _pcapng_with_offsets()
    path = _write(tmp_path / "zeros.pcapng", data + bytes(1 << 16))
    got, err = read_until_error(path)
    assert [f for _, _, f in got] == frames
    assert err.offset == len(data) and "block length 0" in err.reason


# -- not a capture --------------------------------------------------------------------------------


NOT_CAPTURES = {
    "text.txt": (b"hello, this is not a capture\n", "not a pcap or pcapng capture"),
    "data.zst": (b"\x28\xb5\x2f\xfd" + bytes(range(32)), "zstd"),
    "empty.pcap": (b"", "empty"),
    "tiny.pcap": (b"\xd4", "not a pcap or pcapng capture"),
}


@pytest.mark.parametrize("name", sorted(NOT_CAPTURES))
def test_not_a_capture(tmp_path: Path, name: str) -> None:
    content, words = NOT_CAPTURES[name]
    path = _write(tmp_path / name, content)
    with pytest.raises(CaptureFileError) as info:
        read_all(path)
    assert words in str(info.value) and str(path) in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(CaptureFileError, match="cannot open"):
        CaptureReader.open("/nonexistent/dir/x.pcap")


@pytest.mark.parametrize("name", sorted(NOT_CAPTURES) + ["missing.pcap"])
def test_cli_not_a_capture_exits_nonzero_without_traceback(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name in NOT_CAPTURES:
        path.write_bytes(NOT_CAPTURES[name][0])
    out = tracer("capture", "--read", str(path), "--port", str(SERVER_PORT),
                 "--db", str(tmp_path / "t.db"), "-q", check=False)
    # not a capture: damaged input (3); no file at all: bad usage (2), refused up front
    assert out.returncode == (3 if name in NOT_CAPTURES else 2), out
    assert "Traceback" not in out.stderr
    assert str(path) in out.stderr and "error" in out.stderr.lower()


# -- the CLI: pipes and damaged files -------------------------------------------------------------


def _expected_conversation_rows(rows: list[dict[str, Any]]) -> None:
    by_port = {r["orig_p"]: r for r in rows}
    assert sorted(by_port) == [40001, 40002]
    closed, still_open = by_port[40001], by_port[40002]
    assert (closed["resp_p"], closed["close_kind"], closed["is_open"]) == (
        SERVER_PORT, "client_fin", 0)
    assert closed["preface_ts"] is not None
    assert (still_open["close_kind"], still_open["is_open"]) == (None, 1)
    assert still_open["history"].startswith("Sh")


@pytest.mark.parametrize("compress", [False, True], ids=["pcap", "pcap.gz"])
def test_cli_reads_a_pipe(tmp_path: Path, compress: bool) -> None:
    data = conversation_pcap()
    if compress:
        data = gzip.compress(data, mtime=0)
    src = _write(tmp_path / "src.bin", data)
    db = tmp_path / "pipe.db"
    # A separate process writes the capture in small pieces into tracer's standard input.
    writer = subprocess.Popen(
        [sys.executable, "-c",
         ("import sys\n"
          "data = open(sys.argv[1], 'rb').read()\n"
          "for i in range(0, len(data), 97):\n"
          "    sys.stdout.buffer.write(data[i:i + 97]); sys.stdout.buffer.flush()\n"),
         str(src)],
        stdout=subprocess.PIPE)
    assert writer.stdout is not None
    try:
        out = tracer("capture", "--read", "-", "--port", str(SERVER_PORT), "--db", str(db),
                     stdin=writer.stdout, check=False)
    finally:
        writer.stdout.close()
        writer.wait(timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    _expected_conversation_rows(stored_connections(db))


def test_reader_on_a_pipe_in_small_pieces() -> None:
    data, expected = multi_section_pcapng()
    rfd, wfd = os.pipe()

    def feed() -> None:
        with os.fdopen(wfd, "wb", buffering=0) as w:
            for i in range(0, len(data), 7):
                w.write(data[i:i + 7])

    thread = threading.Thread(target=feed)
    thread.start()
    with os.fdopen(rfd, "rb") as r:
        reader = CaptureReader(r, "<pipe>")
        packets = list(reader)
    thread.join()
    assert packets == expected
    assert reader.size is None and reader.sha256() == hashlib.sha256(data).hexdigest()


def test_reader_on_a_pipe_yields_records_before_the_writer_closes() -> None:
    data = conversation_pcap()
    expected = len(conversation())
    rfd, wfd = os.pipe()
    got_all = threading.Event()
    closed_early: list[bool] = []

    def feed() -> None:
        with os.fdopen(wfd, "wb", buffering=0) as w:
            w.write(data)
            # A live capture keeps its pipe open: wait (bounded) for the reader to catch up.
            closed_early.append(not got_all.wait(timeout=1.0))

    thread = threading.Thread(target=feed)
    thread.start()
    n = 0
    with os.fdopen(rfd, "rb") as r:
        for _ in CaptureReader(r, "<pipe>"):
            n += 1
            if n == expected:
                got_all.set()
    thread.join()
    assert n == expected
    assert closed_early == [False], "the reader held back packets until the writer closed the pipe"


def test_cli_truncated_file_keeps_what_came_before(tmp_path: Path) -> None:
    data = conversation_pcap()
    # Cut in the middle of the last record (the ACK that completes the second handshake).
    last = len(data) - len(conversation()[-1][2]) - 16
    path = _write(tmp_path / "cut.pcap", data[: last + 16 + 10])
    db = tmp_path / "cut.db"
    out = tracer("capture", "--read", str(path), "--port", str(SERVER_PORT), "--db", str(db),
                 check=False)
    assert out.returncode == 3, out
    assert "Traceback" not in out.stderr
    assert str(path) in out.stderr and f"offset {last}" in out.stderr
    rows = stored_connections(db)
    by_port = {r["orig_p"]: r for r in rows}
    assert sorted(by_port) == [40001, 40002]
    assert by_port[40001]["close_kind"] == "client_fin"
    # the second connection's SYN and SYN-ACK were before the damage; its last ACK was not
    assert by_port[40002]["is_open"] == 1 and by_port[40002]["history"] == "Sh"


def test_cli_corrupt_pcapng_keeps_what_came_before(tmp_path: Path) -> None:
    le = "<"
    body = b"".join(epb(le, 0, (sec * 10**6 + usec), f) for sec, usec, f in conversation())
    data = shb(le) + idb(le, LINKTYPE_ETHERNET, 65535) + body
    bad = bytearray(data + epb(le, 0, 1, frame(10)))
    bad[len(data) + 4:len(data) + 8] = struct.pack(le + "I", 0x7FFFFFFF)
    path = _write(tmp_path / "bad.pcapng", bytes(bad))
    db = tmp_path / "bad.db"
    out = tracer("capture", "--read", str(path), "--port", str(SERVER_PORT),
                 "--db", str(db), "-q", check=False)
    assert out.returncode == 3 and "Traceback" not in out.stderr
    assert f"offset {len(data)}" in out.stderr
    _expected_conversation_rows(stored_connections(db))


def test_cli_reads_the_same_capture_from_file_and_pipe_alike(tmp_path: Path) -> None:
    data = conversation_pcap(">")
    path = _write(tmp_path / "be.pcap", data)
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    assert tracer("capture", "--read", str(path), "--port", str(SERVER_PORT),
                  "--db", str(a), "-q", check=False).returncode == 0
    assert tracer("capture", "--read", "-", "--port", str(SERVER_PORT), "--db", str(b), "-q",
                  input=data, check=False).returncode == 0

    def strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "capture_id"} for r in rows]

    assert strip(stored_connections(a)) == strip(stored_connections(b))

