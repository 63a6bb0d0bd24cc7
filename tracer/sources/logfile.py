"""Log bytes at the I/O edge: files (gzip-compressed or not), standard input, the journal.

Everything here reads: files, pipes, the clock (the reference instant of a log without
years), the machine's time zone, journalctl. What it hands on is bytes in chunks of at
most CHUNK, whatever the size of the file or the ratio of its compression, for the
sans-IO parser in tracer/logs to turn into records.
"""

from __future__ import annotations

import calendar
import datetime
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
import zoneinfo
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
# What journalctl is asked for: the fields the parser reads (journalctl adds its own
# __CURSOR, __REALTIME_TIMESTAMP, __MONOTONIC_TIMESTAMP and _BOOT_ID); the rest of an
# entry is about a third of its size and unused.
JOURNAL_FIELDS = ("MESSAGE", "PRIORITY", "_PID", "SYSLOG_PID", "SYSLOG_IDENTIFIER", "_COMM",
                  "_SOURCE_REALTIME_TIMESTAMP")


class LogSourceError(Exception):
    """A log cannot be read (or stopped being readable); the message says why, on one line."""


class _CountingReader(io.RawIOBase):
    """Counts the bytes a decompressor takes from the file: progress in file bytes."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.count += n
        return n


class LogInput:
    """The bytes of one log, as they are read."""

    def __init__(self, stream: IO[bytes], *, name: str, path: str | None, size: int | None,
                 reference: float, process: subprocess.Popen[bytes] | None = None,
                 errors: IO[bytes] | None = None) -> None:
        """``stream``: a buffered binary stream. ``size``: its length in bytes, for
        progress (None for pipes). ``reference``: when the log was last written (epoch
        seconds), which places times written without a year."""
        self.name = name
        self.path = path
        self.size = size
        self.reference = reference
        self.compressed = False
        self._raw = stream
        self._process = process
        self._errors = errors
        self._counter: _CountingReader | None = None
        self._plain_read = 0
        self._digest = hashlib.sha256()
        self._complete = False

    @classmethod
    def open(cls, path: str) -> LogInput:
        """A file, or ``-`` for standard input."""
        if path == "-":
            return cls(sys.stdin.buffer, name="stdin", path=None, size=None,
                       reference=time.time())
        try:
            f = open(path, "rb")  # noqa: SIM115 - the LogInput owns it until close()
            st = os.fstat(f.fileno())
        except OSError as exc:
            raise LogSourceError(f"cannot read {path}: {exc.strerror}") from None
        if not os.path.isfile(path) and not _is_pipe(st.st_mode):
            f.close()
            raise LogSourceError(f"cannot read {path}: not a regular file")
        size = st.st_size if os.path.isfile(path) else None
        return cls(f, name=os.path.basename(path) or path, path=path, size=size,
                   reference=st.st_mtime if size is not None else time.time())

    @classmethod
    def journal(cls, units: Sequence[str] = (), since: str | None = None,
                until: str | None = None) -> LogInput:
        """The systemd journal, through ``journalctl -o json`` (its entries, oldest first)."""
        exe = shutil.which("journalctl")
        if exe is None:
            raise LogSourceError(
                "--journal needs journalctl (systemd), which is not on PATH here; on the "
                "host with the journal run `journalctl -o json > FILE` and add FILE")
        cmd = [exe, "-o", "json", "--no-pager", "--output-fields=" + ",".join(JOURNAL_FIELDS)]
        for unit in units:
            cmd += ["--unit", unit]
        if since:
            cmd += ["--since", since]
        if until:
            cmd += ["--until", until]
        errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors,
                                    stdin=subprocess.DEVNULL)
        except OSError as exc:
            errors.close()
            raise LogSourceError(f"cannot run journalctl: {exc.strerror}") from None
        assert proc.stdout is not None
        name = "journal" + (":" + ",".join(units) if units else "")
        return cls(proc.stdout, name=name, path=None, size=None, reference=time.time(),
                   process=proc, errors=errors)

    def chunks(self) -> Iterator[bytes]:
        """The log's bytes (decompressed), in chunks of at most CHUNK; raises
        LogSourceError when the data turns out damaged (after the chunks before it)."""
        raw = self._raw
        try:
            head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
        except OSError as exc:
            raise LogSourceError(f"cannot read {self.name}: {exc.strerror}") from None
        stream: IO[bytes] = raw
        if head == GZIP_MAGIC:
            self.compressed = True
            self._counter = _CountingReader(raw)
            stream = gzip.GzipFile(fileobj=self._counter, mode="rb")  # type: ignore[assignment]
        digest = self._digest
        while True:
            try:
                data = stream.read1(CHUNK)  # type: ignore[attr-defined]
            except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
                raise LogSourceError(
                    f"{self.name}: the compressed data is damaged after {self.bytes_read():,} "
                    f"bytes ({exc})") from None
            except OSError as exc:
                raise LogSourceError(f"cannot read {self.name}: {exc.strerror}") from None
            if not data:
                break
            self._plain_read += len(data)
            digest.update(data)
            yield data
        self._complete = True

    def splittable(self) -> bool:
        """Whether the log is a regular, uncompressed file (which can be read in parts,
        each from its own offset)."""
        if self.path is None or self.size is None or self._process is not None:
            return False
        try:
            head = self._raw.peek(2)[:2] if hasattr(self._raw, "peek") else GZIP_MAGIC
        except OSError:
            return False
        return head != GZIP_MAGIC

    def bytes_read(self) -> int:
        """How far into the file reading has got (compressed bytes for gzip)."""
        return self._counter.count if self._counter is not None else self._plain_read

    def sha256(self) -> str | None:
        """Digest of the log's (decompressed) bytes; None until it has been read whole."""
        return self._digest.hexdigest() if self._complete else None

    def close(self) -> None:
        """Release the file; for the journal, wait for journalctl and raise LogSourceError
        if it failed (or stop it, when reading ended early)."""
        if self._raw is not sys.stdin.buffer:
            self._raw.close()
        proc = self._process
        if proc is None:
            return
        if proc.poll() is None and not self._complete:
            proc.terminate()
        code = proc.wait()
        said = b""
        if self._errors is not None:
            self._errors.seek(0)
            said = self._errors.read(4096)
            self._errors.close()
        if code != 0 and self._complete:
            first = said.decode("utf-8", "replace").strip().splitlines()
            raise LogSourceError(
                f"journalctl failed (exit status {code})" + (f": {first[0]}" if first else ""))


