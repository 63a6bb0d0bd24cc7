"""The connection record: one finished (or still open) connection as the row the store keeps."""

from __future__ import annotations

from typing import Any

from tracer.events import settings_text
from tracer.http2.observer import Http2Observer, summary
from tracer.tcp.flow import Connection

# Column order of the connections table (store/schema.py creates it from this list).
RECORD_FIELDS = (
    "uid",
    "ts",
    "syn_ts",
    "synack_ts",
    "established_ts",
    "close_ts",
    "end_ts",
    "duration",
    "ip_version",
    "orig_h",
    "orig_p",
    "resp_h",
    "resp_p",
    "conn_state",
    "history",
    "orig_pkts",
    "orig_bytes",
    "resp_pkts",
    "resp_bytes",
    "missed_bytes",
    "syn_retries",
    "retransmits",
    "keepalives",
    "zero_windows",
    "mid_stream",
    "is_open",
    "close_kind",
    "end_reason",
    "last_activity_ts",
    "events_dropped",
    "protocol",
    "preface_ts",
    "client_settings_ts",
    "server_settings_ts",
    "client_settings",
    "server_settings",
    "streams",
    "first_method",
    "authority",
    "user_agent",
    "pings_orig",
    "pings_resp",
    "goaways",
    "goaway_sender",
    "goaway_ts",
    "goaway_last_stream_id",
    "goaway_error",
    "goaway_debug",
    "rst_streams",
    "trailers",
    "grpc_errors",
    "data_frames",
    "window_updates",
    "tls_sni",
    "tls_alpn",
    "h2c_upgrade",
)


def build_record(conn: Connection) -> dict[str, Any]:
    """Everything the store keeps about one connection; ``methods`` maps method to count."""
    orig_h, orig_p, resp_h, resp_p = conn.addresses()
    o, r = conn.orig, conn.resp
    rec: dict[str, Any] = {
        "uid": conn.uid,
        "ts": conn.ts,
        "syn_ts": conn.syn_ts,
        "synack_ts": conn.synack_ts,
        "established_ts": conn.established_ts,
        "close_ts": conn.close_ts,
        "end_ts": conn.last_ts,
        "duration": conn.last_ts - conn.ts,
        "ip_version": conn.ip_version,
        "orig_h": orig_h,
        "orig_p": orig_p,
        "resp_h": resp_h,
        "resp_p": resp_p,
        "conn_state": conn.conn_state,
        "history": conn.history,
        "orig_pkts": o.pkts,
        "orig_bytes": o.size,
        "resp_pkts": r.pkts,
        "resp_bytes": r.size,
        "missed_bytes": conn.missed_bytes,
        "syn_retries": conn.syn_retries,
        "retransmits": o.retransmits + r.retransmits,
        "keepalives": o.keepalives + r.keepalives,
        "zero_windows": o.zero_windows + r.zero_windows,
        "mid_stream": int(conn.mid_stream),
        "is_open": int(conn.is_open),
        "close_kind": conn.close_kind,
        "end_reason": conn.end_reason or None,
        "last_activity_ts": conn.last_activity,
        "events_dropped": conn.events_dropped,
    }
    observer = conn.observer
    h2 = summary(observer if isinstance(observer, Http2Observer) else None)
    for key in RECORD_FIELDS:
        if key not in rec:
            rec[key] = h2.get(key)
    for key in ("client_settings", "server_settings"):
        if rec[key] is not None:
            rec[key] = settings_text(rec[key])
    rec["h2c_upgrade"] = int(bool(rec["h2c_upgrade"]))
    for key in ("streams", "pings_orig", "pings_resp", "goaways", "rst_streams", "trailers",
                "grpc_errors", "data_frames", "window_updates"):
        if rec[key] is None:
            rec[key] = 0
    rec["methods"] = dict(h2.get("methods") or {})
    return rec
