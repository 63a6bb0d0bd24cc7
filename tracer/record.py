"""The connection record: one finished (or still open) connection as the row the store keeps."""

from __future__ import annotations

from typing import Any

from tracer.events import settings_text
from tracer.http2.observer import Http2Observer
from tracer.tcp.flow import Connection
from tracer.tcp.state import STATE_NAMES, conn_state

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
    "orig_state",
    "resp_state",
    "orig_seq_first",
    "orig_seq_next",
    "resp_seq_first",
    "resp_seq_next",
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
    "from_snapshot",
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
    "client_settings_ack_ts",
    "server_settings_ack_ts",
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
    "first_rpc_ts",
    "last_rpc_ts",
    "orig_fin_ts",
    "resp_fin_ts",
    "orig_rst_ts",
    "resp_rst_ts",
    "tls_records_orig",
    "tls_records_resp",
)


_settings_text_cache: dict[tuple[tuple[int, int], ...], str] = {}


def _settings(values: tuple[tuple[int, int], ...] | None) -> str | None:
    if values is None:
        return None
    text = _settings_text_cache.get(values)
    if text is None:
        if len(_settings_text_cache) > 4096:
            _settings_text_cache.clear()
        text = _settings_text_cache[values] = settings_text(values)
    return text


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
        "orig_state": STATE_NAMES[o.state],
        "resp_state": STATE_NAMES[r.state],
        "orig_seq_first": o.first_seq,
        "orig_seq_next": o.next,
        "resp_seq_first": r.first_seq,
        "resp_seq_next": r.next,
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
        "from_snapshot": int(conn.from_snapshot),
        "is_open": int(conn.is_open),
        "close_kind": conn.close_kind,
        "end_reason": conn.end_reason or None,
        "last_activity_ts": conn.last_activity,
        "events_dropped": conn.events_dropped,
        "orig_fin_ts": o.fin_ts,
        "resp_fin_ts": r.fin_ts,
        "orig_rst_ts": o.rst_ts,
        "resp_rst_ts": r.rst_ts,
    }
    h2 = conn.observer
    if isinstance(h2, Http2Observer):
        rec.update(
            protocol=h2.protocol,
            preface_ts=h2.preface_ts,
            client_settings_ts=h2.client_settings_ts,
            server_settings_ts=h2.server_settings_ts,
            client_settings=_settings(h2.client_settings),
            server_settings=_settings(h2.server_settings),
            client_settings_ack_ts=h2.client_settings_ack_ts,
            server_settings_ack_ts=h2.server_settings_ack_ts,
            streams=h2.streams,
            first_method=h2.first_method,
            authority=h2.authority,
            user_agent=h2.user_agent,
            pings_orig=h2.pings_orig,
            pings_resp=h2.pings_resp,
            goaways=h2.goaways,
            goaway_sender=h2.goaway_sender,
            goaway_ts=h2.goaway_ts,
            goaway_last_stream_id=h2.goaway_last_stream_id,
            goaway_error=h2.goaway_error,
            goaway_debug=h2.goaway_debug,
            rst_streams=h2.rst_streams,
            trailers=h2.trailers,
            grpc_errors=h2.grpc_errors,
            data_frames=h2.data_frames,
            window_updates=h2.window_updates,
            tls_sni=h2.tls_sni,
            tls_alpn=h2.tls_alpn,
            h2c_upgrade=int(h2.upgraded),
            first_rpc_ts=h2.first_rpc_ts,
            last_rpc_ts=h2.last_rpc_ts,
            tls_records_orig=h2.tls_records_orig,
            tls_records_resp=h2.tls_records_resp,
            grpc_statuses=dict(h2.grpc_statuses) if h2.grpc_statuses else {},
            methods=dict(h2.methods) if h2.methods else (
                {h2.first_method: h2.streams} if h2.first_method is not None else {}),
        )
    else:
        rec.update(_NO_HTTP2)
        rec["methods"] = {}
        rec["grpc_statuses"] = {}
    return rec


