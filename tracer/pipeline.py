"""The analysis pipeline: packets in; connection records, events and anomalies out.

decode -> TCP flow table -> HTTP/2 observer, in one loop with nothing in between. The
caller owns I/O: it feeds ``(ts, linktype, frame)`` tuples from any source and drains the
outboxes into a store as often as it likes. Everything here is pure and bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tracer.decode import (
    SKIP_UNSUPPORTED_LINKTYPE,
    Decoder,
    DecodeResult,
    Malformed,
    make_decoder,
)
from tracer.events import AnomalyFound, ConnectionEvent
from tracer.http2.observer import Http2Context
from tracer.options import CoreOptions
from tracer.outbox import Outbox
from tracer.record import build_record
from tracer.tcp.flow import FlowTable

Packet = tuple[float, int, bytes]
FallbackFactory = Callable[[int, frozenset[int], tuple[int, int]], "Decoder | None"]

TICK_INTERVAL = 1.0  # packet-time seconds between flow-table ticks


@dataclass
class Drained:
    events: list[ConnectionEvent] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    anomalies: list[AnomalyFound] = field(default_factory=list)


@dataclass
class Stats:
    packets: int = 0
    segments: int = 0
    skipped: dict[int, int] = field(default_factory=dict)
    malformed: dict[str, int] = field(default_factory=dict)
    first_ts: float | None = None
    last_ts: float | None = None
    linktypes: set[int] = field(default_factory=set)


def _unsupported(frame: bytes) -> DecodeResult:
    return SKIP_UNSUPPORTED_LINKTYPE


class Analyzer:
    """One capture run's decoding state."""

    def __init__(
        self,
        ports: frozenset[int],
        options: CoreOptions | None = None,
        *,
        fallback: FallbackFactory | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """``shard`` = (index, count): analyse only the connections this worker owns (see
        tracer.decode.make_decoder). Worker 0 also owns everything that belongs to no
        connection: malformed frames are reported by it alone."""
        self.ports = frozenset(ports)
        self.options = options if options is not None else CoreOptions()
        self.shard = shard
        # The run's one outbox: the table and the HTTP/2 layer append, drain empties it.
        self.outbox = Outbox()
        self.h2 = Http2Context(self.outbox,
                               decode_server_headers=self.options.decode_server_headers)
        self.table = FlowTable(self.ports, self.h2.observer, self.options, self.outbox)
        self.fallback = fallback
        self.stats = Stats()
        self._decoders: dict[int, Decoder] = {}
        self._next_tick: float | None = None

    def decoder(self, linktype: int) -> Decoder:
        dec = self._decoders.get(linktype)
        if dec is None:
            dec = make_decoder(linktype, self.ports, self.shard)
            if dec is None and self.fallback is not None:
                dec = self.fallback(linktype, self.ports, self.shard)
            if dec is None:
                dec = _unsupported
            self._decoders[linktype] = dec
            self.stats.linktypes.add(linktype)
        return dec

    def feed(self, packets: Iterator[Packet], limit: int) -> int:
        """Consume up to ``limit`` packets from ``packets``; return how many were read."""
        stats = self.stats
        skipped = stats.skipped
        segment = self.table.segment
        last_lt = -1
        dec: Decoder = _unsupported
        next_tick = self._next_tick
        n = 0
        segments = 0
        ts = 0.0
        try:
            for ts, linktype, frame in packets:
                n += 1
                if linktype != last_lt:
                    dec = self.decoder(linktype)
                    last_lt = linktype
                try:
                    result = dec(frame)
                except Malformed as exc:
                    self._malformed(ts, exc)
                    result = 0
                if isinstance(result, int):
                    if result:
                        skipped[result] = skipped.get(result, 0) + 1
                else:
                    segments += 1
                    segment(ts, result)
                if next_tick is None:
                    stats.first_ts = ts
                    next_tick = ts
                if ts >= next_tick:
                    self.table.tick(ts)
                    next_tick = ts + TICK_INTERVAL
                if n >= limit:
                    break
        finally:
            # Also when the source raises (a damaged file): what was read stays counted.
            self._next_tick = next_tick
            if n:
                stats.packets += n
                stats.segments += segments
                if stats.last_ts is None or ts > stats.last_ts:
                    stats.last_ts = ts
        return n

    def _malformed(self, ts: float, exc: Malformed) -> None:
        if self.shard[0]:
            return  # worker 0 reports it
        m = self.stats.malformed
        m[exc.reason] = m.get(exc.reason, 0) + 1
        self.outbox.anomaly(ts, None, exc.reason, exc.detail)

    def finish(self) -> None:
        """End of input: every connection still open is finished as open at the end, all
        at once (the next drain builds every record together; with many open, use
        ``finish_batches``)."""
        self.table.close(self.stats.last_ts)

    def finish_batches(self, batch: int = 2048) -> Iterator[Drained]:
        """End of input, a batch at a time: what ``finish`` then ``drain`` give, as
        ``Drained`` objects of at most ``batch`` records each (events and anomalies as
        they come). Sleeping connections are woken one at a time as they are finished.
        Write each batch before asking for the next: the next is built only then, so
        memory holds one batch, not every open connection at once."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        table = self.table
        finished = self.outbox.finished
        more = table.close_some(0, self.stats.last_ts)  # the end's tick alone, first
        while True:
            if more and len(finished) < batch:
                more = table.close_some(batch - len(finished))
            yield self.drain(batch)  # at least once: events and anomalies not drained yet
            if not more and not finished:
                return

    def drain(self, limit: int | None = None) -> Drained:
        """Take what the core produced since the last drain: every finished connection's
        record, or the first ``limit`` of them (the others wait for the next drain)."""
        outbox = self.outbox
        # The lists are the outbox's, appended to by the table and the observers:
        # emptied in place.
        finished = outbox.finished
        if limit is None or len(finished) <= limit:
            done = finished[:]
            finished.clear()
        else:
            done = finished[:limit]
            del finished[:limit]
        records = [build_record(c) for c in done]
        out = Drained(outbox.events[:], records, outbox.anomalies[:])
        outbox.events.clear()
        outbox.anomalies.clear()
        return out
