"""`tracer capture --metrics/--metrics-file/--metrics-top`: the options and their checks
(the exporter itself is tracer.agent.metrics)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from tracer.agent.metrics import DEFAULT_TOP, MetricsSettings, parse_address


def metrics_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The three options, given to the command as ``metrics``, ``metrics_file`` and
    ``metrics_top``."""
    f = click.option(
        "--metrics-top", type=click.IntRange(1, 1000), default=DEFAULT_TOP, show_default=True,
        metavar="N",
        help="Live: per-client series for the N clients with the most open connections; "
             "the others are summed into one series labelled other (bounded labels).")(f)
    f = click.option(
        "--metrics-file", metavar="PATH",
        help="Live: write the same metrics in node_exporter's textfile format to PATH "
             "(say /var/lib/node_exporter/textfile/tracer.prom) every 5 s and at exit: a "
             "new file beside it, synced, renamed over PATH. A PATH that is a symbolic "
             "link is refused.")(f)
    return click.option(
        "--metrics", metavar="HOST:PORT",
        help="Live: serve Prometheus metrics at http://HOST:PORT/metrics while capturing "
             "(127.0.0.1:9464; :9464 for every address): open, idle and oldest "
             "connections, opens, closes (by who closed) and RPCs per client process; "
             "preface timeouts, GOAWAYs, accept queue and descriptors of the server; "
             "packets, kernel drops, rows, database size and memory of the agent. A port "
             "in use stops the capture before it starts (exit 4).")(f)


def metrics_settings(reads: tuple[str, ...], metrics: str | None, metrics_file: str | None,
                     metrics_top: int) -> MetricsSettings | None:
    """The settings, or None without --metrics or --metrics-file. Metrics are of a live
    agent: with --read they are refused (a file read ends before anyone would scrape)."""
    if reads and (metrics or metrics_file):
        raise click.UsageError("--metrics and --metrics-file are for live capture (a running "
                               "agent), not with --read: run `tracer report` on the "
                               "database instead")
    if not metrics and not metrics_file:
        return None
    address = None
    if metrics:
        try:
            address = parse_address(metrics)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics") from None
    return MetricsSettings(address=address, file=metrics_file, top=metrics_top)
