"""Databases built to the second for query tests: connection records as the store's writer
takes them, every field set the way a capture would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlite_utils

from store.schema import open_database
from store.writer import CaptureWriter
from tracer.record import RECORD_FIELDS

T0 = 1_790_000_000.0
SERVER = ("10.0.0.1", 9090)


def record(uid: str, ts: float, orig: tuple[str, int], *, close: float | None,
           preface: float | None, settings: float | None) -> dict[str, Any]:
    r: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    r.update(
        uid=uid, ts=T0 + ts, syn_ts=T0 + ts, established_ts=T0 + ts + 0.001,
        end_ts=T0 + (close if close is not None else 200.0), duration=1.0, ip_version=4,
        orig_h=orig[0], orig_p=orig[1], resp_h=SERVER[0], resp_p=SERVER[1],
        conn_state="SF" if close is not None else "S1", history="ShADadFf",
        orig_pkts=5, orig_bytes=100, resp_pkts=5, resp_bytes=100, missed_bytes=0,
        syn_retries=0, retransmits=0, keepalives=0, zero_windows=0, mid_stream=0,
        from_snapshot=0, is_open=int(close is None),
        close_kind="client_fin" if close is not None else None,
        close_ts=T0 + close if close is not None else None,
        end_reason="closed" if close is not None else "open_at_end",
        last_activity_ts=T0 + ts, events_dropped=0, protocol="h2c",
        preface_ts=T0 + preface if preface is not None else None,
        server_settings_ts=T0 + settings if settings is not None else None,
        streams=1, first_method="/pkg.Svc/Get", pings_orig=0, pings_resp=0, goaways=0,
        rst_streams=0, trailers=1, grpc_errors=0, data_frames=0, window_updates=0,
        h2c_upgrade=0, methods={"/pkg.Svc/Get": 1}, grpc_statuses={},
    )
    return r


def stored(path: Path, rows: list[dict[str, Any]], *, first_ts: float, last_ts: float,
           packets: int, elapsed_s: float = 1.0, kind: str = "file",
           host: str | None = None) -> sqlite_utils.Database:
    """A new database at ``path`` holding one complete capture of ``rows`` on the server's
    port, with these totals (and the host it ran on); left open for what a test adds to
    it."""
    db = open_database(str(path))
    writer = CaptureWriter.start(db, kind=kind, ports=[SERVER[1]], host=host)
    writer.write(rows, [], [])
    writer.finish(status="complete", error=None, first_ts=first_ts, last_ts=last_ts,
                  packets=packets, segments=packets, connections=len(rows),
                  open_at_end=sum(r["is_open"] for r in rows), anomaly_counts={}, drops=0,
                  elapsed_s=elapsed_s, stats={})
    return db
