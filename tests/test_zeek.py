"""`tracer connections --format zeek|zeek-json`: a conn.log that Zeek's tools read.

The TSV is read back twice: by bro-cut (Zeek's zeek-cut under its older name, Debian's
bro-aux, which the Makefile installs) and by a reader that follows Zeek's ASCII format as
its header declares it (separator, unset and empty markers, \\xHH escapes, types); every
value must equal the stored connection's. The JSON form must hold the same values under
the same keys, unset ones left out, as Zeek's use_json writer does.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import DEMO_CAPTURE, tracer

from cli.zeek import FIELDS, _tsv_value, zeek_json, zeek_tsv

PORT = "50151"  # the demo capture's server port


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("zeek") / "tracer.db"
    tracer("capture", "-r", DEMO_CAPTURE, "--port", PORT, "--db", db, "-q")
    return db


def _stored(db: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        tracer("connections", "--db", db, "--format", "json").stdout)
    assert len(rows) > 30  # the demo's three clients
    return rows


def _unescape(text: str) -> str:
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
                 text.encode())
    return raw.decode()


def read_zeek_log(text: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """A Zeek ASCII log read as Zeek's reader does: header lines say how to read the rest."""
    header: dict[str, str] = {}
    rows = []
    lines = text.split("\n")
    assert lines[-1] == "", "the log ends with a newline"
    first = lines[0]
    assert first.startswith("#separator ")
    sep = _unescape(first.split(" ", 1)[1])
    fields: list[str] = []
    types: list[str] = []
    for line in lines[1:-1]:
        if line.startswith("#"):
            key, _, value = line[1:].partition(sep)
            header[key] = value
            if key == "fields":
                fields = value.split(sep)
            elif key == "types":
                types = value.split(sep)
            continue
        cells = line.split(sep)
        assert len(cells) == len(fields) == len(types), line
        row: dict[str, Any] = {}
        for name, kind, cell in zip(fields, types, cells, strict=True):
            if cell == header["unset_field"]:
                row[name] = None
            elif cell == header["empty_field"]:
                row[name] = ""
            elif kind in ("time", "interval"):
                row[name] = float(cell)
            elif kind in ("count", "port"):
                row[name] = int(cell)
            elif kind == "bool":
                assert cell in ("T", "F")
                row[name] = cell == "T"
            else:
                row[name] = _unescape(cell)
        rows.append(row)
    return header, rows


def _expected(r: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, kind, get in FIELDS:
        value = get(r)
        if value is not None and kind in ("time", "interval"):
            value = round(float(value), 6)
        out[name] = value
    return out


def test_tsv_has_zeeks_header_and_every_stored_value(demo_db: Path) -> None:
    stored = _stored(demo_db)
    text = tracer("connections", "--db", demo_db, "--format", "zeek").stdout
    header, rows = read_zeek_log(text)
    assert header["path"] == "conn"
    assert header["set_separator"] == ","
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d", header["open"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d", header["close"])
    fields = header["fields"].split("\t")
    # Zeek's own conn.log names, in Zeek's order, for what is measured here
    zeek_names = ["ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto",
                  "service", "duration", "orig_bytes", "resp_bytes", "conn_state",
                  "missed_bytes", "history", "orig_pkts", "resp_pkts"]
    assert fields[:len(zeek_names)] == zeek_names
    assert all(f.startswith(("tracer_", "grpc_", "tls_")) for f in fields[len(zeek_names):])
    assert len(rows) == len(stored)
    for got, want in zip(rows, stored, strict=True):
        assert got == _expected(want)
    states = {r["conn_state"] for r in rows}
    assert "S1" in states and states & {"SF", "RSTO", "RSTR"}  # open ones and closed ones
    assert {r["service"] for r in rows} == {"http2"}


@pytest.mark.skipif(shutil.which("bro-cut") is None and shutil.which("zeek-cut") is None,
                    reason="neither zeek-cut nor bro-cut (Debian's bro-aux) is installed")
