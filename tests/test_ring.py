"""The memory-mapped receive ring (tracer/sources/ring.py) against the recv path, tcpdump
and the kernel's counters, on real loopback traffic.

Needs root (AF_PACKET); the tcpdump comparison needs tcpdump (`make system-deps`). Every
read and every traffic loop is bounded in count and in time. About 10 s in all.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import live_support as ls
import pytest
from support import free_port

from tracer.agent.live import LiveSettings, run_live
from tracer.decode import LINKTYPE_RAW
from tracer.sources import live as live_source
from tracer.sources.live import LiveCapture
from tracer.sources.pcapfile import CaptureReader
from tracer.sources.ring import RingUnavailable, geometry

pytestmark = [pytest.mark.live]

EXCHANGES = 300  # request/response pairs of the reference traffic
READ_TIMEOUT_S = 10.0
QUIET_S = 0.3  # no packet for this long: the traffic is over

Packet = tuple[float, bytes]


def _read_all(capture: LiveCapture, expect: int | None = None) -> list[Packet]:
    """Every packet the capture holds: until ``expect`` packets, or QUIET_S without one;
    at most READ_TIMEOUT_S."""
    out: list[Packet] = []
    deadline = time.monotonic() + READ_TIMEOUT_S
    last = time.monotonic()
    for item in capture.packets(0.05):
        now = time.monotonic()
        if item is not None:
            out.append((item[0], item[2]))
            last = now
            if expect is not None and len(out) >= expect:
                break
        elif now - last >= QUIET_S or now >= deadline:
            break
    return out


@contextlib.contextmanager
def _server(port: int) -> Iterator[socket.socket]:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(4)
    srv.settimeout(5.0)
    try:
        yield srv
    finally:
        srv.close()


def _exchange(srv: socket.socket, port: int, count: int) -> None:
    """``count`` small requests and answers on one connection, then a clean close: every
    kind of segment (SYN, data, pure ACK, FIN) of a few hundred packets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(5.0)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(count):
                client.sendall(b"q%05d" % i)
                got = b""
                while len(got) < 6:
                    got += conn.recv(6 - len(got))
                conn.sendall(b"a" * (i % 200 + 1))
                want = i % 200 + 1
                back = b""
                while len(back) < want:
                    back += client.recv(want - len(back))
            client.shutdown(socket.SHUT_WR)
            assert conn.recv(1) == b""
        # conn closed here; the client reads its FIN
        assert client.recv(1) == b""


def test_ring_is_used_on_loopback() -> None:
    ls.need_root()
    with LiveCapture(["lo"], frozenset([free_port()])) as capture:
        assert capture.ring_bytes == live_source.DEFAULT_BUFFER
        assert capture.receive.startswith("receive ring: 32 MiB"), capture.receive
        assert not capture.ring_refused


def test_ring_off_reads_with_recv() -> None:
    ls.need_root()
    with LiveCapture(["lo"], frozenset([free_port()]), ring=False) as capture:
        assert capture.ring_bytes == 0 and not capture.rings
        assert capture.receive.startswith("receive ring off"), capture.receive
        assert not capture.ring_refused


