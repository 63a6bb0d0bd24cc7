"""Write packets as pcapng (what `tracer capture --write` keeps): each packet on the interface
that saw it, with the link-layer facts the kernel gave.

The packet sockets are cooked: the kernel strips the link header and hands over the packet
from its network header with a sockaddr_ll beside it (interface index, packet type, the
protocol, hardware type and address). Each packet is written as LINKTYPE_LINUX_SLL2, the
header libpcap itself writes for such sockets (`tcpdump -i any -w`): those facts, field
for field, in front of the IP packet. So `tcpdump -r` prints each packet's direction and
interface, and Wireshark its packet type; raw IP would keep only the bytes.

Every interface gets its own Interface Description Block, written when its first packet
comes (pcapng allows them anywhere in a section), named (if_name) as the interface is
named then, or ``ifindex N`` when it is already gone; every Enhanced Packet Block names
its interface, and its epb_flags say inbound or outbound and unicast, multicast,
broadcast or promiscuous, from the packet type. An agent that runs for months on a host
where containers come and go may see new interfaces without end: after MAX_INTERFACES
the packets of any further interface share one last block, named OTHER_INTERFACES, and
keep their interface index in their SLL2 header (counted in ``other_packets``), so what
the writer holds stays bounded. (A new section would describe them anew, but tshark 4.0
then shows the first section's names for the next one's interfaces.)

The file is created 0600: it holds payloads, which the database never does. It is always a
new file: an existing name (a file, or a symbolic link planted where root's agent writes) is
refused, never followed, truncated or chmod-ed.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

from tracer.decode import LINKTYPE_LINUX_SLL2
from tracer.sources.ring import SOCKADDR_LL, Packet, TaggedPacket

_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_EPB = 0x00000006
OPT_COMMENT = 1
IF_NAME = 2
IF_TSRESOL = 9
EPB_FLAGS = 2
SLL2_HEADER = 20
MAX_INTERFACES = 1024  # interfaces described each in its own block; then OTHER_INTERFACES
MAX_LINKS = 4096  # sockaddr_ll kept with what they make of a packet block
OTHER_INTERFACES = "other interfaces (the packet's SLL2 header has its ifindex)"

# epb_flags by sll_pkttype (linux/if_packet.h): bits 0-1 the direction (1 inbound,
# 2 outbound), bits 2-4 the reception type (1 unicast, 2 multicast, 3 broadcast,
# 4 promiscuous). PACKET_HOST: to this host; BROADCAST; MULTICAST; OTHERHOST: to another
# host, seen in promiscuous mode; OUTGOING: sent by this host. Any other type (5,
# multicast looped back; 6 and 7, never given to packet sockets) has no flags: unknown.
_FLAGS_BY_PKTTYPE = (0x01 | 1 << 2, 0x01 | 3 << 2, 0x01 | 2 << 2, 0x01 | 4 << 2, 0x02)

_EPB_HEAD = struct.Struct("<IIIIIII")  # type, length, interface, ts high, ts low, caplen, len
_SLL2 = struct.Struct("!2s2xiHBB8s")  # protocol, reserved, ifindex, hatype, pkttype, halen, addr
_EPB_TAIL = struct.Struct("<HHIII")  # epb_flags (code, length, value), opt_endofopt, length
_EPB_FIXED = _EPB_HEAD.size + _EPB_TAIL.size


def _block(btype: int, body: bytes) -> bytes:
    pad = (-len(body)) % 4
    length = 12 + len(body) + pad
    return struct.pack("<II", btype, length) + body + b"\0" * pad + struct.pack("<I", length)


def _option(code: int, value: bytes) -> bytes:
    pad = (-len(value)) % 4
    return struct.pack("<HH", code, len(value)) + value + b"\0" * pad


def interface_name(ifindex: int) -> str:
    """The interface's name now, or ``ifindex N`` for one that is gone (0: unknown)."""
    if ifindex <= 0:
        return "unknown interface"
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"ifindex {ifindex}"


class PcapWriteError(Exception):
    """The pcapng file cannot be created; the message says why and what to do."""


