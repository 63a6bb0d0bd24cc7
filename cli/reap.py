"""`tracer reap`: list a client's leaked idle connections and, with --yes, close them."""

from __future__ import annotations

import errno
import json
import os
import time
from collections import Counter
from typing import Any

import click

from cli.output import fmt_age, fmt_ts, render
from cli.times import parse_duration
from store.schema import StoreError, open_database

EXIT_REFUSED = 6  # --yes refused: the database's view is stale (see --trust-stale)
EXIT_NOT_CLOSED = 7  # some connections could not be closed (errno said), or none can be


def _errno(_ctx: Any, _param: Any, value: str | None) -> int | None:
    if value is None:
        return None
    code = getattr(errno, value.upper(), None)
    if not isinstance(code, int):
        raise click.BadParameter(f"{value!r} is not an errno name (EOPNOTSUPP, EPERM, ...)")
    return code


@click.command()
@click.option("--db", "db_path", default="tracer.db", show_default=True, metavar="FILE",
              envvar="TRACER_DB", help="The database a live `tracer capture` writes. Env: "
                                       "TRACER_DB.")
@click.option("--client", required=True, metavar="PID|IP",
              help="The leaking client: its process id (where attributed) or its address.")
@click.option("--older-than", default="10m", show_default=True, metavar="TIME",
              help="Only connections opened at least this long ago.")
@click.option("--idle", default="5m", show_default=True, metavar="TIME",
              help="Only connections with no activity (an RPC, any HTTP/2 frame but PING) "
                   "for this long; the live agent must have written within it.")
@click.option("--yes", is_flag=True, help="Close them. Without it the list is printed and "
                                          "nothing is closed.")
