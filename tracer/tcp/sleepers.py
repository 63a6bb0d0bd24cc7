"""The flow table's sleeping connections, kept apart from the awake ones.

An idle open connection is packed (tracer.sleep) and kept here under its client-side key,
in the order it went to sleep. Nothing here wakes a connection on its own: the table asks
for one by key when a packet of it arrives, for the oldest when it must evict, or for any
at the end of input. Eviction looks at the packed last-activity time of the oldest
sleepers without unpacking them, and never touches the rest.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from tracer.decode import reverse_key
from tracer.sleep import Sleeper, sleep_pack, sleep_peek, sleep_unpack

_LAST_TS = struct.Struct("<d")


class Sleepers:
    """Sleeping connections by client-side key, oldest first."""

    def __init__(self, last_ts_at: int) -> None:
        # Where each sleeper's last packet time sits in its packed numbers.
        self._last_ts_at = last_ts_at
        self._by_key: dict[bytes, Sleeper] = {}
        # Reference tuples shared between sleepers (see tracer.sleep.sleep_pack).
        self._shared: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def put(self, okey: bytes, blob: bytes, refs: tuple[Any, ...]) -> None:
        """Keep a connection's packed state (``refs`` without the key) under ``okey``."""
        self._by_key[okey] = sleep_pack(blob, refs, self._shared)

    def take(self, key: bytes) -> tuple[bytes, bytes, tuple[Any, ...]] | None:
        """The sleeper with ``key`` in either direction, taken out: (client-side key,
        packed numbers, references without the key); None when none sleeps under it."""
        by_key = self._by_key
        okey = key
        sleeper = by_key.pop(okey, None)
        if sleeper is None:
            okey = reverse_key(key)
            sleeper = by_key.pop(okey, None)
            if sleeper is None:
                return None
        blob, refs = sleep_unpack(sleeper)
        return okey, blob, refs

    def take_any(self) -> tuple[bytes, bytes, tuple[Any, ...]] | None:
        """The most recent sleeper, taken out (the end of input takes them all)."""
        if not self._by_key:
            return None
        okey, sleeper = self._by_key.popitem()
        blob, refs = sleep_unpack(sleeper)
        return okey, blob, refs

    def oldest(self, count: int) -> list[tuple[float, bytes]]:
        """(last packet time, key) of the ``count`` sleepers that went to sleep first,
        least recently active first, read without waking them."""
        out: list[tuple[float, bytes]] = []
        at = self._last_ts_at
        for key, sleeper in self._by_key.items():
            if len(out) >= count:
                break
            out.append((_LAST_TS.unpack(sleep_peek(sleeper, at, 8))[0], key))
        out.sort()
        return out

    def client_keys(self) -> Iterator[bytes]:
        """Client-side keys of the sleepers (do not change the sleepers while iterating)."""
        return iter(self._by_key)

    def packed_bytes(self) -> int:
        """Bytes of packed numbers held (a measurement of the structure's own size)."""
        return sum(len(sleeper[0]) for sleeper in self._by_key.values())
