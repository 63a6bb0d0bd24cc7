"""Idle connections sleep packed (tracer.sleep) and wake on their next packet: nothing about
them may change, and asleep they must cost under 1 KB each."""

from __future__ import annotations

import gc
import random
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support import FULL

from benchmarks.gen_capture import H2, Conversation
from tracer.pipeline import Analyzer
from tracer.sleep import sleep_pack, sleep_unpack

PORT = 9090


def _conversations(n: int, seed: int) -> list[tuple[float, bytes]]:
    """Connections that talk, fall silent long enough to sleep, and talk again; some
    close after that, some stay open."""
    rng = random.Random(seed)
    packets: list[tuple[float, bytes]] = []
    for i in range(n):
        conv = Conversation(bytes([10, 3, i // 250, 1 + i % 250]), 30000 + i, 100.0 + i, rng)
        conv.handshake()
        h2 = H2(conv, rng, "grpc-go/1.64.0")
        h2.open()
        h2.rpc("/svc.A/Get", bdp_ping=True)
        conv.wait(120.0 + rng.random() * 60)  # idle: asleep after 30 s
        h2.ping(True)
        h2.rpc("/svc.A/Get" if i % 2 else "/svc.B/Put")
        h2.rpc("/svc.A/Get")
        if i % 3 == 0:
            h2.goaway(True, 0)
            conv.fin(True)
        packets.extend(conv.packets)
    packets.sort(key=lambda p: p[0])
    return packets


def _run(packets: list[tuple[float, bytes]], sleep_after: float,
         **options: Any) -> tuple[list, list, int]:
    analyzer = Analyzer(frozenset([PORT]), FULL.replace(sleep_after=sleep_after, **options))
    slept = 0
    events = []
    records = []
    it = iter((ts, 1, frame) for ts, frame in packets)
    while analyzer.feed(it, 50):
        slept = max(slept, analyzer.table.asleep_count)
        d = analyzer.drain()
        events += d.events
        records += d.records
    analyzer.finish()
    d = analyzer.drain()
    events += d.events
    records += d.records
    return sorted(records, key=lambda r: r["uid"]), events, slept


def test_sleeping_changes_nothing() -> None:
    packets = _conversations(40, seed=3)
    awake, awake_events, _ = _run(packets, sleep_after=float("inf"))
    slept, slept_events, sleepers = _run(packets, sleep_after=30.0)
    assert sleepers > 0  # the run did put connections to sleep
    assert slept == awake
    assert slept_events == awake_events


def test_a_crowd_sleeps_after_a_second_and_changes_nothing() -> None:
    """More than ``crowd`` connections awake: the idle ones sleep after crowd_sleep_after seconds,
    checked every second, instead of waiting for the minute's sweep."""
    packets = _conversations(40, seed=4)
    awake, awake_events, _ = _run(packets, sleep_after=float("inf"))
    crowded, crowded_events, sleepers = _run(packets, sleep_after=30.0, crowd=8,
                                           crowd_sleep_after=1.0)
    assert sleepers > 0
    assert crowded == awake
    assert crowded_events == awake_events


def test_a_crowd_puts_idle_connections_to_sleep_within_two_seconds() -> None:
    rng = random.Random(6)
    packets: list[tuple[float, bytes]] = []
    for i in range(50):
        conv = Conversation(bytes([10, 5, 0, 1 + i]), 40000 + i, 1000.0 + i * 0.01, rng)
        conv.handshake()
        h2 = H2(conv, rng, "grpc-go/1.64.0")
        h2.open()
        h2.rpc("/svc.A/Get")
        packets.extend(conv.packets)
    packets.sort(key=lambda p: p[0])
    analyzer = Analyzer(frozenset([PORT]), FULL.replace(crowd=10, crowd_sleep_after=1.0))
    it = iter((ts, 1, frame) for ts, frame in packets)
    while analyzer.feed(it, 1000):
        analyzer.drain()
    table = analyzer.table
    last = packets[-1][0]
    table.tick(last)  # the first tick only schedules the sweeps
    assert table.asleep_count == 0
    for step in range(1, 5):
        table.tick(last + step * 0.5)
    assert table.asleep_count >= 40  # over crowd: the idle ones slept
    assert table.open_count == 50
    # Under the crowd: none sleep so soon.
    again = Analyzer(frozenset([PORT]), FULL.replace(crowd=100, crowd_sleep_after=1.0))
    it = iter((ts, 1, frame) for ts, frame in packets)
    while again.feed(it, 1000):
        again.drain()
    for step in range(5):
        again.table.tick(last + step * 0.5)
    assert again.table.asleep_count == 0


@pytest.mark.parametrize("n", [3000])
def test_a_sleeping_connection_costs_under_a_kilobyte(n: int) -> None:
    rng = random.Random(5)
    packets: list[tuple[float, bytes]] = []
    for i in range(n):
        conv = Conversation(bytes([10, 4, i // 250, 1 + i % 250]), 20000 + i, 1000.0 + i * 1e-3,
                            rng)
        conv.handshake()
        h2 = H2(conv, rng, "grpc-python/1.85.3")
        h2.open()
        h2.rpc("/svc.A/Get", bdp_ping=True)
        packets.extend(conv.packets)
    packets.sort(key=lambda p: p[0])
    analyzer = Analyzer(frozenset([PORT]), FULL)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        it = iter((ts, 1, frame) for ts, frame in packets)
        while analyzer.feed(it, 65536):
            analyzer.drain()
        for t in range(0, 200, 10):  # the capture goes on, quiet: the table ticks
            analyzer.table.tick(packets[-1][0] + t)
        analyzer.drain()
        gc.collect()
        per_connection = (tracemalloc.get_traced_memory()[0] - before) / analyzer.table.open_count
    finally:
        tracemalloc.stop()
    assert analyzer.table.asleep_count == n
    assert per_connection < 1024, per_connection


def test_sleepers_share_equal_dicts_and_wake_with_their_own() -> None:
    """A dict among a sleeper's references (per-method or grpc-status counts) is kept as its
    items: equal ones are shared like the rest, and each woken connection gets its own."""
    shared: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    mine, theirs = {0: 1}, {0: 1}
    first = sleep_pack(b"one", ("ShADda", mine, None), shared)
    second = sleep_pack(b"two", ("ShADda", theirs, None), shared)
    assert first[1] is second[1]
    blob, refs = sleep_unpack(first)
    _, other = sleep_unpack(second)
    assert (blob, refs) == (b"one", ("ShADda", {0: 1}, None))
    assert type(refs[1]) is dict and refs[1] is not mine and refs[1] is not other[1]
    # Equal but not the same: True is not 1.
    flagged = sleep_pack(b"three", ("ShADda", {True: 1}, None), shared)
    assert flagged[1] is not first[1]
    assert [type(k) for k in sleep_unpack(flagged)[1][1]] == [bool]
    # Unhashable values: kept, not shared.
    lists = sleep_pack(b"four", ("ShADda", {0: [1]}, None), shared)
    assert sleep_unpack(lists)[1] == ("ShADda", {0: [1]}, None)
