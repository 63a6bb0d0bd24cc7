"""Reading capture files into the store: the files as one packet stream, in time order,
through the analyzer, written batch by batch.

Several worker processes may share the work: each reads every file but analyses only
the connections of its shard (tracer.decode.make_decoder), and writes its rows into the
same capture. Connections never span shards, so the result is the same as with one
process. Worker 0 runs in this process: it drives the progress bar, records the sources
and everything that belongs to no connection. Workers die with this process (kill -9
included): nothing goes on writing the database behind a dead command.

SIGINT and SIGTERM stop a read cleanly: each worker finishes its batch, stores what it
has, and the capture is marked interrupted. A database that cannot be written (a full
disk) stops the read too: the capture is marked failed and what was committed is kept.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any

from store.lock import StoreBusy, WriterLock
from store.retention import Retention
from store.schema import StoreError, open_database
from store.stored_report import store_report
from store.writer import CaptureWriter, StoreFull, store_failure
from tracer import __version__
from tracer.agent.control import (
    StopRequest,
    die_with_parent,
    own_identity,
    quiet_cycle_collector,
    signals_deferred,
)
from tracer.decode import SKIP_NAMES, SKIP_OTHER_SHARD, Prefilter, make_shard_prefilter
from tracer.options import CoreOptions
from tracer.pipeline import Analyzer
from tracer.sources.fallback import scapy_decoder
from tracer.sources.filefilter import FileFilter
from tracer.sources.pcapfile import CaptureFileError, CaptureReader

BATCH = 65536  # packets between two store transactions
FINISH_BATCH = 2048  # connections per transaction when the input ends
# Below this much input a second worker costs more (start-up, a second read) than it saves.
MIN_BYTES_PER_JOB = 16 << 20

# (bytes read of the current file, its size if known, packets read of all files so far)
Progress = Callable[[int, "int | None", int], None]


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
    filter_errors: list[str] = field(default_factory=list)  # link types --filter cannot match
    drops: int | None = None
    interrupted: bool = False
    store_failure: str | None = None  # the database could not be written
    disk_full: bool = False
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
    status: str = "complete"  # complete | damaged | interrupted | failed
    errors: list[str] = field(default_factory=list)
    filter_errors: list[str] = field(default_factory=list)  # link types --filter cannot match
    skipped: dict[str, int] = field(default_factory=dict)
    superseded: list[int] = field(default_factory=list)
    drops: int | None = None
    jobs: int = 1
    order: list[str] = field(default_factory=list)  # the files in the order they were read
    stopped_by: int | None = None  # the signal that interrupted the read
    store_failure: str | None = None  # why the database could not be written, what was kept
    disk_full: bool = False
    pruned: int = 0  # old connections retention let go at the end


def _stats_for_store(analyzer: Analyzer) -> dict[str, int]:
    table = analyzer.table
    return {
        "late_packets": table.late_packets,
        "truncated_segments": table.truncated_segments,
        "evicted_connections": table.evicted,
        "hpack_memo_hits": analyzer.h2.memo.hits,
        "hpack_memo_misses": analyzer.h2.memo.misses,
    }


def in_time_order(paths: list[str]) -> list[str]:
    """The files sorted by the time of their first packet: rotated files given by a glob
    (dump1 dump10 dump2) are read as the one stream they were. Standard input, and files
    whose first packet cannot be read (the read itself will say why), keep their place
    relative to each other at the end."""
    if len(paths) < 2 or "-" in paths:
        return list(paths)
    firsts: list[tuple[float, int, str]] = []
    rest: list[str] = []
    for n, path in enumerate(paths):
        first = _first_timestamp(path)
        if first is None:
            rest.append(path)
        else:
            firsts.append((first, n, path))
    return [p for _ts, _n, p in sorted(firsts)] + rest


def _first_timestamp(path: str) -> float | None:
    try:
        with CaptureReader.open(path, digest=False) as reader:
            for ts, _lt, _frame in reader:
                return ts
    except CaptureFileError:
        return None
    return None


def _analyse(
    paths: list[str],
    ports: frozenset[int],
    writer: CaptureWriter,
    *,
    shard: tuple[int, int],
    options: CoreOptions,
    progress: Progress | None,
    stop: StopRequest,
    user_filter: str | None = None,
) -> ShardResult:
    """Read every file as one packet stream; write this shard's rows as they come."""
    result = ShardResult()
    quiet_cycle_collector()
    analyzer = Analyzer(ports, options, fallback=scapy_decoder, shard=shard)
    keeps_sources = shard[0] == 0
    # With several workers, the reader already drops most of the other workers' records
    # (the common frame) before copying them. --filter runs first, in every worker (each
    # reads every record), so that what it rejects is counted once, by worker 0.
    keep = make_shard_prefilter(ports, shard) if shard[1] > 1 else None
    matches = FileFilter(user_filter) if user_filter else None
    if matches is not None:
        keep = _both(matches, keep)
    drops: list[int] = []
    records = 0
    db_path = writer.db.conn.execute("PRAGMA database_list").fetchone()[2]

    def flush(reading: int) -> None:
        """Write what the analyzer drained; ``reading``: records of the current file so far."""
        with signals_deferred():  # a batch is drained and written whole
            d = analyzer.drain()
            writer.write(d.records, d.events, d.anomalies)
            if keeps_sources:
                s = analyzer.stats
                writer.update_progress(packets=records + reading, segments=s.segments,
                                       first_ts=s.first_ts, last_ts=s.last_ts, drops=None)

    try:
        for n, path in enumerate(paths):
            if stop.requested:
                break
            try:
                reader = CaptureReader.open(path, digest=keeps_sources, keep=keep)
            except CaptureFileError as exc:
                result.errors.append(str(exc))
                continue
            with reader:
                try:
                    packets = iter(reader)
                    if keeps_sources:  # known from the start: a read cut short names it
                        with signals_deferred():
                            writer.add_source(n, path, fmt=reader.info.format,
                                              compressed=reader.info.compressed,
                                              size=reader.size, sha256=None, packets=0,
                                              linktypes=[])
                    while not stop.requested:
                        got = analyzer.feed(packets, BATCH)
                        flush(reader.info.packets)
                        if progress is not None:
                            progress(reader.bytes_read(), reader.size,
                                     records + reader.info.packets)
                        if got < BATCH:
                            break
                except CaptureFileError as exc:
                    result.errors.append(str(exc))
                    flush(reader.info.packets)
                finally:
                    info = reader.info
                    records += info.packets
                    if info.drops is not None:
                        drops.append(info.drops)
                    if keeps_sources:
                        with signals_deferred():
                            writer.add_source(
                                n, path, fmt=info.format, compressed=info.compressed,
                                size=reader.size,
                                sha256=reader.sha256() if info.format else None,
                                packets=info.packets, linktypes=info.linktypes,
                            )
    except KeyboardInterrupt:
        stop.signum = stop.signum or signal.SIGINT
    except (sqlite3.Error, StoreError, OSError) as exc:
        failure = store_failure(exc, db_path)
        result.store_failure = str(failure)
        result.disk_full = isinstance(failure, StoreFull)
    result.interrupted = stop.requested
    if result.store_failure is None:
        try:
            for drained in analyzer.finish_batches(FINISH_BATCH):
                with signals_deferred():
                    writer.write(drained.records, drained.events, drained.anomalies)
        except (sqlite3.Error, StoreError, OSError) as exc:
            failure = store_failure(exc, db_path)
            result.store_failure = str(failure)
            result.disk_full = isinstance(failure, StoreFull)
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
    if matches is not None:
        if keeps_sources:
            result.skipped["filter"] = matches.rejected
            result.filter_errors += matches.errors
        matches.close()
    return result


