"""The connection record: the connections table's declared columns, and how a connection fills them.

COLUMNS is the one list of the table's columns: the store builds its INSERT, its readers'
column lists and its schema checks from it. build_record turns one finished (or still
open) connection into the row the store keeps."""

from __future__ import annotations

from typing import Any, NamedTuple

from tracer.events import settings_text
from tracer.http2.observer import Http2Observer
from tracer.tcp.flow import Connection
from tracer.tcp.state import STATE_NAMES, conn_state


class Column(NamedTuple):
    """One column of the connections table.

    ``source`` says what fills it: ``tcp`` (the flow table's Connection) and ``http2`` (its
    Http2Observer; ``build_record``) make the record; ``capture`` is the writer's (which
    capture run wrote the row); ``attribution`` is written separately, when the owner of
    the client socket is known (store.writer.CaptureWriter.attribute). ``since`` is the
    migration that adds it to a database (store/schema.py; the migrations hold their own
    frozen lists, a test checks they agree with this table). ``nullable``: the record may
    hold None there; an ``http2`` column that is not nullable is 0 without an observer.
    ``default`` is the column's SQL DEFAULT. ``merge`` says what a connection continued
    from an earlier capture's row keeps (continued_record): ``kept`` the earlier row's
    value, ``sum`` both added, ``first`` the earlier row's unless it had none, ``last``
    the continuation's, ``newer`` the continuation's unless it has none, ``goaway`` the
    continuation's when it saw a GOAWAY, ``min``/``max`` of the two, ``computed`` worked
    out in continued_record itself."""

    name: str
    sql: str  # INTEGER, REAL or TEXT
    source: str
    since: str
    nullable: bool = True
    default: str | None = None
    merge: str = "kept"


_TCP, _H2, _CAPTURE, _ATTR = "tcp", "http2", "capture", "attribution"
_M001 = "m001_initial"
_M014 = "m014_unmigrated_columns"
_I, _R, _T = "INTEGER", "REAL", "TEXT"

# Every column of the connections table, in the order a reader lists them (the order of a
# table made by the release before this table: `tracer connections --format json` keeps
# its key order).
COLUMNS = (
    Column("uid", _T, _TCP, _M001, nullable=False),
    Column("ts", _R, _TCP, _M001, nullable=False),
    Column("syn_ts", _R, _TCP, _M001),
    Column("synack_ts", _R, _TCP, _M001),
    Column("established_ts", _R, _TCP, _M001),
    Column("close_ts", _R, _TCP, _M001, merge="last"),
    Column("end_ts", _R, _TCP, _M001, nullable=False, merge="last"),
    Column("duration", _R, _TCP, _M001, nullable=False, merge="computed"),
    Column("ip_version", _I, _TCP, _M001, nullable=False),
    Column("orig_h", _T, _TCP, _M001, nullable=False),
    Column("orig_p", _I, _TCP, _M001, nullable=False),
    Column("resp_h", _T, _TCP, _M001, nullable=False),
    Column("resp_p", _I, _TCP, _M001, nullable=False),
    Column("conn_state", _T, _TCP, _M001, nullable=False, merge="computed"),
    Column("history", _T, _TCP, _M001, nullable=False, merge="computed"),
    Column("orig_state", _T, _TCP, _M014, nullable=False, merge="computed"),
    Column("resp_state", _T, _TCP, _M014, nullable=False, merge="computed"),
    Column("orig_seq_first", _I, _TCP, _M014),
    Column("orig_seq_next", _I, _TCP, _M014, merge="last"),
    Column("resp_seq_first", _I, _TCP, _M014),
    Column("resp_seq_next", _I, _TCP, _M014, merge="last"),
    Column("orig_pkts", _I, _TCP, _M001, nullable=False, merge="sum"),
    Column("orig_bytes", _I, _TCP, _M001, nullable=False, merge="sum"),
    Column("resp_pkts", _I, _TCP, _M001, nullable=False, merge="sum"),
    Column("resp_bytes", _I, _TCP, _M001, nullable=False, merge="sum"),
    Column("missed_bytes", _I, _TCP, _M001, nullable=False, merge="sum"),
    Column("syn_retries", _I, _TCP, _M001, nullable=False, merge="sum"),
    Column("retransmits", _I, _TCP, _M001, nullable=False, merge="sum"),
    Column("keepalives", _I, _TCP, _M001, nullable=False, merge="sum"),
    Column("zero_windows", _I, _TCP, _M001, nullable=False, merge="sum"),
    Column("mid_stream", _I, _TCP, _M001, nullable=False),
    Column("from_snapshot", _I, _TCP, _M014, nullable=False),
    Column("is_open", _I, _TCP, _M001, nullable=False, merge="last"),
    Column("close_kind", _T, _TCP, _M001, merge="last"),
    Column("end_reason", _T, _TCP, _M001, merge="last"),
    Column("last_activity_ts", _R, _TCP, _M001, merge="max"),
    Column("events_dropped", _I, _TCP, _M001, nullable=False, merge="sum"),
    Column("protocol", _T, _H2, _M001, merge="first"),
    Column("preface_ts", _R, _H2, _M001, merge="first"),
    Column("client_settings_ts", _R, _H2, _M001, merge="first"),
    Column("server_settings_ts", _R, _H2, _M001, merge="first"),
    Column("client_settings", _T, _H2, _M001, merge="first"),
    Column("server_settings", _T, _H2, _M001, merge="first"),
    Column("client_settings_ack_ts", _R, _H2, _M014, merge="first"),
    Column("server_settings_ack_ts", _R, _H2, _M014, merge="first"),
    Column("streams", _I, _H2, _M001, nullable=False, merge="sum"),
    Column("first_method", _T, _H2, _M001, merge="first"),
    Column("authority", _T, _H2, _M001, merge="first"),
    Column("user_agent", _T, _H2, _M001, merge="first"),
    Column("pings_orig", _I, _H2, _M001, nullable=False, merge="sum"),
    Column("pings_resp", _I, _H2, _M001, nullable=False, merge="sum"),
    Column("goaways", _I, _H2, _M001, nullable=False, merge="sum"),
    Column("goaway_sender", _T, _H2, _M001, merge="goaway"),
    Column("goaway_ts", _R, _H2, _M001, merge="goaway"),
    Column("goaway_last_stream_id", _I, _H2, _M001, merge="goaway"),
    Column("goaway_error", _I, _H2, _M001, merge="goaway"),
    Column("goaway_debug", _T, _H2, _M001, merge="goaway"),
    Column("rst_streams", _I, _H2, _M001, nullable=False, merge="sum"),
    Column("trailers", _I, _H2, _M001, nullable=False, merge="sum"),
    Column("grpc_errors", _I, _H2, _M001, nullable=False, merge="sum"),
    Column("data_frames", _I, _H2, _M001, nullable=False, merge="sum"),
    Column("window_updates", _I, _H2, _M001, nullable=False, merge="sum"),
    Column("tls_sni", _T, _H2, _M001, merge="first"),
    Column("tls_alpn", _T, _H2, _M001, merge="first"),
    Column("h2c_upgrade", _I, _H2, _M001, nullable=False),
    Column("capture_id", _I, _CAPTURE, _M001, nullable=False),
    Column("pid", _I, _ATTR, "m002_attribution"),
    Column("process_start", _R, _ATTR, "m002_attribution"),
    Column("attribution", _T, _ATTR, "m002_attribution"),
    Column("attributed_ts", _R, _ATTR, "m002_attribution"),
    Column("first_rpc_ts", _R, _H2, "m007_rpc_counts", merge="min"),
    Column("last_rpc_ts", _R, _H2, "m007_rpc_counts", merge="max"),
    Column("orig_fin_ts", _R, _TCP, "m009_folded_closes", merge="newer"),
    Column("resp_fin_ts", _R, _TCP, "m009_folded_closes", merge="newer"),
    Column("orig_rst_ts", _R, _TCP, "m009_folded_closes", merge="newer"),
    Column("resp_rst_ts", _R, _TCP, "m009_folded_closes", merge="newer"),
    Column("tls_records_orig", _I, _H2, "m010_tls_records", nullable=False, default="0",
           merge="sum"),
    Column("tls_records_resp", _I, _H2, "m010_tls_records", nullable=False, default="0",
           merge="sum"),
    Column("client_uid", _I, _ATTR, "m013_attribution_detail"),
    Column("client_user", _T, _ATTR, "m013_attribution_detail"),
    Column("client_netns", _I, _ATTR, "m013_attribution_detail"),
    Column("client_cgroup", _T, _ATTR, "m013_attribution_detail"),
    Column("client_container", _T, _ATTR, "m013_attribution_detail"),
    Column("client_pod", _T, _ATTR, "m013_attribution_detail"),
)

