"""The records the log parser emits: one per non-blank line, parsed or kept with a reason.

They are named tuples, not the frozen dataclasses the packet events are: a log file gives
a million of them, and building a named tuple costs a third of a frozen dataclass with
slots (whose ``__init__`` goes through ``object.__setattr__`` for every field). They are
as immutable, and typed the same.
"""

from __future__ import annotations

from typing import NamedTuple

# A message (or the raw text of an unparsed line) is stored cut to this many characters;
# the addresses are still taken from the whole line.
MAX_MESSAGE = 2048

Address = tuple[str, int]  # (ip, port); IPv6 in inet_ntop form, IPv4-mapped as IPv4

# Why a line is kept unparsed. Stable codes: they are stored.
NO_FORMAT = "no_format"  # matches none of the known formats
FORMAT_MISMATCH = "format_mismatch"  # does not match the format forced with --format
CONTINUATION = "continuation"  # indented, no time of its own: part of a multi-line message
NO_TIMESTAMP = "no_timestamp"  # the format is recognised but the line carries no time
BAD_TIMESTAMP = "bad_timestamp"  # a time that is not one (month 13, Feb 30, epoch 42)
BAD_JSON = "bad_json"  # starts like a JSON object but is not one
REASONS = (NO_FORMAT, FORMAT_MISMATCH, CONTINUATION, NO_TIMESTAMP, BAD_TIMESTAMP, BAD_JSON)


class LogRecord(NamedTuple):
    """A parsed line. ``ts`` is epoch seconds, UTC; ``level`` is debug, info, warn, error or
    fatal where recognisable, else the line's own word, lower case."""

    line_no: int  # 1-based, counting every line of the input (blank ones included)
    ts: float
    level: str | None
    pid: int | None
    process: str | None
    message: str
    addresses: tuple[Address, ...] = ()


class UnparsedLine(NamedTuple):
    """A line kept as it was (cut to MAX_MESSAGE characters), with the reason."""

    line_no: int
    reason: str
    raw: str
    addresses: tuple[Address, ...] = ()


LogLine = LogRecord | UnparsedLine
