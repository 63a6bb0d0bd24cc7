"""Memory of a capture that ends with 200,000 connections open, while reading and at the end.

Generates (once, cached in benchmarks/.cache/) a pcap of leaked connections: each one a
real TCP handshake, the HTTP/2 preface and SETTINGS both ways, one RPC (with a BDP PING),
then silence until the end of the capture. They open evenly over a few minutes of packet
time, so most of them are asleep (tracer.sleep) by the end. The packets of a handful of
conversations made with benchmarks/gen_capture.py are copied for every connection, with
its own addresses, ports and sequence numbers.

Every measurement runs in a fresh process that reads the file the way `tracer capture
--read` does (Analyzer.feed in batches of 65,536 packets, each drained into a
CaptureWriter on a temporary SQLite database) and then ends the capture:
- ``all``: Analyzer.finish() then one drain() (every record built at once);
- ``batches``: Analyzer.finish_batches(), each batch written before the next is built.
Scenarios: ``open``: the default table (max_connections 200,000), no eviction;
``full``: max_connections 90% of the connections, so the table evicts.
Reported: peak RSS (getrusage ru_maxrss) while reading and at the end, and the same minus
the peak of an empty run (the same process on a capture with no packets) divided by the
connections open before the end. Target (issue 8): at most 1 KB per open connection at
every moment, the end included.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import importlib
import inspect
import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CACHE = HERE / ".cache"
PORT = 9090
FEED_BATCH = 65536  # packets per feed and store transaction, as the file reader does
T0 = 1_790_000_000.0
TEMPLATES = 8  # distinct conversations (methods, timings, HPACK) copied for every connection
CLIENTS = 50  # client hosts the connections come from

_ETH = 14
_SRC, _DST = _ETH + 12, _ETH + 16
_SPORT, _DPORT, _SEQ, _ACK = _ETH + 20, _ETH + 22, _ETH + 24, _ETH + 28


# -- the capture -----------------------------------------------------------------------------


def _templates(seed: int) -> list[list[tuple[float, bool, bytes, int, int]]]:
    """Leaked conversations: (time from the first packet, from the client, frame, sequence
    and acknowledgment numbers relative to the sender's and receiver's first ones)."""
    from benchmarks.gen_capture import H2, METHODS, SERVER_IP, Conversation

    rng = random.Random(seed)
    out = []
    for i in range(TEMPLATES):
        conv = Conversation(bytes([10, 9, 9, 9]), 40000, 0.0, rng)
        cisn, sisn = conv.cseq, conv.sseq
        conv.handshake()
        h2 = H2(conv, rng, "grpc-python/1.85.3 grpc-c/50.0.0" if i % 2 else "grpc-go/1.64.0")
        h2.open()
        h2.rpc(METHODS[i % len(METHODS)], bdp_ping=True)
        packets = []
        for ts, data in conv.packets:
            from_client = data[_SRC:_SRC + 4] != SERVER_IP
            seq, ack = struct.unpack_from(">II", data, _SEQ)
            mine, theirs = (cisn, sisn) if from_client else (sisn, cisn)
            packets.append((ts, from_client, data, (seq - mine) & 0xFFFFFFFF,
                            (ack - theirs) & 0xFFFFFFFF))
        out.append(packets)
    return out


def generate(connections: int, duration: float, seed: int) -> Iterator[tuple[float, bytes]]:
    """Every connection's packets, in time order: connection i opens at i * duration / n."""
    templates = _templates(seed)
    rng = random.Random(seed + 1)
    step = duration / connections
    heap: list[tuple[float, int, int]] = []
    isns: dict[int, tuple[int, int]] = {}
    i = 0
    while i < connections or heap:
        start = T0 + i * step
        if i < connections and (not heap or start <= heap[0][0]):
            isns[i] = (rng.getrandbits(32), rng.getrandbits(32))
            heapq.heappush(heap, (start, i, 0))
            i += 1
            continue
        ts, c, k = heapq.heappop(heap)
        template = templates[c % TEMPLATES]
        _rel, from_client, data, seq, ack = template[k]
        cisn, sisn = isns[c]
        frame = bytearray(data)
        client = bytes([10, 1, 0, 1 + c % CLIENTS])
        port = 20000 + c // CLIENTS
        if from_client:
            frame[_SRC:_SRC + 4] = client
            struct.pack_into(">H", frame, _SPORT, port)
            struct.pack_into(">II", frame, _SEQ, (cisn + seq) & 0xFFFFFFFF,
                             (sisn + ack) & 0xFFFFFFFF)
        else:
            frame[_DST:_DST + 4] = client
            struct.pack_into(">H", frame, _DPORT, port)
            struct.pack_into(">II", frame, _SEQ, (sisn + seq) & 0xFFFFFFFF,
                             (cisn + ack) & 0xFFFFFFFF)
        yield ts, bytes(frame)
        if k + 1 < len(template):
            heapq.heappush(heap, (T0 + c * step + template[k + 1][0], c, k + 1))
        else:
            del isns[c]


