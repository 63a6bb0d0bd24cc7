"""Rendering rows for people and scripts: aligned tables, CSV, Markdown, JSON."""

from __future__ import annotations

import csv
import datetime
import io
import json
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

FORMATS = ("table", "json", "csv", "markdown")


def fmt_ts(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S.%f"
    )[:-3] + "Z"


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    text = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in text:
        lines.append("  ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip())
    return "\n".join(lines)


def markdown(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    def esc(v: Any) -> str:
        return cell(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    for row in rows:
        w.writerow(["" if v is None else (json.dumps(v) if isinstance(v, dict) else v)
                    for v in row])
    return buf.getvalue().rstrip("\n")


def render(fmt: str, rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    if fmt == "csv":
        return csv_text(rows, headers)
    if fmt == "markdown":
        return markdown(rows, headers)
    return table(rows, headers)


def terminal_width() -> int | None:
    """The width tables must fit when the output is a terminal (COLUMNS, else the
    terminal's own size); None when it goes to a pipe or a file: scripts get every column
    (and readline, loaded by some parent, may export a COLUMNS that means nothing there)."""
    if sys.stdout.isatty():
        return shutil.get_terminal_size((80, 24)).columns
    return None


def shorten(text: str, room: int) -> str:
    """``text`` in at most ``room`` characters, cut at a word boundary, marked with …"""
    if len(text) <= room:
        return text
    cut = text[:max(room - 1, 1)]
    space = cut.rfind(" ")
    if space >= room // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;") + "…"


def fit_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], width: int | None,
              drop_order: Sequence[str], squeeze: Sequence[str] = ()) -> tuple[str, list[str]]:
    """An aligned table within ``width`` columns: the columns of ``drop_order`` left out,
    first ones first, until it fits, then the ``squeeze`` columns (free text) cut at a word
    boundary to what is left. Returns the table and the headers left out."""
    text = [[cell(v) for v in row] for row in rows]
    names = list(headers)
    if width is None:
        return table(text, names), []

    cols = list(range(len(names)))
    w = {i: max([len(names[i])] + [len(r[i]) for r in text]) for i in cols}
    hidden: list[str] = []
    squeezable = [names.index(n) for n in squeeze if n in names]
    least = max(24, width // 3)  # what free text keeps before columns are left out

    def total(squeezed: bool) -> int:
        return sum(min(w[i], max(len(names[i]), least)) if squeezed and i in squeezable
                   else w[i] for i in cols) + 2 * (len(cols) - 1)

    for name in drop_order:
        if total(squeezed=True) <= width:
            break
        if name in names and names.index(name) in cols:
            cols.remove(names.index(name))
            hidden.append(name)
    over = total(squeezed=False) - width
    for i in reversed(squeezable):
        if over <= 0 or i not in cols:
            continue
        room = max(len(names[i]), w[i] - over, 12)
        over -= w[i] - room
        for r in text:
            r[i] = shorten(r[i], room)
    return table([[r[i] for i in cols] for r in text], [names[i] for i in cols]), hidden


def hidden_note(hidden: Sequence[str], width: int | None) -> str:
    """The line under a table that left columns out, wrapped to the terminal."""
    note = (f"(not shown to fit the terminal: {', '.join(hidden)}; --wide shows every "
            "column)")
    return textwrap.fill(note, width=max((width or 80) - 1, 40), break_on_hyphens=False)


def process_label(command_line: str | None) -> str | None:
    """What tells processes apart in a narrow column: the command line with each path cut
    to its last part (`/srv/app/.venv/bin/python -m orders.worker --shard 3` ->
    `python -m orders.worker --shard 3`), arguments kept in order."""
    if not command_line:
        return command_line
    return " ".join(word.rsplit("/", 1)[-1] if "/" in word and not word.endswith("/")
                    else word for word in command_line.split(" "))


class ProgressLine:
    """A file read's progress on a terminal, redrawn in place at most 10 times a second:
    `reading  45.2/176.4 MB  26%  312,104 packets/s  ETA 0:07`, never wider than the
    terminal; then a word on what comes next."""

    def __init__(self, stream: Any, clock: Any = None) -> None:
        self.stream = stream
        self.clock = clock or time.monotonic
        self.started = self.clock()
        self.shown = 0.0
        self.drawn = False

    def _draw(self, text: str) -> None:
        width = shutil.get_terminal_size((80, 24)).columns - 1
        self.stream.write("\r\033[K" + text[:width])
        self.stream.flush()
        self.drawn = True

    def update(self, done: int, total: int | None, packets: int) -> None:
        now = self.clock()
        if now - self.shown < 0.1 and not (total and done >= total):
            return
        self.shown = now
        elapsed = max(now - self.started, 1e-6)
        mb = done / 1e6
        parts = ["reading", f"{mb:,.1f}/{total / 1e6:,.1f} MB" if total else f"{mb:,.1f} MB"]
        if total:
            parts.append(f"{min(done / total, 1.0):4.0%}")
        parts.append(f"{packets / elapsed:,.0f} packets/s")
        if total and done:
            left = max(total - done, 0) * elapsed / done
            parts.append(f"ETA {int(left // 60)}:{int(left % 60):02d}")
        self._draw("  ".join(parts))

    def say(self, text: str) -> None:
        self._draw(text)

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
