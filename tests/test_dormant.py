"""Idle connections sleep packed (tracer.freeze) and wake on their next packet: nothing about
them may change, and asleep they must cost under 1 KB each."""

from __future__ import annotations

import gc
import random
import sys
import tracemalloc
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.gen_capture import H2, Conversation
from tracer.pipeline import Analyzer

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


def _run(packets: list[tuple[float, bytes]], dormant_after: float) -> tuple[list, list, int]:
    analyzer = Analyzer(frozenset([PORT]), dormant_after=dormant_after)
    slept = 0
    events = []
    records = []
    it = iter((ts, 1, frame) for ts, frame in packets)
    while analyzer.feed(it, 50):
        slept = max(slept, analyzer.table.dormant)
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
    awake, awake_events, _ = _run(packets, dormant_after=float("inf"))
    slept, slept_events, sleepers = _run(packets, dormant_after=30.0)
    assert sleepers > 0  # the run did put connections to sleep
    assert slept == awake
    assert slept_events == awake_events


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
    analyzer = Analyzer(frozenset([PORT]))
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
    assert analyzer.table.dormant == n
    assert per_connection < 1024, per_connection