def write_pcap(path: Path, packets: Iterator[tuple[float, bytes]]) -> int:
    from benchmarks.gen_capture import write_pcap as write

    return write(str(path), packets)


def ensure_capture(connections: int, duration: float, seed: int) -> Path:
    # Regenerated when the code that makes it changes.
    sources = (HERE / "gen_capture.py").read_text() + inspect.getsource(_templates) + (
        inspect.getsource(generate))
    tag = hashlib.sha256(sources.encode()).hexdigest()[:10]
    path = CACHE / f"memory-end-{connections}c-{int(duration)}s-{seed}-{tag}.pcap"
    if not path.exists():
        CACHE.mkdir(exist_ok=True)
        for old in CACHE.glob("memory-end-*.pcap"):
            old.unlink()
        print(f"generating {path.name} ...", file=sys.stderr)
        partial = path.with_suffix(".part")
        n = write_pcap(partial, generate(connections, duration, seed))
        partial.rename(path)
        print(f"    {n:,} packets", file=sys.stderr)
    return path


def empty_capture() -> Path:
    path = CACHE / "memory-empty.pcap"  # not memory-end-*: ensure_capture cleans those
    if not path.exists():
        CACHE.mkdir(exist_ok=True)
        write_pcap(path, iter(()))
    return path


# -- one measurement (in its own process) ---------------------------------------------------


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (ru_maxrss is in KiB here)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def quiet_cycle_collector() -> None:
    """The file reader's setting of the cycle collector (wherever this version keeps it)."""
    for module in ("tracer.agent.control", "tracer.agent.files", "cli.runner"):
        try:
            quiet = getattr(importlib.import_module(module), "quiet_cycle_collector", None)
        except ImportError:
            continue
        if quiet is not None:
            quiet()
            return
    raise SystemExit("quiet_cycle_collector not found: where does the file reader keep it?")


def sleepers_heap(table: Any) -> tuple[float, float]:
    """(bytes per sleeper, share of sleepers whose references tuple is shared): the entry,
    its packed numbers, its key, its slot in the table's dict, and the references tuples
    counted once (what they point to is mostly shared: strings, SETTINGS, HPACK states)."""
    asleep = table._sleepers._by_key  # a measurement of the table's own layout
    if not asleep:
        return 0.0, 0.0
    users: dict[int, int] = {}
    total = sys.getsizeof(asleep)
    refs: dict[int, Any] = {}
    for key, sleeper in asleep.items():
        total += sys.getsizeof(key) + sys.getsizeof(sleeper) + sys.getsizeof(sleeper[0])
        users[id(sleeper[1])] = users.get(id(sleeper[1]), 0) + 1
        refs[id(sleeper[1])] = sleeper[1]
    total += sum(sys.getsizeof(r) for r in refs.values())
    shared = sum(n for n in users.values() if n > 1)
    return total / len(asleep), shared / len(asleep)


def measure(path: Path, end: str, batch: int, writer_kind: str,
            max_connections: int | None) -> dict[str, Any]:
    import tracer
    from store.schema import open_database
    from store.writer import CaptureWriter
    from tracer.options import CoreOptions
    from tracer.pipeline import Analyzer
    from tracer.sources.fallback import scapy_decoder
    from tracer.sources.pcapfile import CaptureReader

    options: dict[str, Any] = {}
    if max_connections is not None:
        options["max_connections"] = max_connections
    with tempfile.TemporaryDirectory() as tmp:
        db = open_database(os.path.join(tmp, "memory.db"))
        writer = CaptureWriter.start(db, kind="file", ports=[PORT])
        rows = 0

        def write(records: list[dict[str, Any]], events: list[Any], anomalies: list[Any]) -> None:
            nonlocal rows
            rows += len(records)
            if writer_kind == "sqlite":
                writer.write(records, events, anomalies)

        quiet_cycle_collector()
        analyzer = Analyzer(frozenset([PORT]), CoreOptions(**options), fallback=scapy_decoder)
        table = analyzer.table
        started = time.perf_counter()
        with CaptureReader.open(str(path)) as reader:
            packets = iter(reader)
            while True:
                got = analyzer.feed(packets, FEED_BATCH)
                d = analyzer.drain()
                write(d.records, d.events, d.anomalies)
                if got < FEED_BATCH:
                    break
        read_s = time.perf_counter() - started
        reading = peak_rss()
        open_before_end = table.tracked
        asleep_before_end = table.asleep_count
        per_sleeper, shared = sleepers_heap(table)
        largest = 0
        started = time.perf_counter()
        cpu = time.process_time()
        if end == "batches":
            for d in analyzer.finish_batches(batch):
                largest = max(largest, len(d.records))
                write(d.records, d.events, d.anomalies)
        else:
            analyzer.finish()
            d = analyzer.drain()
            largest = len(d.records)
            write(d.records, d.events, d.anomalies)
        end_s = time.perf_counter() - started
        end_cpu_s = time.process_time() - cpu
        db.close()
    return {
        "build": tracer.build_kind(),
        "packets": analyzer.stats.packets,
        "read_s": read_s,
        "end_s": end_s,
        "end_cpu_s": end_cpu_s,
        "peak_reading": reading,
        "peak_end": peak_rss(),
        "open_before_end": open_before_end,
        "asleep_before_end": asleep_before_end,
        "per_sleeper": per_sleeper,
        "refs_shared": shared,
        "evicted": table.evicted,
        "rows": rows,
        "largest_batch": largest,
    }


