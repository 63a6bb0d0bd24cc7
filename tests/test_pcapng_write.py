"""`tracer capture --write`: each packet on the interface that saw it, read back by tshark,
tcpdump and tracer's own reader.

The writer's blocks are checked on crafted packets, byte for byte, by a block walk of
this file's own (an interface that appears late, one that is gone, every packet type, a
packet cut by the snap length, a new section after too many interfaces); then real
captures: the ring and the recv path agree on each packet's sockaddr_ll, and a live
agent on `any` with one client on loopback and another behind a veth pair in a network
namespace writes a file where tshark and tcpdump put every packet on its own interface,
in its own direction, and `tracer capture --read` finds the live run's connections.

The live tests need root and `ip netns`; tshark and tcpdump (`make system-deps`) are
needed by the tests that read with them, which otherwise skip saying so. About 15 s.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import live_support as ls
import netns
import pytest
import realtraffic_support as rt
from support import DEMO_CAPTURE, free_port, need_root, skip_if, tracer

from cli.demo import SHIPPED_PORT
from tracer.decode import LINKTYPE_LINUX_SLL2
from tracer.sources.live import LiveCapture
from tracer.sources.pcapfile import CaptureReader
from tracer.sources.pcapwriter import OTHER_INTERFACES, PcapngWriter
from tracer.sources.ring import SOCKADDR_LL

TSHARK = shutil.which("tshark")
TCPDUMP = shutil.which("tcpdump")
TOOL_TIMEOUT_S = 30.0
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
PACKET_HOST, PACKET_OUTGOING = 0, 4
ANY_DURATION_S = 5.0


def _need(tool: str | None, name: str) -> str:
    if tool is None:
        pytest.skip(f"{name} is not installed (make system-deps installs it)")
    return tool


def _link(ifindex: int, pkttype: int, *, hatype: int = ARPHRD_LOOPBACK,
          address: bytes = b"\0" * 6, stale: bytes = b"") -> bytes:
    """A sockaddr_ll as the kernel writes it; ``stale``: bytes left past the address."""
    return SOCKADDR_LL.pack(socket.AF_PACKET, b"\x08\x00", ifindex, hatype, pkttype,
                            len(address), (address + stale)[:8])


def _ipv4(src: str, dst: str, sport: int, dport: int, payload: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    total = 20 + len(tcp) + len(payload)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 6, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + tcp + payload


@dataclass
class Block:
    kind: int
    body: bytes


def _blocks(path: Path) -> list[Block]:
    """Every block of a little-endian pcapng file, the lengths at both ends checked."""
    data = path.read_bytes()
    out, at = [], 0
    while at < len(data):
        kind, length = struct.unpack_from("<II", data, at)
        assert length % 4 == 0 and at + length <= len(data), (at, length)
        assert struct.unpack_from("<I", data, at + length - 4)[0] == length, at
        out.append(Block(kind, data[at + 8:at + length - 4]))
        at += length
    return out


def _options(raw: bytes) -> dict[int, bytes]:
    found, at = {}, 0
    while at + 4 <= len(raw):
        code, size = struct.unpack_from("<HH", raw, at)
        if code == 0:
            break
        found[code] = raw[at + 4:at + 4 + size]
        at += 4 + size + (-size % 4)
    return found


def _idb(block: Block) -> tuple[int, int, str, bytes]:
    """(link type, snap length, if_name, if_tsresol) of an Interface Description Block."""
    assert block.kind == 1
    linktype, _reserved, snaplen = struct.unpack_from("<HHI", block.body)
    options = _options(block.body[8:])
    return linktype, snaplen, options[2].decode(), options[9]


@dataclass
class Epb:
    interface: int
    ts_us: int
    caplen: int
    wirelen: int
    sll2: tuple[Any, ...]  # protocol, ifindex, hatype, pkttype, halen, address
    packet: bytes
    flags: int


def _epb(block: Block) -> Epb:
    assert block.kind == 6
    interface, high, low, caplen, wirelen = struct.unpack_from("<IIIII", block.body)
    frame = block.body[20:20 + caplen]
    options = _options(block.body[20 + caplen + (-caplen % 4):])
    return Epb(interface, high << 32 | low, caplen, wirelen,
               struct.unpack_from("!H2xiHBB8s", frame), frame[20:],
               struct.unpack("<I", options[2])[0])


# -- the writer, on crafted packets ------------------------------------------------------


def _gone_ifindex() -> int:
    """An interface index no interface of this host has."""
    return max(index for index, _name in socket.if_nameindex()) + 1000


def test_each_interface_gets_one_block_when_its_first_packet_comes(tmp_path: Path) -> None:
    lo, gone = socket.if_nametoindex("lo"), _gone_ifindex()
    path = tmp_path / "w.pcapng"
    first = _ipv4("127.0.0.1", "127.0.0.1", 40000, 9090, b"PRI * HTTP/2.0")
    second = _ipv4("10.0.0.2", "10.0.0.1", 40001, 9090, b"x" * 100)
    mac = bytes.fromhex("02aabbccddee")
    writer = PcapngWriter(str(path), snaplen=200, comment="crafted")
    writer.write(1_790_000_000.000001, first, _link(lo, PACKET_HOST), len(first))
    # an interface that appears late, and is gone by then: its packet cut short to 60 bytes
    writer.write(1_790_000_001.5, second[:60],
                 _link(gone, PACKET_OUTGOING, hatype=ARPHRD_ETHER, address=mac), len(second))
    writer.write(1_790_000_002.25, first, _link(lo, PACKET_HOST, stale=b"\xff\xff"),
                 len(first))
    writer.close()
    assert writer.interfaces == ["lo", f"ifindex {gone}"] and writer.packets == 3

    blocks = _blocks(path)
    assert [b.kind for b in blocks] == [0x0A0D0D0A, 1, 6, 1, 6, 6]
    assert _options(blocks[0].body[16:])[1] == b"crafted"
    assert _idb(blocks[1]) == (LINKTYPE_LINUX_SLL2, 200 + 20, "lo", b"\x06")
    assert _idb(blocks[3]) == (LINKTYPE_LINUX_SLL2, 200 + 20, f"ifindex {gone}", b"\x06")
    one, two, three = (_epb(blocks[i]) for i in (2, 4, 5))
    assert (one.interface, two.interface, three.interface) == (0, 1, 0)
    assert (one.ts_us, two.ts_us, three.ts_us) == (
        1_790_000_000_000_001, 1_790_000_001_500_000, 1_790_000_002_250_000)
    assert one.sll2 == (0x0800, lo, ARPHRD_LOOPBACK, PACKET_HOST, 6, b"\0" * 8)
    assert two.sll2 == (0x0800, gone, ARPHRD_ETHER, PACKET_OUTGOING, 6, mac + b"\0\0")
    # bytes the kernel left past the address are not written
    assert three.sll2 == one.sll2
    assert (one.packet, one.caplen, one.wirelen) == (first, 20 + len(first), 20 + len(first))
    assert (two.packet, two.caplen, two.wirelen) == (second[:60], 80, 20 + len(second))
    assert (one.flags, two.flags) == (0b101, 0b10)  # inbound unicast; outbound

    with CaptureReader.open(str(path)) as reader:
        back = list(reader)
    assert [(round(ts, 6), link, frame[20:]) for ts, link, frame in back] == [
        (1_790_000_000.000001, LINKTYPE_LINUX_SLL2, first),
        (1_790_000_001.5, LINKTYPE_LINUX_SLL2, second[:60]),
        (1_790_000_002.25, LINKTYPE_LINUX_SLL2, first)]


@pytest.mark.parametrize(("pkttype", "flags"), [
    (0, 0b00101),  # PACKET_HOST: inbound, unicast
    (1, 0b01101),  # PACKET_BROADCAST: inbound, broadcast
    (2, 0b01001),  # PACKET_MULTICAST: inbound, multicast
    (3, 0b10001),  # PACKET_OTHERHOST: inbound, promiscuous
    (4, 0b00010),  # PACKET_OUTGOING: outbound
    (5, 0),  # PACKET_LOOPBACK (multicast looped back): not said
    (7, 0),  # PACKET_KERNEL, never given to packet sockets: not said
])
def test_direction_and_reception_type_from_the_packet_type(tmp_path: Path, pkttype: int,
                                                           flags: int) -> None:
    path = tmp_path / "f.pcapng"
    packet = _ipv4("10.0.0.2", "10.0.0.1", 40000, 9090)
    writer = PcapngWriter(str(path))
    writer.write(1.0, packet, _link(1, pkttype), len(packet))
    writer.close()
    epb = _epb(_blocks(path)[2])
    assert epb.flags == flags and epb.sll2[3] == pkttype


def test_interfaces_beyond_the_limit_share_one_block(tmp_path: Path) -> None:
    """With room for two interfaces, the packets of a third and a fourth go to one shared
    block; their SLL2 headers keep their own interface index."""
    path = tmp_path / "s.pcapng"
    names = {5: "eth-a", 6: "eth-b", 7: "eth-c", 8: "eth-d"}
    packet = _ipv4("10.0.0.2", "10.0.0.1", 40000, 9090)
    writer = PcapngWriter(str(path), name_of=names.__getitem__, max_interfaces=2)
    order = [5, 6, 5, 7, 8, 7, 6]
    for i, ifindex in enumerate(order):
        writer.write(10.0 + i, packet, _link(ifindex, PACKET_HOST), len(packet))
    writer.close()
    assert (writer.packets, writer.other_packets) == (7, 3)
    assert writer.interfaces == ["eth-a", "eth-b", OTHER_INTERFACES]
    blocks = _blocks(path)
    assert [b.kind for b in blocks] == [0x0A0D0D0A, 1, 6, 1, 6, 6, 1, 6, 6, 6, 6]
    assert [_idb(b)[2] for b in blocks if b.kind == 1] == writer.interfaces
    packets = [_epb(b) for b in blocks if b.kind == 6]
    assert [(p.interface, p.sll2[1]) for p in packets] == [
        (0, 5), (1, 6), (0, 5), (2, 7), (2, 8), (2, 7), (1, 6)]
    with CaptureReader.open(str(path)) as reader:
        assert [int(ts) for ts, _link, _frame in reader] == list(range(10, 17))
    if TSHARK is not None:
        assert _tshark(path, "frame.interface_name", "sll.ifindex") == [
            [names.get(i, OTHER_INTERFACES) if i in (5, 6) else OTHER_INTERFACES, str(i)]
            for i in order]


def _tshark(path: Path, *fields: str) -> list[list[str]]:
    tool = _need(TSHARK, "tshark")
    argv = [tool, "-r", str(path), "-T", "fields", *[a for f in fields for a in ("-e", f)]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return [line.split("\t") for line in proc.stdout.splitlines()]


def _tcpdump(path: Path) -> list[str]:
    tool = _need(TCPDUMP, "tcpdump")
    proc = subprocess.run([tool, "-n", "-r", str(path)], capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_tshark_and_tcpdump_read_the_crafted_file(tmp_path: Path) -> None:
    lo, gone = socket.if_nametoindex("lo"), _gone_ifindex()
    path = tmp_path / "t.pcapng"
    a = _ipv4("127.0.0.1", "127.0.0.1", 40000, 9090)
    b = _ipv4("10.0.0.1", "10.0.0.2", 9090, 40001)
    writer = PcapngWriter(str(path))
    writer.write(1.0, a, _link(lo, PACKET_HOST), len(a))
    writer.write(2.0, b, _link(gone, PACKET_OUTGOING, hatype=ARPHRD_ETHER), len(b))
    writer.close()
    assert _tshark(path, "frame.interface_id", "frame.interface_name", "sll.ifindex",
                   "ip.src") == [["0", "lo", str(lo), "127.0.0.1"],
                                 ["1", f"ifindex {gone}", str(gone), "10.0.0.1"]]
    lines = _tcpdump(path)
    assert len(lines) == 2, lines
    assert re.search(r" lo\s+In\s+IP 127\.0\.0\.1\.40000 > 127\.0\.0\.1\.9090:", lines[0]), \
        lines
    # tcpdump names an interface by asking this host for its index: "?" when none has it
    assert re.search(r" \?\s+Out\s+IP 10\.0\.0\.1\.9090 > ", lines[1]), lines


# -- real packets -----------------------------------------------------------------------


def _tagged(capture: LiveCapture, expect: int) -> list[tuple[Any, ...]]:
    """(packet, sockaddr_ll fields, address bytes that count) of ``expect`` packets, or
    what came within 5 s."""
    out: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + 5.0
    for item in capture.tagged_packets(0.05):
        if item is not None:
            _ts, _linktype, data, link, wirelen = item
            family, protocol, ifindex, hatype, pkttype, halen, address = SOCKADDR_LL.unpack(link)
            out.append((data, wirelen, family, protocol, ifindex, hatype, pkttype, halen,
                        address[:halen]))
        if len(out) >= expect or time.monotonic() > deadline:
            return out
    return out


def test_ring_and_recv_give_each_packet_the_same_sockaddr() -> None:
    """One TCP exchange on loopback, read by a capture with the ring and one without:
    the same packets, each with the same interface, packet type, protocol and address."""
    need_root("packet sockets")
    port = free_port()
    with LiveCapture(["lo"], frozenset({port})) as ring, \
            LiveCapture(["lo"], frozenset({port}), ring=False) as recv:
        assert ring.rings and not recv.rings
        with socket.create_server(("127.0.0.1", port)) as server, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping" * 100)
                assert peer.recv(400)
        # SYN, SYN-ACK, ACK, data, its ACK, then two FINs and their ACKs: at least 7
        from_ring, from_recv = _tagged(ring, 7), _tagged(recv, 7)
    assert len(from_ring) >= 7 and from_ring == from_recv[:len(from_ring)]
    lo = socket.if_nametoindex("lo")
    for data, wirelen, family, protocol, ifindex, hatype, pkttype, halen, address in from_ring:
        assert (family, protocol, ifindex, hatype, pkttype) == (
            socket.AF_PACKET, b"\x08\x00", lo, ARPHRD_LOOPBACK, PACKET_HOST)
        assert wirelen == len(data) and (halen, address) == (6, b"\0" * 6)


@dataclass
class AnyRun:
    port: int
    host: netns.Host
    pcap: Path
    db: Path
    output: str
    tshark: list[list[str]]
    tcpdump: list[str]


@pytest.fixture(scope="module")
def any_run(tmp_path_factory: pytest.TempPathFactory) -> AnyRun:
    """`tracer capture -i any --write F` while a grpcio client closes its connections
    over loopback and another, in a namespace, holds them over a veth pair. The file is
    read by tshark and tcpdump while the veth still exists (tcpdump names interfaces by
    asking this host)."""
    ls.need_root()
    skip_if(netns.unavailable_reason())
    work = tmp_path_factory.mktemp("any")
    db, pcap = work / "any.db", work / "any.pcapng"
    local = rt.PeerSpec("grpcio-close-lo", "grpcio", "close", 3)
    remote = rt.PeerSpec("grpcio-leak-veth", "grpcio", "leak", 2)
    with rt.nothing_left_behind(), netns.hosts(1) as hosts, \
            rt.started_processes() as processes:
        host = hosts[0]
        port = ls.start_server(processes)
        agent = ls.Agent(processes, db, port, "-i", "any", "--duration", f"{ANY_DURATION_S}s",
                         "--write", str(pcap))
        agent.wait_ready()
        clients = [ls.start_peer(processes, local, f"127.0.0.1:{port}"),
                   ls.start_peer(processes, remote, f"{host.gateway}:{port}",
                                 prefix=host.command([]))]
        rt.wait_done(clients)
        ls.wait_client_ports(clients[1].popen.pid, port, remote.count)
        agent.require_time_left(ANY_DURATION_S)
        assert agent.wait_exit() == 0, agent.output()
        fields = ("frame.interface_id", "frame.interface_name", "frame.packet_flags_direction",
                  "ip.src", "ip.dst", "tcp.srcport", "tcp.dstport")
        run = AnyRun(port, host, pcap, db, agent.output(),
                     _tshark(pcap, *fields) if TSHARK else [],
                     _tcpdump(pcap) if TCPDUMP else [])
    return run


def test_any_puts_every_packet_on_its_interface_for_tshark(any_run: AnyRun) -> None:
    _need(TSHARK, "tshark")
    port, host = str(any_run.port), any_run.host
    seen: dict[tuple[str, str], int] = {}
    ids: dict[str, set[str]] = {}
    for interface_id, name, direction, src, dst, sport, dport in any_run.tshark:
        if port not in (sport, dport):
            continue
        ids.setdefault(name, set()).add(interface_id)
        if "127.0.0.1" in (src, dst):
            # loopback: the copy kept is the one received (the outgoing one is dropped)
            where = ("lo", "in")
        elif src == host.ip:
            where = (host.root_if, "in")
        elif dst == host.ip:
            where = (host.root_if, "out")
        else:
            continue  # another namespace's traffic on the same port number
        assert (name, {"0x00000001": "in", "0x00000002": "out"}[direction]) == where, \
            (name, direction, src, dst)
        seen[where] = seen.get(where, 0) + 1
    assert set(seen) == {("lo", "in"), (host.root_if, "in"), (host.root_if, "out")}, seen
    # one interface block each: one id per name, distinct ids
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({next(iter(v)) for v in ids.values()}) == len(ids), ids


def test_any_puts_every_packet_on_its_interface_for_tcpdump(any_run: AnyRun) -> None:
    _need(TCPDUMP, "tcpdump")
    port, host = any_run.port, any_run.host
    lines = [line for line in any_run.tcpdump if f".{port} " in line or f".{port}:" in line]
    assert lines, any_run.tcpdump[:5]
    counts = {"lo": 0, "in": 0, "out": 0}
    for line in lines:
        if " IP 127.0.0.1." in line:
            assert re.search(r" lo\s+In\s+IP 127\.0\.0\.1\.", line), line
            counts["lo"] += 1
        elif f" IP {host.ip}." in line:
            assert re.search(rf" {host.root_if}\s+In\s+IP {re.escape(host.ip)}\.", line), line
            counts["in"] += 1
        elif f" > {host.ip}." in line:
            assert re.search(rf" {host.root_if}\s+Out\s+IP ", line), line
            counts["out"] += 1
    assert all(counts.values()), counts


def test_any_file_reads_back_to_the_live_connections(any_run: AnyRun, tmp_path: Path) -> None:
    assert any_run.pcap.stat().st_mode & 0o777 == 0o600
    replay = tmp_path / "replay.db"
    tracer("capture", "--read", str(any_run.pcap), "--port", str(any_run.port),
           "--db", str(replay), "-q")

    def shape(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], tuple[Any, ...]]:
        return {(r["orig_h"], r["orig_p"], r["resp_h"], r["resp_p"]):
                (r["conn_state"], r["streams"], r["is_open"], r["close_kind"], r["history"])
                for r in rows}

    live = ls.connections(any_run.db)
    clients = {r["orig_h"] for r in live}
    assert {"127.0.0.1", any_run.host.ip} <= clients, clients
    assert shape(ls.connections(replay)) == shape(live)
    assert "written to" in any_run.output, any_run.output


def test_write_with_read_is_refused_saying_what_keeps_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out.pcapng"
    done = tracer("capture", "--read", str(DEMO_CAPTURE), "--port", str(SHIPPED_PORT),
                  "--db", str(tmp_path / "t.db"), "--write", str(out), check=False)
    assert done.returncode == 2, done
    assert "--write keeps the packets a live capture reads" in done.stderr, done.stderr
    assert "tshark -r IN" in done.stderr, done.stderr
    assert not out.exists() and not (tmp_path / "t.db").exists()