def _both(first: Prefilter, then: Prefilter | None) -> Prefilter:
    if then is None:
        return first

    def keep(linktype: int, buf: bytes, start: int, end: int) -> bool:
        return first(linktype, buf, start, end) and then(linktype, buf, start, end)
    return keep


def _worker(
    conn: Pipe, parent: int, db_path: str, capture_id: int, paths: list[str],
    ports: frozenset[int], shard: tuple[int, int], options: CoreOptions,
    user_filter: str | None,
) -> None:
    """Entry point of worker processes 1..n-1."""
    die_with_parent(parent)
    stop = StopRequest()
    try:
        db = open_database(db_path)
        writer = CaptureWriter(db, capture_id)
        result = _analyse(paths, ports, writer, shard=shard, options=options,
                          progress=None, stop=stop, user_filter=user_filter)
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
    options: CoreOptions | None = None,
    progress: Progress | None = None,
    jobs: int | None = None,
    retention: Retention | None = None,
    wait: Callable[[str], None] | None = None,
    user_filter: str | None = None,
    finishing: Callable[[], None] | None = None,
) -> RunResult:
    """Read capture files (``-`` is standard input) as one packet stream into the database.

    ``wait``: told when another capture is writing the database and this one waits for it
    (without it, StoreBusy is raised at once). ``retention``: applied at the end.
    ``user_filter``: a tcpdump expression; only the records it accepts are read
    (FilterError, before anything is written, when it cannot be compiled). ``finishing``:
    called when the reading is done and the capture's totals and report are being stored
    (seconds for a big capture)."""
    options = options if options is not None else CoreOptions()
    if user_filter:
        FileFilter(user_filter).close()  # a bad expression is said before a capture begins
    if jobs is None:
        jobs = default_jobs(paths)
    if any(p == "-" for p in paths):
        jobs = 1
    paths = in_time_order(paths)
    db = open_database(db_path)
    lock = WriterLock(db, db_path)
    try:
        lock.acquire(wait=wait)
    except KeyboardInterrupt:
        db.close()  # before the lock's descriptor: closing one drops SQLite's POSIX locks
        lock.release()
        raise StoreBusy(f"gave up waiting for {db_path}") from None
    writer = CaptureWriter.start(db, kind="file", ports=ports, tool_version=__version__,
                                 writer=own_identity())
    result = RunResult(writer.capture_id, jobs=jobs, order=list(paths))
    started = time.perf_counter()
    # A pipe can block a read for ever: there a signal must interrupt it. Regular files
    # are read in bounded batches, and the stop is checked between them.
    stop = StopRequest(interrupt="-" in paths)
    children: list[tuple[Any, Pipe]] = []
    try:
        if jobs > 1:
            ctx = multiprocessing.get_context("fork")
            for index in range(1, jobs):
                parent_end, child_end = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_worker,
                    args=(child_end, os.getpid(), db_path, writer.capture_id, paths, ports,
                          (index, jobs), options, user_filter),
                    daemon=True,
                )
                proc.start()
                child_end.close()
                children.append((proc, parent_end))
        shards = [_analyse(paths, ports, writer, shard=(0, jobs), options=options,
                           progress=progress, stop=stop, user_filter=user_filter)]
        for proc, _pipe in children:
            if stop.requested and proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, stop.signum or signal.SIGINT)  # they stop at their batch
        for proc, pipe in children:
            shards.append(_collect(proc, pipe))
    finally:
        stop.restore()
    result.stopped_by = stop.signum
    _merge(result, shards)
    result.elapsed_s = time.perf_counter() - started
    if finishing is not None:
        finishing()
    _close_capture(writer, result, shards, retention)
    db.close()
    lock.release()
    return result


