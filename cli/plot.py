"""Drawing the open-connections timeline (matplotlib, loaded only when a plot is asked for)."""

from __future__ import annotations

import datetime
import html
import io
from typing import Any

MAX_LINES = 8


LEGEND_CHARS = 60  # a legend entry's most characters: the plot keeps its width


def _legend(client: dict[str, Any]) -> str:
    """A line's name: its pid and what tells the process apart (its command line with each
    path cut to its last part), else its address."""
    from cli.output import process_label, shorten

    name = process_label(client["process"])
    return shorten(f"{client['label']} {name}" if name else client["label"], LEGEND_CHARS)


def plot_timeline(data: dict[str, Any], path: str, title: str) -> None:
    """PNG or SVG by the file's extension; HTML is the SVG in a page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    times: Any = [datetime.datetime.fromtimestamp(t, datetime.timezone.utc) for t in data["times"]]
    clients = [(_legend(c), c["open"]) for c in data["clients"]]
    shown, rest = clients[:MAX_LINES], clients[MAX_LINES:]
    markers = data["markers"]
    p50 = markers.get("preface_p50_ms") or []
    has_latency = any(v is not None for v in p50)
    server: dict[str, Any] = data.get("server") or {}
    has_server = any(v is not None for v in
                     [*server.get("fds", []), *server.get("accept_queue", [])])
    ratios = [3] + [1] * (has_latency + has_server)
    fig, axes = plt.subplots(len(ratios), 1, figsize=(11, 5.5 + 1.6 * (len(ratios) - 1)),
                             dpi=110, sharex=True, gridspec_kw={"height_ratios": ratios},
                             squeeze=False)
    ax = axes[0][0]
    for who, values in shown:
        ax.plot(times, values, drawstyle="steps-post",
                linewidth=2 if values and max(values) > 2 else 1.2,
                label=f"{who} (max {max(values, default=0)})")
    if rest:
        others = [sum(v[i] for _, v in rest) for i in range(len(times))]
        ax.plot(times, others, color="grey", linestyle="--",
                label=f"{len(rest)} other clients (sum)")
    # Markers cover the bucket they happened in (each value is at its bucket's end).
    width = datetime.timedelta(seconds=data["bucket_s"])
    for i, t in enumerate(times):
        if markers["preface_timeouts"][i]:
            ax.axvspan(t - width, t, color="red", alpha=0.2, linewidth=0)
        if markers["goaways_server"][i]:
            ax.axvline(t - width / 2, color="orange", alpha=0.7, linestyle=":")
    if any(markers["preface_timeouts"]):
        ax.fill_between([], [], color="red", alpha=0.2, label="preface timeouts")
    if any(markers["goaways_server"]):
        ax.plot([], [], color="orange", linestyle=":", label="server GOAWAY")
    ax.set_title(title)
    ax.set_ylabel("open connections")
    ax.grid(True, alpha=0.3)
    bottom = ax
    if has_latency:
        lat_ax = axes[1][0]
        p99 = markers["preface_p99_ms"]
        lat_ax.plot(times, [v if v is not None else float("nan") for v in p50],
                    drawstyle="steps-post", color="tab:blue", label="p50")
        lat_ax.plot(times, [v if v is not None else float("nan") for v in p99],
                    drawstyle="steps-post", color="tab:red", linestyle="--", label="p99")
        lat_ax.set_ylabel("preface latency (ms)")
        lat_ax.grid(True, alpha=0.3)
        lat_ax.legend(loc="upper left", fontsize=8)
        bottom = lat_ax
    if has_server:
        bottom = axes[-1][0]
        _server_panel(bottom, times, server)
    bottom.set_xlabel("time (UTC)")
    bottom.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]
    fig.autofmt_xdate()
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    if path.endswith(".html"):
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        with open(path, "w") as f:
            f.write(f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<body style='font-family:sans-serif'><h2>{html.escape(title)}</h2>"
                    f"{buf.getvalue()}</body>\n")
    else:
        fig.savefig(path)
    plt.close(fig)


def _nan(values: list[int | None]) -> list[float]:
    return [float(v) if v is not None else float("nan") for v in values]


def _server_panel(ax: Any, times: Any, server: dict[str, Any]) -> None:
    """The server process's descriptors against its limit, and its accept queue (right
    axis; its maximum, the listen backlog, in the legend: often thousands)."""
    limits = [v for v in server["fd_limit"] if v is not None]
    if limits:
        ax.plot(times, _nan(server["fd_limit"]), drawstyle="steps-post", color="black",
                linestyle="--", alpha=0.6, label=f"RLIMIT_NOFILE ({max(limits)})")
    ax.plot(times, _nan(server["fds"]), drawstyle="steps-post", color="tab:purple",
            label=f"server pid {server['pid']}: file descriptors")
    top = max([*limits, *(v for v in server["fds"] if v is not None)], default=1)
    ax.set_ylim(0, top * 1.1)  # from 0: at the limit is then plain to see
    ax.set_ylabel("descriptors")
    ax.grid(True, alpha=0.3)
    queue_ax = ax.twinx()
    backlogs = [v for v in server["accept_queue_max"] if v is not None]
    backlog = f", backlog {max(backlogs)}" if backlogs else ""
    queue_ax.plot(times, _nan(server["accept_queue"]), drawstyle="steps-post",
                  color="tab:red", label=f"accept queue{backlog}")
    queue_ax.set_ylabel("accept queue")
    queue_ax.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = queue_ax.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
