"""`tracer`: find the process that leaks gRPC connections."""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
import shutil
import stat
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import click

from cli.metrics import metrics_options, metrics_settings
from cli.output import (
    FORMATS,
    ProgressLine,
    fit_table,
    fmt_age,
    fmt_ts,
    hidden_note,
    process_label,
    render,
    shorten,
    table,
    terminal_width,
)
from cli.times import instant, parse_duration, parse_size
from store.queries import capture_summary
from store.queries import connections as list_connections
from store.queries import report as build_report
from store.schema import StoreError, open_database
from store.sql import DEFAULT_PREFACE_TIMEOUT
from tracer import __version__, build_kind
from tracer.options import CoreOptions
from tracer.tcp.state import CONN_STATES

DEFAULT_DB = "tracer.db"

EXIT_DAMAGED = 3
EXIT_CAPTURE = 4
EXIT_STORE = 5


def _db_option(f: Any) -> Any:
    return click.option(
        "--db", "db_path", default=DEFAULT_DB, show_default=True, metavar="FILE",
        envvar="TRACER_DB", help="SQLite database (created 0600). Env: TRACER_DB.",
    )(f)


def _format_option(f: Any) -> Any:
    return click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
        help="Output format.",
    )(f)


_wide_option = click.option(
    "--wide", is_flag=True,
    help="Every column, however wide (a table on a terminal leaves out what does not fit; "
         "a pipe or a file gets every column).")


def _client_value(_ctx: Any, _param: Any, value: str | None) -> str | None:
    """--client: an IP address (v4 or v6, brackets allowed) or a process id."""
    if value is None or value.isdigit():
        return value
    bare = value.strip().removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither an IP address nor a process id") from None


def _client_option(help_text: str = "Only this client address or process id."
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--client", metavar="IP|PID", callback=_client_value, help=help_text)


def _open_existing(db_path: str) -> Any:
    """The database for a reader command: opened read-only, never created or migrated."""
    if not os.path.lexists(db_path):  # a dangling link is refused as a link, not "missing"
        raise click.ClickException(
            f"no database at {db_path}: run `tracer capture --read FILE --port PORT "
            f"--db {db_path}` first (or pass --db)"
        )
    try:
        return open_database(db_path, readonly=True)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(f"{__version__} ({build_kind()} core)", prog_name="tracer")
def main() -> None:
    """Find the process that leaks gRPC connections.

    tracer rebuilds every TCP connection to a gRPC port (SYN, handshake, FIN/RST) and its
    HTTP/2 control frames (preface, SETTINGS, HEADERS method, PING, GOAWAY) into SQLite,
    and reports which client opens connections without closing them.

    \b
      tracer capture --read dump.pcapng --port 9090   # analyse a capture file
      tracer report                                   # who leaks, with evidence
      tracer connections --open                       # every connection still open
    """
    os.umask(0o077)


def _retention(retain: str | None, max_db_size: str | None) -> Any:
    from store.retention import Retention

    older = parse_duration(retain)
    size = parse_size(max_db_size)
    if older is not None and older <= 0:
        raise click.BadParameter("use 14d, 12h, ...", param_hint="--retain")
    return Retention(older_than_s=older, max_bytes=size) if older or size else None


@main.command()
@click.option("-r", "--read", "reads", multiple=True, metavar="FILE",
              help="Analyse a pcap or pcapng file (gzip-compressed too) instead of capturing "
                   "live; repeat for several files read as one stream (rotated files: they "
                   "are read in the time order of their first packets); - reads standard "
                   "input (tcpdump -w - | tracer capture --read - --port 9090).")
@click.option("--port", "ports", multiple=True, type=click.IntRange(1, 65535),
              help="The gRPC server port. Repeat for several. The side on this port is the "
                   "server; connections picked up mid-stream are oriented by it. Needed "
                   "unless --unix is given.")
@click.option("--unix", "unix", multiple=True, metavar="PATH",
              help="Live: follow the connections to a gRPC server listening on this Unix "
                   "socket (a path, or @name for an abstract one): the kernel's socket "
                   "table is polled every 0.5s (no packets exist there, so methods, RPCs "
                   "and GOAWAYs are not visible; open and close times are known to within "
                   "a poll). Repeat for several; alone (no packet capture at all) or beside "
                   "--port.")
@_db_option
@click.option("-i", "--iface", "interfaces", multiple=True, metavar="NAME",
              help="Live: interface to capture on (repeat for several); default any (all "
                   "interfaces, loopback included).")
@click.option("--duration", metavar="TIME", help="Live: stop after this long (30s, 10m, 2h).")
@click.option("-c", "--count", type=click.IntRange(1), metavar="N",
              help="Live: stop after N packets.")
@click.option("-w", "--write", "write_path", metavar="FILE",
              help="Live: also keep the packets as pcapng, each on the interface that saw "
                   "it (one interface block per interface, Linux cooked v2 headers with "
                   "the interface index and direction). A new file, created 0600; an "
                   "existing file or a symbolic link is refused. Wireshark, tcpdump and "
                   "`tracer capture --read` open it.")
@click.option("--snaplen", type=click.IntRange(64, 262144), default=262144, show_default=True,
              help="Live: bytes kept of each packet. HTTP/2 frames cut short count as missed "
                   "bytes; frame headers at segment starts are still read.")
@click.option("--filter", "user_filter", metavar="EXPR",
              help="Only packets this tcpdump filter expression accepts, live or from files "
                   "(ANDed with --port; also given as trailing words, as to tcpdump). "
                   "Needs libpcap; without it tracer filters on --port by itself.")
@click.option("--buffer-size", type=click.IntRange(4096), default=32 << 20, show_default=True,
              metavar="BYTES",
              help="Live: kernel room for packets not yet read: the size of the "
                   "memory-mapped receive ring (part of the agent's resident memory from "
                   "the start), or without the ring the socket's receive buffer; too small "
                   "and the kernel drops packets (counted and reported, never hidden).")
@click.option("--no-ring", is_flag=True,
              help="Live: read one packet per system call instead of through the "
                   "memory-mapped receive ring (more CPU per packet: drops start at a "
                   "lower rate; the agent falls back to it by itself, and says so, where "
                   "the kernel refuses the ring).")
@click.option("--no-attribution", is_flag=True,
              help="Live: do not look up which process owns each connection.")
@click.option("--user", metavar="NAME",
              help="Live: drop root for this user once the packet sockets are open. "
                   "Attribution then sees only that user's processes (the kernel hides the "
                   "file descriptors of others), and the database is written as that user "
                   "(it needs to write in the database's folder).")
@click.option("--grpc-status/--no-grpc-status", default=False, show_default=True,
              help="Also decode the server's header blocks, for the grpc-status of every RPC "
                   "(counted per connection). Off by default: it costs about a third more "
                   "time, and the client's requests (methods) are decoded either way.")
@click.option("--events", "events", type=click.Choice(["control", "all"]), default="control",
              show_default=True,
              help="What goes into the events table: control (FIN, RST, GOAWAY, gaps, TLS "
                   "and HTTP/1 hellos, ...; RPCs, PINGs and RST_STREAMs are counted per "
                   "connection) or all (also one row per RPC, PING and RST_STREAM: about "
                   "100 bytes each).")
@click.option("--retain", metavar="TIME",
              help="Keep this much history (14d, 12h): older closed connections, their "
                   "events and log lines are deleted while capturing (and at the end of a "
                   "file read). Open connections are always kept.")
@click.option("--max-db-size", metavar="SIZE",
              help="Keep the database under this size (500M, 2G): the oldest closed "
                   "connections go first; open connections are always kept.")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=None, metavar="N",
              help="Files: worker processes, each analysing a share of the connections. "
                   "Default: one per CPU (up to 4) for files over 16 MB, else 1.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, status line or summary.")
