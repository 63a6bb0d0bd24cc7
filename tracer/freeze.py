"""Packing the state of slotted objects into bytes: how idle connections sleep small.

A tracked connection is a handful of objects (connection, endpoints, HTTP/2 observer and
directions) whose numbers are separate Python objects: about 2.5 KB. A leaked
connection sits idle for hours, thousands of them at once; asleep, its numbers are one
struct-packed bytes object and its references (strings, shared tuples, HPACK state) one
tuple. ``Layout`` describes one class's slots: which are floats, small or large integers,
flags, or references.
"""

from __future__ import annotations

import math
import struct
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
        for (name, kind), value in zip(self.numbers, values):
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



class Dormant(tuple):  # type: ignore[type-arg]
    """A connection asleep in the flow table: ``(blob, *references)`` in one tuple, stored
    under both of the connection's keys. (Kept in this interpreted module: a compiled
    class cannot derive from tuple.)"""

    __slots__ = ()