def test_ring_and_recv_see_the_same_packets_with_the_kernels_timestamps(tmp_path: Path) -> None:
    """Both paths on the same traffic at once, and tcpdump too where it is installed: the
    same packets in the same order; the ring's timestamps are the kernel's arrival times
    (tcpdump's, though the ring is read QUIET_S after the traffic ended), the recv path's
    are read times, never earlier."""
    ls.need_root()
    port = free_port()
    tcpdump = shutil.which("tcpdump")
    with _server(port) as srv, contextlib.ExitStack() as stack:
        ring = stack.enter_context(LiveCapture(["lo"], frozenset([port])))
        plain = stack.enter_context(LiveCapture(["lo"], frozenset([port]), ring=False))
        assert ring.rings and not plain.rings
        dump: subprocess.Popen[bytes] | None = None
        dump_file = tmp_path / "lo.pcap"
        if tcpdump:
            dump = subprocess.Popen(
                # Every packet as it comes (no block timeout to wait for at the end),
                # into a buffer of many small frames (the packets here are < 400 bytes),
                # written as root (the test's folder is root's alone).
                [tcpdump, "-i", "lo", "-nn", "-U", "-Z", "root", "--immediate-mode",
                 "-s", "2048", "-B", "32768", "--time-stamp-precision=nano",
                 "-w", str(dump_file), f"tcp port {port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            stack.callback(_stop, dump)
            _wait_listening(dump)
        began = time.time()
        _exchange(srv, port, EXCHANGES)
        ended = time.time()
        time.sleep(QUIET_S)
        by_ring = _read_all(ring)
        by_recv = _read_all(plain, expect=len(by_ring))
        assert ring.statistics() == (len(by_ring), 0)
        assert plain.statistics() == (len(by_recv), 0)
    # SYN, SYN-ACK, ACK, two data segments and ACKs per exchange, FINs.
    assert len(by_ring) >= 2 * EXCHANGES + 6, len(by_ring)
    assert [p for _, p in by_ring] == [p for _, p in by_recv]
    for (t_ring, _), (t_recv, _) in zip(by_ring, by_recv, strict=True):
        assert began - 0.01 <= t_ring <= ended + 0.01
        assert t_recv >= t_ring - 1e-6
    assert [t for t, _ in by_ring] == sorted(t for t, _ in by_ring)
    if dump is None:
        pytest.skip("tcpdump is not installed: the timestamps were not compared with it")
    _stop(dump)
    assert dump.stderr is not None
    said = dump.stderr.read().decode(errors="replace")
    with CaptureReader.open(str(dump_file), digest=False) as reader:
        by_tcpdump = [(ts, frame[14:]) for ts, _lt, frame in reader]  # Ethernet on lo
    assert [p for _, p in by_tcpdump] == [p for _, p in by_ring], said
    worst = max(abs(a - b) for (a, _), (b, _) in zip(by_ring, by_tcpdump, strict=True))
    assert worst < 1e-3, f"ring and tcpdump timestamps differ by up to {worst * 1e6:.0f} us"


def test_a_full_ring_counts_every_drop() -> None:
    """A ring of two blocks that nobody reads while 32 MiB cross loopback (segments of up
    to 64 KiB): the kernel drops most of them and says so; what it passed is exactly what
    was read plus what it dropped."""
    ls.need_root()
    port = free_port()
    block, count = geometry(1, 262144)
    assert (block, count) == (4096, 1)
    block, _ = geometry(8 << 20, 262144)
    with ls.tcp_sink(port), LiveCapture(["lo"], frozenset([port]),
                                        buffer_bytes=2 * block) as capture:
        assert capture.rings[0].block_count == 2
        ls.flood(port, 32 << 20)
        time.sleep(QUIET_S)
        read = _read_all(capture)
        received, dropped = capture.statistics()
        full = capture.ring_full
    assert dropped > 0 and full > 0
    assert received == len(read) + dropped, (received, len(read), dropped)
    assert len(read) >= 2  # what the two blocks held


def test_turns_come_on_time_idle_and_under_a_flood() -> None:
    """None at least every turn, with no traffic and with loopback flooded."""
    ls.need_root()
    port = free_port()
    turn = 0.05
    with ls.tcp_sink(port), LiveCapture(["lo"], frozenset([port])) as capture:
        packets = capture.packets(turn)
        assert _worst_gap(packets, 1.0) < 4 * turn
        stop = threading.Event()

        def flood() -> None:
            deadline = time.monotonic() + 5.0
            with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while not stop.is_set() and time.monotonic() < deadline:
                    s.sendall(b"x" * 64)

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        try:
            gap = _worst_gap(packets, 1.5, need_packets=True)
        finally:
            stop.set()
            sender.join(10.0)
    assert gap < 4 * turn, f"{gap:.3f}s between two turns under a flood"


def _worst_gap(packets: Iterator[tuple[float, int, bytes] | None], seconds: float,
               need_packets: bool = False) -> float:
    start = last = time.monotonic()
    worst = 0.0
    seen = 0
    for item in packets:
        now = time.monotonic()
        if item is None:
            worst = max(worst, now - last)
            last = now
            if now - start >= seconds:
                break
        else:
            seen += 1
    assert seen or not need_packets, "the flood never reached the capture"
    return worst


def test_refused_ring_falls_back_to_recv_and_says_so(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel refuses the ring (an old kernel, no memory), the agent reads with
    recv and tells it once, as a warning; the database records which path ran."""
    ls.need_root()

    def refuse(*_args: object) -> None:
        raise RingUnavailable("TPACKET_V3 receive ring of 33,554,432 bytes refused "
                              "(Invalid argument)")

    monkeypatch.setattr(live_source, "Ring", refuse)
    told: list[tuple[str, bool]] = []
    port = free_port()
    db = tmp_path / "fallback.db"
    with _server(port) as srv:
        sender = threading.Thread(target=_exchange, args=(srv, port, 20), daemon=True)

        def notice(line: str, warning: bool) -> None:
            told.append((line, warning))
            sender.start()  # the packet socket is open: what comes now is captured

        settings = LiveSettings(ports=frozenset([port]), db_path=str(db), interfaces=["lo"],
                                duration=2.0, attribution=False, notice=notice)
        result = run_live(settings)
        sender.join(10.0)
    said = ("no receive ring (TPACKET_V3 receive ring of 33,554,432 bytes refused (Invalid "
            "argument)): reading one packet per system call, which takes more CPU per "
            "packet")
    assert told == [(said, True)]
    assert result.status == "complete" and result.ring_bytes == 0
    assert result.packets >= 40, result
    stats = {r["name"]: r["value"] for r in ls.query(
        db, "SELECT name, value FROM capture_stats WHERE capture_id = ?", [result.capture_id])}
    assert stats["kernel.ring_bytes"] == 0 and "kernel.ring_full" not in stats


def test_agent_records_its_ring(tmp_path: Path) -> None:
    ls.need_root()
    for extra, ring_bytes, said in (((), 32 << 20, "receive ring: 32 MiB"),
                                    (("--no-ring",), 0, "receive ring off")):
        db = tmp_path / f"ring-{ring_bytes}.db"
        with ls.processes() as processes:
            agent = ls.Agent(processes, db, free_port(), "--iface", "lo", "--duration",
                             "1s", *extra)
            assert agent.wait_exit() == 0, agent.output()
        assert said in agent.output(), agent.output()
        [row] = ls.query(db, "SELECT value FROM capture_stats WHERE name = "
                             "'kernel.ring_bytes'")
        assert row["value"] == ring_bytes


def _wait_listening(dump: subprocess.Popen[bytes]) -> None:
    """Until tcpdump says it listens (its socket is open), at most 5 s."""
    assert dump.stderr is not None
    deadline = time.monotonic() + 5.0
    said = b""
    while time.monotonic() < deadline and dump.poll() is None:
        if select.select([dump.stderr], [], [], 0.1)[0]:
            said += os.read(dump.stderr.fileno(), 4096)
            if b"listening on" in said:
                return
    raise AssertionError(f"tcpdump did not start: {said!r}")


def _stop(dump: subprocess.Popen[bytes]) -> None:
    if dump.poll() is None:
        dump.send_signal(signal.SIGINT)
        try:
            dump.wait(5.0)
        except subprocess.TimeoutExpired:
            dump.kill()
            dump.wait(5.0)


def test_sigterm_stops_the_agent_under_a_flood(tmp_path: Path) -> None:
    """Loopback flooded (small segments as fast as they go) through the ring: SIGTERM
    still ends the agent within a second and a half, the capture complete."""
    ls.need_root()
    port = free_port()
    stop = threading.Event()

    def flood() -> None:
        deadline = time.monotonic() + 20.0
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not stop.is_set() and time.monotonic() < deadline:
                s.sendall(b"x" * 64)

    with ls.processes() as processes, ls.tcp_sink(port):
        agent = ls.Agent(processes, tmp_path / "flood.db", port, "--iface", "lo")
        agent.wait_ready()
        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        try:
            agent.wait_for_rows("SELECT packets FROM captures", [],
                                lambda rows: rows and (rows[0]["packets"] or 0) > 10_000,
                                "the flood is being captured")
            sent = time.monotonic()
            agent.proc.popen.send_signal(signal.SIGTERM)
            code = agent.wait_exit(timeout=30)
            took = time.monotonic() - sent
        finally:
            stop.set()
            sender.join(10.0)
    assert code == 0, agent.output()
    assert took < 1.5, f"SIGTERM took {took:.2f}s to stop the agent under a flood"
    assert "receive ring: 32 MiB" in agent.output()
    assert ls.capture_row(agent.db)["status"] == "complete"


def test_a_packet_header_outside_its_block_is_counted_not_followed() -> None:
    """A block whose second packet header claims more bytes than the block holds: the
    first packet is read, the rest of the block is skipped and counted, the block goes
    back to the kernel and the reader goes on. No kernel writes such a block; the
    reader must not trust it either. (An anonymous map and a socket pair stand in for
    the ring's memory and socket: no root needed.)"""
    import mmap
    import struct

    from tracer.sources import ring as ring_module

    block = 4096
    memory = mmap.mmap(-1, 2 * block)
    first = 48
    packet = b"E" + bytes(19)
    # block 0: two packets, the second running past the end of the block
    struct.pack_into("=III", memory, ring_module.BLOCK_STATUS_AT, ring_module.TP_STATUS_USER,
                     2, first)
    struct.pack_into("=IIIIII2xH", memory, first, 128, 1_700_000_000, 250_000_000,
                     len(packet), len(packet), 1, 80)
    memory[first + 80:first + 80 + len(packet)] = packet
    struct.pack_into("=IIIIII2xH", memory, first + 128, 0, 1_700_000_001, 0, block, block,
                     1, 80)
    # block 1: still the kernel's
    left, right = socket.socketpair()
    fake = ring_module.Ring.__new__(ring_module.Ring)
    fake.map, fake.sock = memory, left
    fake.block_size, fake.block_count, fake.size = block, 2, 2 * block
    fake.current, fake.malformed = 0, 0
    errors: list[int] = []
    try:
        items = ring_module.ring_packets([fake], 0.05,
                                         lambda _ring, error: errors.append(error))
        got = next(items)
        assert got == (1_700_000_000.25, LINKTYPE_RAW, packet)
        assert next(items) is None  # block 1 is not ready: nothing more for now
    finally:
        left.close()
        right.close()
    assert fake.malformed == 1 and fake.current == 1 and not errors
    assert memory[ring_module.BLOCK_STATUS_AT] == ring_module.TP_STATUS_KERNEL