@metrics_options
@click.argument("expression", nargs=-1, metavar="[EXPRESSION]")
def capture(reads: tuple[str, ...], ports: tuple[int, ...], unix: tuple[str, ...],
            db_path: str,
            interfaces: tuple[str, ...], duration: str | None, count: int | None,
            write_path: str | None, snaplen: int, user_filter: str | None, buffer_size: int,
            no_ring: bool, no_attribution: bool, user: str | None, grpc_status: bool,
            events: str, retain: str | None, max_db_size: str | None, jobs: int | None,
            quiet: bool, expression: tuple[str, ...], **metrics: Any) -> None:
    """Rebuild the gRPC connections on a port into the database: live, or from files.

    \b
    Live (needs root or CAP_NET_RAW):
      tracer capture --port 9090                 # until Ctrl-C, with a status line
      tracer capture --port 9090 --duration 10m --write dump.pcapng
      tracer capture --port 9090 --retain 14d --max-db-size 2G   # as a service
      tracer capture --unix /run/containerd/containerd.sock  # a Unix-socket server
    From capture files:
      tracer capture --read dump.pcapng --port 9090
      tracer capture -r dump.pcapng --port 9090 host 10.0.0.5   # a tcpdump filter

    Live, the connections already open when it starts are read from the kernel's socket
    table and recorded at once; every client connection whose client end is a local
    socket (the agent runs on the client host, or both are on one host, containers
    included) is attributed to its process. What changed is stored every half second, so
    a kill -9 loses at most the last second. SIGINT and SIGTERM stop it cleanly within a
    second: open connections are stored as open at the end and it exits 0. A second run
    into the same database adds a new capture.

    Files are read as a stream (never loaded whole), with a progress bar on a terminal.
    Reading the same file into the same database again replaces the earlier import.
    SIGINT and SIGTERM stop a file read cleanly: what was read is stored and the capture
    is marked interrupted.

    Exit status: 0 on success; 2 for bad usage; 3 when a file is damaged or not a capture
    (everything decoded before the damage is kept); 4 when live capture cannot start;
    5 when the database cannot be written (a full disk: the capture is marked failed,
    what was committed before is kept); 130 (SIGINT) or 143 (SIGTERM) when a file read
    is interrupted (what was read is kept).
    """
    if not ports and not unix:
        raise click.UsageError("give the server's --port (or a Unix socket with --unix)")
    if reads and unix:
        raise click.UsageError("--unix follows a live server's Unix socket: a capture file "
                               "holds no Unix-socket traffic; give --port with --read")
    if unix and not ports and (interfaces or write_path or count or user_filter
                               or expression):
        raise click.UsageError("--iface, --write, --count and filters are for packets: "
                               "give --port too, or leave them out with --unix alone")
    if unix:  # before anything is printed or opened: a wrong path is a usage error
        from tracer.agent.unixwatch import UnixTargetError, resolve

        try:
            resolve(unix)
        except UnixTargetError as exc:
            raise click.BadParameter(str(exc).removeprefix("--unix "),
                                     param_hint="--unix") from None
    if expression:
        if user_filter:
            raise click.UsageError("give the filter either as --filter or as trailing words")
        user_filter = " ".join(expression)
    retention = _retention(retain, max_db_size)
    core = CoreOptions(decode_server_headers=grpc_status, rpc_events=events == "all")
    exporter = metrics_settings(reads, **metrics)
    if reads:
        if write_path:
            raise click.UsageError(
                "--write keeps the packets a live capture reads, not those of --read files "
                "(they are captures already). To keep part of one with its interfaces and "
                "link types as they are: tshark -r IN -Y 'tcp.port == N' -w OUT")
        _check_readable(reads)
        live_only = {"--iface": interfaces, "--duration": duration, "--count": count,
                     "--user": user, "--no-ring": no_ring}
        given = [name for name, value in live_only.items() if value]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply to live capture, "
                                   "not with --read")
        _capture_files(reads, ports, db_path, core, jobs, retention, quiet, user_filter)
        return
    from tracer.agent.live import LiveSettings

    settings = LiveSettings(
        ports=frozenset(ports), db_path=db_path, interfaces=list(interfaces) or ["any"],
        duration=parse_duration(duration), count=count, write_path=write_path,
        snaplen=snaplen, buffer_bytes=buffer_size, user_filter=user_filter, ring=not no_ring,
        attribution=not no_attribution, user=user, core=core, retention=retention,
        wait=lambda line: click.echo(line, err=True), metrics=exporter, unix=unix,
    )
    _capture_live(settings, quiet)


def _check_readable(reads: tuple[str, ...]) -> None:
    """Every --read file can be opened, before a capture is begun in the database (a
    missing file is bad usage, not a damaged one)."""
    for path in reads:
        if path == "-":
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise click.BadParameter(f"cannot open {path}: {exc.strerror}",
                                     param_hint="--read") from None
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise click.BadParameter(f"{path} is a directory", param_hint="--read")
        finally:
            os.close(fd)


