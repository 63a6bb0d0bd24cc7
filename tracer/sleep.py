"""Packing the state of slotted objects into bytes: how idle connections sleep small.

A tracked connection is a handful of objects (connection, endpoints, HTTP/2 observer and
directions) whose numbers are separate Python objects: about 2.5 KB. A leaked
connection sits idle for hours, thousands of them at once; asleep, its numbers are one
struct-packed bytes object and its references (strings, shared tuples, HPACK state, dicts
as their items) one tuple. ``Layout`` describes one class's slots: which are floats, small
or large integers, flags, or references.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

# Slot kinds.
FLOAT = "d"  # float or None (stored as NaN)
SEQ = "seq"  # 32-bit sequence number or None (a bit in the None mask)
COUNT = "I"  # non-negative integer below 2^32
BIG = "Q"  # non-negative integer
SIGNED = "i"  # integer in 32 bits, may be negative (budgets)
FLAG = "?"  # bool
BYTE = "B"  # small integer (states, modes)
REF = "r"  # any object, kept as a reference

_NAN = math.nan


class Layout:
    """How the slots of one class are packed."""

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.numbers = [(name, kind) for name, kind in fields if kind != REF]
        self.refs = [name for name, kind in fields if kind == REF]
        self.seqs = [name for name, kind in fields if kind == SEQ]
        codes = "".join("I" if kind == SEQ else kind for _name, kind in self.numbers)
        mask = "H" if self.seqs else ""
        self.struct = struct.Struct("<" + mask + codes)
        self.size = self.struct.size
        if len(self.seqs) > 16:
            raise ValueError("at most 16 optional sequence numbers")

    def offset(self, name: str) -> int:
        """Where the packed value of the numeric slot ``name`` starts."""
        codes = "H" if self.seqs else ""
        for slot, kind in self.numbers:
            if slot == name:
                return struct.calcsize("<" + codes)
            codes += "I" if kind == SEQ else kind
        raise KeyError(name)

    def pack(self, obj: Any) -> tuple[bytes, tuple[Any, ...]]:
        values: list[Any] = []
        none_mask = 0
        bit = 1
        for name, kind in self.numbers:
            value = getattr(obj, name)
            if kind == FLOAT:
                values.append(_NAN if value is None else value)
            elif kind == SEQ:
                if value is None:
                    none_mask |= bit
                    value = 0
                values.append(value)
                bit <<= 1
            else:
                values.append(value)
        if self.seqs:
            values.insert(0, none_mask)
        return self.struct.pack(*values), tuple(getattr(obj, name) for name in self.refs)

    def unpack(self, obj: Any, blob: bytes, offset: int, refs: tuple[Any, ...],
               ref_offset: int) -> tuple[int, int]:
        """Set ``obj``'s slots from ``blob[offset:]`` and ``refs[ref_offset:]``; return the
        offsets after them."""
        values = list(self.struct.unpack_from(blob, offset))
        none_mask = values.pop(0) if self.seqs else 0
        bit = 1
        for (name, kind), value in zip(self.numbers, values, strict=True):
            if kind == FLOAT:
                setattr(obj, name, None if math.isnan(value) else value)
            elif kind == SEQ:
                setattr(obj, name, None if none_mask & bit else value)
                bit <<= 1
            else:
                setattr(obj, name, value)
        for i, name in enumerate(self.refs):
            setattr(obj, name, refs[ref_offset + i])
        return offset + self.size, ref_offset + len(self.refs)



class Sleeper(tuple):  # type: ignore[type-arg]
    """A connection asleep in the flow table: ``(packed numbers, references)`` (see
    ``sleep_pack``), stored under the connection's client-side key. (Kept in this
    interpreted module: a compiled class cannot derive from tuple.)"""

    __slots__ = ()


class _Items(tuple):  # type: ignore[type-arg]
    """A dict that a sleeper references, as its items: hashable, so that sleepers with
    equal dicts (the grpc-status counts of every connection that made one good RPC) share
    one tuple; woken, it is a dict again, the connection's own."""

    __slots__ = ()


def _same_types(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if type(a) is _Items:
        return all(type(k) is type(j) and type(v) is type(w)
                   for (k, v), (j, w) in zip(a, b, strict=True))
    return True


_REF_MASK = struct.Struct("<QB")  # which references are not None; how many there are
SHARED_MAX = 1 << 16  # distinct reference tuples remembered for sharing


def sleep_pack(blob: bytes, refs: tuple[Any, ...],
               shared: dict[tuple[Any, ...], tuple[Any, ...]]) -> Sleeper:
    """One sleeping connection: its numbers compressed (raw deflate: timestamps and
    sequence numbers of one connection share most of their bytes, about 2.5x smaller),
    and the references that are not None in one tuple, shared with every sleeper that has
    the same ones (``shared``, the caller's: the connections of one client mostly hold the
    same history, SETTINGS, texts and HPACK states)."""
    if len(refs) > 64:
        raise ValueError("at most 64 references")
    mask = 0
    kept = []
    for i, ref in enumerate(refs):
        if ref is not None:
            mask |= 1 << i
            kept.append(_Items(ref.items()) if type(ref) is dict else ref)
    mine = tuple(kept)
    try:
        common = shared.get(mine)
    except TypeError:  # an unhashable reference (a list, a dict's value): not shared
        common = None
    else:
        if common is None:
            if len(shared) >= SHARED_MAX:
                shared.clear()
            shared[mine] = mine
        elif not all(_same_types(a, b) for a, b in zip(common, mine, strict=True)):
            common = None  # equal but not the same (1 and True): keep our own
    squeeze = zlib.compressobj(1, zlib.DEFLATED, -15)
    packed = squeeze.compress(_REF_MASK.pack(mask, len(refs)) + blob) + squeeze.flush()
    return Sleeper((packed, common if common is not None else mine))


def sleep_peek(sleeper: Sleeper, offset: int, size: int) -> bytes:
    """``size`` bytes of the blob given to ``sleep_pack``, from ``offset``, decompressing
    no more of it than that (a look at a sleeper without waking it)."""
    start = _REF_MASK.size + offset
    head = zlib.decompressobj(-15).decompress(sleeper[0], start + size)
    return head[start:start + size]


def sleep_unpack(sleeper: Sleeper) -> tuple[bytes, tuple[Any, ...]]:
    """``(blob, refs)`` as given to ``sleep_pack``."""
    raw = zlib.decompress(sleeper[0], -15)
    mask, count = _REF_MASK.unpack_from(raw)
    kept = iter(sleeper[1])
    refs = []
    for i in range(count):
        ref = next(kept) if mask >> i & 1 else None
        refs.append(dict(ref) if type(ref) is _Items else ref)
    return raw[_REF_MASK.size:], tuple(refs)
