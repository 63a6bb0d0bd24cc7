"""Logs lined up with connections (issue 4), the ingestion part: real-looking lines of each
format to the right UTC instant, pid, level and addresses; the splitter and the parser
under any chunking of any bytes; `tracer logs add/list/show/remove` end to end.

Expected instants are computed here with datetime from the written wall time and zone,
never with tracer's own time code.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import sqlite3
import stat
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import tracer

from cli.main import main
from tracer.logs import MAX_LINE, LineSplitter, LogParser, LogRecord, TimeBase, UnparsedLine
from tracer.logs.addresses import MAX_ADDRESSES, find_addresses, normal_ip
from tracer.logs.formats import PARSERS
from tracer.logs.records import MAX_MESSAGE
from tracer.sources.logfile import LocalZone, plan_parts, read_range

UTC = datetime.timezone.utc


def instant(wall: str, zone: str = "UTC") -> float:
    """Epoch seconds of an ISO wall time in a zone (naive wall times only)."""
    tz = UTC if zone == "UTC" else ZoneInfo(zone)
    return datetime.datetime.fromisoformat(wall).replace(tzinfo=tz).timestamp()


def parse_lines(lines: list[str], *, zone: str = "UTC", year: int | None = 2024, fmt: str = "auto",
                reference: float | None = None) -> list[LogRecord | UnparsedLine]:
    tz = UTC if zone == "UTC" else ZoneInfo(zone)
    parser = LogParser(TimeBase(tz, year=year, reference=reference), fmt)
    return parser.feed(lines) + parser.finish()


def parse_one(line: str, **kwargs: object) -> LogRecord | UnparsedLine:
    records = parse_lines([line], **kwargs)  # type: ignore[arg-type]
    assert len(records) == 1
    return records[0]


# -- issue 4, test 4: one real-looking line per format -------------------------------------

# (name, line, zone, expected instant, level, pid, process, addresses, text in the message)
FORMAT_CASES = [
    ("grpc-go klog",
     ('W1124 10:02:03.123456   4321 clientconn.go:1234] [core] [Channel #1 SubChannel #2] '
     'grpc: addrConn.createTransport failed to connect to {Addr: "10.0.0.5:9090", '
     'ServerName: "10.0.0.5:9090", }. Err: connection error: desc = "failed to receive '
     'server preface within timeout"'),
     "UTC", instant("2024-11-24T10:02:03.123456"), "warn", 4321, None,
     (("10.0.0.5", 9090),), "failed to receive server preface"),
    ("klog in a local zone",
     "E1124 10:02:03.500000    77 http2_client.go:959] transport: closing 10.0.0.5:9090",
     "Europe/Paris", instant("2024-11-24T10:02:03.5", "Europe/Paris"), "error", 77, None,
     (("10.0.0.5", 9090),), "transport: closing"),
    ("grpc C-core (abseil): thread id, not a pid",
     ("I0000 00:00:1732442523.250000 1234567 subchannel.cc:806] subchannel 0x5 "
     "{address=ipv4:10.0.0.5:9090}: connect failed"),
     "UTC", 1732442523.25, "info", None, None, (("10.0.0.5", 9090),), "connect failed"),
    ("C++ glog: thread id, not a pid",
     ("E1124 10:02:03.000001 140321 chttp2_transport.cc:2867] ipv4:10.0.0.5:9090: "
     "keepalive watchdog timeout"),
     "UTC", instant("2024-11-24T10:02:03.000001"), "error", None, None,
     (("10.0.0.5", 9090),), "keepalive watchdog"),
    ("zap JSON",
     ('{"level":"error","ts":1732442523.123,"caller":"client/dial.go:88","msg":"dial '
     'failed","addr":"10.0.0.5:9090","pid":812}'),
     "UTC", 1732442523.123, "error", 812, None, (("10.0.0.5", 9090),), "dial failed"),
    ("zap JSON, ISO time with offset",
     '{"level":"warn","ts":"2024-11-24T11:02:03.123+01:00","msg":"retrying"}',
     "America/New_York", instant("2024-11-24T10:02:03.123"), "warn", None, None, (),
     "retrying"),
    ("JSON, epoch milliseconds",
     '{"time":1732442523123,"level":"info","message":"connected to [fd00::5]:9090"}',
     "UTC", 1732442523.123, "info", None, None, (("fd00::5", 9090),), "connected"),
    ("pino JSON, numeric level",
     '{"level":50,"time":1732442523123,"pid":4388,"hostname":"h","msg":"boom"}',
     "UTC", 1732442523.123, "error", 4388, None, (), "boom"),
    ("ECS JSON, process object",
     ('{"@timestamp":"2024-11-24T10:02:03.123Z","log.level":"ERROR","message":"reset by '
     'peer 10.0.0.5:9090","process":{"pid":5120,"name":"capmvm"}}'),
     "UTC", instant("2024-11-24T10:02:03.123"), "error", 5120, "capmvm",
     (("10.0.0.5", 9090),), "reset by peer"),
    ("Docker json-file",
     ('{"log":"I1124 10:02:03.000000 1 main.go:1] started\\n","stream":"stderr",'
     '"time":"2024-11-24T10:02:03.123456789Z"}'),
     "UTC", instant("2024-11-24T10:02:03.123456"), "info", None, None, (), "started"),
    ("logrus text",
     ('time="2024-11-24T10:02:03Z" level=error msg="rpc error: code = Unavailable desc = '
     'connection error: dial tcp 10.0.0.5:9090: i/o timeout" pid=4321'),
     "Asia/Tokyo", instant("2024-11-24T10:02:03"), "error", 4321, None,
     (("10.0.0.5", 9090),), "i/o timeout"),
    ("logrus text, naive time, escaped quotes",
     'time="2024-11-24 10:02:03.5" level=warning msg="peer \\"10.0.0.5:9090\\" went away"',
     "Europe/Paris", instant("2024-11-24T10:02:03.5", "Europe/Paris"), "warn", None, None,
     (("10.0.0.5", 9090),), 'peer "10.0.0.5:9090" went away'),
    ("journald JSON",
     ('{"__CURSOR":"s=1","__REALTIME_TIMESTAMP":"1732442523123456","_PID":"812",'
     '"_COMM":"capmvm","PRIORITY":"3","MESSAGE":"lost connection to 10.0.0.5:9090",'
     '"_BOOT_ID":"b"}'),
     "UTC", 1732442523.123456, "error", 812, "capmvm", (("10.0.0.5", 9090),),
     "lost connection"),
    ("journald JSON, stdout of a service: the level its message writes",
     ('{"__REALTIME_TIMESTAMP":"1732442523000000","_SOURCE_REALTIME_TIMESTAMP":'
     '"1732442522999999","_PID":"77","SYSLOG_IDENTIFIER":"client","_COMM":"python3",'
     '"PRIORITY":"6","MESSAGE":"WARNING:grpc:reconnecting to 10.0.0.6:9090"}'),
     "UTC", 1732442522.999999, "warn", 77, "client", (("10.0.0.6", 9090),), "reconnecting"),
    ("journald JSON, MESSAGE as bytes",
     '{"__REALTIME_TIMESTAMP":"1732442523000000","_PID":"9","MESSAGE":[104,105,255]}',
     "UTC", 1732442523.0, None, 9, None, (), "hi\ufffd"),
    ("syslog RFC 3164",
     "Nov 24 10:02:03 host1 capmvm[812]: connection to 10.0.0.5:9090 reset by peer",
     "Europe/Paris", instant("2024-11-24T10:02:03", "Europe/Paris"), None, 812, "capmvm",
     (("10.0.0.5", 9090),), "reset by peer"),
    ("syslog RFC 3164 with PRI, no pid",
     ("<27>Nov  4 09:02:03 host1 kernel: TCP: request_sock_TCP: Possible SYN flooding on "
     "port 9090"),
     "UTC", instant("2024-11-04T09:02:03"), "error", None, "kernel", (), "SYN flooding"),
    ("syslog RFC 5424",
     ('<11>1 2024-11-24T10:02:03.123Z host1 capmvm 812 ID47 [meta seq="1" x="a]b"] '
     "\ufefflost [2001:db8::1]:9090"),
     "UTC", instant("2024-11-24T10:02:03.123"), "error", 812, "capmvm",
     (("2001:db8::1", 9090),), "lost"),
    ("rsyslog RFC 3339 file format",
     "2024-11-24T11:02:03.123456+01:00 host1 capmvm[812]: dial 10.0.0.5:9090",
     "UTC", instant("2024-11-24T10:02:03.123456"), None, 812, "capmvm",
     (("10.0.0.5", 9090),), "dial"),
    ("grpc-js trace (GRPC_TRACE=all GRPC_VERBOSITY=DEBUG)",
     ("D 2024-11-24T10:02:03.123Z | v1.14.7 12345 | subchannel | (3) 10.0.0.5:9090 "
     "CONNECTING -> TRANSIENT_FAILURE"),
     "America/New_York", instant("2024-11-24T10:02:03.123"), "debug", 12345, None,
     (("10.0.0.5", 9090),), "CONNECTING -> TRANSIENT_FAILURE"),
    ("grpc-js error",
     ("E 2024-11-24T10:02:03.123Z | v1.14.7 12345 | transport | (4) 10.0.0.5:9090 "
     "connection closed by GOAWAY with code 0"),
     "UTC", instant("2024-11-24T10:02:03.123"), "error", 12345, None,
     (("10.0.0.5", 9090),), "GOAWAY"),
    ("Python logging, the cookbook's format",
     ("2024-11-24 10:02:03,123 - grpc._channel - ERROR - <_InactiveRpcError of RPC that "
     'terminated with: status = StatusCode.UNAVAILABLE details = "failed to connect to all '
     'addresses; last error: UNKNOWN: ipv4:10.0.0.5:9090: Failed to connect to remote host"'),
     "America/New_York", instant("2024-11-24T10:02:03.123", "America/New_York"), "error",
     None, None, (("10.0.0.5", 9090),), "StatusCode.UNAVAILABLE"),
    ("Go's log package (grpc-go's default logger)",
     ('2024/11/24 10:02:03 WARNING: [core] [Channel #1 SubChannel #2] grpc: '
     'addrConn.createTransport failed to connect to {Addr: "[::ffff:10.0.0.5]:9090", }'),
     "UTC", instant("2024-11-24T10:02:03"), "warn", None, None, (("10.0.0.5", 9090),),
     "createTransport"),
    ("logrus terminal format",
     "ERRO[2024-11-24T10:02:03Z] dial 10.0.0.5:9090 failed",
     "UTC", instant("2024-11-24T10:02:03"), "error", None, None, (("10.0.0.5", 9090),),
     "dial"),
]


@pytest.mark.parametrize(
    ("line", "zone", "ts", "level", "pid", "process", "addresses", "text"),
    [case[1:] for case in FORMAT_CASES], ids=[case[0] for case in FORMAT_CASES])
def test_each_format_to_its_instant_pid_level_addresses(
        line: str, zone: str, ts: float, level: str | None, pid: int | None,
        process: str | None, addresses: tuple[tuple[str, int], ...], text: str) -> None:
    record = parse_one(line, zone=zone)
    assert isinstance(record, LogRecord), record
    assert record.ts == pytest.approx(ts, abs=1e-6)
    assert (record.level, record.pid, record.process) == (level, pid, process)
    assert record.addresses == addresses
    assert text in record.message
    assert record.line_no == 1


def test_a_log_of_every_format_at_once_keeps_each_line() -> None:
    lines = [case[1] for case in FORMAT_CASES if case[2] == "UTC"]
    records = parse_lines(["", *lines, "   at grpc.Dial()", "", "garbage"])
    assert [r.line_no for r in records] == list(range(2, len(lines) + 2)) + [
        len(lines) + 2, len(lines) + 4]
    assert all(isinstance(r, LogRecord) for r in records[:-2])
    assert [(type(r).__name__, r.reason) for r in records[-2:]  # type: ignore[union-attr]
            ] == [("UnparsedLine", "continuation"), ("UnparsedLine", "no_format")]


@pytest.mark.parametrize(("line", "reason"), [
    ("this is not a log line", "no_format"),
    ("    at io.grpc.Foo(Foo.java:12)", "continuation"),
    ('{"level":"info","msg":"x"', "bad_json"),
    ('{"level":"info","msg":"no time here"}', "no_timestamp"),
    ('{"level":"info","ts":42,"msg":"an uptime, not a time"}', "bad_timestamp"),
    ("I1324 10:02:03.000000 1 main.go:1] month 13", "bad_timestamp"),
    ("Feb 30 10:02:03 host app[1]: no such day", "bad_timestamp"),
    ("ERROR:grpc._channel:logging.basicConfig's default has no time", "no_timestamp"),
    ('time="yesterday" level=info msg="x"', "bad_timestamp"),
    ("INFO[0042] seconds since start are not a time", "no_timestamp"),
    ('{"__REALTIME_TIMESTAMP":"soon","MESSAGE":"x"}', "bad_timestamp"),
])
def test_a_line_that_cannot_be_used_is_kept_with_its_reason(line: str, reason: str) -> None:
    record = parse_one(line)
    assert isinstance(record, UnparsedLine)
    assert (record.reason, record.raw, record.line_no) == (reason, line, 1)


def test_a_forced_format_says_mismatch_and_tries_nothing_else() -> None:
    records = parse_lines(['{"ts":1732442523,"msg":"json"}', "Nov 24 10:02:03 h a[1]: x"],
                          fmt="syslog")
    assert isinstance(records[0], UnparsedLine) and records[0].reason == "format_mismatch"
    assert isinstance(records[1], LogRecord) and records[1].pid == 1


def test_year_of_yearless_times_from_the_files_last_change() -> None:
    # Written on 2025-01-02: December lines are from 2024, January ones from 2025.
    reference = instant("2025-01-02T08:00:00")
    records = parse_lines(["Dec 31 23:59:59 h app[1]: old year",
                           "Jan  2 07:00:00 h app[1]: new year"], year=None,
                          reference=reference)
    assert [r.ts for r in records] == [instant("2024-12-31T23:59:59"),  # type: ignore[union-attr]
                                       instant("2025-01-02T07:00:00")]


def test_naive_times_across_a_daylight_saving_change() -> None:
    records = parse_lines(["2024-03-31T01:59:59 a", "2024-03-31T03:00:00 b"],
                          zone="Europe/Paris")
    times = [r.ts for r in records]  # type: ignore[union-attr]
    assert times == [instant("2024-03-31T00:59:59"), instant("2024-03-31T01:00:00")]


def test_local_zone_follows_daylight_saving(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    try:
        zone = LocalZone()
        tb = TimeBase(zone, year=2024)
        assert tb.local(2024, 1, 15, 12, 0, 0) == instant("2024-01-15T11:00:00")
        assert tb.local(2024, 7, 15, 12, 0, 0) == instant("2024-07-15T10:00:00")
        assert datetime.datetime.fromtimestamp(instant("2024-07-15T10:00:00"), zone).hour == 12
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_message_cut_but_addresses_from_the_whole_line() -> None:
    line = "2024-11-24T10:02:03Z " + "x" * (MAX_MESSAGE + 10) + " 10.0.0.5:9090"
    record = parse_one(line)
    assert isinstance(record, LogRecord)
    assert len(record.message) == MAX_MESSAGE
    assert record.addresses == (("10.0.0.5", 9090),)


# -- addresses ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "found"), [
    ("dial 10.0.0.5:9090 ok", (("10.0.0.5", 9090),)),
    ("peer=ipv4:10.0.0.5:9090 target dns:10.0.0.6:443", (("10.0.0.5", 9090),
                                                         ("10.0.0.6", 443))),
    ("10.0.0.5:9090 -> 10.0.0.5:9090 twice", (("10.0.0.5", 9090),)),
    ("version v1.2.3.4:5 and a.1.2.3.4:5 and 1.2.3.4.5:6", ()),
    ("bad octet 256.1.1.1:80, port 0 1.1.1.1:0, port 70000 1.1.1.1:70000", ()),
    ("leading zero 010.000.000.005:9090", (("10.0.0.5", 9090),)),
    ("time 10:02:03.123 and 1.5:3", ()),
    ("[fd00::5]:9090 [FD00:0:0::5%eth0]:9090 [::ffff:10.0.0.5]:9090",
     (("fd00::5", 9090), ("10.0.0.5", 9090))),
    ("[::1]:50051 and [not:an:address]:1", (("::1", 50051),)),
])
def test_addresses_in_the_connections_tables_form(
        text: str, found: tuple[tuple[str, int], ...]) -> None:
    assert find_addresses(text) == found


def test_addresses_capped_per_line() -> None:
    text = " ".join(f"10.0.0.{i}:9090" for i in range(1, 40))
    assert len(find_addresses(text)) == MAX_ADDRESSES


def test_normal_ip_matches_the_socket_forms() -> None:
    assert normal_ip("10.0.0.5") == "10.0.0.5"
    assert normal_ip("::FFFF:10.0.0.5") == "10.0.0.5"
    assert normal_ip("FD00:0000::0005") == "fd00::5"
    assert normal_ip("10.0.0.256") is None


# -- any bytes, any chunking ------------------------------------------------------------------

LINE_STARTS = [
    "W1124 10:02:03.123456   4321 clientconn.go:1234] ",
    "I0000 00:00:1732442523.25 12 a.cc:1] ",
    '{"level":"error","ts":1732442523.123,"msg":"',
    '{"__REALTIME_TIMESTAMP":"1732442523123456","_PID":"8","MESSAGE":"',
    'time="2024-11-24T10:02:03Z" level=error msg="',
    "Nov 24 10:02:03 host1 capmvm[812]: ",
    "<11>1 2024-11-24T10:02:03.123Z h app 1 - [a b=\"c\"] ",
    "D 2024-11-24T10:02:03.123Z | v1.14.7 12345 | subchannel | ",
    "2024-11-24 10:02:03,123 - x - ERROR - ",
    "ERRO[2024-11-24T10:02:03Z] ",
    "   ", "", "\ufeff",
]
line_text = st.builds(
    lambda start, rest: start + rest, st.sampled_from(LINE_STARTS),
    st.text(alphabet=st.characters(blacklist_characters="\n"), max_size=60)
    | st.sampled_from(["10.0.0.5:9090", '"}', "[fd00::5]:9090 x", "\\", "\r", "\x00"]))
log_bytes = (
    st.lists(line_text, max_size=40).map(
        lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))
    | st.lists(line_text | st.text(max_size=30), max_size=20).map(
        lambda ls: "\r\n".join(ls).encode("utf-8", "surrogatepass"))
    | st.binary(max_size=400)
    # Long lines of few kinds of pieces: multi-byte characters, a broken one, \r anywhere.
    | st.lists(st.lists(st.sampled_from([b"a", b"\r", "é".encode(), "😀".encode(), b"\xff",
                                         b"\xe2\x82"]), max_size=60).map(b"".join),
               max_size=6).map(b"\n".join)
)


def cut(data: bytes, points: list[int]) -> Iterator[bytes]:
    last = 0
    for p in sorted({min(p, len(data)) for p in points}):
        yield data[last:p]
        last = p
    yield data[last:]


def run(chunks: Iterator[bytes], max_line: int) -> tuple[list[object], int, dict[str, int]]:
    splitter = LineSplitter(max_line)
    parser = LogParser(TimeBase(UTC, year=2024))
    out: list[object] = []
    for chunk in chunks:
        out += parser.feed(splitter.feed(chunk))
    out += parser.feed(splitter.finish())
    out += parser.finish()
    counts = {"lines": parser.lines, "parsed": parser.parsed, "unparsed": parser.unparsed,
              "blank": parser.blank}
    return out, splitter.cut_lines, counts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=log_bytes, points=st.lists(st.integers(0, 500), max_size=12),
       max_line=st.sampled_from([8, 40, MAX_LINE]))
# A \r just at the cut of a line too long to wait for (kept: it does not end the line).
@example(data=b"abcdefg\r" + b"a" * 40 + b"\n", points=[], max_line=8)
# Four-byte characters up to the cut, then a broken one.
@example(data="😀".encode() * 9 + b"\xf0\x9f" + b"a" * 40 + b"\n", points=[20, 37], max_line=8)
def test_any_chunking_gives_the_records_of_one_chunk(data: bytes, points: list[int],
                                                      max_line: int) -> None:
    whole = run(iter([data]), max_line)
    assert run(cut(data, points), max_line) == whole
    assert run((data[i:i + 1] for i in range(len(data))), max_line) == whole


def outside_model(data: bytes, max_line: int) -> tuple[list[str], int]:
    """The lines and the count of cut ones, from a plain reading of the bytes."""
    if not data:
        return [], 0
    raw = data.split(b"\n")
    if raw[-1] == b"":
        raw.pop()
    lines = [r.decode("utf-8", "replace").removesuffix("\r") for r in raw]
    return [line[:max_line] for line in lines], sum(len(line) > max_line for line in lines)


@settings(max_examples=300, deadline=None)
@given(data=log_bytes, points=st.lists(st.integers(0, 500), max_size=8),
       max_line=st.sampled_from([4, 16, 64]))
def test_lines_are_bounded_and_the_cut_ones_counted(data: bytes, points: list[int],
                                                     max_line: int) -> None:
    splitter = LineSplitter(max_line)
    lines: list[str] = []
    for chunk in cut(data, points):
        lines += splitter.feed(chunk)
    lines += splitter.finish()
    expected, cut_count = outside_model(data, max_line)
    assert lines == expected
    assert splitter.cut_lines == cut_count
    assert all(len(line) <= max_line for line in lines)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(line_text | st.text(max_size=40).map(lambda t: t.replace("\n", " ")),
                      max_size=50))
def test_every_non_blank_line_gives_exactly_one_record(lines: list[str]) -> None:
    parser = LogParser(TimeBase(UTC, year=2024))
    records = parser.feed(lines) + parser.finish()
    non_blank = [i + 1 for i, line in enumerate(lines)
                 if line.removeprefix("\ufeff" if i == 0 else "").strip()]
    assert [r.line_no for r in records] == non_blank
    assert parser.parsed + parser.unparsed == len(records)
    assert parser.blank == len(lines) - len(records)
    for r in records:
        if isinstance(r, LogRecord):
            assert r.ts == r.ts and len(r.message) <= MAX_MESSAGE
        else:
            assert r.reason and len(r.raw) <= MAX_MESSAGE


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=120) | line_text, fmt=st.sampled_from(sorted(PARSERS)))
def test_parsers_never_raise(text: str, fmt: str) -> None:
    result = PARSERS[fmt](text, TimeBase(ZoneInfo("Europe/Paris"), reference=1.7e9))
    assert isinstance(result, (str, tuple))


def test_detection_ends_at_the_same_line_whatever_the_grouping() -> None:
    # Far more held-back lines than the cap, then lines two formats both accept: which
    # one wins must not depend on how the lines were grouped into feed() calls.
    lines = [""] * 5000 + ["2024-11-24T10:02:03Z host app[1]: x"] * 40
    one = LogParser(TimeBase(UTC, year=2024))
    whole = one.feed(lines) + one.finish()
    by_line = LogParser(TimeBase(UTC, year=2024))
    pieces: list[object] = []
    for line in lines:
        pieces += by_line.feed([line])
    pieces += by_line.finish()
    assert pieces == whole and len(whole) == 40


def test_a_file_without_newlines_stays_bounded() -> None:
    splitter = LineSplitter(1000)
    out = []
    for _ in range(100):
        out += splitter.feed(b"x" * 10000)
        assert len(splitter._carry) <= 5000
    out += splitter.feed(b"\nend\n")
    assert out == ["x" * 1000, "end"] and splitter.cut_lines == 1


# -- a file read in parts --------------------------------------------------------------------

def test_parts_start_at_line_starts_and_know_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    text = "".join(f"line {i}\n" for i in range(1, 1001)) + "tail without newline"
    path.write_text(text)
    size = path.stat().st_size
    plan = plan_parts(str(path), size, 4)
    assert len(plan.parts) == 4 and plan.size == size
    assert plan.parts[0].start == 0 and plan.parts[-1].end == size
    rebuilt = b""
    for part in plan.parts:
        data = b"".join(read_range(str(path), part.start, part.end))
        assert data.startswith(f"line {part.first_line}\n".encode())
        rebuilt += data
    assert rebuilt == path.read_bytes()
    import hashlib
    assert plan.sha256 == hashlib.sha256(rebuilt).hexdigest()


# -- the command line, end to end ------------------------------------------------------------

# The lines whose instant does not depend on --tz (UTC, or an offset written).
SAMPLE = [case[1] for case in FORMAT_CASES
          if case[2] == "UTC" or case[0] in ("logrus text", "zap JSON, ISO time with offset")
          ] + [
    "this line is not a log line at all 10.0.0.9:9090",
    "",
    "    at continuation()",
]


def invoke(*args: str | Path, env: dict[str, str] | None = None,
           stdin: bytes | None = None) -> tuple[int, str, str]:
    """``tracer ARGS`` run in this process (quicker than ``support.tracer``)."""
    result = CliRunner().invoke(main, [str(a) for a in args], env=env, input=stdin,
                                catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def stored(db_path: str | Path) -> list[tuple[object, ...]]:
    """Every stored line with its addresses, in source order (ids aside)."""
    conn = sqlite3.connect(db_path)
    rows = conn.execute(
        "SELECT l.line_no, l.ts, l.level, l.pid, l.process, l.message, l.reason,"
        " (SELECT group_concat(ip || ' ' || port, ',') FROM log_addresses a"
        "  WHERE a.line_id = l.id) FROM log_lines l ORDER BY l.source_id, l.line_no"
    ).fetchall()
    conn.close()
    return rows


def test_add_list_show_and_add_again(tmp_path: Path, tmp_db: Path) -> None:
    log = tmp_path / "client.log"
    log.write_text("\n".join(SAMPLE) + "\n")
    code, _out, err = invoke("logs", "add", str(log), "--db", tmp_db, "--tz", "UTC",
                             "--year", "2024")
    assert code == 0, err
    parsed = len(SAMPLE) - 3
    assert f"client.log: {len(SAMPLE):,} lines: {parsed} parsed" in err
    assert "2 unparsed (no_format 1, continuation 1), 1 blank" in err
    assert "(log source 1)" in err
    assert stat.S_IMODE(os.stat(tmp_db).st_mode) == 0o600
    rows = stored(tmp_db)
    assert len(rows) == len(SAMPLE) - 1
    unparsed = [r for r in rows if r[6] is not None]
    assert [(r[0], r[1], r[6], r[5], r[7]) for r in unparsed] == [
        (parsed + 1, None, "no_format", SAMPLE[parsed], "10.0.0.9 9090"),
        (len(SAMPLE), None, "continuation", SAMPLE[-1], None)]
    # Each address belongs to the line that mentions it.
    for row in rows:
        for pair in (row[7] or "").split(",") if row[7] else []:
            ip, _port = pair.split(" ")
            assert ip.split(":")[0] in str(row[5]) or ip in SAMPLE[int(str(row[0])) - 1]

    code, _out, err = invoke("logs", "add", str(log), "--db", tmp_db, "--tz", "UTC",
                             "--year", "2024")
    assert code == 0, err
    assert "replaced log source 1 (client.log" in err and "(log source 2)" in err
    assert stored(tmp_db) == rows  # the same lines, once

    code, out, _err = invoke("logs", "list", "--db", tmp_db, "--format", "json")
    sources = json.loads(out)
    assert [(s["id"], s["name"], s["format"], s["tz"], s["lines"], s["parsed"],
             s["unparsed"]) for s in sources] == [
        (2, "client.log", sources[0]["format"], "UTC", len(SAMPLE), parsed, 2)]
    assert set(sources[0]["format"].split("+")) == {"json", "klog", "syslog", "logfmt",
                                                    "plain"}
    assert sources[0]["first_ts"] == pytest.approx(instant("2024-11-04T09:02:03"))
    code, out, _err = invoke("logs", "list", "--db", tmp_db)
    assert "client.log" in out and "UTC" in out

    code, out, _err = invoke("logs", "show", "--db", tmp_db, "--format", "json",
                             "--address", "10.0.0.5:9090", "--pid", "4321")
    shown = json.loads(out)
    logrus = next(i + 1 for i, line in enumerate(SAMPLE) if line.startswith('time="'))
    assert [s["line_no"] for s in shown] == [logrus, 1]  # in time order: .000 then .123
    assert shown[1]["addresses"] == [{"ip": "10.0.0.5", "port": 9090}]
    assert shown[1]["time"] == "2024-11-24 10:02:03.123Z"
    code, out, _err = invoke("logs", "show", "--db", tmp_db, "--grep", "(?i)goaway", "--format",
                             "csv")
    assert out.splitlines()[0].startswith("TIME (UTC),SOURCE,LINE,LEVEL,PID")
    assert len(out.splitlines()) == 2 and "GOAWAY" in out
    code, out, _err = invoke("logs", "show", "--db", tmp_db, "--unparsed")
    assert "no_format" in out and "continuation" in out and "10.0.0.9:9090" in out
    code, out, _err = invoke("logs", "show", "--db", tmp_db, "--since", "2024-11-24T10:02:03.2Z",
                             "--until", "1732442523.3")
    assert len(out.splitlines()) == 2 and "connect failed" in out  # the abseil line, .25
    code, out, _err = invoke("logs", "show", "--db", tmp_db, "--since", "-1s", "--limit", "2",
                             "--format", "json")
    assert len(json.loads(out)) == 2
    code, out, _err = invoke("logs", "show", "--db", tmp_db, "--source", "client.log",
                             "--limit", "1")
    assert code == 0 and len(out.splitlines()) == 2

    code, _out, err = invoke("logs", "remove", "2", "--db", tmp_db)
    assert code == 0 and "removed log source 2" in err and stored(tmp_db) == []


def test_gzip_stdin_and_parts_store_the_same_lines(tmp_path: Path, tmp_db: Path) -> None:
    text = ("\n".join(SAMPLE) + "\n") * 50
    plain = tmp_path / "a.log"
    plain.write_text(text)
    packed = tmp_path / "a.log.1"  # no .gz suffix: recognised by its first bytes
    packed.write_bytes(gzip.compress(text.encode()) + gzip.compress(b"one more 1.2.3.4:5\n"))
    base = ["--db", str(tmp_db), "--tz", "UTC", "--year", "2024"]
    assert invoke("logs", "add", str(plain), *base, "-j", "1")[0] == 0
    reference = stored(tmp_db)
    assert invoke("logs", "remove", "a.log", "--db", tmp_db)[0] == 0
    code, _out, err = invoke("logs", "add", str(plain), *base, "-j", "3")
    assert code == 0, err
    assert "3 workers" in err
    assert stored(tmp_db) == reference
    assert invoke("logs", "remove", str(plain), "--db", tmp_db)[0] == 0
    code, _out, err = invoke("logs", "add", str(packed), *base)
    assert code == 0, err
    assert stored(tmp_db)[:-1] == reference
    assert stored(tmp_db)[-1][5] == "one more 1.2.3.4:5"
    assert invoke("logs", "remove", "a.log.1", "--db", tmp_db)[0] == 0
    code, _out, err = invoke("logs", "add", "-", *base, stdin=text.encode())
    assert code == 0, err
    assert "stdin:" in err and stored(tmp_db) == reference
    # The same bytes from a file: replaced, not added twice.
    code, _out, err = invoke("logs", "add", str(plain), *base)
    assert "replaced log source 1 (stdin" in err and stored(tmp_db) == reference
    assert invoke("logs", "remove", "stdin", "--db", tmp_db)[0] == 1  # gone already


def test_damaged_gzip_keeps_the_lines_before_it(tmp_path: Path, tmp_db: Path) -> None:
    text = "".join(f"2024-11-24T10:02:{i % 60:02d}Z line {i}\n" for i in range(20000))
    packed = gzip.compress(text.encode())
    bad = tmp_path / "bad.log.gz"
    bad.write_bytes(packed[:len(packed) // 2])
    code, _out, err = invoke("logs", "add", str(bad), "--db", tmp_db, "--tz", "UTC")
    assert code == 3
    assert "damaged" in err and "Traceback" not in err
    kept = stored(tmp_db)
    assert 0 < len(kept) < 20000
    assert [r[0] for r in kept] == list(range(1, len(kept) + 1))


def test_journal_through_journalctl(tmp_path: Path, tmp_db: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    entries = tmp_path / "entries.json"
    entries.write_text("\n".join([
        json.dumps({"__REALTIME_TIMESTAMP": "1732442523123456", "_PID": "812",
                    "_COMM": "capmvm", "PRIORITY": "3",
                    "MESSAGE": "failed to receive server preface from 10.0.0.5:9090"}),
        json.dumps({"__REALTIME_TIMESTAMP": "1732442524000000", "_PID": "813",
                    "SYSLOG_IDENTIFIER": "other", "MESSAGE": "hello"}),
    ]) + "\n")
    args_seen = tmp_path / "args"
    fake = bin_dir / "journalctl"
    fake.write_text(f'#!/bin/sh\necho "$@" > {args_seen}\ncat {entries}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    code, _out, err = invoke("logs", "add", "--journal", "--unit", "capmvm.service",
                             "--since", "-1h", "--db", tmp_db, env=env)
    assert code == 0, err
    assert "journal:capmvm.service: 2 lines: 2 parsed (json 2)" in err
    assert "-o json" in args_seen.read_text() and "--unit capmvm.service --since -1h" in \
        args_seen.read_text()
    assert [(r[1], r[3], r[4], r[2]) for r in stored(tmp_db)] == [
        (1732442523.123456, 812, "capmvm", "error"), (1732442524.0, 813, "other", None)]

    fake.write_text("#!/bin/sh\necho 'Failed to parse timestamp: x' >&2\nexit 1\n")
    code, _out, err = invoke("logs", "add", "--journal", "--db", tmp_db, env=env)
    assert code == 1 and "journalctl failed (exit status 1): Failed to parse timestamp" in err


def test_clear_errors_without_tracebacks(tmp_path: Path, tmp_db: Path) -> None:
    db = str(tmp_db)
    cases = [
        (["logs", "add", str(tmp_path / "missing.log"), "--db", db],
         "error: cannot read", 1),
        (["logs", "add", str(tmp_path), "--db", db], "error: cannot read", 1),
        (["logs", "add", "--journal", "--db", db], "--journal needs journalctl", 1),
        (["logs", "add", "--db", db], "give FILE(s)", 2),
        (["logs", "add", "x.log", "--unit", "u", "--db", db], "only apply with --journal", 2),
        (["logs", "add", "x.log", "--tz", "Mars/Olympus", "--db", db], "unknown time zone", 2),
        (["logs", "show", "--db", str(tmp_path / "none.db")], "no database at", 1),
    ]
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    for args, message, status in cases:
        proc = tracer(*args, env={"PATH": str(empty)} if "--journal" in args else None,
                      check=False)
        assert proc.returncode == status, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.lower().startswith("error")]
        assert len(errors) == 1, proc.stderr


def test_help_says_how_times_are_read() -> None:
    code, out, _err = invoke("logs", "add", "--help")
    assert code == 0
    for text in ("--tz", "local zone", "--year", "thread id", "gzip", "--journal"):
        assert text in out
    code, out, _err = invoke("logs", "--help")
    for command in ("add", "list", "show", "remove"):
        assert command in out


def test_adding_and_removing_logs_refreshes_the_stored_report(tmp_path: Path,
                                                               tmp_db: Path) -> None:
    """Readers never write: the writer that changed the data stores the report again."""
    capture = Path(__file__).resolve().parent.parent / "cli" / "demo-capture.pcapng"
    code, _out, err = invoke("capture", "-q", "--read", str(capture), "--port", "50151",
                             "--db", tmp_db)
    assert code == 0, err

    def stored_report() -> dict[str, object]:
        conn = sqlite3.connect(tmp_db)
        [(kept,)] = conn.execute("SELECT report FROM report_cache").fetchall()
        conn.close()
        data: dict[str, object] = json.loads(zlib.decompress(kept))  # store.stored_report
        return data

    assert "log_evidence" not in stored_report()
    log = tmp_path / "client.log"
    log.write_text("\n".join(SAMPLE) + "\n")
    code, _out, err = invoke("logs", "add", str(log), "--db", tmp_db, "--tz", "UTC",
                             "--year", "2024")
    assert code == 0, err
    assert "log_evidence" in stored_report()
    code, _out, err = invoke("logs", "remove", "1", "--db", tmp_db)
    assert code == 0, err
    assert "log_evidence" not in stored_report()
