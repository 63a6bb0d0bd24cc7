"""One log's lines to records: the format detected from its first lines, then line by line.

Auto-detection reads the first DETECT_LINES non-blank, non-indented lines, parses them
with every format and keeps the one that parses most of them (ties go to the more
specific format, in FORMATS order). Each line is then parsed with that format; a line it
does not recognise is tried with the others that may start with its first character (a
file where two programs write, a JSON line amid text), and one that none recognises is
kept with a reason. A format forced by the caller is the only one tried.

Where detection ends is decided line by line (the sample is full, or so many lines or
characters are held back), never by how the lines were grouped into ``feed`` calls: the
records are the same for any chunking of the input.
"""

from __future__ import annotations

from collections.abc import Sequence

from tracer.logs.addresses import find_addresses
from tracer.logs.formats import NOT_THIS, PARSERS, Fields, Parser, may_start
from tracer.logs.records import (
    CONTINUATION,
    FORMAT_MISMATCH,
    MAX_MESSAGE,
    NO_FORMAT,
    LogLine,
    LogRecord,
    UnparsedLine,
)
from tracer.logs.timestamps import TimeBase

FORMATS = tuple(PARSERS)  # most specific first: the order ties are broken in
DETECT_LINES = 32
# Lines, and characters, held back while detecting; blank lines count, so a file of blank
# lines cannot make it grow.
MAX_PENDING_LINES = 4096
MAX_PENDING_CHARS = 4 << 20
# First characters whose candidate parsers are remembered (any Unicode character may
# start a line: the memo is capped).
_MAX_MEMO = 1024

Candidates = tuple[tuple[str, Parser], ...]
_new_record = tuple.__new__  # LogRecord(...) without its Python-level __new__


class LogParser:
    """Turns the lines of one log, fed in order, into records."""

    def __init__(self, tb: TimeBase, fmt: str = "auto", *, first_line: int = 1) -> None:
        """``fmt``: "auto" or one of FORMATS. ``tb`` says how naive and yearless times
        become instants. ``first_line``: the number of the first line fed (a log read in
        parts: the lines before this part, plus one)."""
        if fmt != "auto" and fmt not in PARSERS:
            raise ValueError(f"unknown log format {fmt!r}: use auto or {', '.join(FORMATS)}")
        self.tb = tb
        self.forced = fmt != "auto"
        self.detected: str | None = fmt if self.forced else None
        # Counters, for the summary.
        self.lines = 0
        self.blank = 0
        self.parsed = 0
        self.unparsed = 0
        self.reasons: dict[str, int] = {}
        self.by_format: dict[str, int] = {}  # parsed lines per format
        self._line_no = first_line - 1
        self._at_start = first_line == 1
        self._detecting = not self.forced
        self._pending: list[str] = []
        self._pending_chars = 0
        self._sample: list[str] = []
        self._order: tuple[str, ...] = (fmt,) if self.forced else FORMATS
        self._memo: dict[str, Candidates] = {}

    def feed(self, lines: Sequence[str]) -> list[LogLine]:
        """The records of these lines (the lines after those fed before), in order. While
        the format is being detected, records come later, from a later call or finish()."""
        if not lines:
            return []
        if self._at_start:
            self._at_start = False
            if lines[0].startswith("\ufeff"):  # a byte order mark
                lines = [lines[0][1:], *lines[1:]]
        self.lines += len(lines)
        if not self._detecting:
            return self._parse(lines)
        pending = self._pending
        sample = self._sample
        for i, line in enumerate(lines):
            pending.append(line)
            self._pending_chars += len(line)
            if line and not line[0].isspace():
                sample.append(line)
            if (len(sample) >= DETECT_LINES or len(pending) >= MAX_PENDING_LINES
                    or self._pending_chars >= MAX_PENDING_CHARS):
                out = self._release()
                if i + 1 < len(lines):
                    out.extend(self._parse(lines[i + 1:]))
                return out
        return []

    @property
    def detecting(self) -> bool:
        """Whether the format is still being detected (records are being held back)."""
        return self._detecting

    def assume(self, detected: str | None) -> None:
        """Take ``detected`` as the detected format instead of detecting it: for the parts
        of a log read in parts after a parser that read its start detected it. Call
        before the first feed."""
        if self.forced or self.lines:
            raise ValueError("assume() is for a fresh auto-detecting parser")
        if detected is not None and detected not in PARSERS:
            raise ValueError(f"unknown log format {detected!r}")
        self._choose(detected)

    def finish(self) -> list[LogLine]:
        """The records still held back (a log shorter than the detection sample)."""
        if not self._detecting:
            return []
        return self._release()

    def _choose(self, fmt: str | None) -> None:
        self._detecting = False
        self.detected = fmt
        if fmt is not None:
            self._order = (fmt, *(name for name in FORMATS if name != fmt))
        self._memo.clear()

    def _release(self) -> list[LogLine]:
        self._choose(detect_format(self._sample, self.tb))
        pending = self._pending
        self._pending = []
        self._sample = []
        self._pending_chars = 0
        return self._parse(pending)

    def _candidates(self, first: str) -> Candidates:
        found = tuple((name, PARSERS[name]) for name in self._order if may_start(name, first))
        if len(self._memo) < _MAX_MEMO:
            self._memo[first] = found
        return found

    def _parse(self, lines: Sequence[str]) -> list[LogLine]:
        out: list[LogLine] = []
        append = out.append
        tb = self.tb
        memo = self._memo
        reasons = self.reasons
        by_format = self.by_format
        primary = self._order[0]
        primary_parsed = parsed = blank = 0
        n = self._line_no
        for line in lines:
            n += 1
            if not line or line.isspace():
                blank += 1
                continue
            first = line[0]
            candidates = memo.get(first)
            if candidates is None:
                candidates = self._candidates(first)
            r: Fields | str = NOT_THIS
            name = ""
            for name, parse in candidates:  # noqa: B007 - the name is used after the loop
                r = parse(line, tb)
                if r is not NOT_THIS:
                    break
            if isinstance(r, str):
                if r is NOT_THIS:
                    if first.isspace():
                        r = CONTINUATION
                    else:
                        r = FORMAT_MISMATCH if self.forced else NO_FORMAT
                reasons[r] = reasons.get(r, 0) + 1
                append(UnparsedLine(n, r, line[:MAX_MESSAGE], find_addresses(line)))
                continue
            parsed += 1
            if name == primary:
                primary_parsed += 1
            else:
                by_format[name] = by_format.get(name, 0) + 1
            if len(r[4]) > MAX_MESSAGE:
                r = (*r[:4], r[4][:MAX_MESSAGE])
            append(_new_record(LogRecord, (n, *r, find_addresses(line))))
        self._line_no = n
        if primary_parsed:
            by_format[primary] = by_format.get(primary, 0) + primary_parsed
        self.parsed += parsed
        self.blank += blank
        self.unparsed += len(out) - parsed
        return out


def detect_format(sample: Sequence[str], tb: TimeBase) -> str | None:
    """The format that parses most of these lines (None when none parses any)."""
    best: str | None = None
    best_score = 0
    for name, parse in PARSERS.items():
        score = 0
        for line in sample:
            if not isinstance(parse(line, tb), str):
                score += 1
        if score > best_score:
            best, best_score = name, score
    return best
