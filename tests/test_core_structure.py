"""The core's structure: one owner per piece of state, no reference cycles, an honest table
API, typed options, and the parser's mode changes only along its declared table."""

from __future__ import annotations

import gc
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support import FULL

from benchmarks.gen_capture import H2, Conversation
from tracer.decode import ACK, FIN, SYN
from tracer.http2.modes import (
    DETECT,
    FRAMES,
    IGNORE,
    MODE_NAMES,
    RESYNC,
    TLS_RECORDS,
    TRANSITIONS,
)
from tracer.http2.observer import Direction, Http2Context
from tracer.options import CoreOptions
from tracer.outbox import Budget, Outbox
from tracer.pipeline import Analyzer

PORT = 9090


def _packets(n: int, seed: int, *, close_every: int = 3) -> list[tuple[float, int, bytes]]:
    rng = random.Random(seed)
    out: list[tuple[float, bytes]] = []
    for i in range(n):
        conv = Conversation(bytes([10, 9, i // 250, 1 + i % 250]), 32000 + i, 100.0 + i, rng)
        conv.handshake()
        h2 = H2(conv, rng, "grpc-go/1.64.0")
        h2.open()
        h2.rpc("/svc.A/Get", bdp_ping=True)
        if i % close_every == 0:
            conv.wait(2.0)
            conv.fin(True)
        out.extend(conv.packets)
    out.sort(key=lambda p: p[0])
    return [(ts, 1, frame) for ts, frame in out]


def _run(analyzer: Analyzer, packets: list[tuple[float, int, bytes]]) -> None:
    it = iter(packets)
    while analyzer.feed(it, 100):
        analyzer.drain()


def _cyclic_garbage(connections: int) -> int:
    gc.collect()
    gc.disable()
    try:
        analyzer = Analyzer(frozenset([PORT]), FULL.replace(sleep_after=5.0))
        _run(analyzer, _packets(connections, seed=1))
        last = analyzer.stats.last_ts
        assert last is not None
        for t in range(0, 130, 10):  # sleepers, wakers, lingering closes
            analyzer.table.tick(last + t)
        analyzer.drain()
        for _ in analyzer.finish_batches(16):
            pass
        del analyzer
        return gc.collect()
    finally:
        gc.enable()


def test_no_connection_forms_a_reference_cycle() -> None:
    """Connections, observers, directions and budgets point only down: all of them are
    freed by reference counting. What the cycle collector finds is the run's decoder (its
    nested functions share one environment), the same however many connections went by."""
    few, many = _cyclic_garbage(20), _cyclic_garbage(80)
    assert few == many, (few, many)
    assert many <= 32, many


def test_open_by_client_counts_sleepers_and_leaves_closed_ones_out() -> None:
    analyzer = Analyzer(frozenset([PORT]), FULL.replace(sleep_after=5.0))
    packets = _packets(30, seed=2)
    _run(analyzer, packets)
    table = analyzer.table
    last = analyzer.stats.last_ts
    assert last is not None
    table.tick(last + 61.0)  # the minute's sweep: idle open connections sleep
    table.tick(last + 122.0)
    assert table.asleep_count == 20
    assert table.open_count == 20  # 10 of 30 closed with FIN/FIN
    by_client = table.open_by_client()
    assert sum(by_client.values()) == 20
    assert len(by_client) == 20  # one connection per client address here
    assert all(len(client) == 4 for client in by_client)
    assert table.asleep_count == 20  # counting woke nobody


def test_next_deadline_is_when_tick_has_work() -> None:
    analyzer = Analyzer(frozenset([PORT]), FULL)
    table = analyzer.table
    assert table.next_deadline() is None  # no time seen yet
    packets = _packets(1, seed=3, close_every=1)  # one connection, closed by FIN/FIN
    _run(analyzer, packets[:-1])
    closed_at = packets[-1][0]
    _run(analyzer, packets[-1:])
    deadline = table.next_deadline()
    assert deadline is not None
    assert deadline == pytest.approx(closed_at + table.close_linger)
    table.tick(deadline - 0.001)
    assert analyzer.drain().records == []
    table.tick(deadline)
    records = analyzer.drain().records
    assert [r["end_reason"] for r in records] == ["closed"]


def test_options_are_typed_with_one_default_each() -> None:
    defaults = CoreOptions()
    assert defaults.decode_server_headers is False and defaults.rpc_events is False
    assert defaults.replace(crowd=8).crowd == 8
    with pytest.raises(TypeError, match="unknown core option"):
        defaults.replace(no_such_option=8)
    with pytest.raises(ValueError, match="max_connections must be at least 1"):
        CoreOptions(max_connections=0)
    with pytest.raises(ValueError, match="close_linger must be >= 0"):
        CoreOptions(close_linger=-1.0)
    with pytest.raises(TypeError, match="reorder_bytes must be a number"):
        CoreOptions(reorder_bytes="1M")  # type: ignore[arg-type]


def test_the_analyzer_and_its_parts_share_one_outbox() -> None:
    analyzer = Analyzer(frozenset([PORT]), FULL)
    assert analyzer.table.outbox is analyzer.outbox
    assert analyzer.h2.outbox is analyzer.outbox


def test_a_mode_change_outside_the_table_is_refused() -> None:
    assert all(a != b for a, b in TRANSITIONS)
    assert {name for pair in TRANSITIONS for name in pair} == set(range(len(MODE_NAMES)))
    d = Direction(True, True)
    d.set_mode(RESYNC)  # DETECT -> RESYNC: listed
    with pytest.raises(AssertionError):
        d.set_mode(IGNORE)  # RESYNC -> IGNORE: not listed
    d.set_mode(FRAMES)
    with pytest.raises(AssertionError):
        d.set_mode(TLS_RECORDS)
    assert d.mode == FRAMES


def test_an_observer_reports_activity_by_what_data_returns() -> None:
    outbox = Outbox()
    ctx = Http2Context(outbox)
    obs = ctx.observer(Budget("Cx", outbox.events, 8))
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + bytes(8)
    window_update = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x10\x00"
    assert obs.data(True, 1.0, preface) is False  # the preface alone is not activity
    assert obs.orig.mode == FRAMES and obs.resp.mode == DETECT
    assert obs.data(True, 1.1, settings) is True
    assert obs.data(True, 1.2, ping) is False  # keepalive PINGs are not activity
    assert obs.data(True, 1.3, window_update) is True
    assert [type(e).__name__ for e in outbox.events] == [
        "PrefaceReceived", "SettingsReceived", "PingSent"]


def test_a_late_copy_of_a_finished_connections_syn_gets_a_uid_of_its_own() -> None:
    """The SYN that opened a connection, seen again after the connection finished (same
    time and sequence numbers: a merged or reordered capture), starts a connection with a
    uid of its own: the store keeps one row per uid, so both rows survive."""
    key = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + (1024).to_bytes(2, "big") + (PORT).to_bytes(2, "big")
    rkey = key[4:8] + key[0:4] + key[10:12] + key[8:10]
    syn = (key, 1024, PORT, 0, 0, SYN, 65535, b"", 0)
    analyzer = Analyzer(frozenset([PORT]), FULL)
    table = analyzer.table
    for ts, seg in [(1.0, syn), (1.0, (rkey, PORT, 1024, 0, 1, SYN | ACK, 65535, b"", 0)),
                    (1.0, (key, 1024, PORT, 1, 1, ACK, 65535, b"", 0)),
                    (2.0, (key, 1024, PORT, 1, 1, FIN | ACK, 65535, b"", 0)),
                    (2.0, (rkey, PORT, 1024, 1, 2, FIN | ACK, 65535, b"", 0)),
                    (20.0, (key, 1024, PORT, 2, 2, ACK, 65535, b"", 0)),
                    (1.0, syn)]:
        table.segment(ts, seg)
        table.tick(ts)
    table.close()
    drained = analyzer.drain()
    records = drained.records
    assert [r["end_reason"] for r in records] == ["closed", "open_at_end"]
    assert records[0]["uid"] != records[1]["uid"]
    by_uid: dict[str, list[int]] = {}
    for e in drained.events:
        by_uid.setdefault(e.uid, []).append(e.n)
    assert sorted(by_uid.values()) == [[1], [1, 2, 3, 4, 5]]
