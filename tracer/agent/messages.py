"""The messages between the agent's processes: what the capture process sends the store
worker, and what the store worker answers.

Plain frozen dataclasses, pickled over a pipe. The capture process owns the analyzer and
sends what it drained; the store worker owns the database and the attribution state and
answers with what it decided. Nothing else crosses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tracer.events import AnomalyFound, ConnectionEvent


@dataclass(frozen=True)
class Totals:
    """The capture's counters so far. A live capture's window is its wall-clock run, not
    the span from its first packet to its last: a quiet port is observed too."""

    packets: int = 0
    segments: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    received: int = 0  # packets the kernel's filter passed
    drops: int | None = None  # packets the kernel dropped
    ring_bytes: int = 0  # the receive ring's size (0: no ring, one recv per packet)
    ring_full: int = 0  # times the ring was full (what arrived then was dropped)
    ring_malformed: int = 0  # ring blocks cut short at a header pointing outside them


# -- capture process -> store worker -----------------------------------------------------


@dataclass(frozen=True)
class Opened:
    """Connections that just appeared: attribution looks for their sockets at once (the
    socket of a short call is gone within milliseconds). Not written yet."""

    records: list[dict[str, Any]]


@dataclass(frozen=True)
class Batch:
    """What changed since the last batch: finished connections, open ones that moved,
    events and anomalies; written in one transaction."""

    records: list[dict[str, Any]]
    events: list[ConnectionEvent]
    anomalies: list[AnomalyFound]
    totals: Totals


@dataclass(frozen=True)
class Finish:
    """The capture ended (``status``: complete, interrupted, failed): close the capture."""

    status: str
    error: str | None
    elapsed_s: float


# -- store worker -> capture process -----------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The database is open and the capture row exists."""

    capture_id: int


@dataclass(frozen=True)
class Failed:
    """The store worker cannot go on (the database cannot be opened or written: a full
    disk, a folder the user cannot write); ``message`` says what and what was kept."""

    message: str
    capture_id: int | None = None


@dataclass(frozen=True)
class Summary:
    """The store worker's account of the finished capture."""

    capture_id: int
    connections: int
    open_at_end: int
    stats: dict[str, int] = field(default_factory=dict)
    pruned: int = 0  # connections retention let go during the run


ToWorker = Opened | Batch | Finish
FromWorker = Ready | Failed | Summary