# The record's own columns (what build_record fills), in the order the writer sends them.
RECORD_FIELDS = tuple(c.name for c in COLUMNS if c.source == _TCP or c.source == _H2)
# What the writer inserts: the record, then the capture run that wrote it.
WRITTEN_COLUMNS = RECORD_FIELDS + tuple(c.name for c in COLUMNS if c.source == _CAPTURE)
# What build_record puts beside the columns: method -> count, grpc-status -> count.
RECORD_EXTRAS = ("methods", "grpc_statuses")


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


# A connection without an HTTP/2 observer (never spoke HTTP/2, or not followed): its
# counters are 0 and everything else unknown.
_NO_HTTP2: dict[str, Any] = {
    c.name: None if c.nullable else 0 for c in COLUMNS if c.source == _H2
}


def _merged(kind: str) -> tuple[str, ...]:
    return tuple(c.name for c in COLUMNS if c.merge == kind and c.source != _ATTR)


# How a continued connection's columns come from its two rows (Column.merge).
_SUMMED = _merged("sum")
_FIRST_KNOWN = _merged("first")  # facts of its start: the earlier row knows them
_LAST_KNOWN = _merged("last")  # how it ended: the continuation says
_NEWER = _merged("newer")
_GOAWAY = _merged("goaway")
_EARLIEST = _merged("min")
_LATEST = _merged("max")
_STATE_BY_NAME = {name: i for i, name in enumerate(STATE_NAMES)}
_CONTINUITY_WINDOW = 1 << 30


def continued_record(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """The columns of ``old`` (a stored connection left open at its capture's end) after
    ``new`` (a connection picked up mid-stream on the same 4-tuple later) continues it, or
    None when the sequence numbers say ``new`` is another connection. Columns whose merge
    is ``kept`` are not in it: the stored row keeps them."""
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
    for k in _EARLIEST:
        firsts = [t for t in (old.get(k), new[k]) if t is not None]
        out[k] = min(firsts, default=None)
    for k in _LATEST:
        lasts = [t for t in (old.get(k), new[k]) if t is not None]
        out[k] = max(lasts, default=None)
    for k in _NEWER:
        out[k] = new[k] if new[k] is not None else old.get(k)
    if new["goaways"]:
        for k in _GOAWAY:
            out[k] = new[k]
    out["duration"] = new["end_ts"] - old["ts"]
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