def _capture_live(settings: Any, quiet: bool) -> None:
    from tracer.agent.live import CaptureError, run_live
    from tracer.sources.pcapwriter import PcapWriteError

    interactive = not quiet and sys.stderr.isatty()

    def status(line: str) -> None:
        if interactive:
            # redrawn in place: a line wider than the terminal would wrap, and the next
            # redraw would leave the wrapped part behind
            width = shutil.get_terminal_size((80, 24)).columns - 1
            if len(line) > width:
                line = line[:max(width - 1, 0)] + "…"
            click.echo("\r\033[K" + line, nl=False, err=True)
        elif not quiet:
            click.echo(line, err=True)

    def notice(line: str, warning: bool) -> None:
        # A ring refused by the kernel is said even with --quiet: the rate it costs.
        if warning or not quiet:
            click.echo(("warning: " if warning else "") + line, err=True)

    settings.notice = notice
    ports = ",".join(map(str, sorted(settings.ports)))
    if not quiet:
        what = [f"capturing TCP port {ports} on {','.join(settings.interfaces)}"] \
            if settings.ports else []
        if settings.unix:
            what.append(f"following Unix socket{'s' if len(settings.unix) > 1 else ''} "
                        f"{', '.join(settings.unix)} (polled every 0.5s)")
        click.echo(f"{' and '.join(what)} into {settings.db_path} (Ctrl-C to stop)",
                   err=True)
    try:
        result = run_live(settings, status if not quiet else None)
    except (CaptureError, PcapWriteError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CAPTURE)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    if interactive:
        click.echo("", err=True)
    if result.error:
        click.echo(f"error: {result.error}", err=True)
    if not quiet:
        rate = result.packets / result.elapsed_s if result.elapsed_s > 0 else 0.0
        if settings.unix:
            click.echo(f"Unix sockets: {result.unix_polls:,} polls (every "
                       f"{result.unix_interval_s:g}s at most), median "
                       f"{result.unix_poll_ms:.2f} ms each; {result.unix_opened:,} connections "
                       f"seen, attributed to a process: {result.unix_attributed:,}"
                       + ("" if settings.ports else
                          f" -> {settings.db_path} (capture {result.capture_id})"), err=True)
        if settings.ports:
            click.echo(
                f"captured {result.packets:,} packets in {result.elapsed_s:.1f}s "
                f"({rate:,.0f}/s); kernel: {result.received:,} passed the filter, "
                f"{result.dropped:,} dropped", err=True,
            )
        if result.status != "failed" and settings.ports:
            click.echo(
                f"{result.connections:,} connections ({result.seeded:,} already open at the "
                f"start), {result.open_at_end:,} open at the end; attributed to a process: "
                f"{result.attributed:,}, remote clients: {result.remote:,}, closed before "
                f"they could be attributed: {result.unattributed_closed:,} -> "
                f"{settings.db_path} (capture {result.capture_id})"
                + (f"; retention let go of {result.pruned:,} old connections"
                   if result.pruned else "")
                + (f"; {result.written_packets:,} packets written to {settings.write_path}"
                   + _on_interfaces(result.written_interfaces)
                   if settings.write_path else ""),
                err=True,
            )
    if result.status == "failed":
        sys.exit(EXIT_STORE)


def _on_interfaces(names: list[str]) -> str:
    """" (on lo, eth0)": the interfaces --write described, the first few by name."""
    if not names:
        return ""
    shown = ", ".join(names[:4])
    return f" (on {shown}" + (f" and {len(names) - 4:,} more)" if len(names) > 4 else ")")


def _capture_files(reads: tuple[str, ...], ports: tuple[int, ...], db_path: str,
                   core: CoreOptions, jobs: int | None, retention: Any, quiet: bool,
                   user_filter: str | None) -> None:
    from tracer.agent.files import read_files
    from tracer.sources.filefilter import FilterError

    show_progress = not quiet and sys.stderr.isatty()
    bar = ProgressLine(sys.stderr) if show_progress else None

    def finishing() -> None:
        if bar is not None:
            bar.say("read; storing the totals and the report...")

    try:
        result = read_files(list(reads), frozenset(ports), db_path,
                            options=core, progress=bar.update if bar is not None else None,
                            jobs=jobs, retention=retention, finishing=finishing,
                            wait=lambda line: click.echo(line, err=True),
                            user_filter=user_filter)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    except FilterError as exc:
        raise click.BadParameter(str(exc).removeprefix("--filter "),
                                 param_hint="--filter") from None
    if bar is not None:
        bar.close()
    if not quiet:
        if list(reads) != result.order:
            click.echo("read in the time order of their first packets: "
                       + " ".join(result.order), err=True)
        rate = result.packets / result.elapsed_s if result.elapsed_s > 0 else 0.0
        filtered = result.skipped.pop("filter", None)
        skipped = sum(result.skipped.values())
        click.echo(
            f"read {len(reads)} file{'s' if len(reads) != 1 else ''}: {result.packets:,} packets "
            f"({result.segments:,} TCP segments on port {','.join(map(str, ports))}, "
            f"{skipped:,} other"
            + (f", {filtered:,} left out by --filter" if filtered is not None else "")
            + f") in {result.elapsed_s:.2f}s ({rate:,.0f} packets/s"
            + (f", {result.jobs} workers)" if result.jobs > 1 else ")"),
            err=True,
        )
        if result.status != "failed":
            click.echo(
                f"{result.connections:,} connections, {result.open_at_end:,} open at the end, "
                f"{result.anomalies:,} anomalies -> {db_path} (capture {result.capture_id})"
                + (f"; replaced earlier import of the same file(s): capture "
                   f"{', '.join(map(str, result.superseded))}" if result.superseded else "")
                + (f"; retention let go of {result.pruned:,} old connections"
                   if result.pruned else ""),
                err=True,
            )
    if result.store_failure:
        click.echo(f"error: {'disk full: ' if result.disk_full else ''}{result.store_failure}",
                   err=True)
    for err in result.errors + result.filter_errors:
        click.echo(f"error: {err}", err=True)
    if result.status == "failed":
        sys.exit(EXIT_STORE)
    if result.status == "interrupted":
        click.echo("interrupted: what was read so far is stored "
                   f"(capture {result.capture_id} is marked interrupted)", err=True)
        sys.exit(128 + (result.stopped_by or 2))
    if result.errors:
        if result.packets:
            click.echo("everything read before the damage is stored", err=True)
        sys.exit(EXIT_DAMAGED)
    if result.filter_errors:
        sys.exit(2)  # bad usage: the expression cannot match these files' link types


def _instant(text: str | None, db_path: str) -> float | None:
    """--since/--until: ISO 8601 (naive = UTC), epoch seconds, or -DURATION before the end
    of what the database holds (-10m: the last ten minutes)."""
    return instant(text, lambda: capture_summary(_open_existing(db_path))["last_ts"],
                   empty="the database holds no capture yet")


_preface_timeout_option = click.option(
    "--preface-timeout", default=f"{DEFAULT_PREFACE_TIMEOUT:g}s", show_default=True,
    metavar="DURATION", callback=lambda _ctx, _param, value: parse_duration(value),
    help="A client preface with no server SETTINGS within this long counts as a preface "
         "timeout (the clients saw 'failed to receive server preface'): seconds or 20s, 1m. "
         "Set it to the clients' connect timeout.")


@main.command()
@_db_option
@_format_option
@click.option("--since", metavar="TIME",
              help="Only connections that existed from this moment: 2026-11-24T10:00:00Z, "
                   "epoch seconds, or -10m (ten minutes before the end of the data).")
@click.option("--until", metavar="TIME",
              help="Only up to this moment (same forms); open and ages are as of then.")
@_client_option()
@_preface_timeout_option
@click.option("--fail-on-leak", is_flag=True,
              help="Exit with status 1 when any client's verdict is leak (for CI and cron).")
@_wide_option
def report(db_path: str, fmt: str, since: str | None, until: str | None, client: str | None,
           preface_timeout: float, fail_on_leak: bool, wide: bool) -> None:
    """Who leaks connections, how fast, since when, with which RPC.

    One entry per client (a process where attributed, else an address): connections
    opened, closed (and how), still open, the oldest open one's age, how idle the open
    ones are, RPCs per connection, methods, health checks (connect and close without
    HTTP/2), a verdict (leak, suspect, ok) and a one-line reason. Then the server's
    health: preface latency, preface timeouts (with how many connections the server held
    at those moments, and whose), GOAWAYs by sender and error, resets, refusals.
    `--format json` prints it as one object (its keys are listed in the README, under
    `tracer report`; keys may be added, never renamed).

    Exit status: 0; 1 when --client matches no connection, or with --fail-on-leak when a
    client's verdict is leak; 2 for bad usage.
    """
    data = print_report(db_path, fmt, preface_timeout, since=_instant(since, db_path),
                        until=_instant(until, db_path), client=client, wide=wide)
    if client and not data["clients"]:
        click.echo(f"error: no connection from client {client} in {db_path}"
                   + (" in that window" if since or until else ""), err=True)
        sys.exit(1)
    if fail_on_leak and any(c["verdict"] == "leak" for c in data["clients"]):
        sys.exit(1)


