"""One parser function per log format: a line of text in, its fields or a reason out.

Each parser returns ``(ts, level, pid, process, message)`` when the line is of its format
and carries a valid time; a reason code (tracer/logs/records.py) when it is of its format
but cannot be used; ``NOT_THIS`` when the line is not of its format at all (the caller may
then try another). They never raise on any text. ``may_start`` says, from a line's first
character alone, which parsers could possibly recognise it, so a line is only offered to
those (a log where several programs write different formats costs no more than one).

- json: one object per line. zap, logrus JSON, slog, pino, bunyan, ECS, Docker's
  json-file driver, and journald's export (``journalctl -o json``).
- klog: glog/klog ``Lmmdd hh:mm:ss.uuuuuu id file:line] msg`` (grpc-go through klog or
  glog, Kubernetes components, grpc C-core as used by grpcio, abseil).
- syslog: RFC 3164 (``Aug 18 10:00:00 host tag[pid]: msg``, with or without ``<PRI>``),
  the same with an RFC 3339 time (rsyslog's file format), and RFC 5424.
- logfmt: ``key=value`` pairs (logrus's text format, go-kit, slog's text handler).
- plain: a leading ISO 8601 or epoch time, then anything (Python logging, Go's log
  package as grpc-go's default logger, grpc-js traces, Kubernetes CRI container logs,
  console lines), or logrus's terminal format ``INFO[2023-08-18T10:00:00Z] msg``.

Every pattern is ASCII-only (``re.ASCII``): a digit in a time or a pid is 0-9, never
another script's digit that ``int`` would accept and a person would not write.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from tracer.logs.records import BAD_JSON, BAD_TIMESTAMP, NO_TIMESTAMP
from tracer.logs.timestamps import (
    ISO_GROUPS,
    ISO_PATTERN,
    MIN_EPOCH_S,
    MONTHS,
    TimeBase,
    epoch_from_number,
    fraction,
)

# (ts, level, pid, process, message)
Fields = tuple[float, str | None, int | None, str | None, str]
NOT_THIS = ""  # the line is not of this parser's format
Parser = Callable[[str, TimeBase], Fields | str]

MAX_PROCESS = 256
MAX_PID = (1 << 31) - 1
_A = re.ASCII

# -- levels ------------------------------------------------------------------------------

DEBUG, INFO, WARN, ERROR, FATAL = "debug", "info", "warn", "error", "fatal"
LEVELS = (DEBUG, INFO, WARN, ERROR, FATAL)
_LEVEL_WORDS = {
    DEBUG: ("debug", "dbg", "trace", "trc", "verbose", "fine", "finer", "finest", "d", "t",
            "debu", "trac", "v"),
    INFO: ("info", "information", "informational", "notice", "inf", "i", "n", "config"),
    WARN: ("warn", "warning", "wrn", "w"),
    ERROR: ("error", "err", "e", "erro", "eror", "severe"),
    FATAL: ("fatal", "critical", "crit", "panic", "dpanic", "emerg", "emergency", "alert",
            "f", "c", "fata", "pani"),
}
_LEVEL_OF = {word: level for level, words in _LEVEL_WORDS.items() for word in words}
# The words as they are usually written, looked up before any case folding.
_LEVEL_OF.update({word.upper(): level for word, level in list(_LEVEL_OF.items())})
# syslog severities 0..7 (RFC 5424 6.2.1), as journald's PRIORITY too.
SYSLOG_LEVELS = (FATAL, FATAL, FATAL, ERROR, WARN, INFO, INFO, DEBUG)
_KLOG_LEVELS = {"I": INFO, "W": WARN, "E": ERROR, "F": FATAL, "D": DEBUG}


def normal_level(word: str) -> str | None:
    """debug, info, warn, error or fatal; an unknown word as it is (lower case, cut)."""
    level = _LEVEL_OF.get(word)
    if level is not None:
        return level
    w = word.strip().lower()
    if not w:
        return None
    return _LEVEL_OF.get(w) or w[:16]


def numeric_level(value: int) -> str | None:
    """pino and bunyan levels (10 trace .. 60 fatal), or a syslog severity (0..7)."""
    if 0 <= value <= 7:
        return SYSLOG_LEVELS[value]
    if 10 <= value <= 60:
        return (DEBUG, DEBUG, INFO, WARN, ERROR, FATAL)[value // 10 - 1]
    return None


# A level written inside a message: a klog/glog prefix, an upper-case word near the start
# (Python logging, Go's log), a bracketed one, or a logfmt/JSON level field.
_SNIFF = re.compile(
    r"(?:^|[\s\[(|:,-])(TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|ERR|CRITICAL|CRIT|FATAL"
    r"|PANIC|SEVERE)(?!\w)"
    r"|\[(trace|debug|info|notice|warn|warning|error|critical|fatal|panic)\]"
    r"|\"?\b(?:level|lvl|severity)\"?\s*[=:]\s*\"?([A-Za-z]+)", _A,
)
_KLOG_PREFIX = re.compile(r"([IWEFD])\d{4} \d\d:\d\d:\d\d", _A)
SNIFF_CHARS = 80


def sniff_level(text: str) -> str | None:
    """The level a message writes about itself near its start, if any."""
    if _KLOG_PREFIX.match(text):
        return _KLOG_LEVELS[text[0]]
    m = _SNIFF.search(text, 0, SNIFF_CHARS)
    if m is None:
        return None
    return normal_level(m.group(1) or m.group(2) or m.group(3))


def _pid(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value <= MAX_PID else None
    # isascii: "²".isdigit() is true and int("²") raises.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        pid = int(value)
        return pid if 0 < pid <= MAX_PID else None
    return None


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value[:MAX_PROCESS] if value else None
    return None


# -- json ----------------------------------------------------------------------------------

_TS_KEYS = ("ts", "time", "timestamp", "@timestamp", "t", "date", "datetime", "asctime")
_LEVEL_KEYS = ("level", "lvl", "severity", "levelname", "log.level", "loglevel", "@level")
_MSG_KEYS = ("msg", "message", "log", "@message", "text")
_PID_KEYS = ("pid", "process_id", "process.pid")
_PROCESS_KEYS = ("process", "proc", "comm", "program", "app", "application", "service",
                 "process.name", "service.name")
# journald: services writing to stdout get this PRIORITY (SyslogLevel=info) for every
# line, so then the level the message writes itself is the better one.
_JOURNAL_DEFAULT_PRIORITY = "6"
_MISSING = object()
_loads = json.JSONDecoder().decode


def _json_time(value: object, tb: TimeBase) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return epoch_from_number(float(value))
        except OverflowError:  # an integer of hundreds of digits
            return None
    if isinstance(value, str):
        return tb.text_instant(value)
    return None


def _as_text(value: object, fallback: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (ValueError, RecursionError):
        return fallback


def parse_json(line: str, tb: TimeBase) -> Fields | str:
    if not line.startswith("{"):
        return NOT_THIS
    try:
        obj = _loads(line)
    except (ValueError, RecursionError):
        return BAD_JSON
    if not isinstance(obj, dict):
        return BAD_JSON
    if "__REALTIME_TIMESTAMP" in obj or "MESSAGE" in obj:
        return _journal_entry(obj)
    for key in _TS_KEYS:
        value = obj.get(key, _MISSING)
        if value is not _MISSING:
            ts = _json_time(value, tb)
            if ts is None:
                return BAD_TIMESTAMP
            break
    else:
        return NO_TIMESTAMP
    level = None
    for key in _LEVEL_KEYS:
        value = obj.get(key)
        if value is not None:
            if isinstance(value, str):
                level = normal_level(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                level = numeric_level(value)
            break
    message = line
    for key in _MSG_KEYS:
        value = obj.get(key)
        if value is not None:
            # Docker's json-file driver keeps the line's own newline.
            message = _as_text(value, line).rstrip("\n")
            break
    if level is None:
        level = sniff_level(message)
    pid = None
    for key in _PID_KEYS:
        value = obj.get(key)
        if value is not None:
            pid = _pid(value)
            break
    process = None
    for key in _PROCESS_KEYS:
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(value, dict):  # ECS: {"process": {"pid": 1, "name": "x"}}
            pid = pid or _pid(value.get("pid"))
            value = value.get("name")
        process = _text(value)
        if process is not None:
            break
    return (ts, level, pid, process, message)


def _journal_entry(obj: dict[str, Any]) -> Fields | str:
    # The time the message was written where journald knows it, else when it received it.
    raw = obj.get("_SOURCE_REALTIME_TIMESTAMP") or obj.get("__REALTIME_TIMESTAMP")
    if raw is None:
        return NO_TIMESTAMP
    if not isinstance(raw, str) or not (raw.isascii() and raw.isdigit()) or len(raw) > 20:
        return BAD_TIMESTAMP
    ts = int(raw) / 1e6
    if ts < MIN_EPOCH_S:
        return BAD_TIMESTAMP
    message = obj.get("MESSAGE")
    if isinstance(message, list):  # not UTF-8: journalctl writes the bytes as numbers
        message = bytes(b for b in message if isinstance(b, int) and 0 <= b < 256).decode(
            "utf-8", "replace")
    elif not isinstance(message, str):
        message = "" if message is None else _as_text(message, "")
    priority = obj.get("PRIORITY")
    level = None
    if priority is None or priority == _JOURNAL_DEFAULT_PRIORITY:
        level = sniff_level(message)
    if level is None and isinstance(priority, str) and len(priority) == 1 \
            and priority in "01234567":
        level = SYSLOG_LEVELS[int(priority)]
    pid = _pid(obj.get("_PID")) or _pid(obj.get("SYSLOG_PID"))
    process = _text(obj.get("SYSLOG_IDENTIFIER")) or _text(obj.get("_COMM"))
    return (ts, level, pid, process, message)


# -- klog / glog ---------------------------------------------------------------------------

# Lmmdd hh:mm:ss.uuuuuu id file:line] msg. The id: Go's glog and klog write the process id
# there (os.Getpid(), "TODO: should be TID" in their source); C++ glog, abseil and grpc's
# C-core write the thread id. So it is a pid only where the source file is Go.
# Abseil before absl::InitializeLog writes "I0000 00:00:1723456789.123456": epoch seconds.
_KLOG = re.compile(
    r"([IWEFD])(\d{4} \d\d:\d\d):(\d+)(?:\.(\d+))? +(\d+) ([^\s:\]]+)(?::\d+)?\]", _A
)


def parse_klog(line: str, tb: TimeBase) -> Fields | str:
    m = _KLOG.match(line)
    if m is None:
        return NOT_THIS
    sev, key, s, frac, ident, source = m.groups()
    if len(s) == 2:
        ts = tb.klog(key, s, frac)
    elif key == "0000 00:00":
        epoch = epoch_from_number(int(s[:12]))
        ts = None if epoch is None else epoch + fraction(frac)
    else:
        return BAD_TIMESTAMP
    if ts is None:
        return BAD_TIMESTAMP
    pid = None
    if source.endswith(".go") and len(ident) <= 10:
        pid = int(ident)
        if not 0 < pid <= MAX_PID:
            pid = None
    # The message keeps the source location (clientconn.go:1234] ...): it says who spoke.
    return (ts, _KLOG_LEVELS[sev], pid, None, line[m.start(6):])


# -- syslog --------------------------------------------------------------------------------

_SYSLOG_3164 = re.compile(
    r"(?:<(\d{1,3})>)?([A-Z][a-z]{2}) ([ \d]?\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))? (\S+) ?",
    _A,
)
# rsyslog's file format: RFC 3339 (a T and an offset, always), host, tag.
_SYSLOG_ISO = re.compile(
    r"(?:<(\d{1,3})>)?(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d))"
    r" (\S{1,255}) ",
    _A,
)
_SYSLOG_5424 = re.compile(r"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) ?", _A)
# A program name starts with a letter (or "(", systemd's "(sd-pam)"): "10.0.0.5:" after
# a time and a word is an address in a plain line, not a tag.
_TAG = re.compile(r"([A-Za-z_(][^\s\[\]:]{0,63})(?:\[(\d{1,10})\])?: ?", _A)


def _severity(pri: str | None) -> str | None:
    if pri is None:
        return None
    value = int(pri)
    return SYSLOG_LEVELS[value & 7] if value <= 191 else None


def parse_syslog(line: str, tb: TimeBase) -> Fields | str:
    if line.startswith("<") and line.startswith(">1 ", line.find(">", 1, 5)):
        return _parse_5424(line, tb)
    m = _SYSLOG_3164.match(line)
    if m is not None:
        pri, mon, d, h, mi, s, frac, host = m.groups()
        month = MONTHS.get(mon)
        if month is None:
            return NOT_THIS
        ts = tb.yearless(month, int(d), int(h), int(mi), int(s), fraction(frac))
        if ts is None:
            return BAD_TIMESTAMP
        # No hostname (some local syslogs): what looked like one is the tag.
        start = m.start(8) if host.endswith(":") else m.end()
        tag = _TAG.match(line, start)
        if tag is None:
            message = line[start:]
            return (ts, _severity(pri) or sniff_level(message), None, None, message)
        message = line[tag.end():]
        return (ts, _severity(pri) or sniff_level(message), _pid(tag.group(2)),
                tag.group(1), message)
    m = _SYSLOG_ISO.match(line)
    if m is None:
        return NOT_THIS
    tag = _TAG.match(line, m.end())
    if tag is None:  # a time then a word: plain text, not syslog
        return NOT_THIS
    ts = tb.text_instant(m.group(2))
    if ts is None:
        return BAD_TIMESTAMP
    message = line[tag.end():]
    return (ts, _severity(m.group(1)) or sniff_level(message), _pid(tag.group(2)),
            tag.group(1), message)


def _parse_5424(line: str, tb: TimeBase) -> Fields | str:
    m = _SYSLOG_5424.match(line)
    if m is None:
        return NOT_THIS
    pri, stamp, _host, app, procid, _msgid = m.groups()
    if stamp == "-":
        return NO_TIMESTAMP
    ts = tb.text_instant(stamp)
    if ts is None:
        return BAD_TIMESTAMP
    pos = m.end()
    if line.startswith("-", pos):
        pos += 1
    else:
        pos = _skip_structured_data(line, pos)
    message = line[pos:].lstrip(" ").removeprefix("\ufeff")
    return (ts, _severity(pri) or sniff_level(message), _pid(procid),
            None if app == "-" else app[:MAX_PROCESS], message)


def _skip_structured_data(line: str, pos: int) -> int:
    """Past RFC 5424 SD-ELEMENTs ([id k="v" ...]...): quoted values may hold \\" and ]."""
    n = len(line)
    while pos < n and line[pos] == "[":
        pos += 1
        quoted = False
        while pos < n:
            ch = line[pos]
            if quoted:
                if ch == "\\":
                    pos += 1
                elif ch == '"':
                    quoted = False
            elif ch == '"':
                quoted = True
            elif ch == "]":
                break
            pos += 1
        pos += 1
    return pos


