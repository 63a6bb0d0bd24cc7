"""HPACK decoding per direction with the hpack library, memoised across connections.

Decoding every header block with the pure-Python hpack library costs about 16 us, which
alone would cap a capture at a few tens of thousands of RPCs per second. But a header
block's meaning depends only on the decoder's dynamic table and the block's bytes, and
gRPC clients send the same blocks again and again (the same method from a fresh
connection, the same indexed references on a pooled one). So decoding is memoised on
(table state, block bytes) -> (allow-listed fields, next table state). Table states are
interned by content, so every connection that reaches the same table shares one state and
every later block it sends is a dictionary lookup. On a miss the hpack library decodes for
real, from the connection's own decoder or one rebuilt from the state.

Soundness for connections picked up mid-stream (or after a lost header block): the
decoder starts from an empty table. Entries it inserts sit at the front of the real
encoder's table too, so any reference it can resolve is resolved correctly; a reference
into the unknown part raises, and that block's method is reported as unknown. A decode
therefore never returns a wrong value, only "unknown".

Bounded: at most ``max_transitions`` memo entries and ``max_state_bytes`` of interned
table contents; past either limit the memo starts over (states held by live connections
stay valid).
"""

from __future__ import annotations

from hpack import Decoder
from hpack.exceptions import HPACKError
from hpack.table import table_entry_size

# Header values that may be kept (DESIGN.md safety rules). Everything else is decoded only
# to keep the dynamic table right, and dropped.
ALLOWED_HEADERS = frozenset(
    (b":path", b":authority", b"user-agent", b"content-type", b"grpc-status", b"grpc-message")
)
# The largest dynamic table we are willing to hold per state. SETTINGS_HEADER_TABLE_SIZE
# above this is rare; such a block decodes as unknown rather than costing memory.
MAX_TABLE_SIZE = 65536
MAX_HEADER_LIST_SIZE = 1 << 18

Fields = tuple[tuple[bytes, bytes], ...]


class TableState:
    """An immutable snapshot of a dynamic table: its max size and entries, newest first."""

    __slots__ = ("sid", "maxsize", "entries", "size")

    def __init__(self, sid: int, maxsize: int, entries: tuple[tuple[bytes, bytes], ...]) -> None:
        self.sid = sid
        self.maxsize = maxsize
        self.entries = entries
        self.size = sum(table_entry_size(n, v) for n, v in entries)


class HpackMemo:
    """Shared memo of decoded header blocks; one per capture run."""

    def __init__(self, max_transitions: int = 16384, max_state_bytes: int = 16 << 20) -> None:
        self.max_transitions = max_transitions
        self.max_state_bytes = max_state_bytes
        self._next_sid = 1
        self.empty = TableState(0, 4096, ())
        self._transitions: dict[tuple[int, bytes], tuple[Fields, TableState]] = {}
        self._states: dict[tuple[int, tuple[tuple[bytes, bytes], ...]], TableState] = {}
        self._state_bytes = 0
        self.hits = 0
        self.misses = 0
        self.resets = 0

    def lookup(self, state: TableState, block: bytes) -> tuple[Fields, TableState] | None:
        return self._transitions.get((state.sid, block))

    def remember(
        self, state: TableState, block: bytes, fields: Fields, maxsize: int,
        entries: tuple[tuple[bytes, bytes], ...],
    ) -> TableState:
        """Record a decode and return the interned state the table is in after it."""
        if (
            len(self._transitions) >= self.max_transitions
            or self._state_bytes >= self.max_state_bytes
        ):
            self._transitions.clear()
            self._states.clear()
            self._state_bytes = 0
            self.resets += 1
        if maxsize == state.maxsize and entries == state.entries:
            new = state
        else:
            content = (maxsize, entries)
            found = self._states.get(content)
            if found is None:
                found = TableState(self._next_sid, maxsize, entries)
                self._next_sid += 1
                self._states[content] = found
                self._state_bytes += found.size + 64 * len(entries)
            new = found
        self._transitions[(state.sid, block)] = (fields, new)
        return new


class HpackError(Exception):
    """A header block the decoder could not decode; the direction's table is now unknown."""


class HpackDirection:
    """The HPACK decoding context of one direction of one connection."""

    __slots__ = ("memo", "state", "decoder", "decoder_state")

    def __init__(self, memo: HpackMemo) -> None:
        self.memo = memo
        self.state = memo.empty
        self.decoder: Decoder | None = None
        self.decoder_state: TableState | None = None

    def reset(self) -> None:
        """Forget the table (after a lost header block or a decode error)."""
        self.state = self.memo.empty
        self.decoder = None
        self.decoder_state = None

    def decode(self, block: bytes) -> Fields:
        """Allow-listed fields of one complete header block; raises HpackError."""
        memo = self.memo
        hit = memo._transitions.get((self.state.sid, block))
        if hit is not None:
            memo.hits += 1
            self.state = hit[1]
            return hit[0]
        memo.misses += 1
        decoder = self.decoder
        if decoder is None or self.decoder_state is not self.state:
            decoder = _materialize(self.state)
        before = self.state
        try:
            headers = decoder.decode(block, raw=True)
        except (HPACKError, IndexError, ValueError) as exc:
            self.reset()
            raise HpackError(f"{type(exc).__name__}: {exc}") from None
        fields: Fields = tuple(
            (bytes(n), bytes(v)) for n, v in headers if n in ALLOWED_HEADERS
        )
        table = decoder.header_table
        self.state = memo.remember(
            before, block, fields, table.maxsize, tuple(table.dynamic_entries)
        )
        self.decoder = decoder
        self.decoder_state = self.state
        return fields


def _materialize(state: TableState) -> Decoder:
    """A real hpack decoder whose dynamic table holds ``state``."""
    decoder = Decoder(max_header_list_size=MAX_HEADER_LIST_SIZE)
    decoder.max_allowed_table_size = MAX_TABLE_SIZE
    table = decoder.header_table
    table.maxsize = state.maxsize
    for name, value in reversed(state.entries):
        table.add(name, value)
    return decoder
