"""Inside TLS the RPCs cannot be seen: the observer counts application data records each
way and makes the connection active with each, whole or split across segments, across a
gap inside one record's body, and when the connection is picked up mid-stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crafted.cases import Capture, Tcp, client_hello, server_hello, tls_app_data
from crafted.harness import analyze, write_pcap


def _run(cap: Capture, tmp_path: Path, name: str) -> dict[str, Any]:
    case = cap.case(name, name)
    path = tmp_path / f"{name}.pcap"
    write_pcap(case, path)
    records, _events, anomalies = analyze(case, path)
    assert not [a for a in anomalies if a.reason == "tls_record_desync"], anomalies
    [record] = records
    return record


def _hello(t: Tcp) -> None:
    t.handshake()
    t.c(client_hello(b"grpc.example.com", b"h2"))
    t.s(server_hello(b"h2") + b"\x14\x03\x03\x00\x01\x01" + tls_app_data(40))


def test_records_counted_each_way_whole_and_split(tmp_path: Path) -> None:
    cap = Capture()
    t = Tcp(cap, cport=42001)
    _hello(t)
    t.c(tls_app_data(60) + tls_app_data(20))  # two records in one segment
    records = tls_app_data(300) + tls_app_data(10)
    t.c(records[:7])  # a header cut in two...
    t.c(records[7:200])  # ...a body across segments...
    t.c(records[200:])  # ...and the next record with the body's end
    cap.wait(5.0)
    t.s(tls_app_data(30))
    t.close_by_client()
    r = _run(cap, tmp_path, "tls_split")
    assert r["protocol"] == "tls"
    assert (r["tls_records_orig"], r["tls_records_resp"]) == (4, 2)
    # The server's last record, 5 s after the client's: the connection's last activity.
    assert r["last_activity_ts"] is not None and r["last_activity_ts"] - r["ts"] > 5.0
    assert r["streams"] == 0  # RPCs are not seen, and not guessed


def test_a_gap_inside_a_record_body_keeps_the_records(tmp_path: Path) -> None:
    cap = Capture()
    t = Tcp(cap, cport=42002)
    _hello(t)
    body = tls_app_data(1000)
    t.c(body[:300])
    t.skip(True, body[300:700])  # lost by the capture, inside the record's body
    t.c(body[700:] + tls_app_data(50))
    t.close_by_client()
    r = _run(cap, tmp_path, "tls_gap")
    assert r["tls_records_orig"] == 2 and r["missed_bytes"] == 400


def test_tls_picked_up_mid_stream_is_still_tls(tmp_path: Path) -> None:
    """No hello (the capture began after it): a segment that starts with an application
    data record, followed by another, is TLS, and its records count."""
    cap = Capture()
    t = Tcp(cap, cport=42003)
    t.c(tls_app_data(80) + tls_app_data(40))  # no SYN, no hello: mid-stream
    t.s(tls_app_data(60))
    t.c(tls_app_data(30))
    r = _run(cap, tmp_path, "tls_mid")
    assert r["mid_stream"] == 1 and r["protocol"] == "tls"
    assert (r["tls_records_orig"], r["tls_records_resp"]) == (3, 1)
    assert r["last_activity_ts"] is not None