@click.option("--trust-stale", is_flag=True,
              help="Close even when no live agent writes the database or its last write is "
                   "older than --idle (RPCs since then are unknown to it; the kernel's "
                   "last-data time of each socket still keeps busy ones open).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
@click.option("--destroy-errno", callback=_errno, hidden=True, metavar="NAME",
              help="Testing: every SOCK_DESTROY answers this errno, the kernel is not asked.")
def reap(db_path: str, client: str, older_than: str, idle: str, yes: bool,
         trust_stale: bool, fmt: str, destroy_errno: int | None) -> None:
    """Close a client's leaked connections (SOCK_DESTROY, what `ss -K` does).

    Lists the connections of --client that are open in the database and in the kernel's
    socket table now, opened more than --older-than ago and idle for --idle (no RPC, no
    HTTP/2 frame but PING); closes them only with --yes. Each is aborted: the server's
    accepted socket (that frees its descriptor) and the client's where it is on this host;
    the peer sees a RST. Never closed: a connection active within --idle, a TLS one (its
    RPCs are encrypted) and one open before the capture (its RPCs were never seen); they
    are listed as excluded. What was closed is recorded in the database; `tracer report`
    shows it. Needs root (CAP_NET_ADMIN) and a live `tracer capture` on the database.

    \b
      tracer reap --client 4321                 # what would be closed
      tracer reap --client 4321 --yes           # close them
      tracer reap --client 10.0.1.7 --older-than 1h --idle 10m --yes

    Exit status: 0 listed or closed; 6 refused (the database's view is stale); 7 some
    could not be closed (the kernel lacks CONFIG_INET_DIAG_DESTROY: the `ss -K` lines are
    printed instead; no CAP_NET_ADMIN; ...).
    """
    from tracer.reap import ReapError, failing_destroy, kernel_destroy
    from tracer.reap import reap as run_reap

    older_s = parse_duration(older_than)
    idle_s = parse_duration(idle)
    assert older_s is not None and idle_s is not None
    if not os.path.lexists(db_path):
        raise click.ClickException(f"no database at {db_path}: run `tracer capture --port "
                                   f"PORT --db {db_path}` first (or pass --db)")
    try:
        db = open_database(db_path, readonly=not yes)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    destroy = failing_destroy(destroy_errno) if destroy_errno is not None else kernel_destroy
    try:
        result = run_reap(db, client, older_than_s=older_s, idle_s=idle_s, close_them=yes,
                          trust_stale=trust_stale, destroy=destroy)
    except ReapError as exc:
        raise click.ClickException(str(exc)) from None
    except PermissionError as exc:
        raise click.ClickException(f"cannot read the kernel's socket table: {exc.strerror}"
                                   ) from None
    finally:
        db.close()
    if fmt == "json":
        click.echo(json.dumps(_json(result), indent=2))
    else:
        _print(result, db_path, yes, trust_stale)
    if yes and result.stale is not None and not trust_stale:
        raise SystemExit(EXIT_REFUSED)
    if any(o.result in ("failed", "unsupported") for o in result.outcomes):
        raise SystemExit(EXIT_NOT_CLOSED)


def _who(result: Any) -> str:
    return f"process {result.client}" if result.client.isdigit() else f"client {result.client}"


def _endpoints(conn: dict[str, Any]) -> tuple[str, str]:
    def host(h: str) -> str:
        return f"[{h}]" if ":" in h else h
    return (f"{host(conn['orig_h'])}:{conn['orig_p']}", f"{host(conn['resp_h'])}:{conn['resp_p']}")


def _sockets(cand: Any) -> str:
    sides = []
    if cand.server is not None:
        sides.append("server")
    if cand.client is not None:
        sides.append("client" if cand.client_pid is None else "client (its netns)")
    return ", ".join(sides)


def _print(result: Any, db_path: str, yes: bool, trust_stale: bool) -> None:
    from tracer.reap import ss_command

    plan = result.plan
    view = result.view
    if result.stale is None:
        ago = time.time() - view["last_write_ts"]
        click.echo(f"agent: capture {view['capture']} (pid {view['pid']}) writes {db_path}; "
                   f"last write {fmt_age(ago)} ago")
    else:
        click.echo(f"warning: {result.stale}: the database may not know the RPCs of the last "
                   f"{fmt_age(plan.idle_s)}")
    n = len(plan.candidates)
    click.echo(f"{_who(result)}: {n} connection{'s' if n != 1 else ''} open, older than "
               f"{fmt_age(plan.older_than_s)} and idle for {fmt_age(plan.idle_s)} or more "
               f"(port {','.join(map(str, result.ports))})")
    outcome = {id(o.candidate): o for o in result.outcomes}
    headers = ["UID", "CLIENT", "SERVER", "PID", "OPENED", "AGE", "IDLE", "RPCS", "SOCKETS"]
    if result.outcomes:
        headers += ["RESULT", "DETAIL"]
    rows = []
    for cand in plan.candidates:
        orig, resp = _endpoints(cand.conn)
        row = [cand.conn["uid"], orig, resp, cand.conn["pid"], fmt_ts(cand.conn["opened_ts"]),
               fmt_age(cand.age_s), fmt_age(cand.idle_s), cand.conn["streams"], _sockets(cand)]
        if result.outcomes:
            o = outcome.get(id(cand))
            row += [o.result if o else "-", (o.error or "") if o else ""]
        rows.append(row)
    if rows:
        click.echo("")
        click.echo(render("table", rows, headers))
    reasons = Counter(e.reason for e in plan.excluded)
    if reasons:
        click.echo("")
        click.echo(f"excluded {len(plan.excluded)} open connection"
                   f"{'s' if len(plan.excluded) != 1 else ''}:")
        for reason, count in reasons.most_common():
            click.echo(f"  {count}: {reason}")
    click.echo("")
    if not yes:
        click.echo(f"dry run: nothing closed; add --yes to close these {n}" if n else
                   "nothing to close")
        return
    if not result.closing:
        click.echo(f"refused: nothing closed. {result.stale}; close anyway with --trust-stale "
                   "(each socket's last data in the kernel still keeps busy ones open), or "
                   "start `tracer capture` on this database and wait --idle")
        return
    counts = Counter(o.result for o in result.outcomes)
    click.echo(f"closed {counts['closed']}, already gone {counts['already_gone']}, failed "
               f"{counts['failed'] + counts['unsupported']}; recorded in {db_path}"
               + (" (--trust-stale)" if result.stale else ""))
    if result.unsupported:
        error = next(o.error for o in result.outcomes if o.result == "unsupported")
        click.echo(f"the kernel refused SOCK_DESTROY ({error}). Close them with ss instead "
                   "(it needs the same kernel support; or restart the client):")
        for o in result.outcomes:
            if o.result == "unsupported":
                for line in ss_command(o.candidate):
                    click.echo(f"  {line}")


def _json(result: Any) -> dict[str, Any]:
    from tracer.reap import ss_command

    outcome = {id(o.candidate): o for o in result.outcomes}

    def cand(c: Any) -> dict[str, Any]:
        o = outcome.get(id(c))
        entry = {"uid": c.conn["uid"], "client": c.conn["orig_h"], "client_port": c.conn["orig_p"],
                 "server": c.conn["resp_h"], "server_port": c.conn["resp_p"],
                 "pid": c.conn["pid"], "opened_ts": c.conn["opened_ts"],
                 "age_s": round(c.age_s, 3), "idle_s": round(c.idle_s, 3),
                 "rpcs": c.conn["streams"], "server_socket": c.server is not None,
                 "client_socket": c.client is not None, "ss_commands": ss_command(c)}
        if o is not None:
            entry.update(result=o.result, error=o.error, destroyed=list(o.sockets))
        return entry

    return {
        "client": result.client, "ports": result.ports, "agent": result.view,
        "stale": result.stale, "older_than_s": result.plan.older_than_s,
        "idle_s": result.plan.idle_s, "closing": result.closing,
        "candidates": [cand(c) for c in result.plan.candidates],
        "excluded": [{"uid": e.conn["uid"], "client_port": e.conn["orig_p"],
                      "reason": e.reason} for e in result.plan.excluded],
        "results": dict(Counter(o.result for o in result.outcomes)),
    }


def reaped_lines(clients: list[dict[str, Any]]) -> list[str]:
    """The report's lines on connections `tracer reap` closed, per client."""
    out = []
    for c in clients:
        r = c.get("reaped")
        if not r:
            continue
        who = f"pid {c['pid']}" if c["pid"] is not None else c["client"]
        when = fmt_ts(r["first_ts"]) if r["first_ts"] == r["last_ts"] else \
            f"{fmt_ts(r['first_ts'])} .. {fmt_ts(r['last_ts'])}"
        out.append(f"  reaped: {who}: {r['reaped']} connection{'s' if r['reaped'] != 1 else ''}"
                   f" closed by `tracer reap` ({', '.join(r['by'])}) at {when}; their close "
                   f"seen for {r['closed_seen']} (counted as left behind in the verdict)")
    return out