def print_report(db_path: str, fmt: str = "table",
                 preface_timeout: float = DEFAULT_PREFACE_TIMEOUT, *,
                 since: float | None = None, until: float | None = None,
                 client: str | None = None, wide: bool = False) -> dict[str, Any]:
    db = _open_existing(db_path)
    data = build_report(db, preface_timeout=preface_timeout, since=since, until=until,
                        client=client)
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return data
    if fmt == "csv":  # for scripts: numbers in base units, stable snake_case names
        click.echo(render("csv", *_report_csv(data["clients"])))
        return data
    headers = ["CLIENT", "PID", "PROCESS", "OPENED", "CLOSED", "OPEN", "HEALTH", "OLDEST OPEN",
               "IDLE", "GROWTH/MIN", "RPC/CONN", "TOP METHOD", "VERDICT", "REASON"]
    rows = []
    for c in data["clients"]:
        top = next(iter(c["methods"].items()), None)
        process = process_label(c["process"]) if fmt == "table" else c["process"]
        idle = c.get("idle_s")
        # A Unix socket shows no frame: what it would take is said, never 0 or idle.
        unseen = "n/a (unix)" if c.get("transport") == "unix" else None
        oldest = fmt_age(c["oldest_open_s"])
        if c.get("oldest_open_before_capture") and fmt == "table":
            oldest = f">={oldest}"  # opened before the capture: at least this old
        rows.append([
            c["client"], f"{c['pid']} on {c['host']}" if c.get("host") else c["pid"], process,
            c["opened"], c["closed"], c["open"],
            c["health_checks"], oldest,
            f"{fmt_age(idle['min'])}+" if idle else unseen,
            c["open_growth_per_min"], unseen if unseen else c["rpcs_per_connection"],
            f"{top[0]} ({top[1]})" if top else unseen, c["verdict"], c["reason"],
        ])
    if fmt != "table":
        click.echo(render(fmt, rows, headers))
        return data
    width = None if wide else terminal_width()

    def say(line: str) -> None:
        """A line of prose, wrapped to the terminal (never mid-word)."""
        if width is not None and len(line) > width and "\n" not in line:
            line = textwrap.fill(line, width=width - 1, subsequent_indent="    ",
                                 break_on_hyphens=False, break_long_words=False)
        click.echo(line)

    cap = data["capture"]
    span = (cap["last_ts"] - cap["first_ts"]) if cap["first_ts"] is not None else None
    ports = ",".join(map(str, cap["ports"]))
    sockets = cap.get("unix_paths") or []
    followed = ([f"port {ports or '-'}"] if ports or not sockets else []) + (
        [f"Unix socket{'s' if len(sockets) > 1 else ''} {', '.join(sockets)}"]
        if sockets else [])
    drops = cap["drops"] if cap["drops"] is not None else "unknown"
    packets = (f"{cap['packets']:,} packets, drops {drops}, anomalies {cap['anomalies']:,}"
               if ports or not sockets else "no packets (Unix sockets only)")
    say(
        f"capture: {len(cap['sources'])} source(s), {', '.join(followed)}, "
        f"{fmt_ts(cap['first_ts'])} .. {fmt_ts(cap['last_ts'])} ({fmt_age(span)}), "
        f"{packets}"
    )
    if since is not None or until is not None:
        say(f"window: {fmt_ts(since)} .. {fmt_ts(until)}")
    for d in cap["damaged"]:
        say(f"  damaged input: {d}")
    for p in cap.get("partial", []):
        say(f"  partial data: {p['reason']}")
    if cap.get("retained_from") is not None:
        say(f"  retained from {fmt_ts(cap['retained_from'])}: "
                   f"{cap['pruned_connections']:,} older closed connections were pruned "
                   "(they still count in each client's totals)")
    say("")
    if rows:
        text, hidden = fit_table(rows, headers, width, REPORT_DROP_ORDER,
                                 squeeze=("REASON", "PROCESS"))
        say(text)
        if hidden:
            say(hidden_note(hidden, width))
    else:
        say("no connections recorded")
    for line in _where_lines(data["clients"]) + reaped_lines(data["clients"]):
        say(line)
    s = data["server"]
    lat = s["preface_latency_ms"]
    say("")
    unix = cap.get("unix_paths") or []
    if unix:
        every = cap.get("unix_poll_interval_s") or 0.5
        say(f"server on Unix socket{'s' if len(unix) > 1 else ''} {', '.join(unix)} "
            f"(followed by polling the kernel's socket table every {every:g}s): RPCs, "
            "methods, idle times, preface, GOAWAY, PING and RST are not visible without "
            f"packets; open and close times are known to within {every:g}s; a connection "
            "opened and closed between two polls is not seen")
    if not unix or cap["ports"]:
        say(
            f"server: preface latency p50 {lat['p50'] if lat['p50'] is not None else '-'} "
            f"ms, p99 {lat['p99'] if lat['p99'] is not None else '-'} ms "
            f"({lat['samples']} connections); "
            f"preface timeouts (> {s['preface_timeout_s']:g}s) {s['preface_timeouts']}; "
            f"GOAWAY from server {s['goaways']['server']}, from clients "
            f"{s['goaways']['client']}; RST from server {s['resets']['server']}, from "
            f"clients {s['resets']['client']}; refused {s['refused']}"
        )
    for m in s["preface_timeout_moments"]:
        who = ", ".join(f"{k}: {v}" for k, v in m["top_clients"].items())
        say(
            f"  preface timeout at {fmt_ts(m['ts'])} for {m['client']}"
            + (f" (pid {m['pid']})" if m["pid"] else "")
            + f": the server held {m['server_open_connections']} open connections ({who})"
        )
    if s["goaways_by_code"]:
        say("  GOAWAY: " + ", ".join(
            f"{k} {v}" for k, v in sorted(s["goaways_by_code"].items())))
    _print_local_server(s, say, width)
    if "log_evidence" in data:
        say("")
        if data["log_evidence"]:
            say("log evidence (`tracer correlate` for each line and its connections):")
            for e in data["log_evidence"]:
                say(f"  {e['text']}")
        else:
            say("log evidence: no log line says a connection failed")
    return data