# -- logfmt --------------------------------------------------------------------------------

_LOGFMT_START = re.compile(r"[\w.@/-]+=", _A)
# The quoted value unrolled ("[^"\\]*(?:\\.[^"\\]*)*"): a run of plain characters is one
# step for the regex engine, where (?:[^"\\]|\\.)* is one alternation per character.
_LOGFMT_PAIR = re.compile(r'([\w.@/-]+)=("[^"\\]*(?:\\.[^"\\]*)*"|[^\s"]*)', _A)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}
_LOGFMT_TS = ("time", "ts", "t", "timestamp", "@timestamp", "date")
_LOGFMT_LEVEL = ("level", "lvl", "severity", "log.level")
_LOGFMT_MSG = ("msg", "message")
_LOGFMT_PROCESS = ("process", "proc", "app", "service", "program", "comm")


def _unquote(value: str) -> str:
    if value.startswith('"'):
        value = value[1:-1]
        if "\\" in value:
            value = _ESCAPE.sub(lambda e: _ESCAPES.get(e.group(1), e.group(1)), value)
    return value


def parse_logfmt(line: str, tb: TimeBase) -> Fields | str:
    if not _LOGFMT_START.match(line):
        return NOT_THIS
    pairs = dict(_LOGFMT_PAIR.findall(line))
    if len(pairs) < 2:
        return NOT_THIS
    for key in _LOGFMT_TS:
        value = pairs.get(key)
        if value is not None:
            ts = tb.text_instant(_unquote(value))
            if ts is None:
                return BAD_TIMESTAMP
            break
    else:
        return NO_TIMESTAMP
    level = None
    for key in _LOGFMT_LEVEL:
        value = pairs.get(key)
        if value is not None:
            level = normal_level(_unquote(value))
            break
    message = line
    for key in _LOGFMT_MSG:
        value = pairs.get(key)
        if value is not None:
            message = _unquote(value)
            break
    value = pairs.get("pid")
    pid = None if value is None else _pid(_unquote(value))
    process = None
    for key in _LOGFMT_PROCESS:
        value = pairs.get(key)
        if value is not None:
            process = _text(_unquote(value))
            break
    return (ts, level, pid, process, message)


