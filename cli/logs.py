"""`tracer logs`: application logs into the database, to line up with the connections."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import click
import sqlite_utils

from cli.output import FORMATS, fmt_ts, render
from cli.times import instant
from store.logs import (
    LineFilter,
    LogWriter,
    find_sources,
    log_lines,
    log_sources,
    logs_end,
    remove_source,
)
from store.schema import StoreError, open_database
from tracer.logs import FORMATS as LOG_FORMATS
from tracer.logs import LineSplitter, LogLine, LogParser, TimeBase
from tracer.logs.addresses import normal_ip
from tracer.sources.logfile import (
    FilePart,
    LogInput,
    LogSourceError,
    parse_zone,
    plan_parts,
    read_range,
)

DEFAULT_DB = "tracer.db"
EXIT_DAMAGED = 3
EXIT_INTERRUPTED = 130
# Records handed to the database per transaction: large enough that SQLite's per-commit
# cost vanishes, small enough that the few batches alive at once stay a few MB.
BATCH_RECORDS = 20000
MESSAGE_WIDTH = 160  # characters of a message in the table view
# A plain file at least this big is read in parts by several processes (-j): below it,
# starting them costs more than it saves.
PARTS_MIN_BYTES = 16 << 20


@dataclass
class AddResult:
    """What adding one log did: the counts of the summary."""

    source_id: int
    name: str
    fmt: str
    lines: int = 0
    blank: int = 0
    parsed: int = 0
    unparsed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    by_format: dict[str, int] = field(default_factory=dict)
    cut_lines: int = 0
    addresses: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    elapsed_s: float = 0.0
    jobs: int = 1
    replaced: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    interrupted: bool = False


@dataclass
class PartResult:
    """What reading one part of a log (or the whole of it) found; sent back by workers."""

    blank: int = 0
    addresses: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    by_format: dict[str, int] = field(default_factory=dict)
    cut_lines: int = 0
    detected: str | None = None
    error: str | None = None
    interrupted: bool = False


def format_label(forced: str, detected: str | None, by_format: dict[str, int]) -> str:
    """What log_sources.format says: the format forced, else the formats the lines were
    in (several joined by +, most lines first), else "unknown"."""
    if forced != "auto":
        return forced
    seen = [name for name, _ in sorted(by_format.items(), key=lambda kv: -kv[1])]
    return "+".join(seen) if seen else (detected or "unknown")


def default_jobs(inp: LogInput) -> int:
    """Worker processes for one log: one per CPU (up to 4) for a plain file over
    PARTS_MIN_BYTES, else 1."""
    if inp.size is None or inp.size < PARTS_MIN_BYTES:
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def read_part(db: sqlite_utils.Database, source_id: int, chunks: Iterator[bytes],
              parser: LogParser, *, lock: AbstractContextManager[Any] | None = None,
              on_chunk: Callable[[int], None] | None = None) -> PartResult:
    """Split, parse and store the lines of ``chunks`` into the source, in batches. Damaged
    input and Ctrl-C end it early, keeping what was read before (and saying so)."""
    writer = LogWriter(db, source_id, lock)
    splitter = LineSplitter()
    result = PartResult()
    batch: list[LogLine] = []
    batch_lines = 0
    try:
        try:
            for chunk in chunks:
                lines = splitter.feed(chunk)
                batch_lines += len(lines)
                batch += parser.feed(lines)
                if len(batch) >= BATCH_RECORDS:
                    writer.write(batch, batch_lines)
                    batch, batch_lines = [], 0
                if on_chunk is not None:
                    on_chunk(len(chunk))
        except LogSourceError as exc:
            result.error = str(exc)
        lines = splitter.finish()
        batch_lines += len(lines)
        batch += parser.feed(lines)
        batch += parser.finish()
    except KeyboardInterrupt:
        result.interrupted = True
    try:
        writer.write(batch, batch_lines)
    except KeyboardInterrupt:
        result.interrupted = True
        writer.write(batch, batch_lines)
    result.blank = parser.blank
    result.addresses = writer.totals.addresses
    result.reasons = dict(parser.reasons)
    result.by_format = dict(parser.by_format)
    result.cut_lines = splitter.cut_lines
    result.detected = parser.detected
    return result


def _part_worker(pipe: Any, db_path: str, source_id: int, path: str, part: FilePart,
                 fmt: str, detected: str | None, tb: TimeBase, lock: Any, done: Any,
                 index: int) -> None:
    """A worker process: one part of a log file, into its own database connection."""
    try:
        db = open_database(db_path)
        parser = LogParser(tb, fmt, first_line=part.first_line)
        if fmt == "auto":
            parser.assume(detected)

        def on_chunk(n: int) -> None:
            done[index] += n

        result = read_part(db, source_id, read_range(path, part.start, part.end), parser,
                           lock=lock, on_chunk=on_chunk)
        db.close()
    except Exception as exc:  # noqa: BLE001 - reported by the parent, which carries on
        result = PartResult(error=f"worker failed: {type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        result = PartResult(interrupted=True)
    pipe.send(result)
    pipe.close()


def _detect(inp: LogInput, tb: TimeBase, size: int) -> str | None:
    """The format detected from the start of a file (as one parser reading it would)."""
    assert inp.path is not None
    probe = LogParser(tb)
    splitter = LineSplitter()
    for chunk in read_range(inp.path, 0, size):
        probe.feed(splitter.feed(chunk))
        if not probe.detecting:
            return probe.detected
    probe.feed(splitter.finish())
    probe.finish()
    return probe.detected


def add_log(db: sqlite_utils.Database, db_path: str, inp: LogInput, *, name: str, fmt: str,
            zone: datetime.tzinfo, zone_name: str, year: int | None, jobs: int = 1,
            progress: Callable[[int], None] | None = None) -> AddResult:
    """Read one log whole into the database as a new source; replace the sources that
    held the same bytes before. With ``jobs`` > 1 a plain file is read in that many
    parts at once, by worker processes. Damaged input and Ctrl-C keep what was read
    before and say so in the result."""
    started = time.perf_counter()
    tb = TimeBase(zone, year=year, reference=inp.reference)
    writer = LogWriter.start(db, name=name, path=inp.path, tz=zone_name, fmt=fmt)
    sid = writer.source_id
    result = AddResult(sid, name, fmt)
    parts: list[PartResult] = []
    sha256: str | None = None
    if jobs > 1 and inp.splittable():
        assert inp.path is not None and inp.size is not None
        plan = plan_parts(inp.path, inp.size, jobs)
        detected = _detect(inp, tb, plan.size) if fmt == "auto" else None
        ctx = multiprocessing.get_context("fork")
        lock = ctx.Lock()
        done = ctx.Array("q", len(plan.parts), lock=False)
        children = []
        for index, part in enumerate(plan.parts[1:], 1):
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_part_worker, daemon=True, args=(
                child_end, db_path, sid, inp.path, part, fmt, detected, tb, lock, done, index))
            proc.start()
            child_end.close()
            children.append((proc, parent_end))
        first = plan.parts[0]
        parser = LogParser(tb, fmt)
        if fmt == "auto":
            parser.assume(detected)

        def on_chunk(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(sum(done))

        parts.append(read_part(db, sid, read_range(inp.path, first.start, first.end), parser,
                               lock=lock, on_chunk=on_chunk))
        for proc, pipe in children:
            try:
                parts.append(pipe.recv())
            except EOFError:
                parts.append(PartResult(error=f"worker exited with status {proc.exitcode}"))
            except KeyboardInterrupt:
                parts.append(PartResult(interrupted=True))
            proc.join()
        sha256 = plan.sha256
        result.jobs = len(plan.parts)
    else:
        parser = LogParser(tb, fmt)

        def on_bytes(_: int) -> None:
            if progress is not None:
                progress(inp.bytes_read())

        parts.append(read_part(db, sid, inp.chunks(), parser, on_chunk=on_bytes))
        sha256 = inp.sha256()
    try:
        inp.close()
    except LogSourceError as exc:
        parts.append(PartResult(error=str(exc)))
    errors = [p.error for p in parts if p.error]
    result.error = "; ".join(errors) or None
    result.interrupted = any(p.interrupted for p in parts)
    for p in parts:
        result.blank += p.blank
        result.addresses += p.addresses
        result.cut_lines += p.cut_lines
        for k, v in p.reasons.items():
            result.reasons[k] = result.reasons.get(k, 0) + v
        for k, v in p.by_format.items():
            result.by_format[k] = result.by_format.get(k, 0) + v
    result.reasons = dict(sorted(result.reasons.items(), key=lambda kv: -kv[1]))
    result.by_format = dict(sorted(result.by_format.items(), key=lambda kv: -kv[1]))
    result.fmt = format_label(fmt, parts[0].detected, result.by_format)
    complete = result.error is None and not result.interrupted
    result.replaced = writer.finish(fmt=result.fmt, sha256=sha256 if complete else None)
    row = db.execute("SELECT lines, parsed, unparsed, first_ts, last_ts FROM log_sources"
                     " WHERE id = ?", [sid]).fetchone()
    result.lines, result.parsed, result.unparsed, result.first_ts, result.last_ts = row
    result.elapsed_s = time.perf_counter() - started
    return result


def summary(result: AddResult, db_path: str) -> list[str]:
    """The lines `tracer logs add` prints about one log."""
    r = result
    formats = ", ".join(f"{k} {v:,}" for k, v in r.by_format.items())
    reasons = ", ".join(f"{k} {v:,}" for k, v in r.reasons.items())
    rate = r.lines / r.elapsed_s if r.elapsed_s > 0 else 0.0
    out = [
        f"{r.name}: {r.lines:,} lines: {r.parsed:,} parsed"
        + (f" ({formats})" if formats else "")
        + f", {r.unparsed:,} unparsed" + (f" ({reasons})" if reasons else "")
        + f", {r.blank:,} blank"
        + (f", {r.cut_lines:,} longer than 65,536 characters (cut)" if r.cut_lines else ""),
        (f"  {fmt_ts(r.first_ts)} .. {fmt_ts(r.last_ts)}; {r.addresses:,} ip:port mentions; "
         f"{r.elapsed_s:.2f}s ({rate:,.0f} lines/s"
         + (f", {r.jobs} workers" if r.jobs > 1 else "")
         + f") -> {db_path} (log source {r.source_id})"),
    ]
    for old in r.replaced:
        out.append(
            f"  replaced log source {old['id']} ({old['name']}, added "
            f"{fmt_ts(old['added_ts'])}, {old['lines']:,} lines): the same log added again")
    return out


# -- options ----------------------------------------------------------------------------------


def _db_option(f: Any) -> Any:
    return click.option(
        "--db", "db_path", default=DEFAULT_DB, show_default=True, metavar="FILE",
        envvar="TRACER_DB", help="SQLite database (created 0600). Env: TRACER_DB.",
    )(f)


def _open(db_path: str, *, create: bool, readonly: bool = False) -> sqlite_utils.Database:
    """The database; ``readonly`` for the commands that only read it (list, show)."""
    if not create and not os.path.lexists(db_path):
        raise click.ClickException(
            f"no database at {db_path}: add logs first with `tracer logs add FILE --db "
            f"{db_path}` (or pass --db)")
    try:
        return open_database(db_path, readonly=readonly)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


def _instant(text: str | None, db: sqlite_utils.Database, option: str) -> float | None:
    """--since/--until of `logs show`: ISO 8601 (naive = UTC), epoch seconds, or
    -DURATION before the latest stored log line (-10m)."""
    return instant(text, lambda: logs_end(db), empty="no log lines stored yet", option=option)


_BRACKETED = re.compile(r"\[([^\]]+)\](?::(\d{1,5}))?")


def _address(text: str) -> tuple[str, int | None]:
    """--address: 10.0.0.5, 10.0.0.5:9090, [fd00::1]:9090 or fd00::1."""
    host, port = text, None
    m = _BRACKETED.fullmatch(text)
    if m is not None:
        host, port = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, port = text.split(":")
    ip = normal_ip(host)
    if ip is None or (port is not None and not (port.isdigit() and 0 < int(port) < 65536)):
        raise click.BadParameter(f"{text!r}: use an IP address, with :PORT if you like",
                                 param_hint="--address")
    return ip, None if port is None else int(port)


# -- commands ---------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def logs() -> None:
    """Application logs, lined up with the connections.

    Add the logs of the clients and the server (files, standard input, the systemd
    journal); tracer keeps each line's time (UTC), level, pid, message and every ip:port
    it mentions, so they can be matched to connections by time, process and address.

    \b
      tracer logs add /var/log/app/client.log
      tracer logs add --journal --unit orders-client.service --since -1h
      tracer logs list
      tracer logs show --grep 'server preface' --address 10.0.0.5:9090
    """


@logs.command("add")
@click.argument("files", nargs=-1, metavar="[FILE]...")
@click.option("--journal", is_flag=True,
              help="Read the systemd journal (runs `journalctl -o json`).")
@click.option("--unit", "units", multiple=True, metavar="UNIT",
              help="With --journal: only this systemd unit (repeat for several).")
@click.option("--since", metavar="TIME",
              help="With --journal: from this time, as journalctl takes it "
                   "('2024-11-24 10:00', '-1h', 'today').")
@click.option("--until", metavar="TIME", help="With --journal: up to this time.")
@click.option("--source", "source_name", metavar="NAME",
              help="Name the source (default: the file's name; 'stdin'; 'journal:UNIT').")
@click.option("--format", "fmt", type=click.Choice(("auto", *LOG_FORMATS)), default="auto",
              show_default=True,
              help="The lines' format. auto detects it from the first lines and still "
                   "reads lines of another format among them.")
@click.option("--tz", "tz", metavar="ZONE",
              help="Zone of times written without an offset (klog, syslog, naive ISO "
                   "times): an IANA name (Europe/Paris), UTC, or an offset (+05:30). "
                   "Default: this machine's local zone.")
@click.option("--year", type=click.IntRange(1970, 9999), metavar="YYYY",
              help="Year of times written without one (klog, RFC 3164 syslog). Default: "
                   "the latest year that does not put a line after the file's last change "
                   "(for stdin and the journal: now).")
@_db_option
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=None, metavar="N",
              help="Worker processes reading parts of one plain file at once. Default: one "
                   "per CPU (up to 4) for files over 16 MB, else 1.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
def add(files: tuple[str, ...], journal: bool, units: tuple[str, ...], since: str | None,
        until: str | None, source_name: str | None, fmt: str, tz: str | None,
        year: int | None, db_path: str, jobs: int | None, quiet: bool) -> None:
    """Read log files (or - for standard input, or the journal) into the database.

    Each file becomes a log source. Every line is kept: parsed (time as UTC, level,
    pid, process, message, and each ip:port it mentions), or, when it cannot be, as it
    was, with the reason (no_format, continuation, no_timestamp, bad_timestamp,
    bad_json, format_mismatch). Files are read as a stream (gzip-compressed ones too,
    recognised by their first bytes), with a progress bar on a terminal.

    \b
    Formats (auto-detected; --format to force one):
      json    zap, logrus, slog, pino, bunyan, Docker, `journalctl -o json` output;
              times as RFC 3339 or epoch s/ms/us/ns (ts, time, timestamp, @timestamp;
              __REALTIME_TIMESTAMP); pid from pid or _PID
      klog    grpc-go's klog/glog and grpc C-core's abseil lines
              (W1124 10:02:03.123456 4321 clientconn.go:1234] msg); the number after
              the time is the pid when the source file is Go (klog and glog print
              os.Getpid() there) and a thread id otherwise (C++ glog, abseil): not a pid
      syslog  RFC 3164 (Nov 24 10:02:03 host name[pid]: msg), rsyslog's RFC 3339
              variant, RFC 5424
      logfmt  key=value (logrus text: time="..." level=error msg="...")
      plain   a leading ISO 8601 or epoch time: Python logging, Go's log package,
              grpc-js traces (D 2024-11-24T10:02:03.123Z | v1.14.7 12345 | ...)

    Times without an offset are read in --tz (default: this machine's local zone);
    times without a year get --year, or the latest year that does not put them after
    the file's last modification.

    Adding the same log again (the same bytes, after decompression) replaces its
    earlier lines instead of adding them twice, and says so.

    Exit status: 0 on success; 1 when a log cannot be read (or journalctl fails); 3 when
    compressed data is damaged (the lines before it are kept); 130 when interrupted
    (the lines read so far are kept).
    """
    if not files and not journal:
        raise click.UsageError("give FILE(s) to read, - for standard input, or --journal")
    if not journal:
        given = [n for n, v in (("--unit", units), ("--since", since), ("--until", until)) if v]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply with --journal")
    try:
        zone, zone_name = parse_zone(tz)
    except LogSourceError as exc:
        raise click.BadParameter(str(exc), param_hint="--tz") from None
    db = _open(db_path, create=True)
    show_progress = not quiet and sys.stderr.isatty()
    status = 0
    for path in [*files, *([None] if journal else [])]:
        try:
            inp = LogInput.open(path) if path is not None else \
                LogInput.journal(units, since, until)
        except LogSourceError as exc:
            click.echo(f"error: {exc}", err=True)
            status = max(status, 1)
            continue
        bar: Any = None
        if show_progress and inp.size:
            bar = click.progressbar(length=inp.size, label=inp.name, file=sys.stderr,
                                    show_pos=False, show_percent=True, show_eta=True)
        try:
            result = add_log(db, db_path, inp, name=source_name or inp.name, fmt=fmt,
                             zone=zone, zone_name=zone_name, year=year,
                             jobs=jobs if jobs is not None else default_jobs(inp),
                             progress=_progress(bar) if bar is not None else None)
        except sqlite3.Error as exc:
            raise click.ClickException(f"cannot write to {db_path}: {exc}") from None
        finally:
            if bar is not None:
                bar.render_finish()
        if not quiet:
            for line in summary(result, db_path):
                click.echo(line, err=True)
        if result.interrupted:
            click.echo(f"interrupted: the {result.lines:,} lines read so far are stored "
                       f"(log source {result.source_id}, incomplete: `tracer logs remove "
                       f"{result.source_id}` before adding it again)", err=True)
            sys.exit(EXIT_INTERRUPTED)
        if result.error:
            click.echo(f"error: {result.error}", err=True)
            status = max(status, EXIT_DAMAGED if "damaged" in result.error else 1)
    _refresh_report(db)
    if status:
        sys.exit(status)


def _refresh_report(db: sqlite_utils.Database) -> None:
    """The stored report counts the log evidence too: computed again now, by this writer,
    so that readers (which never write) find it current."""
    from store.queries import report

    try:
        report(db, store=True)
    except sqlite3.Error as exc:
        click.echo(f"warning: the stored report could not be refreshed ({exc}); "
                   "`tracer report` computes it each time", err=True)


def _progress(bar: Any) -> Callable[[int], None]:
    def update(done: int) -> None:
        bar.update(done - bar.pos)

    return update


@logs.command("list")
@_db_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table",
              show_default=True, help="Output format.")
def list_(db_path: str, fmt: str) -> None:
    """The log sources: lines, parsed and unparsed, time range."""
    db = _open(db_path, create=False, readonly=True)
    sources = log_sources(db)
    if fmt == "json":
        click.echo(json.dumps(sources, indent=2))
        return
    if not sources:
        click.echo("no logs added yet (tracer logs add FILE)")
        return
    headers = ["ID", "NAME", "PATH", "FORMAT", "TZ", "ADDED", "LINES", "PARSED", "UNPARSED",
               "FIRST", "LAST"]
    table = fmt == "table"
    rows = [[s["id"], s["name"], s["path"], s["format"], s["tz"],
             fmt_ts(s["added_ts"]) if table else s["added_ts"], s["lines"], s["parsed"],
             s["unparsed"], fmt_ts(s["first_ts"]) if table else s["first_ts"],
             fmt_ts(s["last_ts"]) if table else s["last_ts"]] for s in sources]
    click.echo(render(fmt, rows, headers))


@logs.command("show")
@_db_option
@click.option("--source", "sources", multiple=True, metavar="ID|NAME|PATH",
              help="Only lines of this log source (repeat for several).")
@click.option("--pid", type=int, help="Only lines of this process id.")
@click.option("--grep", "pattern", metavar="REGEX",
              help="Only lines whose message matches (Python regular expression; "
                   "(?i) for any case).")
@click.option("--address", metavar="IP[:PORT]",
              help="Only lines that mention this address (10.0.0.5:9090, [fd00::1]:9090, "
                   "or an IP alone for any port).")
@click.option("--since", metavar="TIME",
              help="From this time: 2024-11-24T10:00:00Z (naive = UTC), epoch seconds, or "
                   "-10m (ten minutes before the latest line).")
@click.option("--until", metavar="TIME", help="Up to this time (same forms).")
@click.option("--unparsed", is_flag=True,
              help="Show the lines kept unparsed, with the reason, in file order.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True,
              metavar="N", help="At most N lines.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table",
              show_default=True, help="Output format.")
def show(db_path: str, sources: tuple[str, ...], pid: int | None, pattern: str | None,
         address: str | None, since: str | None, until: str | None, unparsed: bool,
         limit: int, fmt: str) -> None:
    """Stored log lines, in time order: time (UTC), source, line, level, pid, message,
    addresses."""
    db = _open(db_path, create=False, readonly=True)
    source_ids: list[int] | None = None
    if sources:
        source_ids = []
        for which in sources:
            found = find_sources(db, which)
            if not found:
                raise click.BadParameter(f"no log source {which!r} (see tracer logs list)",
                                         param_hint="--source")
            source_ids += found
    grep = None
    if pattern is not None:
        try:
            grep = re.compile(pattern)
        except re.error as exc:
            raise click.BadParameter(f"{pattern!r}: {exc}", param_hint="--grep") from None
    f = LineFilter(sources=source_ids, pid=pid, since=_instant(since, db, "--since"),
                   until=_instant(until, db, "--until"), grep=grep,
                   address=_address(address) if address else None, unparsed=unparsed,
                   limit=limit)
    rows = list(log_lines(db, f))
    if fmt == "json":
        for r in rows:
            r["time"] = fmt_ts(r["ts"]) if r["ts"] is not None else None
            r["addresses"] = [{"ip": ip, "port": port} for ip, port in r["addresses"]]
            del r["id"]
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        if fmt == "table":
            click.echo("no log lines match")
        return
    table = fmt == "table"

    def text(message: str) -> str:
        if not table:
            return message
        message = message.replace("\n", "\\n").replace("\t", " ")
        return message if len(message) <= MESSAGE_WIDTH else message[:MESSAGE_WIDTH - 1] + "…"

    def addresses(pairs: list[tuple[str, int]]) -> str | None:
        shown = [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in pairs]
        return " ".join(shown) or None

    if unparsed:
        headers = ["SOURCE", "LINE", "REASON", "ADDRESSES", "TEXT"]
        out = [[r["source"], r["line_no"], r["reason"], addresses(r["addresses"]),
                text(r["message"])] for r in rows]
    else:
        headers = ["TIME (UTC)", "SOURCE", "LINE", "LEVEL", "PID", "PROCESS", "ADDRESSES",
                   "MESSAGE"]
        out = [[fmt_ts(r["ts"]) if table else r["ts"], r["source"], r["line_no"], r["level"],
                r["pid"], r["process"], addresses(r["addresses"]), text(r["message"])]
               for r in rows]
    click.echo(render(fmt, out, headers))


@logs.command("remove")
@click.argument("sources", nargs=-1, required=True, metavar="ID|NAME|PATH...")
@_db_option
def remove(sources: tuple[str, ...], db_path: str) -> None:
    """Delete log sources with their lines (an interrupted add, a wrong --tz)."""
    db = _open(db_path, create=False)
    for which in sources:
        found = find_sources(db, which)
        if not found:
            raise click.ClickException(f"no log source {which!r} (see tracer logs list)")
        for source_id in found:
            deleted = remove_source(db, source_id)
            click.echo(f"removed log source {source_id} ({deleted:,} lines)", err=True)
    _refresh_report(db)