def _report_csv(clients: list[dict[str, Any]]) -> tuple[list[list[Any]], list[str]]:
    """The report's table for scripts: one number per cell, in seconds or counts."""
    headers = ["client", "pid", "process", "opened", "closed", "open", "health_checks",
               "oldest_open_s", "oldest_open_before_capture", "idle_min_s",
               "open_growth_per_min", "rpcs", "rpcs_per_connection", "top_method",
               "top_method_rpcs", "verdict", "reason"]
    rows = []
    for c in clients:
        top = next(iter(c["methods"].items()), (None, None))
        idle = c.get("idle_s")
        rows.append([
            c["client"], c["pid"], c["process"], c["opened"], c["closed"], c["open"],
            c["health_checks"], c["oldest_open_s"], int(bool(c.get("oldest_open_before_capture"))),
            idle["min"] if idle else None, c["open_growth_per_min"], c["rpcs"],
            c["rpcs_per_connection"], top[0], top[1], c["verdict"], c["reason"]])
    return rows, headers


# The report's columns a narrow terminal goes without, the first ones first.
REPORT_DROP_ORDER = ("TOP METHOD", "HEALTH", "GROWTH/MIN", "RPC/CONN", "IDLE", "CLOSED",
                     "OLDEST OPEN", "OPENED", "PID")
CONNECTIONS_DROP_ORDER = ("tls", "goaway", "srv_settings", "preface", "missed", "resp_pkts",
                          "orig_pkts", "resp_bytes", "orig_bytes", "history", "uid", "streams",
                          "duration", "resp", "closed_by")


def _print_local_server(s: dict[str, Any], say: Callable[[str], None],
                        width: int | None) -> None:
    """The server process on this host (when the live agent saw its listener): its
    descriptors, its accept queue, and why it stopped answering."""

    proc, queue = s.get("process"), s.get("accept_queue")
    if proc is not None:
        command = proc["cmdline"] or proc["comm"] or "?"
        head, _, args = command.partition(" ")
        command = f"{os.path.basename(head)} {args}".rstrip()
        if len(command) > 78:
            command = command[:77] + "…"
        say(f"  server pid {proc['pid']}: {command}")
        fds = f"{proc['fds_max']:,}" if proc["fds_max"] is not None else "unreadable"
        limit = f"{proc['fd_limit']:,}" if proc["fd_limit"] is not None else "no limit known"
        at = (f"; at the limit {fmt_age(proc['at_limit_s'])}, from "
              f"{fmt_ts(proc['at_limit_since'])}" if proc["at_limit_since"] is not None else "")
        over = proc["fds_max"] is not None and proc["fd_limit"] is not None and \
            proc["fds_max"] > proc["fd_limit"]
        held = f"up to {fds} (limit {limit}, some inherited above it)" if over else \
            f"up to {fds} of {limit}"
        say(f"    file descriptors: {held}{at}")
    if queue is not None:
        address = f"[{queue['address']}]" if ":" in queue["address"] else queue["address"]
        where = f"{address}:{queue['port']}" if queue["port"] else queue["address"]  # 0: Unix
        backlog = f"{queue['limit']:,}" if queue["limit"] is not None else "unknown"
        waited = (f"; not empty {fmt_age(queue['waiting_s'])}, from "
                  f"{fmt_ts(queue['waiting_since'])}" if queue["waiting_since"] is not None
                  else "")
        full = f"; full {fmt_age(queue['full_s'])}" if queue["full_since"] is not None else ""
        say(f"    accept queue {where}: up to {queue['max']:,} "
                   f"waiting of {backlog}{waited}{full}")
    if s.get("explanation") and (s.get("stall") or s["preface_timeouts"]):
        say(textwrap.fill(s["explanation"], width=min(width, 101) - 1 if width else 100,
                          initial_indent="  why: ", subsequent_indent="       ",
                          break_on_hyphens=False))


@main.command()
@_db_option
@click.option("--bucket", default="1m", show_default=True, metavar="TIME",
              help="Width of a time bucket (10s, 1m, 1h).")
@_client_option()
@click.option("--since", metavar="TIME", help="From this moment (as for `tracer report`).")
@click.option("--until", metavar="TIME", help="Up to this moment.")
@click.option("--plot", "plot_path", metavar="FILE",
              help="Draw it: FILE.png, FILE.svg or FILE.html (one line per client, preface "
                   "timeouts and server GOAWAYs marked).")
@click.option("--top", type=click.IntRange(1), default=8, show_default=True,
              help="Clients shown as their own column; the rest are summed.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table",
              show_default=True, help="Output format of the text table.")
@_preface_timeout_option
@_wide_option
def timeline(db_path: str, bucket: str, client: str | None, since: str | None,
             until: str | None, plot_path: str | None, top: int, fmt: str,
             preface_timeout: float, wide: bool) -> None:
    """Open connections per client over time: the picture of a leak.

    For each bucket, the connections each client holds open at its end (one line
    climbing, the others flat), with the preface timeouts, the preface latency (client
    preface to server SETTINGS, p50 and p99) and the GOAWAYs of the bucket; when the
    server runs on the capturing host, the most descriptors its process held against its
    limit and its accept queue against its maximum. A text table, or with --plot a picture
    (latency, and the server's descriptors and accept queue, in panels below).

    A process's column is headed by its pid; the lines under the table say which command
    each is. On a terminal the table fits its width: the columns on the right, then the
    last clients' columns (summed into OTHERS) are left out, and a line says so; --wide
    shows them all. JSON has one entry per client with its pid, process start, address,
    host and command line beside its numbers.
    """
    from store.queries import timeline as build_timeline

    width = parse_duration(bucket) or 60.0
    if width <= 0:
        raise click.BadParameter("the bucket must be longer than 0", param_hint="--bucket")
    if plot_path:  # before any work: the table is not printed for a plot that cannot be
        if not plot_path.endswith((".png", ".svg", ".html")):
            raise click.BadParameter("use a .png, .svg or .html file", param_hint="--plot")
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise click.ClickException(
                "--plot needs matplotlib, which is not installed: pip install "
                "'grpc-conntrace[plot]' (or pip install matplotlib) into tracer's environment")
    db = _open_existing(db_path)
    data = build_timeline(db, bucket=width, client=client, since=_instant(since, db_path),
                          until=_instant(until, db_path), preface_timeout=preface_timeout)
    if not data["times"]:
        click.echo("no capture in the database yet")
        return
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    elif fmt == "csv":
        click.echo(render("csv", *_timeline_csv(data, top)))
    else:
        columns = None if wide or fmt != "table" else terminal_width()
        k, rows, headers, left_out = _fit_timeline(data, top, fmt, columns)
        click.echo(render(fmt, rows, headers))
        if left_out:
            click.echo(hidden_note(left_out, columns))
        for line in _timeline_legend(data["clients"][:k]):
            click.echo(shorten(line, columns - 1) if columns else line)
    if plot_path:
        from cli.plot import plot_timeline

        title = f"open connections per client, {bucket} buckets" + (
            f", client {client}" if client else "")
        plot_timeline(data, plot_path, title)
        click.echo(f"plot written to {plot_path}", err=True)


