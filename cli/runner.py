"""Capture runs: wire a packet source, the analyzer and the store writer together."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from store.schema import open_database
from store.writer import CaptureWriter
from tracer import __version__
from tracer.decode import SKIP_NAMES
from tracer.pipeline import Analyzer
from tracer.sources.fallback import scapy_decoder
from tracer.sources.pcapfile import CaptureFileError, CaptureReader

BATCH = 65536  # packets between two store transactions

Progress = Callable[[int, "int | None"], None]


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


def _flush(analyzer: Analyzer, writer: CaptureWriter) -> None:
    drained = analyzer.drain()
    writer.write(drained.records, drained.events, drained.anomalies)


def stats_for_store(analyzer: Analyzer) -> dict[str, int]:
    s = analyzer.stats
    out = {f"skipped.{SKIP_NAMES.get(k, str(k))}": v for k, v in s.skipped.items()}
    out.update({
        "late_packets": analyzer.table.late_packets,
        "truncated_segments": analyzer.table.truncated_segments,
        "evicted_connections": analyzer.table.evicted,
        "hpack_memo_hits": analyzer.h2.memo.hits,
        "hpack_memo_misses": analyzer.h2.memo.misses,
    })
    return out


def read_files(
    paths: list[str],
    ports: frozenset[int],
    db_path: str,
    *,
    decode_server_headers: bool = True,
    progress: Progress | None = None,
) -> RunResult:
    """Read capture files (``-`` is standard input) as one packet stream into the database."""
    db = open_database(db_path)
    writer = CaptureWriter(db, kind="file", ports=ports, tool_version=__version__)
    result = RunResult(writer.capture_id)
    analyzer = Analyzer(ports, decode_server_headers=decode_server_headers, fallback=scapy_decoder)
    started = time.perf_counter()
    drops: list[int] = []
    interrupted = False
    try:
        for n, path in enumerate(paths):
            try:
                reader = CaptureReader.open(path)
            except CaptureFileError as exc:
                result.errors.append(str(exc))
                continue
            with reader:
                try:
                    packets = iter(reader)
                    while True:
                        got = analyzer.feed(packets, BATCH)
                        _flush(analyzer, writer)
                        if progress is not None:
                            progress(reader.bytes_read(), reader.size)
                        if got < BATCH:
                            break
                except CaptureFileError as exc:
                    result.errors.append(str(exc))
                    _flush(analyzer, writer)
                finally:
                    info = reader.info
                    if info.drops is not None:
                        drops.append(info.drops)
                    writer.add_source(
                        n, path, fmt=info.format, compressed=info.compressed, size=reader.size,
                        sha256=reader.sha256() if info.format else None,
                        packets=info.packets, linktypes=info.linktypes,
                    )
    except KeyboardInterrupt:
        interrupted = True
    analyzer.finish()
    _flush(analyzer, writer)
    stats = analyzer.stats
    result.elapsed_s = time.perf_counter() - started
    if interrupted:
        result.status = "interrupted"
    elif result.errors:
        result.status = "damaged"
    result.drops = sum(drops) if drops else None
    writer.finish(
        status=result.status,
        error="; ".join(result.errors) or None,
        first_ts=stats.first_ts,
        last_ts=stats.last_ts,
        packets=stats.packets,
        segments=stats.segments,
        drops=result.drops,
        elapsed_s=result.elapsed_s,
        stats=stats_for_store(analyzer),
    )
    if result.status == "complete":
        result.superseded = writer.supersede_same_sources()
    result.packets = stats.packets
    result.segments = stats.segments
    result.connections = writer.connections
    result.open_at_end = writer.open_at_end
    result.anomalies = sum(writer.anomaly_counts.values())
    result.skipped = {SKIP_NAMES.get(k, str(k)): v for k, v in stats.skipped.items()}
    db.close()
    return result
