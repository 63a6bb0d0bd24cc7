"""Capture runs: wire packet sources, the analyzer and the store writer together.

Reading files can use several worker processes: each reads every file but analyses only
the connections of its shard (tracer.decode.make_decoder), and writes its rows into the
same capture. Connections never span shards, so the result is the same as with one
process. Worker 0 runs in this process: it drives the progress bar, records the sources
and everything that belongs to no connection.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from store.queries import report
from store.schema import open_database
from store.writer import CaptureWriter
from tracer import __version__
from tracer.decode import SKIP_NAMES, SKIP_OTHER_SHARD, make_shard_prefilter
from tracer.pipeline import Analyzer
from tracer.sources.fallback import scapy_decoder
from tracer.sources.pcapfile import CaptureFileError, CaptureReader

BATCH = 65536  # packets between two store transactions
# Below this much input a second worker costs more (start-up, a second read) than it saves.
MIN_BYTES_PER_JOB = 16 << 20

Progress = Callable[[int, "int | None"], None]


@dataclass
class ShardResult:
    """What one worker did; merged into the capture's totals by the parent."""

    packets: int = 0
    segments: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    connections: int = 0
    open_at_end: int = 0
    anomaly_counts: dict[str, int] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    drops: int | None = None
    interrupted: bool = False
    failure: str | None = None  # an unexpected error inside a worker


@dataclass
class RunResult:
    capture_id: int
    packets: int = 0
    segments: int = 0
    connections: int = 0
    open_at_end: int = 0
    anomalies: int = 0
    elapsed_s: float = 0.0
    status: str = "complete"
    errors: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    superseded: list[int] = field(default_factory=list)
    drops: int | None = None
    jobs: int = 1


def quiet_cycle_collector() -> None:
    """Run Python's cycle collector rarely during analysis: it walks every live object
    (every open connection) and cost 10% of the time. Connections break their own
    reference cycles when they are written (Connection.release), so there is little for
    it to find; what it finds it still collects, later."""
    gc.freeze()
    gc.set_threshold(500_000, 1000, 1000)


def _stats_for_store(analyzer: Analyzer) -> dict[str, int]:
    table = analyzer.table
    return {
        "late_packets": table.late_packets,
        "truncated_segments": table.truncated_segments,
        "evicted_connections": table.evicted,
        "hpack_memo_hits": analyzer.h2.memo.hits,
        "hpack_memo_misses": analyzer.h2.memo.misses,
    }


def _analyse(
    paths: list[str],
    ports: frozenset[int],
    writer: CaptureWriter,
    *,
    shard: tuple[int, int],
    decode_server_headers: bool,
    progress: Progress | None,
) -> ShardResult:
    """Read every file as one packet stream; write this shard's rows as they come."""
    result = ShardResult()
    quiet_cycle_collector()
    analyzer = Analyzer(ports, decode_server_headers=decode_server_headers,
                        fallback=scapy_decoder, shard=shard)
    keeps_sources = shard[0] == 0
    # With several workers, the reader already drops most of the other workers' records
    # (the common frame) before copying them.
    keep = make_shard_prefilter(ports, shard) if shard[1] > 1 else None
    drops: list[int] = []
    records = 0

    def flush() -> None:
        d = analyzer.drain()
        writer.write(d.records, d.events, d.anomalies)

    try:
        for n, path in enumerate(paths):
            try:
                reader = CaptureReader.open(path, digest=keeps_sources, keep=keep)
            except CaptureFileError as exc:
                result.errors.append(str(exc))
                continue
            with reader:
                try:
                    packets = iter(reader)
                    while True:
                        got = analyzer.feed(packets, BATCH)
                        flush()
                        if progress is not None:
                            progress(reader.bytes_read(), reader.size)
                        if got < BATCH:
                            break
                except CaptureFileError as exc:
                    result.errors.append(str(exc))
                    flush()
                finally:
                    info = reader.info
                    records += info.packets
                    if info.drops is not None:
                        drops.append(info.drops)
                    if keeps_sources:
                        writer.add_source(
                            n, path, fmt=info.format, compressed=info.compressed,
                            size=reader.size, sha256=reader.sha256() if info.format else None,
                            packets=info.packets, linktypes=info.linktypes,
                        )
    except KeyboardInterrupt:
        result.interrupted = True
    analyzer.finish()
    flush()
    stats = analyzer.stats
    result.packets = records
    result.segments = stats.segments
    result.first_ts = stats.first_ts
    result.last_ts = stats.last_ts
    result.connections = writer.connections
    result.open_at_end = writer.open_at_end
    result.anomaly_counts = dict(writer.anomaly_counts)
    result.stats = _stats_for_store(analyzer)
    result.skipped = {
        SKIP_NAMES.get(k, str(k)): v for k, v in stats.skipped.items() if k != SKIP_OTHER_SHARD
    }
    result.drops = sum(drops) if drops else None
    return result


