"""Packets per second through the receive ring (TPACKET_V3): read for the analyzer alone,
and read with each packet's interface and direction (what `tracer capture --write` needs).

Method: a capture on `lo` (tracer.sources.live.LiveCapture: the ring and the agent's own
port filter) is filled while nothing reads it: a raw socket sends --packets TCP segments
(RST with 100 bytes of payload, which the kernel answers with nothing) from the watched
port on 127.0.0.1. Then the ring is read to its end, timed, in one of these modes:
- plain: `LiveCapture.packets`, as the agent's loop reads without --write; packets counted;
- tagged: `LiveCapture.tagged_packets`, as it reads with --write (each packet with its
  sockaddr_ll and length); packets counted;
- plain+analyzer: the packets fed to the Analyzer (the compiled core), as the agent does
  without --write;
- write+analyzer: as the agent does with --write: the tagged packets through
  `PcapngWriter.tee` (written to a file in the temporary folder) into the Analyzer.
A run counts only when the kernel passed every packet sent, dropped none, and the reader
got them all. Modes take turns, --repeat runs each; the median packets/s is printed, with
the spread. Needs root (packet and raw sockets). About a minute with the defaults.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from tracer.options import CoreOptions
from tracer.pipeline import Analyzer
from tracer.sources.live import LiveCapture
from tracer.sources.pcapwriter import PcapngWriter

PORT = 9431
BUFFER = 32 << 20
# 16 KiB blocks, 2,048 of them: a sender on one core fills each before it times out (1 ms)
SNAPLEN = 8192


def segment(seq: int) -> bytes:
    """An IPv4 TCP RST from PORT with 100 bytes of payload (checksums left 0: the kernel
    drops it after the packet socket saw it)."""
    payload = b"x" * 100
    tcp = struct.pack("!HHIIBBHHH", PORT, 40000, seq, 0, 5 << 4, 0x14, 65535, 0, 0)
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 6, 0,
                     socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1"))
    return ip + tcp + payload


def fill(count: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        send = raw.sendto
        packets = [segment(i) for i in range(256)]
        for i in range(count):
            send(packets[i & 255], ("127.0.0.1", 0))


def count_items(items: Iterator[Any], expected: int) -> int:
    n = 0
    idle = 0
    for item in items:
        if item is None:
            idle += 1
            if n >= expected or idle > 100:
                return n
            continue
        idle = 0
        n += 1
    return n


def until_done(items: Iterator[Any], stop: list[int]) -> Iterator[tuple[float, int, bytes]]:
    for item in items:
        if item is None:
            stop[1] += 1
            if stop[0] >= stop[2] or stop[1] > 100:
                return
            continue
        stop[1] = 0
        stop[0] += 1
        yield item


def analyse(items: Iterator[Any], expected: int) -> int:
    """Packets fed to an Analyzer until ``expected`` came (or 100 turns without one)."""
    analyzer = Analyzer(frozenset({PORT}), CoreOptions())
    stop = [0, 0, expected]
    analyzer.feed(until_done(items, stop), expected + 1)
    return stop[0]


def one_run(mode: str, count: int) -> float | None:
    capture = LiveCapture(["lo"], frozenset({PORT}), snaplen=SNAPLEN, buffer_bytes=BUFFER)
    try:
        if not capture.rings:
            sys.exit(f"no receive ring here: {capture.receive}")
        fill(count)
        time.sleep(0.05)  # the last partly filled block times out (1 ms)
        with tempfile.TemporaryDirectory() as folder:
            writer = PcapngWriter(os.path.join(folder, "ring.pcapng"), snaplen=SNAPLEN)
            started = time.perf_counter()
            if mode == "plain":
                got = count_items(capture.packets(0.05), count)
            elif mode == "tagged":
                got = count_items(capture.tagged_packets(0.05), count)
            elif mode == "plain+analyzer":
                got = analyse(capture.packets(0.05), count)
            else:
                got = analyse(writer.tee(capture.tagged_packets(0.05)), count)
                writer.flush()
            elapsed = time.perf_counter() - started
            writer.close()
        received, dropped = capture.statistics()
    finally:
        capture.close()
    if got != count or received != count or dropped:
        print(f"  {mode}: discarded (sent {count:,}, kernel passed {received:,}, dropped "
              f"{dropped:,}, read {got:,})", file=sys.stderr)
        return None
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=120_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    modes = ["plain", "tagged", "plain+analyzer", "write+analyzer"]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for run in range(args.repeat):
        for mode in modes if run % 2 == 0 else reversed(modes):
            rate = one_run(mode, args.packets)
            if rate is not None:
                rates[mode].append(rate)
                print(f"  run {run + 1} {mode}: {rate:,.0f} packets/s", file=sys.stderr)
    print(f"{'mode':<18} {'median packets/s':>17} {'min':>10} {'max':>10} runs")
    for mode, found in rates.items():
        if found:
            print(f"{mode:<18} {statistics.median(found):>17,.0f} {min(found):>10,.0f} "
                  f"{max(found):>10,.0f} {len(found)}")
        else:
            print(f"{mode:<18} {'no clean run':>17}")


if __name__ == "__main__":
    main()
