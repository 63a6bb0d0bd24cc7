"""The TCP flow table: every connection's life (Zeek-style state and history) and its in-order
payload per direction, handed to the connection's stream observer.

Sans-IO: segments and packet timestamps in; lifecycle events, anomalies and finished
connections out, into the outbox the caller owns (tracer.outbox). Time only moves through
the timestamps given to ``segment`` and ``tick``.

Bounded: the table holds at most ``max_connections`` (the least recently active are
evicted, with an anomaly), each direction's reorder buffer holds at most
``reorder_segments`` segments and ``reorder_bytes`` bytes (past that the hole is declared
a gap: ``missed_bytes`` and history ``g``), and each connection emits at most
``max_events`` events of each kind (counted beyond that). Idle open connections sleep,
packed small, in a structure of their own (tracer.tcp.sleepers).

Ownership: the table owns its connections; a connection owns its endpoints, its observer
and its event budget. Nothing points back up: the observer reports activity by the value
``data`` returns, and emits through the budget it was given.
"""

from __future__ import annotations

import hashlib
import heapq
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from tracer.decode import ACK, FIN, RST, SYN, SegmentTuple, key_addresses, reverse_key
from tracer.events import (
    ORIG,
    RESP,
    ConnectionEvent,
    ContentGapSkipped,
    FinSent,
    HandshakeCompleted,
    PickedUpMidStream,
    PortReused,
    ResetSent,
    SynAckSent,
    SynSent,
)
from tracer.options import CoreOptions
from tracer.outbox import Budget, Outbox
from tracer.sleep import BIG, BYTE, COUNT, FLAG, FLOAT, REF, SEQ, SIGNED, Layout
from tracer.tcp.sleepers import Sleepers
from tracer.tcp.state import (
    CLOSED,
    ESTABLISHED,
    H_ACK,
    H_DATA,
    H_FIN,
    H_GAP,
    H_INCONSISTENT,
    H_MULTIFLAG,
    H_RETRANSMIT,
    H_RST,
    H_SYN,
    H_SYNACK,
    H_ZERO_WINDOW,
    INACTIVE,
    LOG_MARKS,
    PARTIAL,
    RESET,
    SYN_ACK_SENT,
    SYN_SENT,
    conn_state,
)

MASK = 0xFFFFFFFF
HALF = 0x80000000

# Bits of Endpoint.seen for the letters recorded once per direction.
_SEEN_A = 1
_SEEN_D = 2
_SEEN_I = 4
_SEEN_Q = 8


class StreamObserver:
    """Consumer of both byte streams of one connection, in order (the HTTP/2 observer
    derives from it). This base observes nothing."""

    def data(self, from_client: bool, ts: float, payload: bytes) -> bool:
        """In-order payload of one direction; True when it was activity (anything but
        keepalive PINGs and bare framing), which the connection then records."""
        return False

    def gap(self, from_client: bool, ts: float, missed: int) -> None:
        """``missed`` bytes of one direction the capture never had."""

    def lost_start(self, ts: float) -> None:
        """The first bytes delivered, both ways, are not the start of the streams
        (a connection picked up mid-stream)."""

    def finish(self, ts: float) -> None:
        """The connection is over: nothing more arrives; drop what is buffered."""

    def can_sleep(self) -> bool:
        """Whether its whole state fits ``sleep_state`` (no partial frame buffered)."""
        return True

    def sleep_state(self) -> tuple[bytes, tuple[Any, ...]]:
        """Its state as packed numbers and references."""
        return b"", ()

    def wake_state(self, blob: bytes, offset: int, refs: tuple[Any, ...],
                   ref_offset: int) -> None:
        """Restore what ``sleep_state`` returned (blob and refs start at the offsets)."""


# Makes the observer of a new connection, given the connection's event budget; None: the
# connection's payload is not observed.
ObserverFactory = Callable[[Budget], "StreamObserver | None"]


class Endpoint:
    """One side of a connection: its TCP state, sequence tracking and counters."""

    __slots__ = (
        "dir",
        "fin_seq",
        "fin_ts",
        "first_seq",
        "gaps",
        "isn",
        "keepalives",
        "last_ack",
        "next",
        "ooo",
        "ooo_bytes",
        "pkts",
        "retransmits",
        "rst_seq",
        "rst_ts",
        "seen",
        "size",
        "state",
        "syn_seq",
        "synack_seq",
        "upper",
        "zero_windows",
    )

    def __init__(self, direction: str) -> None:
        self.dir = direction
        self.upper = direction == ORIG  # the client's side
        self.state = INACTIVE
        self.isn: int | None = None
        self.next: int | None = None  # next expected sequence number
        self.first_seq: int | None = None  # sequence number of the first byte followed
        self.last_ack: int | None = None  # last acknowledgment number this side sent
        self.pkts = 0
        self.size = 0  # payload bytes in sequence space, gaps included (Zeek's size)
        self.seen = 0
        self.syn_seq: int | None = None
        self.synack_seq: int | None = None
        self.fin_seq: int | None = None
        self.rst_seq: int | None = None
        self.fin_ts: float | None = None  # this side's first FIN, and first RST
        self.rst_ts: float | None = None
        self.gaps = 0
        self.retransmits = 0
        self.zero_windows = 0
        self.keepalives = 0
        self.ooo: list[tuple[int, bytes, int, float]] | None = None
        self.ooo_bytes = 0


