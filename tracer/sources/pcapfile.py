"""Streaming pcap and pcapng reader: (timestamp, link type, frame bytes) from a file or a pipe.

Never loads a whole file: it reads fixed-size chunks and hands out each record as soon as
it is complete. Handles pcap (micro- and nanosecond, both byte orders), pcapng (several
sections, interfaces and link types, EPB/SPB/obsolete PB, if_tsresol and if_tsoffset,
interface statistics), and either of them gzip-compressed.

Damage is reported, never repaired: the reader yields every record before the damage and
then raises ``CaptureFileError`` naming the file and the offset.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import BinaryIO, Protocol

from tracer.decode import Prefilter

CHUNK = 1 << 20
# Largest record we accept. Loopback with GSO/GRO yields frames of about 64 KiB; anything
# near this size is a broken length field, not a packet.
MAX_RECORD = 1 << 20
MAX_BLOCK = 16 << 20

PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000),
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000),
}
PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
GZIP_MAGIC = b"\x1f\x8b"
_OTHER_FORMATS = {
    b"\x28\xb5\x2f\xfd": "a zstd-compressed file: decompress it first (zstd -d)",
    b"\xfd7zXZ": "an xz-compressed file: decompress it first (xz -d)",
    b"BZh": "a bzip2-compressed file: decompress it first (bunzip2)",
    b"PK\x03\x04": "a zip archive: extract the capture first",
}

BT_IDB = 1
BT_PB = 2
BT_SPB = 3
BT_ISB = 5
BT_EPB = 6
BT_SHB = 0x0A0D0D0A
BYTE_ORDER_MAGIC = 0x1A2B3C4D


Record = tuple[float, int, bytes]


class _Readable(Protocol):
    def read1(self, n: int = -1, /) -> bytes: ...


class CaptureFileError(Exception):
    """A capture file that is not a capture, or is damaged at a known offset."""

    def __init__(self, name: str, reason: str, offset: int | None = None) -> None:
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"{name}: {reason}{where}")
        self.name = name
        self.reason = reason
        self.offset = offset


@dataclass
class Interface:
    linktype: int
    snaplen: int
    divisor: int = 1_000_000  # timestamp units per second when decimal
    scale: float = 0.0  # seconds per unit when binary (if_tsresol with the high bit set)
    offset: int = 0  # if_tsoffset, seconds
    name: str = ""
    drops: int | None = None  # last isb_ifdrop seen


@dataclass
class ReaderInfo:
    format: str = ""
    compressed: bool = False
    interfaces: list[Interface] = field(default_factory=list)
    packets: int = 0  # records read so far (a buffer's worth ahead of the consumer)

    @property
    def drops(self) -> int | None:
        known = [i.drops for i in self.interfaces if i.drops is not None]
        return sum(known) if known else None

    @property
    def linktypes(self) -> list[int]:
        return sorted({i.linktype for i in self.interfaces})


class CaptureReader:
    """Iterate ``(ts, linktype, frame)`` over one capture file or stream."""

    def __init__(self, stream: BinaryIO, name: str, size: int | None = None, *,
                 digest: bool = True, keep: Prefilter | None = None) -> None:
        self.name = name
        self.size = size  # bytes on disk, for progress; None for pipes
        self.info = ReaderInfo()
        self._hashing = _HashingReader(stream, digest)
        # Records this says False to are counted but not handed out (another worker's).
        self._keep = keep
        self._raw = stream
        self._stream: _Readable = self._hashing
        self._buf = b""
        self._pos = 0
        self._base = 0  # offset of _buf[0] in the (decompressed) stream
        self._eof = False

    @classmethod
    def open(cls, path: str, *, digest: bool = True,
             keep: Prefilter | None = None) -> CaptureReader:
        """Open a path, or ``-`` for standard input. ``digest``: compute the file's sha256
        while reading (what recognises a file read again)."""
        if path == "-":
            return cls(sys.stdin.buffer, "<stdin>", digest=digest, keep=keep)
        try:
            f = open(path, "rb")  # noqa: SIM115 - the reader owns it until close()
        except OSError as exc:
            raise CaptureFileError(path, f"cannot open: {exc.strerror}") from None
        return cls(f, path, os.fstat(f.fileno()).st_size, digest=digest, keep=keep)

    def close(self) -> None:
        if self._raw is not sys.stdin.buffer:
            self._raw.close()

    def __enter__(self) -> CaptureReader:  # not typing.Self: that needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def bytes_read(self) -> int:
        """How far into the file (compressed bytes for gzip) reading has got."""
        return self._hashing.count

    def sha256(self) -> str:
        """Digest of the bytes read so far: of the whole file once iteration has ended."""
        return self._hashing.digest.hexdigest()

    # -- buffer management -------------------------------------------------------------

    def _fill(self, need: int) -> bool:
        """Make at least ``need`` bytes available from ``_pos``; False at end of data."""
        have = len(self._buf) - self._pos
        if have >= need:
            return True
        parts = [self._buf[self._pos:]]
        self._base += self._pos
        self._pos = 0
        while have < need and not self._eof:
            try:
                # read1: what is there now (up to a chunk), so a pipe hands over each
                # packet as it arrives and a cut gzip stream gives up what it decoded.
                chunk = self._stream.read1(max(CHUNK, need - have))
            except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
                self._eof = True
                self._buf = b"".join(parts)
                raise CaptureFileError(
                    self.name,
                    f"compressed data is damaged ({exc}); everything before it was read",
                    self._base + have,
                ) from None
            if not chunk:
                self._eof = True
                break
            parts.append(chunk)
            have += len(chunk)
        self._buf = b"".join(parts)
        return have >= need

    def _offset(self) -> int:
        return self._base + self._pos

    # -- format detection ----------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[float, int, bytes]]:
        self._fill(4)
        head = self._buf[:4]
        if head[:2] == GZIP_MAGIC and not self.info.compressed:
            self.info.compressed = True
            # The magic was already consumed from the raw stream: start over through gzip.
            self._stream = gzip.GzipFile(  # type: ignore[call-overload]
                fileobj=_Prepend(self._buf, self._hashing), mode="rb"
            )
            self._buf = b""
            self._pos = 0
            self._eof = False
            self._fill(4)
            head = self._buf[:4]
        # Records come in batches (a buffer's worth) flattened by itertools in C: no
        # generator step per packet.
        if head in PCAP_MAGICS:
            self.info.format = "pcap"
            return chain.from_iterable(self._iter_pcap(*PCAP_MAGICS[head]))
        if head == PCAPNG_SHB:
            self.info.format = "pcapng"
            return chain.from_iterable(self._iter_pcapng())
        if not head:
            raise CaptureFileError(self.name, "empty file: not a pcap or pcapng capture")
        for magic, what in _OTHER_FORMATS.items():
            if head.startswith(magic):
                raise CaptureFileError(self.name, f"not a capture but {what}")
        raise CaptureFileError(
            self.name,
            f"not a pcap or pcapng capture (it starts with bytes {head.hex()}); "
            "write captures with tcpdump -w, tshark -w or Wireshark",
        )

    # -- pcap ----------------------------------------------------------------------------

    def _iter_pcap(self, endian: str, divisor: int) -> Iterator[list[Record]]:
        if not self._fill(24):
            raise CaptureFileError(self.name, "truncated pcap file header", 0)
        major, _minor, _zone, _sigfigs, snaplen, network = struct.unpack_from(
            endian + "HHiIII", self._buf, 4
        )
        if major != 2:
            raise CaptureFileError(self.name, f"unsupported pcap version {major}", 4)
        linktype = network & 0x03FFFFFF
        self.info.interfaces.append(Interface(linktype, snaplen, divisor))
        self._pos = 24
        unpack = struct.Struct(endian + "IIII").unpack_from
        info = self.info
        while True:
            # Hand out every complete record in the buffer as one batch, then refill.
            buf = self._buf
            pos = self._pos
            size = len(buf)
            batch: list[Record] = []
            append = batch.append
            keep = self._keep
            count = 0
            while pos + 16 <= size:
                sec, frac, incl, orig = unpack(buf, pos)
                end = pos + 16 + incl
                if end > size or incl > MAX_RECORD or not orig:
                    break
                count += 1
                if keep is None or keep(linktype, buf, pos + 16, end):
                    append((sec + frac / divisor, linktype, buf[pos + 16:end]))
                pos = end
            self._pos = pos
            info.packets += count
            if batch:
                yield batch
            if size - pos < 16:
                if not self._fill(16):
                    if len(self._buf) - self._pos:
                        raise CaptureFileError(
                            self.name, "truncated record header (file cut short)",
                            self._offset(),
                        )
                    return
                continue
            sec, frac, incl, orig = unpack(buf, pos)
            if not orig:
                # Nothing is 0 bytes long on a real link. The format allows a lone empty
                # record, but a run of them is a zero-filled region (a file whose end was
                # never written), which would otherwise read as millions of records.
                if incl:
                    raise CaptureFileError(
                        self.name,
                        f"corrupt record header (captured length {incl}, original length 0)",
                        self._offset(),
                    )
                if self._fill(32) and not unpack(self._buf, self._pos + 16)[3]:
                    buf = self._buf
                    pos = self._pos
                    raise CaptureFileError(
                        self.name,
                        "corrupt record header (original length 0, and the next one too: "
                        + ("all zero bytes, as where a file was never completely written)"
                           if not any(buf[pos:pos + 32]) else "a run of empty records)"),
                        self._offset(),
                    )
                buf = self._buf
                pos = self._pos
                self._pos = pos + 16
                info.packets += 1
                if keep is None or keep(linktype, buf, pos + 16, pos + 16):
                    yield [(sec + frac / divisor, linktype, b"")]
                continue
            if incl > MAX_RECORD:
                raise CaptureFileError(
                    self.name, f"corrupt record header (captured length {incl})",
                    self._offset(),
                )
            if not self._fill(16 + incl):
                raise CaptureFileError(
                    self.name,
                    f"truncated record ({incl} bytes announced, file cut short)",
                    self._offset(),
                )

    # -- pcapng --------------------------------------------------------------------------

    def _iter_pcapng(self) -> Iterator[list[Record]]:
        endian = "<"
        interfaces: list[Interface] = []
        info = self.info
        u32 = struct.Struct("<I").unpack_from
        epb = struct.Struct("<IIIIII").unpack_from
        while True:
            # Fast path: runs of well-formed enhanced packet blocks already in the buffer.
            # Anything unusual (another block type, a short buffer, a bad length) falls
            # through to the general per-block code below, which explains the problem.
            buf = self._buf
            pos = self._pos
            size = len(buf)
            batch: list[Record] = []
            keep = self._keep
            count = 0
            while pos + 28 <= size:
                btype, blen, iface_id, hi, lo, caplen = epb(buf, pos)
                if (
                    btype != BT_EPB
                    or blen > size - pos
                    or blen % 4
                    or 28 + caplen > blen - 4
                    or iface_id >= len(interfaces)
                    or u32(buf, pos + blen - 4)[0] != blen
                ):
                    break
                iface = interfaces[iface_id]
                count += 1
                if keep is None or keep(iface.linktype, buf, pos + 28, pos + 28 + caplen):
                    units = hi << 32 | lo
                    ts = units * iface.scale if iface.scale else units / iface.divisor
                    batch.append(
                        (ts + iface.offset, iface.linktype, buf[pos + 28:pos + 28 + caplen]))
                pos += blen
            self._pos = pos
            info.packets += count
            if batch:
                yield batch
            if not self._fill(12):
                if len(self._buf) - self._pos:
                    raise CaptureFileError(
                        self.name, "truncated block header (file cut short)", self._offset()
                    )
                return
            buf = self._buf
            pos = self._pos
            btype_raw = buf[pos:pos + 4]
            if btype_raw == PCAPNG_SHB:
                bom = buf[pos + 8:pos + 12]
                if bom == b"\x4d\x3c\x2b\x1a":
                    endian = "<"
                elif bom == b"\x1a\x2b\x3c\x4d":
                    endian = ">"
                else:
                    raise CaptureFileError(
                        self.name, "corrupt section header (bad byte-order magic)", self._offset()
                    )
                u32 = struct.Struct(endian + "I").unpack_from
                epb = struct.Struct(endian + "IIIIII").unpack_from
                interfaces = []
            btype = u32(buf, pos)[0]
            blen = u32(buf, pos + 4)[0]
            if blen < 12 or blen % 4 or blen > MAX_BLOCK:
                raise CaptureFileError(
                    self.name, f"corrupt block header (block length {blen})", self._offset()
                )
            if not self._fill(blen):
                raise CaptureFileError(
                    self.name,
                    f"truncated block ({blen} bytes announced, file cut short)",
                    self._offset(),
                )
            buf = self._buf
            pos = self._pos
            if u32(buf, pos + blen - 4)[0] != blen:
                raise CaptureFileError(
                    self.name, "corrupt block (trailing length does not match)", self._offset()
                )
            if btype in (BT_EPB, BT_PB):
                if blen < 32:
                    raise CaptureFileError(
                        self.name, f"corrupt packet block (block length {blen})", self._offset()
                    )
                if btype == BT_EPB:
                    iface_id, hi, lo, caplen = struct.unpack_from(endian + "IIII", buf, pos + 8)
                else:
                    iface_id, _drops, hi, lo, caplen = struct.unpack_from(
                        endian + "HHIII", buf, pos + 8
                    )
                if 28 + caplen > blen - 4:
                    raise CaptureFileError(
                        self.name,
                        f"corrupt packet block (captured length {caplen})",
                        self._offset(),
                    )
                if iface_id >= len(interfaces):
                    raise CaptureFileError(
                        self.name,
                        f"packet refers to interface {iface_id}, "
                        f"but the section defines {len(interfaces)}",
                        self._offset(),
                    )
                iface = interfaces[iface_id]
                units = hi << 32 | lo
                ts = units * iface.scale if iface.scale else units / iface.divisor
                self._pos = pos + blen
                info.packets += 1
                yield [(ts + iface.offset, iface.linktype, buf[pos + 28:pos + 28 + caplen])]
                continue
            if btype == BT_SPB:
                if blen < 16:
                    raise CaptureFileError(
                        self.name, f"corrupt simple packet block (block length {blen})",
                        self._offset(),
                    )
                if not interfaces:
                    raise CaptureFileError(
                        self.name, "simple packet block before any interface", self._offset()
                    )
                iface = interfaces[0]
                origlen = u32(buf, pos + 8)[0]
                caplen = min(origlen, blen - 16)
                if iface.snaplen:
                    caplen = min(caplen, iface.snaplen)
                self._pos = pos + blen
                info.packets += 1
                # A simple packet block carries no timestamp.
                yield [(0.0, iface.linktype, buf[pos + 12:pos + 12 + caplen])]
                continue
            if btype == BT_IDB:
                if blen < 20:
                    raise CaptureFileError(self.name, "corrupt interface block", self._offset())
                linktype, _res, snaplen = struct.unpack_from(endian + "HHI", buf, pos + 8)
                iface = Interface(linktype, snaplen)
                self._parse_idb_options(iface, buf, pos + 16, pos + blen - 4, endian)
                interfaces.append(iface)
                info.interfaces.append(iface)
            elif btype == BT_ISB:
                self._parse_isb(interfaces, buf, pos, blen, endian)
            self._pos = pos + blen

    def _options(
        self, buf: bytes, start: int, end: int, endian: str
    ) -> Iterator[tuple[int, bytes]]:
        hdr = struct.Struct(endian + "HH").unpack_from
        p = start
        while p + 4 <= end:
            code, length = hdr(buf, p)
            if code == 0:
                return
            value = buf[p + 4:p + 4 + length]
            if p + 4 + length > end:
                raise CaptureFileError(self.name, "corrupt block option", self._offset())
            yield code, value
            p += 4 + ((length + 3) & ~3)

    def _parse_idb_options(
        self, iface: Interface, buf: bytes, start: int, end: int, endian: str
    ) -> None:
        for code, value in self._options(buf, start, end, endian):
            if code == 9 and len(value) >= 1:  # if_tsresol
                res = value[0]
                if res & 0x80:
                    iface.scale = 2.0 ** -(res & 0x7F)
                else:
                    iface.divisor = 10 ** res
            elif code == 14 and len(value) >= 8:  # if_tsoffset
                iface.offset = struct.unpack(endian + "q", value[:8])[0]
            elif code == 2:  # if_name
                iface.name = value.decode("utf-8", "replace")

    def _parse_isb(
        self, interfaces: list[Interface], buf: bytes, pos: int, blen: int, endian: str
    ) -> None:
        if blen < 24:
            return
        iface_id = struct.unpack_from(endian + "I", buf, pos + 8)[0]
        if iface_id >= len(interfaces):
            return
        for code, value in self._options(buf, pos + 20, pos + blen - 4, endian):
            if code == 5 and len(value) >= 8:  # isb_ifdrop
                interfaces[iface_id].drops = struct.unpack(endian + "Q", value[:8])[0]


class _HashingReader:
    """Counts (and, unless told not to, hashes) every byte read from the underlying file."""

    def __init__(self, raw: BinaryIO, digest: bool = True) -> None:
        self._raw = raw
        self.count = 0
        self.digest = hashlib.sha256()
        self.hashing = digest

    def read1(self, n: int = -1) -> bytes:
        raw = self._raw
        data = raw.read1(n) if hasattr(raw, "read1") else raw.read(n)
        self.count += len(data)
        if self.hashing:
            self.digest.update(data)
        return data

    def read(self, n: int = -1) -> bytes:  # GzipFile reads its file object with read()
        return self.read1(n)

    def readable(self) -> bool:
        return True


class _Prepend:
    """A read-only stream that first returns bytes already read, then the rest of a stream."""

    def __init__(self, head: bytes, rest: _HashingReader) -> None:
        self._head = head
        self._rest = rest

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0:
                out, self._head = self._head + self._rest.read1(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._rest.read1(n)

    def read1(self, n: int = -1) -> bytes:
        return self.read(n)

    def readable(self) -> bool:
        return True
