"""Memory stays bounded where the table lets go of many connections at once: the end of a
capture (Analyzer.finish_batches) and the eviction of a full table (FlowTable._evict).
Neither may wake every sleeping connection."""

from __future__ import annotations

import gc
import random
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support import FULL

from benchmarks.gen_capture import H2, Conversation
from tracer.pipeline import Analyzer, Drained

PORT = 9090

Packets = list[tuple[float, bytes]]


def _leaked(i: int, start: float, rng: random.Random, net: int = 6) -> Packets:
    """Handshake, preface and SETTINGS both ways, one RPC, then silence."""
    conv = Conversation(bytes([10, net, i // 250, 1 + i % 250]), 30000 + i, start, rng)
    conv.handshake()
    h2 = H2(conv, rng, "grpc-go/1.64.0")
    h2.open()
    h2.rpc("/svc.A/Get", bdp_ping=True)
    return conv.packets


def _leakers(n: int, rng: random.Random, start: float, every: float) -> Packets:
    """``n`` leaked connections (``_leaked``), one every ``every`` seconds from ``start``,
    their packets in time order."""
    packets: Packets = []
    for i in range(n):
        packets.extend(_leaked(i, start + i * every, rng))
    packets.sort(key=lambda p: p[0])
    return packets


def _mixed(n: int, seed: int) -> Packets:
    """Connections that end the capture in every state: asleep, awake (recent, or with a
    frame cut in half, which cannot sleep), closed within the linger, half-closed, and
    attempts that never got an answer."""
    rng = random.Random(seed)
    packets: Packets = []
    for i in range(n):
        conv = Conversation(bytes([10, 7, i // 250, 1 + i % 250]), 31000 + i, 100.0 + i * 0.5,
                            rng)
        kind = i % 6
        conv.handshake()
        if kind == 5:
            packets.append(conv.packets[0])  # SYN, no answer
            continue
        h2 = H2(conv, rng, "grpc-python/1.85.3")
        h2.open()
        h2.rpc("/svc.A/Get" if i % 2 else "/svc.B/Put", bdp_ping=i % 3 == 0)
        if kind == 1:
            conv.wait(rng.uniform(0.5, 8.0))
            conv.fin(True)
        elif kind == 2:
            conv.wait(rng.uniform(0.5, 8.0))
            conv.fin(True)
            del conv.packets[-2:]  # the client's FIN only: half-closed
        elif kind == 3:
            conv.send(True, b"\x00\x00\x10\x00", ack_back=False)  # half a frame header
        packets.extend(conv.packets)
    packets.sort(key=lambda p: p[0])
    return packets


def _feed(analyzer: Analyzer, packets: Packets, batch: int = 64) -> list[Drained]:
    it: Iterator[tuple[float, int, bytes]] = iter((ts, 1, frame) for ts, frame in packets)
    out = []
    while True:
        got = analyzer.feed(it, batch)
        out.append(analyzer.drain())
        if got < batch:
            return out


def _flatten(drained: list[Drained]) -> tuple[list[dict[str, Any]], list[Any], list[Any]]:
    return ([r for d in drained for r in d.records], [e for d in drained for e in d.events],
            [a for d in drained for a in d.anomalies])


def _awake(analyzer: Analyzer) -> int:
    return analyzer.table.tracked - analyzer.table.asleep_count


# -- the end of a capture ----------------------------------------------------------------


def test_finish_batches_gives_what_finish_and_drain_give() -> None:
    packets = _mixed(300, seed=11)
    whole = Analyzer(frozenset([PORT]), FULL.replace(crowd=8))
    read_whole = _feed(whole, packets)
    whole.finish()
    end_whole = whole.drain()

    batched = Analyzer(frozenset([PORT]), FULL.replace(crowd=8))
    read_batched = _feed(batched, packets)
    assert _flatten(read_batched) == _flatten(read_whole)
    assert batched.table.asleep_count > 60  # the end has sleepers to wake
    awake_before = _awake(batched)
    assert awake_before > 5  # and connections awake
    batches = []
    for d in batched.finish_batches(batch=7):
        assert len(d.records) <= 7
        # Sleepers are woken one at a time as they are finished: never more awake.
        assert _awake(batched) <= awake_before
        batches.append(d)
    assert len(batches) >= len(end_whole.records) // 7
    records, events, anomalies = _flatten(batches)
    assert records == end_whole.records
    assert events == end_whole.events
    assert anomalies == end_whole.anomalies
    assert len({r["uid"] for r in records}) == len(records)
    reasons = {r["end_reason"] for r in records}
    assert {"open_at_end", "closed", "closing_at_end"} <= reasons
    assert batched.table.tracked == 0
    assert batched.table.outbox.finished == [] and batched.table.outbox.events == []
    assert list(batched.finish_batches(batch=7)) == [Drained()]  # nothing left


def test_finish_batches_splits_what_the_closing_tick_finishes() -> None:
    """The end's tick can finish many connections at once (their close linger ran out):
    they still come at most a batch at a time."""
    rng = random.Random(12)
    packets: Packets = []
    for i in range(20):  # closed (FIN both ways) between 100.1 and 100.4
        conv = Conversation(bytes([10, 8, 0, 1 + i]), 32000 + i, 99.0 + i * 0.01, rng)
        conv.handshake()
        conv.wait(100.1 + i * 0.015 - conv.t)
        conv.fin(True)
        packets.extend(conv.packets)
    keeper = Conversation(bytes([10, 8, 1, 1]), 33000, 99.0, rng)
    keeper.handshake()
    for at in (105.0, 105.5):  # a tick at 105.0 (linger not over), none at 105.5
        keeper.wait(at - keeper.t)
        keeper.send(True, b"x", ack_back=False)
    packets.extend(keeper.packets)
    packets.sort(key=lambda p: p[0])

    whole = Analyzer(frozenset([PORT]), FULL)
    _feed(whole, packets, batch=1000)
    whole.finish()
    expected = whole.drain().records
    assert sum(r["end_reason"] == "closed" for r in expected) == 20

    batched = Analyzer(frozenset([PORT]), FULL)
    _feed(batched, packets, batch=1000)
    assert batched.table.tracked == 21  # nothing finished before the end
    batches = list(batched.finish_batches(batch=3))
    assert all(len(d.records) <= 3 for d in batches)
    assert [r for d in batches for r in d.records] == expected


def test_drain_with_a_limit_leaves_the_rest_for_the_next() -> None:
    packets = _mixed(30, seed=13)
    analyzer = Analyzer(frozenset([PORT]), FULL)
    _feed(analyzer, packets)
    analyzer.finish()
    pending = len(analyzer.table.outbox.finished)
    assert pending > 10
    got = []
    while analyzer.table.outbox.finished:
        d = analyzer.drain(4)
        assert 1 <= len(d.records) <= 4
        got += d.records
    assert len(got) == pending
    assert analyzer.drain(4).records == []


def _asleep_at_end(n: int) -> Analyzer:
    rng = random.Random(14)
    packets = _leakers(n, rng, 1000.0, 0.02)
    analyzer = Analyzer(frozenset([PORT]), FULL)
    _feed(analyzer, packets, batch=65536)
    for t in range(0, 200, 10):  # quiet: everyone falls asleep
        analyzer.table.tick(packets[-1][0] + t)
    analyzer.drain()
    assert analyzer.table.asleep_count == n
    return analyzer


def _peak_growth(end: Callable[[], int]) -> tuple[int, int]:
    """(records, peak traced memory above the start) of ``end``."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        records = end()
        return records, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_finishing_in_batches_keeps_memory_to_a_batch() -> None:
    """2,000 sleepers: all records at once cost about 5 KB each (6.3 KB of RSS in the
    200,000 benchmark); a batch at a time, the end costs a batch, whatever the count."""
    n = 2000

    def at_once() -> int:
        analyzer.finish()
        return len(analyzer.drain().records)

    def in_batches() -> int:
        records = 0
        for d in analyzer.finish_batches(batch=64):
            records += len(d.records)
            del d
        return records

    analyzer = _asleep_at_end(n)
    all_records, all_peak = _peak_growth(at_once)
    analyzer = _asleep_at_end(n)
    batched_records, batched_peak = _peak_growth(in_batches)
    assert all_records == batched_records == n
    assert all_peak > n * 3000, all_peak  # what the test would catch
    # One batch (64 x about 5 KB) and Python's free lists (up to 2,000 tuples of each
    # size stay allocated once freed, about 0.8 MB here): not n x 5 KB.
    assert batched_peak < n * 1000, batched_peak


# -- eviction ----------------------------------------------------------------------------------


def _until_first_eviction(analyzer: Analyzer, packets: Packets) -> tuple[int, int]:
    """Feed packets one at a time until the table evicts; the awake and asleep counts
    just before."""
    it = iter((ts, 1, frame) for ts, frame in packets)
    table = analyzer.table
    awake = asleep = 0
    while table.evicted == 0:
        awake, asleep = _awake(analyzer), table.asleep_count
        assert analyzer.feed(it, 1) == 1
    return awake, asleep


def test_eviction_wakes_only_its_victims() -> None:
    rng = random.Random(15)
    packets = _leakers(300, rng, 100.0, 0.2)
    analyzer = Analyzer(frozenset([PORT]), FULL.replace(max_connections=250, crowd=8))
    awake, asleep = _until_first_eviction(analyzer, packets)
    table = analyzer.table
    victims = table.evicted
    assert victims == 250 // 100
    assert asleep > 200 and awake < 40
    # Only the victims were woken (and finished); the new connection is awake.
    assert _awake(analyzer) <= awake + 1
    assert table.asleep_count >= asleep - victims
    d = analyzer.drain()
    evicted = [r for r in d.records if r["end_reason"] == "evicted"]
    assert len(evicted) == victims
    # The least recently active: the first connections, long asleep.
    assert sorted(r["orig_p"] for r in evicted) == [30000, 30001]
    assert all(r["is_open"] for r in evicted)
    full = [a for a in d.anomalies if a.reason == "table_full"]
    assert len(full) == 1 and "evicted the 2 least recently active" in full[0].detail


def test_eviction_takes_an_awake_connection_idle_longer_than_the_sleepers() -> None:
    """An attempt never answered cannot sleep; idle since before every sleeper, it goes
    first."""
    rng = random.Random(16)
    attempt = Conversation(bytes([10, 9, 0, 1]), 40000, 99.0, rng)
    attempt.handshake()
    packets = sorted([attempt.packets[0], *_leakers(300, rng, 100.0, 0.2)], key=lambda p: p[0])
    analyzer = Analyzer(frozenset([PORT]),
                        FULL.replace(max_connections=250, crowd=8, attempt_timeout=600.0))
    _until_first_eviction(analyzer, packets)
    evicted = [r for r in analyzer.drain().records if r["end_reason"] == "evicted"]
    assert sorted(r["orig_p"] for r in evicted) == [30000, 40000]


def test_eviction_without_sleepers_takes_the_least_recently_active() -> None:
    rng = random.Random(17)
    packets = _leakers(120, rng, 100.0, 0.2)
    analyzer = Analyzer(frozenset([PORT]),
                        FULL.replace(max_connections=100, sleep_after=float("inf")))
    _until_first_eviction(analyzer, packets)
    assert analyzer.table.asleep_count == 0
    evicted = [r for r in analyzer.drain().records if r["end_reason"] == "evicted"]
    assert [r["orig_p"] for r in evicted] == [30000]