class Connection:
    """One TCP connection: addresses, timing, lifecycle, history, its observer and budget."""

    __slots__ = (
        "budget",
        "close_kind",
        "close_ts",
        "closing",
        "done",
        "end_reason",
        "established_ts",
        "flushed_ts",
        "from_snapshot",
        "history",
        "last_activity",
        "last_ts",
        "mid_stream",
        "missed_bytes",
        "observer",
        "orig",
        "orig_key",
        "resp",
        "syn_retries",
        "syn_ts",
        "synack_ts",
        "ts",
    )

    def __init__(self, orig_key: bytes, ts: float, budget: Budget) -> None:
        self.budget = budget
        self.orig_key = orig_key
        self.orig = Endpoint(ORIG)
        self.resp = Endpoint(RESP)
        self.ts = ts
        self.last_ts = ts
        self.syn_ts: float | None = None
        self.synack_ts: float | None = None
        self.established_ts: float | None = None
        self.close_ts: float | None = None
        self.close_kind: str | None = None  # client_fin server_fin client_rst server_rst reused
        self.history = ""
        self.mid_stream = False
        self.from_snapshot = False  # open in the kernel's socket table when capture began
        self.flushed_ts: float | None = None  # last_ts when a live capture last stored it
        self.syn_retries = 0
        self.missed_bytes = 0
        self.observer: StreamObserver | None = None
        self.closing: float | None = None  # when both sides finished (FIN/FIN or RST)
        self.done = False
        self.end_reason = ""  # why the table let go of it: closed, open_at_end, evicted, ...
        self.last_activity: float | None = None  # last payload other than keepalive PINGs

    @property
    def uid(self) -> str:
        return self.budget.uid

    @property
    def n(self) -> int:
        """Events emitted so far."""
        return self.budget.n

    @property
    def events_dropped(self) -> int:
        return self.budget.dropped

    # -- addresses -------------------------------------------------------------------

    @property
    def ip_version(self) -> int:
        return 4 if len(self.orig_key) == 12 else 6

    def addresses(self) -> tuple[str, int, str, int]:
        """(orig_h, orig_p, resp_h, resp_p) as text and numbers."""
        src, dst = key_addresses(self.orig_key)
        family = socket.AF_INET if len(src) == 4 else socket.AF_INET6
        sport, dport = struct.unpack(">HH", self.orig_key[-4:])
        return socket.inet_ntop(family, src), sport, socket.inet_ntop(family, dst), dport

    @property
    def conn_state(self) -> str:
        return conn_state(
            self.orig.state, self.resp.state, self.orig.size, self.resp.size, self.history
        )

    @property
    def is_open(self) -> bool:
        """No FIN or RST seen from either side (and not ended by port reuse)."""
        return self.close_kind is None

    # -- events ------------------------------------------------------------------------

    def emit(self, cls: type[ConnectionEvent], ts: float, direction: str, *args: Any) -> None:
        """Emit a lifecycle or rare control event (see Budget)."""
        self.budget.emit(cls, ts, direction, *args)

    def emit_frequent(
        self, cls: type[ConnectionEvent], ts: float, direction: str, *args: Any
    ) -> None:
        """Emit a per-RPC or per-PING event, within the connection's event budget."""
        self.budget.emit_frequent(cls, ts, direction, *args)


def connection_uid(orig_key: bytes, ts: float, seq: int = 0, ack: int = 0,
                   again: int = 0) -> str:
    """Deterministic id: the same capture read twice gives the same uids. The first
    packet's sequence numbers tell apart a port reused at the same timestamp; ``again``
    a connection that began with the same packet as the one before it."""
    material = orig_key + struct.pack(">dII", ts, seq, ack)
    if again:
        material += struct.pack(">I", again)
    digest = hashlib.blake2b(material, digest_size=10).digest()
    return "C" + digest.hex()


_CONNECTION_LAYOUT = Layout([
    ("ts", FLOAT), ("last_ts", FLOAT), ("syn_ts", FLOAT), ("synack_ts", FLOAT),
    ("established_ts", FLOAT), ("close_ts", FLOAT), ("closing", FLOAT),
    ("last_activity", FLOAT), ("flushed_ts", FLOAT), ("mid_stream", FLAG),
    ("from_snapshot", FLAG), ("syn_retries", COUNT), ("missed_bytes", BIG),
    ("orig_key", REF), ("history", REF), ("close_kind", REF), ("end_reason", REF),
])
if _CONNECTION_LAYOUT.refs[0] != "orig_key":  # a sleeper's key is kept by the table
    raise ImportError("orig_key must be the connection's first reference")
_BUDGET_LAYOUT = Layout([
    ("n", COUNT), ("events_left", SIGNED), ("essentials_left", SIGNED), ("dropped", COUNT),
])
_UID_BYTES = 10  # the uid's digest leads the blob: "C" + hex of it
# Where a sleeper's last_ts is in its blob: eviction reads it without waking the sleeper.
_LAST_TS_AT = _UID_BYTES + _CONNECTION_LAYOUT.offset("last_ts")
_ENDPOINT_LAYOUT = Layout([
    ("state", BYTE), ("isn", SEQ), ("next", SEQ), ("first_seq", SEQ), ("last_ack", SEQ),
    ("syn_seq", SEQ), ("synack_seq", SEQ), ("fin_seq", SEQ), ("rst_seq", SEQ), ("pkts", BIG),
    ("size", BIG), ("seen", BYTE), ("gaps", COUNT), ("retransmits", COUNT),
    ("zero_windows", COUNT), ("keepalives", COUNT), ("fin_ts", FLOAT), ("rst_ts", FLOAT),
])


