"""Time arguments the commands share: durations (30s, 10m) and moments (--since/--until)."""

from __future__ import annotations

import datetime
from collections.abc import Callable

import click

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | None) -> float | None:
    """"90", "90s", "10m", "2h", "1d" -> seconds."""
    if text is None:
        return None
    try:
        if text[-1:] in _UNITS:
            return float(text[:-1]) * _UNITS[text[-1]]
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: use seconds or 30s, 10m, 2h") from None


def instant(text: str | None, end: Callable[[], float | None], *, empty: str,
            option: str | None = None) -> float | None:
    """A moment: ISO 8601 (naive = UTC), epoch seconds, or -DURATION before ``end()`` (the
    end of the stored data; ``empty`` says why there is none)."""
    if text is None:
        return None
    if text.startswith("-"):
        seconds = parse_duration(text[1:])
        last = end()
        if last is None or seconds is None:
            raise click.BadParameter(f"{text!r}: {empty}", param_hint=option)
        return float(last - seconds)
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: use 2026-11-24T10:00:00Z, epoch seconds, or -10m",
            param_hint=option) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | None) -> int | None:
    """"500M", "2G", "1.5GB", "4096" -> bytes (binary units: 1G is 2^30 bytes)."""
    if text is None:
        return None
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise click.BadParameter(f"{text!r}: use bytes or 500M, 2G") from None
    if number <= 0:
        raise click.BadParameter(f"{text!r}: the size must be more than 0")
    return int(number * _SIZE_UNITS[unit])
