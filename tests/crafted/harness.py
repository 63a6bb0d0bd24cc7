"""Run one crafted capture through the project's reader and pipeline; render what it found.

The rendered summary is what the golden files hold: per connection (sorted by ts, then
orig_p) a stable subset of the record, its events as ``[name, dir, {fields}]`` (without uid,
n and ts) and its anomaly reasons; anomalies not tied to a connection go in a separate list.
Times are offsets in seconds from the case's first packet, so the files read easily.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from scapy.utils import PcapWriter
from support import FULL

from tracer.pipeline import Analyzer
from tracer.sources.pcapfile import CaptureReader

from .cases import T0, Case

GOLDEN_DIR = Path(__file__).parent / "golden"

# The record fields a golden file holds, in this order. Timestamps are made relative.
RECORD_SUBSET = (
    "ts",
    "syn_ts",
    "orig_h",
    "orig_p",
    "resp_h",
    "resp_p",
    "conn_state",
    "history",
    "orig_pkts",
    "resp_pkts",
    "orig_bytes",
    "resp_bytes",
    "missed_bytes",
    "mid_stream",
    "is_open",
    "close_kind",
    "end_reason",
    "syn_retries",
    "retransmits",
    "keepalives",
    "zero_windows",
    "protocol",
    "streams",
    "first_method",
    "methods",
    "authority",
    "user_agent",
    "pings_orig",
    "pings_resp",
    "goaways",
    "goaway_sender",
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
_RELATIVE = ("ts", "syn_ts")
_EVENT_SKIP = ("ts", "uid", "n", "dir")


def write_pcap(case: Case, path: Path) -> None:
    """Write the case's frames with scapy's pcap writer (Ethernet link type)."""
    snaplen = case.snaplen if case.snaplen is not None else 65535
    writer = PcapWriter(str(path), linktype=1, sync=False, snaplen=snaplen)
    try:
        writer.write_header(None)
        for frame in case.frames:
            raw = bytes(frame.pkt)
            usec = frame.usec
            captured = raw if frame.snap is None else raw[: frame.snap]
            writer.write_packet(
                captured, sec=T0 + usec // 1_000_000, usec=usec % 1_000_000, wirelen=len(raw)
            )
    finally:
        writer.close()


def analyze(case: Case, path: Path) -> tuple[list[dict[str, Any]], list[Any], list[Any]]:
    """Read the capture back through the project's reader and pipeline."""
    analyzer = Analyzer(frozenset({case.port}), FULL.replace(**case.options))
    with CaptureReader.open(str(path)) as reader:
        packets = iter(reader)
        while analyzer.feed(packets, 10000):
            pass
    analyzer.finish()
    drained = analyzer.drain()
    return drained.records, drained.events, drained.anomalies


def _plain(value: Any) -> Any:
    """JSON-friendly form: tuples become lists (what a JSON round trip gives)."""
    return json.loads(json.dumps(value))


def _relative(ts: float | None) -> float | None:
    return None if ts is None else round(ts - T0, 6)


def event_row(event: Any) -> list[Any]:
    extra = {
        f.name: getattr(event, f.name)
        for f in dataclasses.fields(event)
        if f.name not in _EVENT_SKIP
    }
    if "opaque" in extra:
        # As the events table stores it: 16 hex digits, easy to match with the case.
        extra["opaque"] = f"{extra['opaque']:016x}"
    row: list[Any] = [event.name, event.dir]
    if extra:
        row.append(_plain(extra))
    return row


def summarize(
    case: Case, records: list[dict[str, Any]], events: list[Any], anomalies: list[Any]
) -> dict[str, Any]:
    """The comparable summary of one run."""
    connections = []
    known = {rec["uid"] for rec in records}
    for rec in sorted(records, key=lambda r: (r["ts"], r["orig_p"])):
        row: dict[str, Any] = {}
        for key in RECORD_SUBSET:
            value = rec[key]
            row[key] = _relative(value) if key in _RELATIVE else _plain(value)
        row["events"] = [event_row(e) for e in events if e.uid == rec["uid"]]
        row["anomalies"] = [a.reason for a in anomalies if a.uid == rec["uid"]]
        connections.append(row)
    return {
        "case": case.name,
        "about": case.about,
        "options": _plain(case.options),
        "connections": connections,
        "anomalies": [a.reason for a in anomalies if a.uid not in known],
        "orphan_events": [event_row(e) for e in events if e.uid not in known],
    }


def run(case: Case, workdir: Path) -> tuple[dict[str, Any], str]:
    """Build, write, read back and summarize one case; also the full repr of the output
    (records, events, anomalies) for checks that must look at everything."""
    path = workdir / f"{case.name}.pcap"
    write_pcap(case, path)
    records, events, anomalies = analyze(case, path)
    everything = repr((records, events, anomalies))
    return summarize(case, records, events, anomalies), everything


def render(summary: dict[str, Any]) -> str:
    """Stable text of a summary: one field per line, one event per line."""
    out = ["{"]
    out.append(f'  "case": {json.dumps(summary["case"])},')
    out.append(f'  "about": {json.dumps(summary["about"])},')
    out.append(f'  "options": {json.dumps(summary["options"], sort_keys=True)},')
    out.append('  "connections": [')
    conns = summary["connections"]
    for i, conn in enumerate(conns):
        out.append("    {")
        for key, value in conn.items():
            if key in ("events", "anomalies"):
                continue
            out.append(f"      {json.dumps(key)}: {json.dumps(value, sort_keys=True)},")
        out.append('      "events": [')
        evs = conn["events"]
        for j, ev in enumerate(evs):
            comma = "," if j < len(evs) - 1 else ""
            out.append(f"        {json.dumps(ev, sort_keys=True)}{comma}")
        out.append("      ],")
        out.append(f'      "anomalies": {json.dumps(conn["anomalies"])}')
        out.append("    }" + ("," if i < len(conns) - 1 else ""))
    out.append("  ],")
    out.append(f'  "anomalies": {json.dumps(summary["anomalies"])},')
    out.append(f'  "orphan_events": {json.dumps(summary["orphan_events"], sort_keys=True)}')
    out.append("}")
    return "\n".join(out) + "\n"


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"
