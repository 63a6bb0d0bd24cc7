"""What the core hands out: one outbox per analysis run, and each connection's event budget.

The analyzer owns the outbox; the flow table and the HTTP/2 layer only append to its lists,
and the analyzer's drain empties them. A connection and its observer share one ``Budget``
(the connection's uid, the number of its next event, and what it may still emit): a leaf
that points at nothing but the outbox's event list, so nothing in a connection points back
up at the table, the observer or each other.
"""

from __future__ import annotations

from typing import Any

from tracer.events import AnomalyFound, ConnectionEvent


class Outbox:
    """Events, anomalies and finished connections since the last drain; and, when a live
    capture asks (``opened`` not None), the connections created since it last took them."""

    __slots__ = ("anomalies", "events", "finished", "opened")

    def __init__(self) -> None:
        self.events: list[ConnectionEvent] = []
        self.anomalies: list[AnomalyFound] = []
        self.finished: list[Any] = []  # tracer.tcp.flow.Connection
        self.opened: list[Any] | None = None

    def anomaly(self, ts: float, uid: str | None, reason: str, detail: str = "") -> None:
        self.anomalies.append(AnomalyFound(ts, uid, reason, detail))


class Budget:
    """One connection's events: its uid, the sequence number of the last one, and how many
    more of each kind it may emit (lifecycle and rare control events have their own budget,
    so floods of frequent events never hide a FIN or a GOAWAY)."""

    __slots__ = ("dropped", "essentials_left", "events", "events_left", "n", "uid")

    def __init__(self, uid: str, events: list[ConnectionEvent], limit: int,
                 frequent: bool = True) -> None:
        self.uid = uid
        self.events = events
        self.n = 0
        self.essentials_left = limit
        # Below 0: frequent events are not wanted at all (counted in the summary only).
        self.events_left = limit if frequent else -1
        self.dropped = 0

    def emit(self, cls: type[ConnectionEvent], ts: float, direction: str, *args: Any) -> None:
        """A lifecycle or rare control event."""
        if self.essentials_left <= 0:
            self.dropped += 1
            return
        self.essentials_left -= 1
        self.n += 1
        self.events.append(cls(ts, self.uid, self.n, direction, *args))

    def emit_frequent(
        self, cls: type[ConnectionEvent], ts: float, direction: str, *args: Any
    ) -> None:
        """A per-RPC or per-PING event."""
        left = self.events_left
        if left <= 0:
            if left == 0:  # the budget ran out; below 0: not wanted
                self.dropped += 1
            return
        self.events_left = left - 1
        self.n += 1
        self.events.append(cls(ts, self.uid, self.n, direction, *args))