def _letter(conn: Connection, ep: Endpoint, letter: str) -> None:
    conn.history += letter if ep.upper else letter.lower()


def _log_letter(conn: Connection, ep: Endpoint, letter: str, count: int) -> None:
    if count in LOG_MARKS:
        _letter(conn, ep, letter)


def client_address(key: bytes) -> bytes:
    """The client's address (packed) from a connection's client-side key."""
    return key[: len(key) // 2 - 2]


class FlowTable:
    """All TCP connections on the watched ports: the awake ones keyed by both directions'
    4-tuples, the sleeping ones apart (tracer.tcp.sleepers)."""

    def __init__(
        self,
        server_ports: frozenset[int],
        observer_factory: ObserverFactory | None = None,
        options: CoreOptions | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        opts = options if options is not None else CoreOptions()
        self.options = opts
        self.server_ports = server_ports
        self.observer_factory = observer_factory
        self.outbox = outbox if outbox is not None else Outbox()
        # The options read on the per-packet path, as plain attributes.
        self.max_connections = opts.max_connections
        self.close_linger = opts.close_linger
        self.attempt_timeout = opts.attempt_timeout
        self.half_closed_timeout = opts.half_closed_timeout
        self.finished_memory = opts.finished_memory
        self.reorder_segments = opts.reorder_segments
        self.reorder_bytes = opts.reorder_bytes
        self.max_events = opts.max_events
        # Per-RPC and per-PING events (request, trailers, ping, rst_stream, later SETTINGS):
        # off, they are only counted in the connection's summary, never built.
        self.rpc_events = opts.rpc_events
        self.sleep_after = opts.sleep_after
        # Many connections awake at once (a burst of new ones): those idle
        # crowd_sleep_after seconds go to sleep at once, checked every second, instead of
        # after sleep_after at the next minute's sweep; memory then follows what is active.
        self.crowd = opts.crowd if opts.sleep_after != float("inf") else sys.maxsize
        self.crowd_sleep_after = min(opts.crowd_sleep_after, opts.sleep_after)
        # Awake connections, under both directions' keys; asleep ones apart.
        self._flows: dict[bytes, tuple[Connection, Endpoint, Endpoint]] = {}
        self._sleepers = Sleepers(_LAST_TS_AT)
        self._next_crowd_check: float = 0.0
        self._closing: deque[Connection] = deque()
        # End of input under way (close_some): its time, and the awake connections left.
        self._end: float | None = None
        self._ending: deque[Connection] = deque()
        # Keys of connections finished lately: when the last one finished, and the uids of
        # the last few finished on these addresses (a new one never reuses them: _open).
        self._finished_keys: dict[bytes, tuple[float, tuple[str, ...]]] = {}
        self._finished_order: deque[tuple[float, bytes]] = deque()
        self._next_sweep: float | None = None
        # Counters.
        self.connections_seen = 0
        self.late_packets = 0
        self.truncated_segments = 0
        self.evicted = 0
        self.last_ts = 0.0

    # -- what the table holds ----------------------------------------------------------

    @property
    def tracked(self) -> int:
        """Connections in the table, awake or asleep (closed ones lingering included)."""
        return len(self._flows) // 2 + len(self._sleepers)

    @property
    def asleep_count(self) -> int:
        """Connections asleep right now."""
        return len(self._sleepers)

    @property
    def open_count(self) -> int:
        """Connections with no FIN or RST seen yet, asleep or awake."""
        awake = sum(1 for conn, ep, _peer in self._flows.values()
                    if ep is conn.orig and conn.close_kind is None and not conn.done)
        return awake + len(self._sleepers)  # only open connections sleep

    def awake(self) -> list[Connection]:
        """Connections awake in the table (each once); the sleeping ones are not woken."""
        return [entry[0] for entry in self._flows.values() if entry[1] is entry[0].orig]

    def open_by_client(self) -> dict[bytes, int]:
        """Open connections (no FIN or RST yet) per client address (packed), asleep or
        awake."""
        out: dict[bytes, int] = {}
        for key in self._sleepers.client_keys():
            client = client_address(key)
            out[client] = out.get(client, 0) + 1
        for key, (conn, ep, _peer) in self._flows.items():
            if ep is conn.orig and conn.close_kind is None and not conn.done:
                client = client_address(key)
                out[client] = out.get(client, 0) + 1
        return out

    def next_deadline(self) -> float | None:
        """The packet time at which ``tick`` next has work (a closed connection's linger
        over, a finished key forgotten, the minute's sweep, the crowd check); None while
        the table has seen no time."""
        if self._next_sweep is None:
            return None
        due = self._next_sweep
        if self._closing and self._closing[0].closing is not None:
            due = min(due, self._closing[0].closing + self.close_linger)
        if self._finished_order:
            due = min(due, self._finished_order[0][0] + self.finished_memory)
        if len(self._flows) > 2 * self.crowd:
            due = min(due, self._next_crowd_check)
        return due

    def wake_all(self) -> None:
        while True:
            taken = self._sleepers.take_any()
            if taken is None:
                return
            self._wake(*taken)

    def _wake_key(self, key: bytes) -> tuple[Connection, Endpoint, Endpoint] | None:
        """The table entry for ``key`` (either direction) of a sleeping connection, woken."""
        taken = self._sleepers.take(key)
        if taken is None:
            return None
        self._wake(*taken)
        return self._flows[key]

    def anomaly(self, ts: float, uid: str | None, reason: str, detail: str = "") -> None:
        self.outbox.anomaly(ts, uid, reason, detail)

    def _new_connection(self, orig_key: bytes, ts: float, uid: str) -> Connection:
        budget = Budget(uid, self.outbox.events, self.max_events, self.rpc_events)
        conn = Connection(orig_key, ts, budget)
        self.connections_seen += 1
        opened = self.outbox.opened
        if opened is not None:
            opened.append(conn)
        return conn

    def seed(self, ts: float, orig_key: bytes) -> Connection:
        """A connection the kernel's socket table showed open when capture began: tracked
        from now on as picked up mid-stream (OTH), its SYN time unknown."""
        entry = self._flows.get(orig_key)
        if entry is None and len(self._sleepers):
            entry = self._wake_key(orig_key)
        if entry is not None:
            return entry[0]
        conn = self._new_connection(orig_key, ts, connection_uid(orig_key, ts))
        conn.mid_stream = True
        conn.from_snapshot = True
        self._flows[orig_key] = (conn, conn.orig, conn.resp)
        self._flows[reverse_key(orig_key)] = (conn, conn.resp, conn.orig)
        self._attach_observer(conn, ts, mid_stream=True)
        conn.emit(PickedUpMidStream, ts, ORIG)
        return conn

    def _attach_observer(self, conn: Connection, ts: float, *, mid_stream: bool) -> None:
        if self.observer_factory is None:
            return
        observer = self.observer_factory(conn.budget)
        if observer is None:
            return
        conn.observer = observer
        if mid_stream:
            observer.lost_start(ts)

    def segment(self, ts: float, seg: SegmentTuple) -> None:
        """Account one decoded TCP segment."""
        key, _sport, _dport, seq, ack, flags, win, payload, wire = seg
        entry = self._flows.get(key)
        if entry is None and len(self._sleepers):
            entry = self._wake_key(key)
        if entry is None:
            entry = self._open(ts, seg)
            if entry is None:
                return
        elif flags & SYN:
            entry = self._syn_on_existing(ts, entry, seg)
        conn, ep, peer = entry
        ep.pkts += 1
        if ts > conn.last_ts:  # not max(): it costs a call per packet; merged
            # captures (several interfaces) are not in order
            conn.last_ts = ts
        if flags & ACK:
            ep.last_ack = ack
        if flags & SYN:
            # Before the payload: data on a SYN (TCP Fast Open) starts after it.
            self._control(ts, conn, ep, peer, seq, ack, flags, wire)
            seq = (seq + 1) & MASK
        elif ep.state < PARTIAL:
            self._advance_handshake(ts, conn, ep, peer, flags)
        if wire:
            if seq == ep.next:
                ep.next = (seq + wire) & MASK
                ep.size += wire
                if len(payload) == wire:
                    observer = conn.observer
                    if observer is not None and observer.data(ep.upper, ts, payload):
                        conn.last_activity = ts
                else:
                    self._truncated(ts, conn, ep, payload, wire)
                if ep.ooo:
                    self._drain(ts, conn, ep)
            else:
                self._unordered(ts, conn, ep, peer, seq, payload, wire)
            if not ep.seen & _SEEN_D:
                ep.seen |= _SEEN_D
                _letter(conn, ep, H_DATA)
        elif flags & 0x17 == ACK:
            if seq != ep.next:
                self._bare_unordered(ts, conn, ep, seq)
            if not ep.seen & _SEEN_A:
                ep.seen |= _SEEN_A
                _letter(conn, ep, H_ACK)
        if flags & 0x05 and not flags & SYN:
            self._control(ts, conn, ep, peer, seq, ack, flags, wire)
        if win == 0 and not flags & 0x06:
            ep.zero_windows += 1
            _log_letter(conn, ep, H_ZERO_WINDOW, ep.zero_windows)

    def tick(self, ts: float) -> None:
        """Let packet time move on: finish closed connections, expire stale attempts."""
        self.last_ts = max(self.last_ts, ts)
        closing = self._closing
        linger = self.close_linger
        while closing and closing[0].closing is not None and closing[0].closing + linger <= ts:
            conn = closing.popleft()
            if not conn.done:
                self._finish(ts, conn, "closed")
        while closing and (closing[0].done or closing[0].closing is None):
            closing.popleft()
        order = self._finished_order
        keys = self._finished_keys
        memory = self.finished_memory
        while order and (order[0][0] + memory <= ts or len(order) > self.max_connections):
            t, key = order.popleft()
            finished = keys.get(key)
            if finished is not None and finished[0] == t:
                del keys[key]
        if self._next_sweep is None:
            self._next_sweep = ts + 60.0
        elif ts >= self._next_sweep:
            self._next_sweep = ts + 60.0
            self._sweep(ts)
        elif len(self._flows) > 2 * self.crowd and ts >= self._next_crowd_check:
            self._next_crowd_check = ts + 1.0
            self._sleep_crowd(ts)

    def close(self, ts: float | None = None) -> None:
        """End of input: finish every connection still in the table, all at once (their
        records then all exist together: ``close_some`` ends a batch at a time)."""
        while self.close_some(sys.maxsize, ts):
            pass

    def close_some(self, limit: int, ts: float | None = None) -> bool:
        """End of input, a batch at a time: finish at most ``limit`` more connections still
        in the table (into the outbox's ``finished``); True while some remain.

        The first call fixes the end time (``ts``, else the last packet's) and ticks to
        it, which may finish others (closed, expired: also in ``finished``). Sleepers are
        woken one at a time as they are finished, never all at once, so memory stays
        bounded when the caller drains ``finished`` between calls. No segments may come
        between the calls; once none remain, the table is empty and ready for more input."""
        end = self._end
        ending = self._ending
        if end is None:
            end = self._end = self.last_ts if ts is None else ts
            self.tick(end)
            ending.extend(self.awake())
        sleepers = self._sleepers
        count = 0
        while count < limit:
            if ending:
                conn = ending.popleft()
                if conn.done:
                    continue
            elif len(sleepers):
                taken = sleepers.take_any()
                assert taken is not None
                conn = self._wake(*taken)
            elif self._flows:
                ending.extend(self.awake())
                continue
            else:
                break
            if conn.closing is not None:
                reason = "closed"
            else:
                reason = "open_at_end" if conn.is_open else "closing_at_end"
            # Nothing comes after the end: no straggler to recognise, no key to remember.
            self._finish(end, conn, reason, remember=False)
            count += 1
        while ending and ending[0].done:
            ending.popleft()
        if ending or len(sleepers) or self._flows:
            return True
        self._end = None
        return False

    # -- connection creation -------------------------------------------------------------

    def _open(self, ts: float, seg: SegmentTuple) -> tuple[Connection, Endpoint, Endpoint] | None:
        key, sport, dport, seq, ack, flags, _win, _payload, _wire = seg
        finished = self._finished_keys.get(key)
        if finished is not None and not flags & SYN:
            # A straggler of a connection already finished (retransmitted FIN, last ACK).
            self.late_packets += 1
            return None
        rkey = reverse_key(key)
        if flags & SYN:
            sender_is_orig = not flags & ACK
        elif dport in self.server_ports:
            sender_is_orig = True
        elif sport in self.server_ports:
            sender_is_orig = False
        else:
            sender_is_orig = True
        okey, other = (key, rkey) if sender_is_orig else (rkey, key)
        uid = connection_uid(okey, ts, seq, ack)
        if finished is not None:
            again = 0
            while uid in finished[1]:
                # A connection finished lately on these addresses began with the same
                # packet (time and sequence numbers: a copy of its SYN delivered late, a
                # reordered or merged capture): this one gets a uid of its own, so that
                # both rows are kept.
                again += 1
                uid = connection_uid(okey, ts, seq, ack, again)
        if self.tracked >= self.max_connections:
            self._evict(ts)
        conn = self._new_connection(okey, ts, uid)
        orig, resp = conn.orig, conn.resp
        self._flows[okey] = (conn, orig, resp)
        self._flows[other] = (conn, resp, orig)
        self._attach_observer(conn, ts, mid_stream=not flags & SYN)
        if not flags & SYN:
            conn.mid_stream = True
            conn.emit(PickedUpMidStream, ts, ORIG if sender_is_orig else RESP)
        elif flags & ACK:
            # SYN-ACK first: the client's SYN was missed (syn_ts stays unknown), but the
            # connection opened within the capture and the client's next sequence number
            # is known, so both streams are followed from their start.
            orig.isn = (ack - 1) & MASK
            orig.next = orig.first_seq = ack
        return (conn, orig, resp) if sender_is_orig else (conn, resp, orig)

    def _syn_on_existing(
        self, ts: float, entry: tuple[Connection, Endpoint, Endpoint], seg: SegmentTuple
    ) -> tuple[Connection, Endpoint, Endpoint]:
        conn, ep, _peer = entry
        seq, flags = seg[3], seg[5]
        if flags & ACK or ep is not conn.orig:
            return entry  # SYN-ACK, or a simultaneous open: handled by _control
        if not conn.done and (ep.syn_seq == seq or (ep.syn_seq is None and ep.isn == seq)):
            return entry  # retransmitted SYN (or the SYN of a connection picked up at its SYN-ACK)
        # A new SYN with another ISN on this 4-tuple: the old connection is over.
        if conn.closing is not None:
            self._finish(ts, conn, "closed")  # it had closed; this is TIME_WAIT reuse
        else:
            if conn.close_kind is None:
                conn.close_kind = "reused"
                conn.emit(PortReused, ts, ORIG)
            self._finish(ts, conn, "port_reused")
        created = self._open(ts, seg)
        assert created is not None
        return created

    # -- state machine ---------------------------------------------------------------------

    def _advance_handshake(
        self, ts: float, conn: Connection, ep: Endpoint, peer: Endpoint, flags: int
    ) -> None:
        """A non-SYN packet from a side that has not reached PARTIAL or ESTABLISHED yet."""
        if ep.state == INACTIVE:
            if flags & ACK and ep is conn.orig and peer.state == SYN_ACK_SENT:
                # Capture started between SYN and SYN-ACK: this ACK completes the handshake.
                ep.state = SYN_SENT
            else:
                ep.state = PARTIAL
                return
        if not flags & ACK:
            return
        ep.state = ESTABLISHED
        if ep is conn.orig and peer.state == SYN_ACK_SENT:
            peer.state = ESTABLISHED
        if conn.established_ts is None and conn.orig.state == ESTABLISHED and (
            conn.resp.state == ESTABLISHED
        ):
            conn.established_ts = ts
            conn.emit(HandshakeCompleted, ts, ep.dir)

    def _control(
        self,
        ts: float,
        conn: Connection,
        ep: Endpoint,
        peer: Endpoint,
        seq: int,
        ack: int,
        flags: int,
        wire: int,
    ) -> None:
        if flags & SYN:
            if flags & (FIN | RST) and not ep.seen & _SEEN_Q:
                ep.seen |= _SEEN_Q
                _letter(conn, ep, H_MULTIFLAG)
            if flags & ACK:
                self._syn_ack(ts, conn, ep, peer, seq, ack)
            else:
                self._syn(ts, conn, ep, seq)
            return
        if flags & FIN and flags & RST and not ep.seen & _SEEN_I:
            ep.seen |= _SEEN_I
            _letter(conn, ep, H_INCONSISTENT)
        if flags & FIN:
            fin_at = (seq + wire) & MASK
            if ep.fin_seq != fin_at:
                first = ep.fin_seq is None
                ep.fin_seq = fin_at
                _letter(conn, ep, H_FIN)
                if first:
                    ep.fin_ts = ts
                    conn.emit(FinSent, ts, ep.dir)
            if ep.next == fin_at:
                ep.next = (fin_at + 1) & MASK
            if ep.state != RESET:
                ep.state = CLOSED
            if conn.close_kind is None:
                conn.close_kind = "client_fin" if ep is conn.orig else "server_fin"
                conn.close_ts = ts
            if peer.state in (CLOSED, RESET) and conn.closing is None:
                self._begin_closing(ts, conn)
        if flags & RST:
            if ep.rst_seq != seq:
                first = ep.rst_seq is None
                ep.rst_seq = seq
                _letter(conn, ep, H_RST)
                if first:
                    ep.rst_ts = ts
                    conn.emit(ResetSent, ts, ep.dir)
            ep.state = RESET
            if conn.close_kind is None:
                conn.close_kind = "client_rst" if ep is conn.orig else "server_rst"
                conn.close_ts = ts
            if conn.closing is None:
                self._begin_closing(ts, conn)

    def _syn(self, ts: float, conn: Connection, ep: Endpoint, seq: int) -> None:
        if ep.syn_seq == seq:
            conn.syn_retries += 1
            return
        fresh = ep.syn_seq is None
        ep.syn_seq = seq
        _letter(conn, ep, H_SYN)
        ep.isn = seq
        ep.next = ep.first_seq = (seq + 1) & MASK
        if ep.state in (INACTIVE, PARTIAL):
            ep.state = SYN_SENT
        if ep is conn.orig and conn.syn_ts is None:
            conn.syn_ts = ts
        if fresh:
            conn.emit(SynSent, ts, ep.dir)

    def _syn_ack(
        self, ts: float, conn: Connection, ep: Endpoint, peer: Endpoint, seq: int, ack: int
    ) -> None:
        if ep.synack_seq == seq:
            return  # retransmitted SYN-ACK
        fresh = ep.synack_seq is None
        ep.synack_seq = seq
        # As in Zeek, SYN and SYN-ACK share one history slot per side: the SYN-ACK of a
        # simultaneous open repeats the side's own SYN and adds no letter.
        if ep.syn_seq != seq:
            _letter(conn, ep, H_SYNACK)
        ep.isn = seq
        ep.next = ep.first_seq = (seq + 1) & MASK
        if ep.state in (INACTIVE, PARTIAL, SYN_SENT):
            ep.state = SYN_ACK_SENT
        if ep is conn.resp and conn.synack_ts is None:
            conn.synack_ts = ts
        if peer.isn is not None:
            # It acknowledges the SYN, and with TCP Fast Open the data that came with it.
            sent = (peer.next - peer.isn - 1) & MASK if peer.next is not None else 0
            if ((ack - peer.isn - 1) & MASK) > sent:
                self.anomaly(
                    ts, conn.uid, "syn_ack_mismatch",
                    f"SYN-ACK acknowledges {ack}, the SYN was {peer.isn}",
                )
        if fresh:
            conn.emit(SynAckSent, ts, ep.dir)
        if peer.state == SYN_ACK_SENT and ep.state == SYN_ACK_SENT:
            # Simultaneous open: both SYNs are now acknowledged.
            ep.state = peer.state = ESTABLISHED
            if conn.established_ts is None:
                conn.established_ts = ts
                conn.emit(HandshakeCompleted, ts, ep.dir)

    def _begin_closing(self, ts: float, conn: Connection) -> None:
        conn.closing = ts
        self._closing.append(conn)

    # -- payload ---------------------------------------------------------------------------

    def _deliver(
        self, ts: float, conn: Connection, ep: Endpoint, payload: bytes, wire: int
    ) -> None:
        assert ep.next is not None
        ep.next = (ep.next + wire) & MASK
        ep.size += wire
        if len(payload) == wire:
            observer = conn.observer
            if observer is not None and observer.data(ep.upper, ts, payload):
                conn.last_activity = ts
        else:
            self._truncated(ts, conn, ep, payload, wire)
        if ep.ooo:
            self._drain(ts, conn, ep)

    def _truncated(
        self, ts: float, conn: Connection, ep: Endpoint, payload: bytes, wire: int
    ) -> None:
        """The capture's snap length cut this segment: the rest is missing content."""
        self.truncated_segments += 1
        observer = conn.observer
        if payload and observer is not None and observer.data(ep.upper, ts, payload):
            conn.last_activity = ts
        self._count_gap(ts, conn, ep, wire - len(payload))

    def _count_gap(self, ts: float, conn: Connection, ep: Endpoint, missed: int) -> None:
        conn.missed_bytes += missed
        ep.gaps += 1
        _log_letter(conn, ep, H_GAP, ep.gaps)
        if ep.gaps == 1:
            conn.emit_frequent(ContentGapSkipped, ts, ep.dir, missed)
        if conn.observer is not None:
            conn.observer.gap(ep.upper, ts, missed)

    def _unordered(
        self,
        ts: float,
        conn: Connection,
        ep: Endpoint,
        peer: Endpoint,
        seq: int,
        payload: bytes,
        wire: int,
    ) -> None:
        nxt = ep.next
        if nxt is None:
            # First bytes of a direction picked up mid-stream.
            ep.next = ep.first_seq = seq
            self._deliver(ts, conn, ep, payload, wire)
            return
        rel = (seq - nxt) & MASK
        if rel >= HALF:
            behind = (nxt - seq) & MASK
            if behind >= wire:
                if wire <= 1 and behind == 1:
                    ep.keepalives += 1
                else:
                    ep.retransmits += 1
                    _log_letter(conn, ep, H_RETRANSMIT, ep.retransmits)
                return
            # Overlaps what we have: keep only the new tail.
            ep.retransmits += 1
            _log_letter(conn, ep, H_RETRANSMIT, ep.retransmits)
            self._deliver(ts, conn, ep, payload[behind:], wire - behind)
            return
        if ep.ooo is None:
            ep.ooo = []
        ep.ooo.append((seq, payload, wire, ts))
        ep.ooo_bytes += len(payload)
        ack = peer.last_ack
        while ep.ooo:
            nxt = ep.next
            assert nxt is not None
            if ack is not None and 0 < ((ack - nxt) & MASK) < HALF:
                pass  # the peer has bytes the capture never had: they are lost to us
            elif len(ep.ooo) <= self.reorder_segments and ep.ooo_bytes <= self.reorder_bytes:
                break
            self._skip_hole(ts, conn, ep)
            if ep.next == nxt:
                break

    def _bare_unordered(self, ts: float, conn: Connection, ep: Endpoint, seq: int) -> None:
        """A segment without payload whose sequence number is not the expected one."""
        nxt = ep.next
        if nxt is None:
            ep.next = ep.first_seq = seq
        elif (nxt - seq) & MASK == 1:
            ep.keepalives += 1

    def _drain(self, ts: float, conn: Connection, ep: Endpoint) -> None:
        """Deliver buffered segments that the stream has now reached."""
        while ep.ooo:
            nxt = ep.next
            assert nxt is not None
            for i, (seq, payload, wire, _t) in enumerate(ep.ooo):  # noqa: B007 - used after
                rel = (seq - nxt) & MASK
                if rel == 0 or rel >= HALF:
                    break
            else:
                return
            del ep.ooo[i]
            ep.ooo_bytes -= len(payload)
            if rel == 0:
                self._deliver(ts, conn, ep, payload, wire)
                continue
            behind = (nxt - seq) & MASK
            if behind < wire:
                self._deliver(ts, conn, ep, payload[behind:], wire - behind)

    def _skip_hole(self, ts: float, conn: Connection, ep: Endpoint) -> None:
        """Give up waiting for the missing bytes before the earliest buffered segment."""
        if not ep.ooo or ep.next is None:
            return
        nxt = ep.next
        earliest = min(ep.ooo, key=lambda item: (item[0] - nxt) & MASK)
        hole = (earliest[0] - nxt) & MASK
        if 0 < hole < HALF:
            self._count_gap(ts, conn, ep, hole)
            ep.next = earliest[0]
            ep.size += hole
        self._drain(ts, conn, ep)

    # -- ending ------------------------------------------------------------------------------

    def _finish(self, ts: float, conn: Connection, reason: str, *, remember: bool = True) -> None:
        """Let go of a connection (into ``finished``). ``remember``: keep its keys for
        ``finished_memory`` seconds, so that its stragglers are not a new connection."""
        if conn.done:
            return
        for ep in (conn.orig, conn.resp):
            while ep.ooo:
                before = len(ep.ooo)
                self._skip_hole(ts, conn, ep)
                if len(ep.ooo) >= before:
                    # Nothing deliverable (all behind): drop what is left.
                    ep.ooo = None
                    ep.ooo_bytes = 0
            if ep.fin_seq is not None and ep.next is not None:
                hole = (ep.fin_seq - ep.next) & MASK
                if 0 < hole < HALF:
                    # Bytes before the FIN that the capture never had.
                    self._count_gap(ts, conn, ep, hole)
                    ep.size += hole
                    ep.next = (ep.fin_seq + 1) & MASK
        conn.done = True
        conn.end_reason = reason
        if conn.observer is not None:
            conn.observer.finish(ts)
        okey = conn.orig_key
        rkey = reverse_key(okey)
        for key in (okey, rkey):
            entry = self._flows.get(key)
            if entry is not None and entry[0] is conn:
                del self._flows[key]
                if remember:
                    earlier = self._finished_keys.get(key)
                    uids = (conn.uid,) if earlier is None else (*earlier[1][-7:], conn.uid)
                    self._finished_keys[key] = (ts, uids)
                    self._finished_order.append((ts, key))
        self.outbox.finished.append(conn)

    def _sweep(self, ts: float) -> None:
        """Expire connection attempts that never got going and half-closed leftovers; put
        connections idle for ``sleep_after`` to sleep.

        Established connections are never expired by idleness: an idle connection that
        stays open is exactly what this tool hunts. Only the table cap removes them."""
        for conn in self.awake():
            if conn.done or conn.closing is not None:
                continue
            idle = ts - conn.last_ts
            if conn.established_ts is None and not conn.mid_stream:
                if idle >= self.attempt_timeout:
                    self._finish(ts, conn, "attempt_expired")
            elif conn.close_kind is not None and idle >= self.half_closed_timeout:
                self._finish(ts, conn, "half_closed_expired")
            elif idle >= self.sleep_after and self._sleepable(conn):
                self._sleep(conn)

    def _sleep_crowd(self, ts: float) -> None:
        """Too many awake (see __init__): put those idle for crowd_sleep_after to sleep."""
        after = self.crowd_sleep_after
        for conn in self.awake():
            if (not conn.done and conn.closing is None and ts - conn.last_ts >= after
                    and (conn.established_ts is not None or conn.mid_stream)
                    and self._sleepable(conn)):
                self._sleep(conn)

    @staticmethod
    def _sleepable(conn: Connection) -> bool:
        return (conn.close_kind is None and not conn.orig.ooo and not conn.resp.ooo
                and (conn.observer is None or conn.observer.can_sleep()))

    def _sleep(self, conn: Connection) -> None:
        """Pack an idle connection's state (tracer.sleep): under 1 KB instead of 2.5."""
        conn.history = sys.intern(conn.history)  # idle connections share a few histories
        blob, refs = _CONNECTION_LAYOUT.pack(conn)
        parts = [bytes.fromhex(conn.uid[1:]), blob, _BUDGET_LAYOUT.pack(conn.budget)[0]]
        for ep in (conn.orig, conn.resp):
            b, r = _ENDPOINT_LAYOUT.pack(ep)
            parts.append(b)
            refs += r
        if conn.observer is not None:
            b, r = conn.observer.sleep_state()
            parts.append(b)
            refs += r
        okey = conn.orig_key
        # The key is the table's: kept by the sleepers, not in the references (refs[0]).
        self._sleepers.put(okey, b"".join(parts), refs[1:])
        del self._flows[okey]
        del self._flows[reverse_key(okey)]

    def _wake(self, okey: bytes, blob: bytes, rest: tuple[Any, ...]) -> Connection:
        """A sleeping connection (already taken from the sleepers) back in the table."""
        refs = (okey, *rest)
        budget = Budget("C" + blob[:_UID_BYTES].hex(), self.outbox.events, 0)
        conn = Connection(b"", 0.0, budget)
        offset, ref_offset = _CONNECTION_LAYOUT.unpack(conn, blob, _UID_BYTES, refs, 0)
        offset, _ = _BUDGET_LAYOUT.unpack(budget, blob, offset, (), 0)
        for ep in (conn.orig, conn.resp):
            offset, ref_offset = _ENDPOINT_LAYOUT.unpack(ep, blob, offset, refs, ref_offset)
        if self.observer_factory is not None and offset < len(blob):
            observer = self.observer_factory(budget)
            if observer is not None:
                observer.wake_state(blob, offset, refs, ref_offset)
                conn.observer = observer
        okey = conn.orig_key
        self._flows[okey] = (conn, conn.orig, conn.resp)
        self._flows[reverse_key(okey)] = (conn, conn.resp, conn.orig)
        return conn

    def _evict(self, ts: float) -> None:
        """The table is full: let go of the least recently active 1%.

        Sleepers went to sleep after being idle, in the order they are kept in: the
        oldest of them are the natural victims, with any awake connection idle for longer
        (an attempt, a half-closed leftover, one that cannot sleep). Only the victims are
        woken: waking every sleeper to sort them took 0.63 s with 20,000 asleep, and left
        them all awake."""
        want = max(1, self.tracked // 100)
        sleepers = self._sleepers.oldest(want)
        awake = heapq.nsmallest(want, self.awake(), key=lambda c: c.last_ts)
        victims: list[Connection] = []
        i = j = 0
        while len(victims) < want and (i < len(sleepers) or j < len(awake)):
            if j >= len(awake) or (i < len(sleepers) and sleepers[i][0] <= awake[j].last_ts):
                taken = self._sleepers.take(sleepers[i][1])
                i += 1
                assert taken is not None
                victims.append(self._wake(*taken))
            else:
                victims.append(awake[j])
                j += 1
        for conn in victims:
            self._finish(ts, conn, "evicted")
        self.evicted += len(victims)
        self.anomaly(
            ts, None, "table_full",
            f"{self.max_connections} connections tracked; evicted the {len(victims)} "
            "least recently active (their rows say end_reason=evicted)",
        )