def _collect(proc: Any, pipe: Pipe) -> ShardResult:
    try:
        shard: ShardResult = pipe.recv()  # end of file if it died
    except (EOFError, OSError):
        shard = ShardResult(failure=f"worker exited with status {proc.exitcode}")
    proc.join()
    return shard


def _merge(result: RunResult, shards: list[ShardResult]) -> None:
    main = shards[0]
    result.errors = list(main.errors)
    result.filter_errors = list(main.filter_errors)
    for s in shards[1:]:
        if s.failure:
            result.errors.append(f"worker failed: {s.failure}")
    failures = [s for s in shards if s.store_failure]
    if failures:
        result.store_failure = failures[0].store_failure
        result.disk_full = any(s.disk_full for s in failures)
        result.status = "failed"
    elif any(s.interrupted for s in shards) or result.stopped_by is not None:
        result.status = "interrupted"
    elif result.errors:
        result.status = "damaged"
    result.packets = main.packets
    result.segments = sum(s.segments for s in shards)
    result.connections = sum(s.connections for s in shards)
    result.open_at_end = sum(s.open_at_end for s in shards)
    result.skipped = main.skipped
    result.drops = main.drops


def _close_capture(writer: CaptureWriter, result: RunResult, shards: list[ShardResult],
                   retention: Retention | None) -> None:
    """The capture row with the totals of every worker; the stored report refreshed."""
    anomaly_counts: dict[str, int] = {}
    stats: dict[str, int] = {}
    for s in shards:
        for k, v in s.anomaly_counts.items():
            anomaly_counts[k] = anomaly_counts.get(k, 0) + v
        for k, v in s.stats.items():
            stats[k] = stats.get(k, 0) + v
    for k, v in result.skipped.items():
        stats[f"skipped.{k}"] = v
    result.anomalies = sum(anomaly_counts.values())
    firsts = [s.first_ts for s in shards if s.first_ts is not None]
    lasts = [s.last_ts for s in shards if s.last_ts is not None]
    error = "; ".join(result.errors) or None
    if result.store_failure:
        error = result.store_failure + (f"; {error}" if error else "")
    db_path = writer.db.conn.execute("PRAGMA database_list").fetchone()[2]
    try:
        writer.finish(
            status=result.status, error=error,
            first_ts=min(firsts) if firsts else None, last_ts=max(lasts) if lasts else None,
            packets=result.packets, segments=result.segments, connections=result.connections,
            open_at_end=result.open_at_end, anomaly_counts=anomaly_counts, drops=result.drops,
            elapsed_s=result.elapsed_s, stats=stats,
        )
        marked = True
    except (sqlite3.Error, StoreError, OSError) as exc:
        if result.store_failure is None:
            _failed(result, exc, db_path)
        marked = writer.mark_failed(result.store_failure or str(exc))
    if result.store_failure is None:
        try:
            if result.status == "complete":
                result.superseded = writer.supersede_same_sources()
            if retention is not None:
                result.pruned = retention.apply(writer.db).connections
            store_report(writer.db)  # computed once now, read many times
            return
        except (sqlite3.Error, StoreError, OSError) as exc:
            _failed(result, exc, db_path)
            marked = writer.mark_failed(result.store_failure or str(exc))
    what = (f"capture {writer.capture_id} is marked failed" if marked else
            f"capture {writer.capture_id} could not be marked failed (a full disk takes "
            "no more writes)")
    result.store_failure = f"{result.store_failure}; {what}; {writer.kept_text()}"


def _failed(result: RunResult, exc: BaseException, db_path: str) -> None:
    failure = store_failure(exc, db_path)
    result.status = "failed"
    result.store_failure = str(failure)
    result.disk_full = isinstance(failure, StoreFull)
