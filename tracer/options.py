"""The core's options: one typed set, one default each, used by the library, the agent and
the command line alike."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class CoreOptions:
    """How the analysis core (flow table and HTTP/2 observer) behaves and what bounds it.

    Times are packet-time seconds."""

    # The table holds at most this many connections; past that the least recently active
    # are evicted (with an anomaly, and end_reason=evicted in their rows).
    max_connections: int = 200_000
    # A connection closed by FIN/FIN or RST stays this long for its stragglers.
    close_linger: float = 5.0
    # A connection attempt that never completes its handshake is given up after this.
    attempt_timeout: float = 120.0
    # A connection closed by one side only is given up after this long idle.
    half_closed_timeout: float = 300.0
    # A finished connection's 4-tuple is remembered this long, so that its late packets
    # (a retransmitted FIN, the last ACK) are not taken for a new connection.
    finished_memory: float = 120.0
    # Each direction's reorder buffer: past either bound the hole is declared a gap.
    reorder_segments: int = 64
    reorder_bytes: int = 1 << 20
    # Events per connection of each kind (lifecycle/control, and per-RPC/PING): beyond
    # that they are counted in events_dropped.
    max_events: int = 128
    # An idle open connection is put to sleep (packed small) after this long idle...
    sleep_after: float = 30.0
    # ... or, while more than ``crowd`` connections are awake (a burst of new ones), after
    # ``crowd_sleep_after``, checked every second: memory then follows what is active.
    crowd: int = 4096
    crowd_sleep_after: float = 1.0
    # One event per RPC, PING and RST_STREAM (else only counted per connection).
    rpc_events: bool = False
    # Decode the server's header blocks too (the grpc-status of every RPC). The client's
    # requests (methods) are decoded either way.
    decode_server_headers: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isnan(value) or value < 0 or (f.name in _AT_LEAST_ONE and value < 1):
                    raise ValueError(
                        f"{f.name} must be {'at least 1' if f.name in _AT_LEAST_ONE else '>= 0'}"
                        f", not {value!r}")
            else:
                raise TypeError(f"{f.name} must be a number, not {type(value).__name__}")

    def replace(self, **changes: object) -> CoreOptions:
        """A copy with ``changes`` (unknown names are an error)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown core option(s): {', '.join(unknown)}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return CoreOptions(**values)


_AT_LEAST_ONE = frozenset({"max_connections", "reorder_segments", "crowd"})
