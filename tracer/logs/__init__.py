"""Application logs as records: lines of text in, parsed or unparsed log lines out (sans-IO).

Nothing here reads a file, the clock or the database. ``LineSplitter`` turns bytes (any
chunking) into bounded text lines; ``LogParser`` detects the format of a file from its
first lines and turns each line into a ``LogRecord`` (a UTC instant, level, pid, process,
message and the ``ip:port`` addresses it mentions) or an ``UnparsedLine`` with a reason.
The I/O edge is tracer/sources/logfile.py, the storage store/logs.py.
"""

from __future__ import annotations

from tracer.logs.lines import MAX_LINE, LineSplitter
from tracer.logs.parser import FORMATS, LogParser
from tracer.logs.records import MAX_MESSAGE, REASONS, LogLine, LogRecord, UnparsedLine
from tracer.logs.timestamps import TimeBase

__all__ = [
    "FORMATS", "MAX_LINE", "MAX_MESSAGE", "REASONS", "LineSplitter", "LogLine", "LogParser",
    "LogRecord", "TimeBase", "UnparsedLine",
]