# -- a file read in parts ---------------------------------------------------------------------


@dataclass(frozen=True)
class FilePart:
    """Bytes [start, end) of a file: whole lines, the first of them numbered first_line."""

    start: int
    end: int
    first_line: int


@dataclass(frozen=True)
class FilePlan:
    """A file cut into parts, and the sha256 of the bytes the parts cover."""

    parts: tuple[FilePart, ...]
    sha256: str
    size: int


def plan_parts(path: str, size: int, count: int) -> FilePlan:
    """Read the first ``size`` bytes of a file once: its sha256, and ``count`` parts of
    about equal size, each starting at a line start, with the number of its first line
    (newlines counted on the way)."""
    targets = [size * k // count for k in range(1, count)]
    cuts: list[tuple[int, int]] = []  # (offset of a part's start, lines before it)
    digest = hashlib.sha256()
    lines = pos = 0
    try:
        with open(path, "rb") as f:
            while pos < size:
                data = f.read(min(CHUNK, size - pos))
                if not data:  # the file shrank since it was opened
                    break
                digest.update(data)
                while targets:
                    nl = data.find(b"\n", max(targets[0] - pos, 0))
                    if nl < 0:
                        break
                    cut = pos + nl + 1
                    cuts.append((cut, lines + data.count(b"\n", 0, nl + 1)))
                    targets = [t for t in targets[1:] if t >= cut]
                lines += data.count(b"\n")
                pos += len(data)
    except OSError as exc:
        raise LogSourceError(f"cannot read {path}: {exc.strerror}") from None
    starts = [(0, 0), *((c, n) for c, n in cuts if c < pos)]
    ends = [c for c, _ in starts[1:]] + [pos]
    parts = tuple(FilePart(start, end, before + 1)
                  for (start, before), end in zip(starts, ends, strict=True))
    return FilePlan(parts, digest.hexdigest(), pos)


def read_range(path: str, start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of a file, in chunks of at most CHUNK."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            pos = start
            while pos < end:
                data = f.read(min(CHUNK, end - pos))
                if not data:
                    return
                pos += len(data)
                yield data
    except OSError as exc:
        raise LogSourceError(f"cannot read {path}: {exc.strerror}") from None


def _is_pipe(mode: int) -> bool:
    import stat

    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


# -- time zones -------------------------------------------------------------------------------


class LocalZone(datetime.tzinfo):
    """The machine's zone as the C library sees it (TZ, else the system's setting),
    daylight saving time included."""

    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        if dt is None:
            return datetime.timedelta(seconds=-time.timezone)
        wall = (dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second, 0, 0, -1)
        try:
            offset = calendar.timegm(wall) - time.mktime(wall)
        except (OverflowError, ValueError):
            offset = -time.timezone
        return datetime.timedelta(seconds=offset)

    def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(0)

    def tzname(self, dt: datetime.datetime | None) -> str:
        return "local"

    def fromutc(self, dt: datetime.datetime) -> datetime.datetime:
        stamp = calendar.timegm(dt.replace(tzinfo=None).timetuple())
        try:
            offset = time.localtime(stamp).tm_gmtoff
        except (OverflowError, OSError, ValueError):
            offset = -time.timezone
        return dt + datetime.timedelta(seconds=offset)


_OFFSET = re.compile(r"(?:UTC|GMT)?([+-])(\d\d):?(\d\d)?", re.ASCII)


def parse_zone(text: str | None) -> tuple[datetime.tzinfo, str]:
    """--tz: the zone of times written without an offset, and the name it is stored
    under. None or "local": this machine's zone; "UTC"; an offset ("+05:30", "-0800");
    an IANA name ("Europe/Paris")."""
    if text is None or text.lower() == "local":
        names = "/".join(dict.fromkeys(time.tzname))
        return LocalZone(), f"local ({names})"
    if text.upper() in ("UTC", "Z", "GMT"):
        return datetime.timezone.utc, "UTC"
    m = _OFFSET.fullmatch(text)
    if m is not None:
        hours, minutes = int(m.group(2)), int(m.group(3) or 0)
        if hours <= 23 and minutes <= 59:
            delta = datetime.timedelta(hours=hours, minutes=minutes)
            sign = m.group(1)
            return (datetime.timezone(-delta if sign == "-" else delta),
                    f"{sign}{hours:02d}:{minutes:02d}")
    try:
        return zoneinfo.ZoneInfo(text), text
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise LogSourceError(
            f"unknown time zone {text!r}: use local, UTC, an offset such as +05:30, or a "
            "zone name such as Europe/Paris") from None