def _fit_timeline(data: dict[str, Any], top: int, fmt: str, width: int | None
                  ) -> tuple[int, list[list[Any]], list[str], list[str]]:
    """The timeline's table within ``width`` columns, leaving out, as long as it is too
    wide: GOAWAYs, preface latency, the clients after the third (summed into OTHERS), the
    accept queue, the clients after the first, the server's descriptors, the last client.
    The preface timeouts always stay. Returns how many clients have a column, the rows and
    headers, and what was left out."""
    most = min(top, len(data["clients"]))
    plan: list[tuple[int, tuple[str, ...]]] = [(most, ())]
    if width is not None:
        dropped: tuple[str, ...] = ()
        for step in ("GOAWAY (server/client)", "PREFACE p50/p99 ms", 3, "ACCEPT QUEUE/MAX", 1,
                     "SERVER FDS/LIMIT", 0):
            if isinstance(step, str):
                dropped += (step,)
                plan.append((plan[-1][0], dropped))
            else:
                plan += [(k, dropped) for k in range(plan[-1][0] - 1, step - 1, -1)]
    for k, dropped in plan:
        rows, headers = _timeline_rows(data, k, fmt)
        keep = [i for i, h in enumerate(headers) if h not in dropped]
        rows = [[row[i] for i in keep] for row in rows]
        headers = [headers[i] for i in keep]
        if width is None or max(map(len, table(rows, headers).splitlines())) <= width:
            break
    left_out = [h for h in dropped if h in _timeline_rows(data, 0, fmt)[1]]
    if k < most:
        left_out.insert(0, f"{most - k} client column{'s' if most - k > 1 else ''} (summed "
                           "in OTHERS)")
    return k, rows, headers, left_out


def _timeline_rows(data: dict[str, Any], top: int,
                   fmt: str) -> tuple[list[list[Any]], list[str]]:
    """The timeline's table: a column for each of the ``top`` first clients, the rest summed
    in OTHERS."""
    shown, rest = data["clients"][:top], data["clients"][top:]
    server = data.get("server")
    headers = ["TIME (UTC)", *[c["label"] for c in shown]] + (["OTHERS"] if rest else []) + [
        "PREFACE TIMEOUTS", "PREFACE p50/p99 ms", "GOAWAY (server/client)"] + (
        ["SERVER FDS/LIMIT", "ACCEPT QUEUE/MAX"] if server else [])
    rows = []
    m = data["markers"]
    for i, t in enumerate(data["times"]):
        row: list[Any] = [fmt_ts(t)[:-5] if fmt == "table" else t]
        row += [c["open"][i] for c in shown]
        if rest:
            row.append(sum(c["open"][i] for c in rest))
        p50, p99 = m["preface_p50_ms"][i], m["preface_p99_ms"][i]
        row += [m["preface_timeouts"][i] or "",
                f"{p50:.1f}/{p99:.1f}" if p50 is not None and p99 is not None else "",
                f"{m['goaways_server'][i]}/{m['goaways_client'][i]}"
                if m["goaways_server"][i] or m["goaways_client"][i] else ""]
        if server:
            row += [_of(server["fds"][i], server["fd_limit"][i]),
                    _of(server["accept_queue"][i], server["accept_queue_max"][i])]
        rows.append(row)
    return rows, headers


def _timeline_legend(clients: list[dict[str, Any]]) -> list[str]:
    """Under the table, what each process column is: its command line, paths cut to their
    last part (what tells processes apart)."""
    return [f"  {c['label']}: {process_label(c['process'])}" for c in clients
            if c["process"]]


def _timeline_csv(data: dict[str, Any], top: int) -> tuple[list[list[Any]], list[str]]:
    """The timeline for scripts: epoch seconds, one number per cell, snake_case names (a
    client column is its address, or pid_N for a process, pid_N_on_HOST for one another
    host's agent named)."""
    shown, rest = data["clients"][:top], data["clients"][top:]
    server = data.get("server")
    m = data["markers"]
    headers = ["time", *[c["label"].replace(" ", "_") for c in shown]] + (
        ["others"] if rest else []) + [
        "preface_timeouts", "preface_p50_ms", "preface_p99_ms", "goaways_server",
        "goaways_client"] + (["server_fds", "server_fd_limit", "accept_queue",
                              "accept_queue_max"] if server else [])
    rows = []
    for i, t in enumerate(data["times"]):
        row: list[Any] = [t, *[c["open"][i] for c in shown]]
        if rest:
            row.append(sum(c["open"][i] for c in rest))
        row += [m["preface_timeouts"][i], m["preface_p50_ms"][i], m["preface_p99_ms"][i],
                m["goaways_server"][i], m["goaways_client"][i]]
        if server:
            row += [server["fds"][i], server["fd_limit"][i], server["accept_queue"][i],
                    server["accept_queue_max"][i]]
        rows.append(row)
    return rows, headers


def _where_lines(clients: list[dict[str, Any]]) -> list[str]:
    """Where each client runs, below the table: its container, Kubernetes pod, and its
    network namespace when the clients are in more than one; for an unattributed client
    what the kernel said of its sockets."""
    spaces = {c.get("netns") for c in clients if c.get("netns") is not None}
    out = []
    for c in clients:
        parts = []
        if len(spaces) > 1 and c.get("netns") is not None:
            parts.append(f"network namespace net:[{c['netns']}]")
        if c.get("container"):
            parts.append(f"container {c['container'][:12]}")
        if c.get("pod"):
            name = f"{c['pod_name']} " if c.get("pod_name") else ""
            parts.append(f"pod {name}(uid {c['pod']})")
        if parts:
            who = f"pid {c['pid']}" if c["pid"] is not None else c["client"]
            who += f" on {c['host']}" if c.get("host") else ""
            out.append(textwrap.fill(f"{who}: " + ", ".join(parts), width=100,
                                     initial_indent="  ", subsequent_indent="    ",
                                     break_on_hyphens=False))  # ids stay whole
    return out


def _of(value: int | None, limit: int | None) -> str:
    """A timeline cell: "64/64", "6/?" (maximum unknown), "" (no sample)."""
    if value is None:
        return ""
    return f"{value}/{limit if limit is not None else '?'}"


@main.command()
@_db_option
@_format_option
@click.option("--pattern", metavar="REGEX",
              help="Log lines to line up (Python regular expression; (?i) for any case). "
                   "Default: what gRPC clients print when connections fail, e.g. 'failed "
                   "to receive server preface', 'Deadline Exceeded', 'No connection "
                   "established', 'connection refused', in lines not logged at debug or "
                   "info level (grpc-go says 'transport is closing' at INFO at every close).")
@click.option("--window", default="5s", show_default=True, metavar="TIME",
              help="How far around each line to look for its connections.")
@click.option("--since", metavar="TIME", help="Lines from this moment (as for `tracer report`).")
@click.option("--until", metavar="TIME", help="Lines up to this moment.")
@click.option("--source", metavar="NAME", help="Only lines of this log (see `tracer logs list`).")
@click.option("--pid", type=int, help="Only lines of this process id.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True,
              help="Lines shown (all matching lines are counted).")
