"""`tracer merge`: a server host's database joined with its client hosts' databases."""

from __future__ import annotations

import json

import click

from cli.times import parse_duration
from store.merge import DEFAULT_MAX_SKEW_S, MergeResult, merge_databases
from store.schema import StoreError


@click.command()
@click.argument("server_db", metavar="SERVER.db")
@click.argument("client_dbs", metavar="CLIENT.db...", nargs=-1, required=True)
@click.option("--name", "names", multiple=True, metavar="HOST",
              help="The host name of each CLIENT.db, in their order (repeat: one per client "
                   "database; default: the host its agent recorded, else its file name "
                   "without .db).")
@click.option("--max-skew", default=f"{DEFAULT_MAX_SKEW_S:g}s", show_default=True,
              metavar="TIME",
              help="How far apart the two hosts' clocks may be: lifetimes that overlap "
                   "within this match (0.5s, 2s, 1m).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
def merge(server_db: str, client_dbs: tuple[str, ...], names: tuple[str, ...],
          max_skew: str, fmt: str) -> None:
    """Name the server's remote clients by the process their own host's agent saw.

    SERVER.db is a server host's database (a capture on the gRPC port there); each
    CLIENT.db is the database of an agent that ran on a client host (`tracer capture
    --port PORT` there, with the server's port). A connection the server's agent could not
    attribute (its client is another host) is looked up in each client database by its
    4-tuple (the client's address and port, the server's address and port) and a
    lifetime that overlaps within --max-skew (each host has its own clock). Found, its
    process (pid, command line, container) and host are written into SERVER.db, and
    `tracer report`, `tracer timeline` and `tracer connections` name it: the leak verdict
    names the remote process. Where a port was reused (two lifetimes overlap), the one
    opened closest in time is taken, and counted. What does not match stays an address
    and is counted, by reason: behind NAT the server sees the router's address, which no
    client database has a connection from, as for a host whose database is not given.
    Each client host is named by --name, else by the host name its agent recorded (an
    older tracer's database: by its file name).

    The client databases are only read (archived copies will do). Connections attributed
    on the server host are never changed; merging the same database again changes
    nothing. A live capture may be writing SERVER.db meanwhile.

    \b
      tracer merge server.db host-b.db host-c.db
      tracer merge server.db b.db --name host-b --max-skew 5s
    """
    try:
        skew = parse_duration(max_skew)
    except click.BadParameter as exc:
        raise click.BadParameter(exc.message, param_hint="--max-skew") from None
    if skew is None or skew < 0:
        raise click.BadParameter("use 0.5s, 2s, 1m ...", param_hint="--max-skew")
    if len(names) > len(client_dbs):
        raise click.BadParameter(f"{len(names)} names for {len(client_dbs)} client "
                                 "database(s): give one --name per CLIENT.db, in order",
                                 param_hint="--name")
    hosts: list[str | None] = [*names, *([None] * (len(client_dbs) - len(names)))]
    try:
        run = merge_databases(server_db, list(zip(client_dbs, hosts, strict=True)),
                              max_skew_s=skew,
                              wait=lambda line: click.echo(line, err=True))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    if fmt == "json":
        click.echo(json.dumps({"server": server_db, "max_skew_s": skew,
                               "live_writer": run.live_writer,
                               "clients": [r.as_dict() for r in run.results]}, indent=2))
        return
    if run.live_writer:
        click.echo(f"{server_db} is being written by {run.live_writer}: merged beside it in "
                   "short transactions")
    for path, r in zip(client_dbs, run.results, strict=True):
        for line in _lines(path, r):
            click.echo(line)
    if not any(r.changed for r in run.results):
        click.echo("nothing changed: every connection these databases can name was named "
                   "already" if any(r.already for r in run.results) else
                   "nothing changed: no connection matched")
    elif run.report_stored:
        click.echo(f"`tracer report --db {server_db}` names them")


def _lines(path: str, r: MergeResult) -> list[str]:
    shown = 0.0 if r.offset_s is None or abs(r.offset_s) < 0.0005 else r.offset_s  # no -0.000
    offset = (f"; clock offset {r.host} - server {shown:+.3f}s (median)"
              if r.offset_s is not None else "")
    named = "" if r.named_by in ("--name", "recorded") else f", by its {r.named_by}"
    out = [f"{path} ({r.host}{named}): {r.client_connections:,} connections; of the server's "
           f"{r.candidates:,} unattributed, {r.matched:,} matched now "
           f"({r.processes:,} processes{offset})"]
    if r.ambiguous:
        out.append(f"  {r.ambiguous:,} of them had two lifetimes overlapping (port reused): "
                   "the one opened closest in time was taken")
    if r.already:
        out.append(f"  {r.already:,} matched by an earlier merge of {r.source} (unchanged)")
    unmatched = sum(r.unmatched.values())
    if unmatched:
        out.append(f"  unmatched {unmatched:,}, left as addresses:")
        for why, n in sorted(r.unmatched.items(), key=lambda kv: -kv[1]):
            out.append(f"    {n:,} {why}")
        for ip, n, why in r.unmatched_addresses:
            out.append(f"    {ip}: {n:,} ({why.split(' (')[0]})")
    return out
