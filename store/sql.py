"""The SQL both read sides share (the report in store.queries, the log lines lined up in
store.correlate) and the store's writers fold by (store.retention, the client aggregates of
store.schema): what a health check, a close and a preface timeout are, and how a client is
keyed. No I/O beyond the statements given to it."""

from __future__ import annotations

from typing import Any

import sqlite_utils

DEFAULT_PREFACE_TIMEOUT = 20.0  # grpc-go's default dial timeout

# A connection that connected and closed without ever speaking HTTP/2 (no preface, no
# stream) is a TCP health check. TLS hides the preface, so TLS connections never count.
HEALTH_CHECK = (
    "(close_kind IS NOT NULL AND preface_ts IS NULL AND streams = 0 AND mid_stream = 0"
    " AND established_ts IS NOT NULL AND COALESCE(protocol, '') != 'tls')"
)

# Clients are processes where attributed (pid plus start time: pids are reused), else IPs.
CLIENT_KEY = (
    "CASE WHEN pid IS NOT NULL THEN 'pid:' || pid || ':' || process_start"
    " ELSE 'ip:' || orig_h END"
)

# How a closed connection ended, one kind each: a GOAWAY before the TCP close wins, then
# a RST, then whoever sent the first FIN.
CLOSED_BY = """
    CASE
        WHEN close_kind IS NULL THEN NULL
        WHEN goaway_ts IS NOT NULL AND goaway_ts <= COALESCE(close_ts, goaway_ts) THEN 'goaway'
        WHEN close_kind IN ('client_rst', 'server_rst') THEN 'rst'
        WHEN close_kind = 'reused' THEN 'port_reused'
        ELSE close_kind
    END
"""


# Which side began a connection's end: the first GOAWAY's sender when it came before the
# TCP close, else the side of the first FIN or RST ('orig' is the client).
CLOSED_FIRST_BY = """
    CASE
        WHEN close_kind IS NULL THEN NULL
        WHEN goaway_ts IS NOT NULL AND goaway_ts <= COALESCE(close_ts, goaway_ts)
            THEN goaway_sender
        WHEN close_kind IN ('client_fin', 'client_rst') THEN 'orig'
        WHEN close_kind IN ('server_fin', 'server_rst') THEN 'resp'
    END
"""


def preface_timed_out(timeout: float, end: float) -> str:
    """SQL: the client sent its preface and the server's SETTINGS did not come within
    ``timeout`` of the client's dial (its SYN: grpc-go's dial timeout runs from there).
    A connection still open at ``end`` (the end of the data) counts once it has waited
    that long; one the client closed after exactly that long counts too."""
    return (
        f"(preface_ts IS NOT NULL AND ("
        f"(server_settings_ts IS NOT NULL"
        f" AND server_settings_ts - COALESCE(syn_ts, ts) > {timeout!r})"
        f" OR (server_settings_ts IS NULL AND COALESCE(close_ts, {end!r}) - COALESCE(syn_ts, ts)"
        f" >= {timeout!r})))"
    )


def rows(db: sqlite_utils.Database, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    cur = db.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def percentile(values: list[float], q: float, presorted: bool = False) -> float | None:
    if not values:
        return None
    if not presorted:
        values = sorted(values)
    idx = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[idx]