def correlate(db_path: str, fmt: str, pattern: str | None, window: str, since: str | None,
              until: str | None, source: str | None, pid: int | None, limit: int) -> None:
    """Log lines lined up with the connections around them.

    For each log line that matches (`tracer logs add` first), the connections of the same
    process (its pid, as attributed by a live capture) or of an address it mentions (the
    client's own ip:port exactly; the server's ip:port within --window), each with its
    state at that moment, and the server's state then: connections it held open and
    whose, preface latency around the line, clients still waiting for its SETTINGS.
    """
    from store.correlate import DEFAULT_PATTERN, PatternError
    from store.correlate import correlate as build_correlation

    width = parse_duration(window)
    if width is None or width < 0:
        raise click.BadParameter("use 5s, 1m, ...", param_hint="--window")
    db = _open_existing(db_path)
    try:
        data = build_correlation(db, pattern=pattern or DEFAULT_PATTERN, window=width,
                                 since=_instant(since, db_path), until=_instant(until, db_path),
                                 source=source, pid=pid, limit=limit)
    except PatternError as exc:
        raise click.BadParameter(str(exc), param_hint="--pattern") from None
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return
    if fmt != "table":
        headers = ["TS", "SOURCE", "PID", "PROCESS", "MATCH", "SERVER OPEN", "WAITING PREFACE",
                   "CONNECTIONS", "NEAREST", "AT LINE"]
        rows = []
        for line in data["lines"]:
            near = line["connections"][0] if line["connections"] else None
            rows.append([fmt_ts(line["ts"]), line["source"], line["pid"], line["process"],
                         line["match"], line["server"]["open_connections"],
                         line["server"]["waiting_for_server_preface"],
                         line["connections_total"], near["uid"] if near else None,
                         near["at_line"] if near else None])
        click.echo(render(fmt, rows, headers))
        return
    _print_correlation(data)


def _print_correlation(data: dict[str, Any]) -> None:
    if data.get("note"):
        click.echo(data["note"])
        return
    click.echo(
        f"{data['matched']:,} matching log line(s)"
        + (f", {data['matched_untimed']:,} more without a time (not lined up)"
           if data["matched_untimed"] else "")
        + (f"; the first {len(data['lines'])} shown" if len(data["lines"]) < data["matched"]
           else "")
    )
    for line in data["lines"]:
        who = f"pid {line['pid']}" if line["pid"] is not None else "no pid"
        if line["process"]:
            who += f" ({line['process']})"
        click.echo("")
        click.echo(f"{fmt_ts(line['ts'])}  {line['source']}  {who}  "
                   f"{line['level'] or ''}: {line['message']}".replace("  :", "  "))
        s = line["server"]
        if s.get("capture_began_after_s") is not None and (
                not s["in_capture"] or not s["open_connections"]):
            top = ", ".join(f"{c['open']} {c['client']}"
                            for c in s["top_clients_at_capture_start"])
            click.echo(f"  before the capture (it began {s['capture_began_after_s']:.1f}s "
                       f"later): its start found {s['open_at_capture_start']} open"
                       + (f" ({top})" if top else "") + ", opened before it")
            if not s["in_capture"]:
                continue
        elif not s["in_capture"]:
            click.echo("  outside the captured time: no connection state to line up")
            continue
        top = ", ".join(f"{c['open']} {c['client']}" for c in s["top_clients"])
        lat = s["preface_latency_ms"]
        text = f"  server then: {s['open_connections']} open" + (f" ({top})" if top else "")
        if lat["samples"]:
            text += f"; preface latency p50 {lat['p50']} ms, p99 {lat['p99']} ms"
        if s["waiting_for_server_preface"]:
            text += (f"; {s['waiting_for_server_preface']} waiting for its preface, the "
                     f"longest {s['longest_wait_s']:.1f}s")
        click.echo(text)
        if not line["connections"]:
            click.echo("  no connection of this process or address around it")
            continue
        click.echo(f"  connections ({len(line['connections'])} of {line['connections_total']}):")
        for c in line["connections"]:
            click.echo(f"    {c['uid']}  {_host(c['orig_h'])}:{c['orig_p']} -> "
                       f"{_host(c['resp_h'])}:{c['resp_p']}  pid {c['pid'] or '-'}  "
                       f"{'+'.join(c['why'])}: {c['at_line']}")


@main.command()
@_db_option
@click.option("--older-than", metavar="TIME",
              help="Delete closed connections (with their events), anomalies and log lines "
                   "that ended longer ago than this before the end of the data (14d, 12h).")
@click.option("--max-db-size", metavar="SIZE",
              help="Then delete the oldest closed connections until the database is under "
                   "this size (500M, 2G).")
@click.option("--vacuum/--no-vacuum", default=True, show_default=True,
              help="A database made before incremental auto-vacuum keeps its size when rows "
                   "go: rewrite it once (a full VACUUM, which needs as much free space as "
                   "the database) so that it shrinks now and from then on.")
def prune(db_path: str, older_than: str | None, max_db_size: str | None, vacuum: bool) -> None:
    """Keep the database within an age or a size: the oldest closed connections go first.

    Open connections are never deleted: they are what a leak is made of. What the deleted
    connections added to their client's totals (opened, closed and how, RPCs, methods) is
    kept, so `tracer report` still counts them, and it says from when the data is whole.
    The file shrinks. A running `tracer capture --retain/--max-db-size` does the same
    while it runs (the age once a minute, the size every 5 seconds).

    \b
      tracer prune --older-than 14d
      tracer prune --max-db-size 2G
    """
    from store.retention import database_bytes
    from store.retention import prune as prune_database

    older = parse_duration(older_than)
    size = parse_size(max_db_size)
    if older is None and size is None:
        raise click.UsageError("give --older-than, --max-db-size or both")
    if not os.path.lexists(db_path):
        raise click.ClickException(f"no database at {db_path} (pass --db)")
    try:
        db = open_database(db_path)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    before = database_bytes(db)
    out = prune_database(db, older_than_s=older, max_bytes=size, budget_s=float("inf"),
                         vacuum=vacuum)
    if out.connections or out.log_lines:
        from store.stored_report import store_report

        store_report(db)  # readers never write: store the report as it is now
    db.close()
    if out.connections or out.log_lines:
        click.echo(f"pruned {out.connections:,} closed connections and {out.log_lines:,} log "
                   f"lines that ended before {fmt_ts(out.cutoff_ts)}")
    else:
        click.echo("nothing to prune")
    if out.vacuumed:
        click.echo("rewrote the database once (VACUUM) with incremental auto-vacuum: it "
                   "shrinks as rows go from now on")
    click.echo(f"{db_path}: {_megabytes(before)} -> {_megabytes(out.bytes_after)}")
    if out.open_bytes is not None and size is not None:
        click.echo(f"still over {_megabytes(size)}: what is left is open connections "
                   f"({_megabytes(out.open_bytes)}), which are never pruned")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


@main.command()
@click.option("--duration", default="20s", show_default=True, metavar="TIME",
              help="How long to capture the scenario.")
@click.option("--db", "db_path", metavar="FILE",
              help="Keep the demo's database here (default: a temporary one, removed).")
@click.option("--freeze", is_flag=True,
              help="The freeze instead: the leak takes the server's last file descriptor, "
                   "new clients time out waiting for its preface and log it; the report "
                   "explains why (needs live capture; --duration 45s is a good length).")
@click.option("--record-shipped", metavar="FILE", hidden=True,
              help="Maintainers: record the capture the demo falls back on (root, ip netns).")