def test_zeek_cut_reads_the_tsv(demo_db: Path) -> None:
    cut = shutil.which("zeek-cut") or shutil.which("bro-cut")
    assert cut is not None
    stored = _stored(demo_db)
    text = tracer("connections", "--db", demo_db, "--format", "zeek").stdout
    out = subprocess.run([cut, "-u", "ts", "id.orig_h", "id.orig_p", "conn_state", "history",
                          "tracer_open"], input=text, capture_output=True, text=True,
                         check=True, timeout=30).stdout
    lines = out.splitlines()
    assert len(lines) == len(stored)
    for line, r in zip(lines, stored, strict=True):
        ts = datetime.datetime.fromtimestamp(r["ts"], datetime.timezone.utc)
        assert line.split("\t") == [
            ts.strftime("%Y-%m-%dT%H:%M:%S+0000"), r["orig_h"], str(r["orig_p"]),
            r["conn_state"], r["history"], "T" if r["is_open"] else "F"]


def test_json_lines_carry_the_same_values_under_zeeks_keys(demo_db: Path) -> None:
    stored = _stored(demo_db)
    text = tracer("connections", "--db", demo_db, "--format", "zeek-json").stdout
    lines = text.splitlines()
    assert len(lines) == len(stored)
    for line, want in zip(lines, stored, strict=True):
        got = json.loads(line)
        expected = {k: v for k, v in _expected(want).items() if v is not None}
        assert got == expected
        assert isinstance(got["ts"], float) and isinstance(got["id.orig_p"], int)


def test_filters_apply_to_the_export(demo_db: Path) -> None:
    stored = _stored(demo_db)
    first = stored[0]
    text = tracer("connections", "--db", demo_db, "--format", "zeek", "--client",
                  first["orig_h"], "--state", first["conn_state"].lower()).stdout
    _, rows = read_zeek_log(text)
    want = [r for r in stored
            if r["orig_h"] == first["orig_h"] and r["conn_state"] == first["conn_state"]]
    assert [r["uid"] for r in rows] == [r["uid"] for r in want]
    later = tracer("connections", "--db", demo_db, "--format", "zeek-json", "--until",
                   repr(first["ts"])).stdout.splitlines()
    assert [json.loads(x)["uid"] for x in later] == [
        r["uid"] for r in stored if r["ts"] <= first["ts"]]


def test_bad_state_and_client_are_refused(demo_db: Path) -> None:
    bad = tracer("connections", "--db", demo_db, "--state", "XX", check=False)
    assert bad.returncode == 2 and "--state" in bad.stderr
    bad = tracer("connections", "--db", demo_db, "--client", "nosuch", check=False)
    assert bad.returncode == 2 and "neither an IP address nor a process id" in bad.stderr


_ROW = {"ts": 1.5, "uid": "C1", "orig_h": "10.0.0.1", "orig_p": 1, "resp_h": "10.0.0.2",
        "resp_p": 2, "protocol": None, "duration": 0.25, "orig_bytes": 0, "resp_bytes": 0,
        "conn_state": "S0", "missed_bytes": 0, "history": "S", "orig_pkts": 1, "resp_pkts": 0,
        "is_open": 1, "close_kind": None, "from_snapshot": 0, "mid_stream": 0, "pid": None,
        "preface_ts": None, "server_settings_ts": None, "streams": 0, "first_method": None,
        "authority": None, "user_agent": None, "goaway_sender": None, "goaway_error": None,
        "rst_streams": 0, "tls_sni": None, "tls_alpn": None}


@given(st.text(max_size=40) | st.sampled_from(["-", "(empty)", "\\x09", "\t", "\n"]))
def test_any_text_survives_the_tsv(text: str) -> None:
    """A user agent or an SNI may hold anything: one line, one cell, read back unchanged."""
    row = {**_ROW, "user_agent": text}
    stamp = datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc)
    log = "\n".join(zeek_tsv([row], now=lambda: stamp)) + "\n"
    _, rows = read_zeek_log(log)
    assert len(rows) == 1
    assert rows[0]["grpc_user_agent"] == text
    obj = json.loads(next(zeek_json([row])))
    assert obj["grpc_user_agent"] == text


def test_markers_are_escaped_not_confused() -> None:
    assert _tsv_value("-", "string") == "\\x2d"  # a lone dash is a value, not unset
    assert _tsv_value("", "string") == "(empty)"
    assert _tsv_value("(empty)", "string") == "\\x28empty)"
    assert _tsv_value(None, "count") == "-"
    assert _tsv_value("a\tb\nc\\", "string") == "a\\x09b\\x0ac\\x5c"