_NO_HTTP2: dict[str, Any] = {
    key: 0 if key in ("streams", "pings_orig", "pings_resp", "goaways", "rst_streams",
                      "trailers", "grpc_errors", "data_frames", "window_updates",
                      "h2c_upgrade", "tls_records_orig", "tls_records_resp") else None
    for key in (*RECORD_FIELDS[RECORD_FIELDS.index("protocol"):RECORD_FIELDS.index("h2c_upgrade") + 1],
                "first_rpc_ts", "last_rpc_ts", "tls_records_orig", "tls_records_resp")
}


# Counters of a continued connection that add up across the two rows.
_SUMMED = (
    "tls_records_orig", "tls_records_resp",
    "orig_pkts", "orig_bytes", "resp_pkts", "resp_bytes", "missed_bytes", "syn_retries",
    "retransmits", "keepalives", "zero_windows", "events_dropped", "streams", "pings_orig",
    "pings_resp", "goaways", "rst_streams", "trailers", "grpc_errors", "data_frames",
    "window_updates",
)
# Facts of the connection's start: the earlier row knows them; the continuation only
# fills what the earlier one lacked.
_FIRST_KNOWN = (
    "protocol", "preface_ts", "client_settings_ts", "server_settings_ts", "client_settings",
    "server_settings", "client_settings_ack_ts", "server_settings_ack_ts", "first_method",
    "authority", "user_agent", "tls_sni", "tls_alpn",
)
# How it ended: the continuation says.
_LAST_KNOWN = ("close_ts", "close_kind", "end_reason", "is_open", "end_ts", "orig_seq_next",
               "resp_seq_next")
_GOAWAY = ("goaway_sender", "goaway_ts", "goaway_last_stream_id", "goaway_error",
           "goaway_debug")
_STATE_BY_NAME = {name: i for i, name in enumerate(STATE_NAMES)}
_CONTINUITY_WINDOW = 1 << 30


def continued_record(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """The columns of ``old`` (a stored connection left open at its capture's end) after
    ``new`` (a connection picked up mid-stream on the same 4-tuple later) continues it, or
    None when the sequence numbers say ``new`` is another connection."""
    between: dict[str, int] = {}
    for side in ("orig", "resp"):
        last, first = old[f"{side}_seq_next"], new[f"{side}_seq_first"]
        if last is not None and first is not None:
            ahead = (first - last) & 0xFFFFFFFF
            if ahead >= _CONTINUITY_WINDOW:
                return None
            between[side] = ahead
    out: dict[str, Any] = {k: (old[k] or 0) + (new[k] or 0) for k in _SUMMED}
    # Bytes sent between the two captures: in the sizes, and missed.
    for side, ahead in between.items():
        out[f"{side}_bytes"] += ahead
        out["missed_bytes"] += ahead
    for k in _FIRST_KNOWN:
        out[k] = old[k] if old[k] is not None else new[k]
    for k in _LAST_KNOWN:
        out[k] = new[k]
    firsts = [t for t in (old.get("first_rpc_ts"), new["first_rpc_ts"]) if t is not None]
    out["first_rpc_ts"] = min(firsts, default=None)
    lasts = [t for t in (old.get("last_rpc_ts"), new["last_rpc_ts"]) if t is not None]
    out["last_rpc_ts"] = max(lasts, default=None)
    for k in ("orig_fin_ts", "resp_fin_ts", "orig_rst_ts", "resp_rst_ts"):
        out[k] = new[k] if new[k] is not None else old.get(k)
    if new["goaways"]:
        for k in _GOAWAY:
            out[k] = new[k]
    out["duration"] = new["end_ts"] - old["ts"]
    out["last_activity_ts"] = max(
        (t for t in (old["last_activity_ts"], new["last_activity_ts"]) if t is not None),
        default=None,
    )
    out["history"] = (old["history"] or "") + (new["history"] or "")
    states = []
    for side in ("orig", "resp"):
        before, after = old[f"{side}_state"], new[f"{side}_state"]
        # The continuation only saw the tail: it says PARTIAL where the earlier row knew
        # better, and CLOSED or RESET when the connection ended.
        merged = after if after in ("CLOSED", "RESET") or before in (None, "INACTIVE") else before
        out[f"{side}_state"] = merged
        states.append(_STATE_BY_NAME[merged])
    out["conn_state"] = conn_state(
        states[0], states[1], out["orig_bytes"], out["resp_bytes"], out["history"]
    )
    return out