def demo(duration: str, db_path: str | None, freeze: bool, record_shipped: str | None) -> None:
    """Watch tracer find a leaking gRPC client, live, on this machine.

    Starts a grpcio server and three client processes on loopback: one closes its
    channels, one keeps one pooled channel, one opens a new channel for every call and
    never closes it. Captures them live with process attribution, then prints the report,
    which names the leaking process (pid and command line) and only it. Exits 0 when it
    does. Without capture privileges it says so and analyses a recorded capture of the
    same scenario that ships with tracer.
    """
    from cli import demo as demo_module

    seconds = parse_duration(duration) or 20.0
    if record_shipped:
        sys.exit(demo_module.record_shipped(record_shipped, seconds, click.echo))
    if freeze:
        def run_cli(*args: str) -> None:
            click.echo("$ tracer " + " ".join(args))
            try:
                main.main(list(args), prog_name="tracer", standalone_mode=False)
            except SystemExit as exc:
                if exc.code:
                    raise
        sys.exit(demo_module.freeze(seconds, db_path, click.echo, run_cli))

    def show(path: str) -> None:
        print_report(path, "table")

    code = demo_module.run(seconds, db_path, click.echo, show)
    sys.exit(code)


@main.command()
@_db_option
@click.option("--format", "fmt", type=click.Choice((*FORMATS, "zeek", "zeek-json")),
              default="table", show_default=True,
              help="Output format; zeek is a Zeek conn.log (TSV with its #fields header, "
                   "read by zeek-cut), zeek-json the same as Zeek's JSON logs.")
@click.option("--open", "open_only", is_flag=True, help="Only connections still open.")
@_client_option("Only connections from this client address or process id.")
@click.option("--pid", type=click.IntRange(1), help="Only connections of this process id.")
@click.option("--since", metavar="TIME",
              help="Only connections that existed from this moment (as for `tracer report`).")
@click.option("--until", metavar="TIME", help="Only connections opened up to this moment.")
@click.option("--state", metavar="STATE", type=click.Choice(sorted(CONN_STATES),
                                                            case_sensitive=False),
              help="Only this Zeek conn_state (S1: established and not closed; SF: closed "
                   "normally; RSTO/RSTR: reset by the client/server; all listed above).")
@click.option("--limit", type=click.IntRange(1), metavar="N", help="At most N rows.")
@_wide_option
def connections(db_path: str, fmt: str, open_only: bool, client: str | None, pid: int | None,
                since: str | None, until: str | None, state: str | None,
                limit: int | None, wide: bool) -> None:
    """One row per connection, Zeek-style, with its HTTP/2 columns.

    uid, 4-tuple, start time, duration, conn_state, history, bytes and packets each way,
    missed_bytes; then the preface and server SETTINGS times, streams, first method,
    GOAWAY sender/last-stream-id/error, how it closed, and TLS SNI/ALPN. `--format json`
    gives every stored column; `--format zeek` a conn.log for Zeek's tools:

    \b
      tracer connections --format zeek > conn.log
      zeek-cut -d ts id.orig_h id.orig_p conn_state history < conn.log

    \b
    conn_state (Zeek's):
    """
    if pid is not None:
        if client not in (None, str(pid)):
            raise click.UsageError(f"--client {client} and --pid {pid} ask for different "
                                   "clients")
        client = str(pid)
    db = _open_existing(db_path)
    rows = list_connections(db, open_only=open_only, client=client, state=state, limit=limit,
                            since=_instant(since, db_path), until=_instant(until, db_path))
    if fmt in ("zeek", "zeek-json"):
        from cli.zeek import zeek_json, zeek_tsv

        # A conn.log row is an IP 4-tuple: a connection to a Unix socket has none.
        unix = [r for r in rows if r.get("protocol") == "unix"]
        rows = [r for r in rows if r.get("protocol") != "unix"]
        for line in (zeek_tsv(rows) if fmt == "zeek" else zeek_json(rows)):
            click.echo(line)
        if unix:
            click.echo(f"note: {len(unix):,} connection{'s' if len(unix) != 1 else ''} to a "
                       "Unix socket left out: a Zeek conn.log holds IP connections only "
                       "(--format json lists them)", err=True)
        return
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    headers = ["uid", "ts", "orig", "resp", "duration", "state", "history", "orig_bytes",
               "resp_bytes", "orig_pkts", "resp_pkts", "missed", "preface", "srv_settings",
               "streams", "first_method", "goaway", "closed_by", "tls"]
    out = []
    for r in rows:
        goaway = None
        if r["goaway_sender"]:
            goaway = (f"{'server' if r['goaway_sender'] == 'resp' else 'client'} "
                      f"last={r['goaway_last_stream_id']} {r['goaway_error_name']}")
        tls = None
        if r["tls_sni"] or r["tls_alpn"]:
            tls = f"sni={r['tls_sni'] or '-'} alpn={r['tls_alpn'] or '-'}"
        preface = None if r["preface_ts"] is None else round(r["preface_ts"] - r["ts"], 6)
        settings = None if r["server_settings_ts"] is None else round(
            r["server_settings_ts"] - r["ts"], 6)
        if r.get("protocol") == "unix":
            # No packet exists on a Unix socket: what they would show is said, never 0.
            na = "n/a (unix)"
            out.append([
                r["uid"], fmt_ts(r["ts"]) if fmt == "table" else r["ts"],
                f"client socket {r['orig_p']}", r["resp_h"], r["duration"], r["conn_state"],
                na, na, na, na, na, na, na, na, na, na, na,
                "closed" if r["close_kind"] else "open", None,
            ])
            continue
        out.append([
            r["uid"], fmt_ts(r["ts"]) if fmt == "table" else r["ts"],
            f"{_host(r['orig_h'])}:{r['orig_p']}", f"{_host(r['resp_h'])}:{r['resp_p']}",
            r["duration"], r["conn_state"], r["history"], r["orig_bytes"], r["resp_bytes"],
            r["orig_pkts"], r["resp_pkts"], r["missed_bytes"],
            f"+{preface}s" if preface is not None and fmt == "table" else preface,
            f"+{settings}s" if settings is not None and fmt == "table" else settings,
            r["streams"], r["first_method"], goaway,
            r["close_kind"] or ("open" if r["is_open"] else None), tls,
        ])
    if not out and fmt == "table":
        click.echo("no connections match")
        return
    if fmt != "table":
        click.echo(render(fmt, out, headers))
        return
    width = None if wide else terminal_width()
    text, hidden = fit_table(out, headers, width, CONNECTIONS_DROP_ORDER,
                             squeeze=("first_method",))
    click.echo(text)
    if hidden:
        click.echo(hidden_note(hidden, width))


# The conn_state list under `tracer connections --help`.
assert connections.help is not None
connections.help = inspect.cleandoc(connections.help) + "".join(
    f"\n  {k:<6} {v}" for k, v in CONN_STATES.items())


def _host(h: str) -> str:
    return f"[{h}]" if ":" in h else h


# Last: cli.logs uses this module's helpers.
from cli.logs import logs  # noqa: E402
from cli.reap import reap, reaped_lines  # noqa: E402

main.add_command(logs)
main.add_command(reap)
from cli.merge import merge  # noqa: E402

main.add_command(merge)


if __name__ == "__main__":
    main()