# -- driver ----------------------------------------------------------------------------------


def run_child(path: Path, end: str, batch: int, writer: str,
              max_connections: int | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--measure", str(path), "--end", end, "--batch",
           str(batch), "--writer", writer]
    if max_connections is not None:
        cmd += ["--max-connections", str(max_connections)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"measurement failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=200_000)
    ap.add_argument("--duration", type=float, default=240.0,
                    help="packet-time seconds over which the connections open")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2048, help="records per finish batch")
    ap.add_argument("--writer", choices=["sqlite", "null"], default="sqlite")
    ap.add_argument("--end", choices=["all", "batches"], action="append",
                    help="how to end the capture (default: both, where available)")
    ap.add_argument("--scenario", choices=["open", "full"], action="append",
                    help="open: no eviction; full: the table evicts (default: both)")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--max-connections", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure is not None:
        result = measure(args.measure, args.end[0] if args.end else "all", args.batch,
                         args.writer, args.max_connections)
        print(json.dumps(result))
        return 0

    from tracer import __version__, build_kind
    from tracer.pipeline import Analyzer

    ends = args.end or (["all", "batches"] if hasattr(Analyzer, "finish_batches") else ["all"])
    scenarios = args.scenario or ["open", "full"]
    capture = ensure_capture(args.connections, args.duration, args.seed)
    print(f"tracer {__version__} ({build_kind()} core); writer: {args.writer}")
    print(f"capture: {capture.name}, {capture.stat().st_size / 1e6:.0f} MB, "
          f"{args.connections:,} leaked connections opening over {args.duration:.0f} s")
    baseline = run_child(empty_capture(), "all", args.batch, args.writer, None)
    base = baseline["peak_end"]
    print(f"empty run: peak RSS {base / 1e6:.1f} MB (the baseline subtracted below)")
    kib = 1024
    for scenario in scenarios:
        limit = None if scenario == "open" else args.connections * 9 // 10
        for end in ends:
            r = run_child(capture, end, args.batch, args.writer, limit)
            n = r["open_before_end"]
            label = "open at end" if scenario == "open" else f"table full ({limit:,} max)"
            print(f"{label}, end={end}{f' ({args.batch})' if end == 'batches' else ''}:")
            print(f"    read {r['packets']:,} packets in {r['read_s']:.1f} s; "
                  f"{n:,} open before the end ({r['asleep_before_end']:,} asleep), "
                  f"{r['evicted']:,} evicted; end in {r['end_s']:.1f} s "
                  f"({r['end_cpu_s']:.1f} s CPU), "
                  f"{r['rows']:,} rows, largest batch {r['largest_batch']:,}")
            if r["asleep_before_end"]:
                print(f"    asleep: {r['per_sleeper']:,.0f} B each (entry, packed numbers, "
                      f"key, dict slot, references tuple), {r['refs_shared']:.0%} sharing "
                      "their references")
            print(f"    peak RSS while reading {r['peak_reading'] / 1e6:.0f} MB "
                  f"= {(r['peak_reading'] - base) / n:,.0f} B per open connection "
                  f"({(r['peak_reading'] - base) / n / kib:.2f} KiB)")
            print(f"    peak RSS at the end    {r['peak_end'] / 1e6:.0f} MB "
                  f"= {(r['peak_end'] - base) / n:,.0f} B per open connection "
                  f"({(r['peak_end'] - base) / n / kib:.2f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
