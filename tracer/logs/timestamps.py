"""Log times to epoch seconds UTC: ISO 8601 / RFC 3339, yearless (klog, syslog), epoch numbers.

Naive times (no offset written) are wall-clock times in the ``TimeBase``'s zone; a wall
time that happens twice when the clocks go back is taken as the first one (``fold=0``),
one that never happens (clocks going forward) with the offset in force before the change.

Yearless times (klog's ``mmdd``, syslog's ``Aug 18``) take the ``TimeBase``'s year when it
has one. Otherwise the year is inferred from a reference instant (the log file's
modification time: its last line was written then): the latest year that does not put the
day after the reference (with a day of slack for clock and zone differences). A file that
spans New Year then gets December in the old year and January in the new one.
"""

from __future__ import annotations

import datetime
import math
import re

UTC = datetime.timezone.utc

# A yearless date may be this far after the reference instant and still be in its year.
YEAR_SLACK_S = 86400.0

_POW10: tuple[int, ...] = tuple(10 ** i for i in range(10))
_DAYS_IN_MONTH = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
MONTHS = {name: i + 1 for i, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"))}

# Epoch numbers in JSON and text: the unit follows from the magnitude. Anything below
# MIN_EPOCH_S (March 1973) is an uptime or a duration, not a wall-clock time.
MIN_EPOCH_S = 1e8
_EPOCH_UNITS = ((1e11, 1.0), (1e14, 1e-3), (1e17, 1e-6), (1e20, 1e-9))

# Date, hour and minute (one group: the cache key), second, optional fraction (. or ,),
# optional offset: Z, +hh:mm, +hhmm, +hh, or " +hhmm" after a space (Go's time.String,
# some strftime formats). Slashes in dates are Go's log package (2023/08/18 10:00:00).
ISO_PATTERN = (
    r"(\d{4}[-/]\d\d[-/]\d\d[T ]\d\d:\d\d):(\d\d)(?:[.,](\d+))?"
    r"(?:([Zz]|[+-]\d\d(?::?\d\d)?)| ([+-]\d{4}))?(?!\d)"
)
ISO_GROUPS = 5
_ISO = re.compile(ISO_PATTERN, re.ASCII)
# Entries of each per-minute cache before it starts over: a log spans few minutes per MB.
_CACHE_ENTRIES = 4096
_INVALID = float("nan")  # a cached minute that is not a valid time
_NUMBER = re.compile(r"\d+(?:\.\d+)?", re.ASCII)


def is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def valid_date(year: int, month: int, day: int) -> bool:
    if not 1 <= year <= 9999 or not 1 <= month <= 12 or day < 1:
        return False
    if month == 2 and day == 29:
        return is_leap(year)
    return day <= _DAYS_IN_MONTH[month]


def civil_seconds(year: int, month: int, day: int, hour: int, minute: int, second: int) -> int:
    """Seconds from 1970-01-01T00:00 to this wall time, both read as UTC (H. Hinnant's
    days_from_civil: no datetime object on the per-line path)."""
    y = year - 1 if month <= 2 else year
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return days * 86400 + hour * 3600 + minute * 60 + second


def epoch_from_number(value: float) -> float | None:
    """Epoch seconds, milliseconds, microseconds or nanoseconds, told apart by magnitude."""
    if math.isnan(value) or value < MIN_EPOCH_S:  # too small to be a wall-clock time
        return None
    for limit, scale in _EPOCH_UNITS:
        if value < limit:
            return value * scale if scale != 1.0 else float(value)
    return None


def fraction(digits: str | None) -> float:
    """".123" as 0.123; beyond nanoseconds is noise."""
    if not digits:
        return 0.0
    digits = digits[:9]
    return int(digits) / _POW10[len(digits)]


def offset_seconds(zone: str) -> int | None:
    """"Z", "+05:30", "+0530", "+05" -> seconds east of UTC; None when out of range."""
    if zone in ("Z", "z"):
        return 0
    digits = zone[1:].replace(":", "")
    hours = int(digits[:2])
    minutes = int(digits[2:4]) if len(digits) > 2 else 0
    if hours > 23 or minutes > 59:
        return None
    total = hours * 3600 + minutes * 60
    return -total if zone[0] == "-" else total


class TimeBase:
    """How the times written in one log become instants: its zone and its year."""

    def __init__(self, tz: datetime.tzinfo = UTC, *, year: int | None = None,
                 reference: float | None = None) -> None:
        """``tz``: the zone of times written without an offset. ``year``: the year of
        yearless times; without it they are placed by ``reference`` (epoch seconds, the
        moment the log was last written), one of the two is needed."""
        if year is None and reference is None:
            raise ValueError("yearless times need a year or a reference instant")
        self.tz = tz
        self.year = year
        self.reference = reference
        fixed = tz.utcoffset(None) if isinstance(tz, datetime.timezone) else None
        self._fixed: int | None = int(fixed.total_seconds()) if fixed is not None else None
        self._offsets: dict[int, int] = {}  # local minute (civil seconds // 60) -> offset
        self._years: dict[tuple[int, int], int] = {}
        self._klog_minutes: dict[str, float] = {}
        self._iso_minutes: dict[tuple[str, str | None], float] = {}
        self._reference_year = 1970
        if year is None and reference is not None:
            try:
                self._reference_year = datetime.datetime.fromtimestamp(reference, tz).year
            except (OverflowError, OSError, ValueError):
                self._reference_year = 1970

    def local(self, year: int, month: int, day: int, hour: int, minute: int, second: int,
              frac: float = 0.0) -> float | None:
        """A wall time in this log's zone; None when it is not a valid time."""
        if (not valid_date(year, month, day) or hour > 23 or minute > 59
                or second > 60):
            return None
        base = civil_seconds(year, month, day, hour, minute, second)
        if self._fixed is not None:
            return base - self._fixed + frac
        key = base // 60
        offset = self._offsets.get(key)
        if offset is None:
            if len(self._offsets) >= 4096:
                self._offsets.clear()
            delta = datetime.datetime(year, month, day, hour, minute,
                                      tzinfo=self.tz).utcoffset()
            offset = int(delta.total_seconds()) if delta is not None else 0
            self._offsets[key] = offset
        return base - offset + frac

    def with_offset(self, year: int, month: int, day: int, hour: int, minute: int,
                    second: int, frac: float, offset: int) -> float | None:
        """A wall time written with its UTC offset (seconds east)."""
        if (not valid_date(year, month, day) or hour > 23 or minute > 59
                or second > 60):
            return None
        return civil_seconds(year, month, day, hour, minute, second) - offset + frac

    def yearless(self, month: int, day: int, hour: int, minute: int, second: int,
                 frac: float = 0.0) -> float | None:
        year = self.year if self.year is not None else self._year_for(month, day)
        return self.local(year, month, day, hour, minute, second, frac)

    def _year_for(self, month: int, day: int) -> int:
        key = (month, day)
        year = self._years.get(key)
        if year is not None:
            return year
        ref = self.reference
        assert ref is not None
        year = self._reference_year
        # Back from next year (a reference just before midnight on New Year's Eve) until
        # the day starts before the reference; up to 8 years back finds the last 29 Feb.
        for candidate in range(self._reference_year + 1, self._reference_year - 8, -1):
            if not valid_date(candidate, month, day):
                continue
            start = self.local(candidate, month, day, 0, 0, 0)
            if start is not None and start <= ref + YEAR_SLACK_S:
                year = candidate
                break
        if len(self._years) >= 1024:
            self._years.clear()
        self._years[key] = year
        return year

    def klog(self, key: str, second: str, frac: str | None) -> float | None:
        """A klog/glog time: ``key`` is its "mmdd hh:mm" (cached: many lines share a
        minute), ``second`` two digits, ``frac`` the digits after the point."""
        base = self._klog_minutes.get(key)
        if base is None:
            if len(self._klog_minutes) >= _CACHE_ENTRIES:
                self._klog_minutes.clear()
            minute = self.yearless(int(key[:2]), int(key[2:4]), int(key[5:7]),
                                   int(key[8:10]), 0)
            base = _INVALID if minute is None else minute
            self._klog_minutes[key] = base
        sec = int(second)
        if sec > 60 or math.isnan(base):
            return None
        return base + sec + fraction(frac) if frac else base + sec

    def iso(self, minute: str, second: str, frac: str | None, zone: str | None) -> float | None:
        """The instant of ISO_PATTERN's groups: ``minute`` "yyyy-mm-ddThh:mm" (cached per
        zone: many lines share a minute), ``zone`` as written or None (naive)."""
        key = (minute, zone)
        base = self._iso_minutes.get(key)
        if base is None:
            if len(self._iso_minutes) >= _CACHE_ENTRIES:
                self._iso_minutes.clear()
            base = self._iso_minute(minute, zone)
            self._iso_minutes[key] = base
        sec = int(second)
        if sec > 60 or math.isnan(base):
            return None
        return base + sec + fraction(frac) if frac else base + sec

    def _iso_minute(self, minute: str, zone: str | None) -> float:
        y, mo, d = int(minute[:4]), int(minute[5:7]), int(minute[8:10])
        h, mi = int(minute[11:13]), int(minute[14:16])
        if zone is None:
            ts = self.local(y, mo, d, h, mi, 0)
        else:
            offset = offset_seconds(zone)
            ts = None if offset is None else self.with_offset(y, mo, d, h, mi, 0, 0.0, offset)
        return _INVALID if ts is None else ts

    def iso_groups(self, g: tuple[str | None, ...]) -> float | None:
        """The instant of ISO_PATTERN's ISO_GROUPS groups, as a match gives them."""
        minute, second, frac, zone, spaced = g
        assert minute is not None and second is not None
        return self.iso(minute, second, frac, zone or spaced)

    def match_iso(self, text: str, pos: int = 0) -> tuple[float | None, int]:
        """An ISO 8601 time at ``text[pos:]``: (instant or None when invalid, end), or
        (None, -1) when there is none."""
        m = _ISO.match(text, pos)
        if m is None:
            return None, -1
        minute, second, frac, zone, spaced = m.groups()
        return self.iso(minute, second, frac, zone or spaced), m.end()

    def text_instant(self, text: str) -> float | None:
        """A time written as text on its own (a JSON or logfmt value): ISO 8601, or an
        epoch number in seconds, milliseconds, microseconds or nanoseconds."""
        if _NUMBER.fullmatch(text):
            return epoch_from_number(float(text))
        m = _ISO.match(text)
        if m is None:
            text = text.strip()
            if _NUMBER.fullmatch(text):
                return epoch_from_number(float(text))
            m = _ISO.match(text)
            if m is None:
                return None
        minute, second, frac, zone, spaced = m.groups()
        zone = zone or spaced
        end = m.end()
        if end != len(text):
            # A zone name after the time: after a numeric offset it repeats it ("+0000
            # UTC", Go's time.String); alone, only UTC and GMT say which zone it is.
            rest = text[end:]
            if not (rest[0] == " " and rest[1:].isalpha() and len(rest) <= 7):
                return None
            if zone is None:
                if rest[1:] not in ("UTC", "GMT", "Z"):
                    return None
                zone = "Z"
        return self.iso(minute, second, frac, zone)