def _create_new(path: str) -> int:
    """A descriptor on ``path``, created now (0600): O_EXCL, so an existing file or a
    symbolic link (even a dangling one) there is refused, and never followed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ELOOP):
            raise PcapWriteError(f"cannot create {path}: {exc.strerror}") from None
        try:
            found = os.lstat(path)
        except OSError:
            found = None
        if found is not None and stat.S_ISLNK(found.st_mode):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise PcapWriteError(
                f"refusing to write {path}: it is a symbolic link to {target}; give the real "
                f"path of a new file") from None
        raise PcapWriteError(
            f"refusing to write {path}: it already exists; choose another name or remove "
            f"it") from None
    os.fchmod(fd, 0o600)  # whatever the umask
    return fd


class PcapngWriter:
    """Raises PcapWriteError when ``path`` exists (file or link) or cannot be created.

    ``snaplen``: the bytes kept of each packet after its link header (the capture's
    --snaplen). ``name_of`` names an interface index (interface_name: the kernel's name)."""

    def __init__(self, path: str, *, snaplen: int = 262144, comment: str = "",
                 name_of: Callable[[int], str] = interface_name,
                 max_interfaces: int = MAX_INTERFACES) -> None:
        fd = _create_new(path)
        self._f: BinaryIO = os.fdopen(fd, "wb", buffering=1 << 20)
        self.path = path
        self.packets = 0
        self.other_packets = 0  # packets of interfaces beyond MAX_INTERFACES
        self._snaplen = snaplen + SLL2_HEADER
        self._name_of = name_of
        self._max_interfaces = max_interfaces
        self._ids: dict[int, int] = {}  # interface index -> interface id
        self._other: int | None = None  # the id of the block OTHER_INTERFACES share
        self._links: dict[bytes, tuple[int, bytes, int]] = {}  # sockaddr_ll -> see _link
        self.interfaces: list[str] = []  # the names of the blocks written, by id
        options = _option(OPT_COMMENT, comment.encode()) if comment else b""
        self._f.write(_block(_SHB, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
                             + options + _option(0, b"")))

    def _describe(self, ifindex: int) -> int:
        """The id of a new interface, its Interface Description Block written."""
        if len(self._ids) < self._max_interfaces:
            self._ids[ifindex] = interface_id = self._block(self._name_of(ifindex))
            return interface_id
        self.other_packets += 1
        if self._other is None:
            self._other = self._block(OTHER_INTERFACES)
        return self._other

    def _block(self, name: str) -> int:
        options = (_option(IF_NAME, name.encode()) + _option(IF_TSRESOL, b"\x06")  # µs
                   + _option(0, b""))
        self._f.write(_block(_IDB, struct.pack("<HHI", LINKTYPE_LINUX_SLL2, 0, self._snaplen)
                             + options))
        self.interfaces.append(name)
        return len(self.interfaces) - 1

    def write(self, ts: float, data: bytes, link: bytes, wirelen: int) -> None:
        """One packet: ``data`` from its IP header, ``link`` its sockaddr_ll as the kernel
        gave it, ``wirelen`` its length before the snap length cut it."""
        known = self._links.get(link)
        if known is None:
            known = self._link(link)
        interface_id, header, flags = known
        units = round(ts * 1_000_000)
        caplen = SLL2_HEADER + len(data)
        pad = -caplen % 4
        length = _EPB_FIXED + caplen + pad
        self._f.write(
            _EPB_HEAD.pack(_EPB, length, interface_id, units >> 32, units & 0xFFFFFFFF, caplen,
                           SLL2_HEADER + max(wirelen, len(data)))
            + header + data + b"\0" * pad + _EPB_TAIL.pack(EPB_FLAGS, 4, flags, 0, length))
        self.packets += 1

    def _link(self, link: bytes) -> tuple[int, bytes, int]:
        """What a sockaddr_ll makes of a packet block: its interface id (the interface
        described if new), its SLL2 header, its epb_flags. Kept for the next packets with
        the same one (a few per interface: one per packet type and peer address)."""
        _family, protocol, ifindex, hatype, pkttype, halen, address = SOCKADDR_LL.unpack(link)
        interface_id = self._ids.get(ifindex)
        if interface_id is None:
            interface_id = self._describe(ifindex)
        if halen < 8:  # the ring's bytes past the address may be an earlier packet's
            address = address[:halen].ljust(8, b"\0")
        known = (interface_id,
                 _SLL2.pack(protocol, ifindex, hatype, pkttype, halen, address),
                 _FLAGS_BY_PKTTYPE[pkttype] if pkttype < 5 else 0)
        if interface_id != self._other:  # those of OTHER_INTERFACES are counted each time
            if len(self._links) >= MAX_LINKS:
                self._links.clear()
            self._links[link] = known
        return known

    def tee(self, packets: Iterator[TaggedPacket | None]) -> Iterator[Packet | None]:
        """``packets`` passed on as the analyzer takes them, each written here first."""
        write = self.write
        for item in packets:
            if item is None:
                yield None
                continue
            ts, linktype, data, link, wirelen = item
            write(ts, data, link, wirelen)
            yield ts, linktype, data

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()