def _worker(
    conn: Any, db_path: str, capture_id: int, paths: list[str], ports: frozenset[int],
    shard: tuple[int, int], decode_server_headers: bool,
) -> None:
    """Entry point of worker processes 1..n-1."""
    try:
        db = open_database(db_path)
        writer = CaptureWriter(db, capture_id)
        result = _analyse(paths, ports, writer, shard=shard,
                          decode_server_headers=decode_server_headers, progress=None)
        db.close()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        result = ShardResult(failure=f"{type(exc).__name__}: {exc}")
    conn.send(result)
    conn.close()


def default_jobs(paths: list[str]) -> int:
    """One worker per CPU (at most 4) for big regular files; one for pipes and small input."""
    if any(p == "-" or not os.path.isfile(p) for p in paths):
        return 1
    size = sum(os.path.getsize(p) for p in paths)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return max(1, min(4, cpus, size // MIN_BYTES_PER_JOB))


def read_files(
    paths: list[str],
    ports: frozenset[int],
    db_path: str,
    *,
    decode_server_headers: bool = True,
    progress: Progress | None = None,
    jobs: int | None = None,
) -> RunResult:
    """Read capture files (``-`` is standard input) as one packet stream into the database."""
    if jobs is None:
        jobs = default_jobs(paths)
    if any(p == "-" for p in paths):
        jobs = 1
    db = open_database(db_path)
    writer = CaptureWriter.start(db, kind="file", ports=ports, tool_version=__version__)
    result = RunResult(writer.capture_id, jobs=jobs)
    started = time.perf_counter()
    children = []
    if jobs > 1:
        ctx = multiprocessing.get_context("fork")
        for index in range(1, jobs):
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker,
                args=(child_end, db_path, writer.capture_id, paths, ports, (index, jobs),
                      decode_server_headers),
                daemon=True,
            )
            proc.start()
            child_end.close()
            children.append((proc, parent_end))
    shards = [_analyse(paths, ports, writer, shard=(0, jobs),
                       decode_server_headers=decode_server_headers, progress=progress)]
    for proc, pipe in children:
        try:
            shards.append(pipe.recv())
        except EOFError:
            shards.append(ShardResult(failure=f"worker exited with status {proc.exitcode}"))
        proc.join()
    main = shards[0]
    result.elapsed_s = time.perf_counter() - started
    result.errors = list(main.errors)
    for s in shards[1:]:
        if s.failure:
            result.errors.append(f"worker failed: {s.failure}")
    anomaly_counts: dict[str, int] = {}
    stats: dict[str, int] = {}
    for s in shards:
        for k, v in s.anomaly_counts.items():
            anomaly_counts[k] = anomaly_counts.get(k, 0) + v
        for k, v in s.stats.items():
            stats[k] = stats.get(k, 0) + v
    for k, v in main.skipped.items():
        stats[f"skipped.{k}"] = v
    if any(s.interrupted for s in shards):
        result.status = "interrupted"
    elif result.errors:
        result.status = "damaged"
    result.packets = main.packets
    result.segments = sum(s.segments for s in shards)
    result.connections = sum(s.connections for s in shards)
    result.open_at_end = sum(s.open_at_end for s in shards)
    result.anomalies = sum(anomaly_counts.values())
    result.skipped = main.skipped
    result.drops = main.drops
    firsts = [s.first_ts for s in shards if s.first_ts is not None]
    lasts = [s.last_ts for s in shards if s.last_ts is not None]
    writer.finish(
        status=result.status,
        error="; ".join(result.errors) or None,
        first_ts=min(firsts) if firsts else None,
        last_ts=max(lasts) if lasts else None,
        packets=result.packets,
        segments=result.segments,
        connections=result.connections,
        open_at_end=result.open_at_end,
        anomaly_counts=anomaly_counts,
        drops=result.drops,
        elapsed_s=result.elapsed_s,
        stats=stats,
    )
    if result.status == "complete":
        result.superseded = writer.supersede_same_sources()
    report(db)  # computed once now, read many times (store.queries.report)
    db.close()
    return result