# -- plain ---------------------------------------------------------------------------------

# grpc-js traces: "D 2023-08-18T10:00:00.123Z | v1.9.0 4321 | subchannel | text"
# (@grpc/grpc-js src/logging.ts: severity letter, ISO time, version, pid, tracer, text).
_PLAIN_ISO = re.compile(r"(?:([DIWEF]) )?\[?" + ISO_PATTERN + r"\]?[ \t|:,-]*", _A)
_PLAIN_EPOCH = re.compile(r"\[?(\d{10}(?:\.\d{1,9})?|\d{13})\]?[ \t|:,-]+", _A)
_LOGRUS_TTY = re.compile(r"(TRAC|DEBU|INFO|WARN|ERRO|FATA|PANI)\[([^\]]{1,40})\] ?", _A)
_GRPC_JS = re.compile(r"v[\w.+-]{1,32} (\d{1,10}) \| ", _A)
_CRI = re.compile(r"(?:stdout|stderr) [FP] ", _A)
# Python's logging.basicConfig() default, "%(levelname)s:%(name)s:%(message)s": no time.
_PYTHON_BASIC = re.compile(r"(?:DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]*:", _A)


def parse_plain(line: str, tb: TimeBase) -> Fields | str:
    m = _PLAIN_ISO.match(line)
    letter = None
    if m is not None:
        g = m.groups()
        letter = g[0]
        ts = tb.iso_groups(g[1:1 + ISO_GROUPS])
    else:
        m = _PLAIN_EPOCH.match(line)
        if m is not None:
            ts = epoch_from_number(float(m.group(1)))
        else:
            m = _LOGRUS_TTY.match(line)
            if m is None:
                return NO_TIMESTAMP if _PYTHON_BASIC.match(line) else NOT_THIS
            # INFO[0042]: seconds since the program started, not a time.
            stamp = m.group(2)
            if stamp.isdigit():
                return NO_TIMESTAMP
            ts = tb.text_instant(stamp)
            letter = m.group(1)[0]
    if ts is None:
        return BAD_TIMESTAMP
    pos = m.end()
    pid = None
    js = _GRPC_JS.match(line, pos)
    if js is not None:
        pid = _pid(js.group(1))
        pos = js.end()
    else:
        cri = _CRI.match(line, pos)
        if cri is not None:
            pos = cri.end()
    message = line[pos:]
    level = _KLOG_LEVELS[letter] if letter else sniff_level(message)
    return (ts, level, pid, None, message)


PARSERS: dict[str, Parser] = {
    "json": parse_json,
    "klog": parse_klog,
    "syslog": parse_syslog,
    "logfmt": parse_logfmt,
    "plain": parse_plain,
}

_DIGITS = "0123456789"
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The first characters each parser can accept (read off its patterns above); a parser
# offered a line starting otherwise would only say NOT_THIS.
_FIRST_CHARS = {
    "json": "{",
    "klog": "IWEFD",
    "syslog": "<" + _UPPER + _DIGITS,
    "logfmt": _UPPER + _UPPER.lower() + _DIGITS + "_.@/-",
    "plain": "[" + _DIGITS + "DIWEFTPC",
}


def may_start(fmt: str, first: str) -> bool:
    """Whether a line starting with the character ``first`` may be of format ``fmt``."""
    return first in _FIRST_CHARS[fmt]
