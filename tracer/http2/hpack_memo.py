"""HPACK decoding per direction, memoised across connections.

Two layers, measured on the benchmark capture (gRPC request blocks of ~10 fields):
- a memo on (table state, block bytes) -> (allow-listed fields, next table state). A block's
  meaning depends only on the decoder's dynamic table and its bytes, and gRPC clients send
  the same blocks again and again (the same call from every fresh connection, the same
  indexed references on a pooled one). Connections that send the same blocks in the same
  order share table states, so their next block is a dictionary lookup (~0.3 us);
- on a miss, ``decode_block``: the RFC 7541 decoding loop, written for this job on top of
  the hpack library's static table and Huffman decoder (memoised per string), with a
  dynamic table that can be restored from a shared state in one step. It skips the
  values of fields that are neither kept nor indexed and avoids hpack's per-field logging
  and copies: ~2.5 us a block where ``hpack.Decoder.decode`` takes ~15 us. Whenever hpack
  decodes a block, it returns the same allow-listed fields and leaves the same table;
  where hpack raises, it raises too (except for a corrupt Huffman string in a value that
  is neither kept nor indexed, which it does not read). tests/test_hpack.py checks this
  against hpack.Decoder on generated and mutated blocks.

Soundness for connections picked up mid-stream (or after a lost header block): the
decoder starts from an empty table. Entries it inserts sit at the front of the real
encoder's table too, so any reference it can resolve is resolved correctly; a reference
into the unknown part raises, and that block's method is reported as unknown. A decode
therefore never returns a wrong value, only "unknown".

Bounded: at most ``max_transitions`` memo entries and ``max_state_bytes`` of table
snapshots; past either limit the memo starts over (states held by live connections stay
valid). The Huffman memo holds at most MAX_HUFFMAN_MEMO strings.
"""

from __future__ import annotations

from collections import deque

from hpack.exceptions import HPACKError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

# Header values that may be kept (DESIGN.md safety rules). Everything else is decoded only
# to keep the dynamic table right, and dropped.
ALLOWED_HEADERS = frozenset(
    (b":path", b":authority", b"user-agent", b"content-type", b"grpc-status", b"grpc-message")
)
# The largest dynamic table we are willing to hold per state. SETTINGS_HEADER_TABLE_SIZE
# above this is rare; such a block decodes as unknown rather than costing memory.
MAX_TABLE_SIZE = 65536
MAX_HEADER_LIST_SIZE = 1 << 18
VARINT_MAX_LENGTH = 5  # as hpack: longer integer encodings are errors
MAX_HUFFMAN_MEMO = 65536
MAX_PURE_BLOCKS = 16

STATIC = HeaderTable.STATIC_TABLE
STATIC_LEN = len(STATIC)

Fields = tuple[tuple[bytes, bytes], ...]
Entries = tuple[tuple[bytes, bytes], ...]


class DynamicTable:
    """RFC 7541 section 4 dynamic table: entries newest first, evicted oldest first.

    Same semantics as hpack's HeaderTable, but it can be built from a snapshot in one step
    (a memo miss after a hit continues from a shared state)."""

    __slots__ = ("entries", "maxsize", "size")

    def __init__(self, maxsize: int = 4096, entries: Entries = (), size: int = 0) -> None:
        self.entries: deque[tuple[bytes, bytes]] = deque(entries)
        self.size = size
        self.maxsize = maxsize

    def add(self, name: bytes, value: bytes) -> None:
        size = 32 + len(name) + len(value)
        if size > self.maxsize:
            self.entries.clear()
            self.size = 0
            return
        self.entries.appendleft((name, value))
        self.size += size
        self._shrink()

    def resize(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._shrink()

    def _shrink(self) -> None:
        entries = self.entries
        while self.size > self.maxsize:
            name, value = entries.pop()
            self.size -= 32 + len(name) + len(value)


class TableState:
    """An immutable snapshot of a dynamic table, shared by every direction that reaches it.

    ``depth`` counts the table-changing blocks since the empty table."""

    __slots__ = ("depth", "entries", "maxsize", "sid", "size")

    def __init__(self, sid: int, maxsize: int, entries: Entries, size: int, depth: int) -> None:
        self.sid = sid
        self.maxsize = maxsize
        self.entries = entries
        self.size = size
        self.depth = depth

    def table(self) -> DynamicTable:
        return DynamicTable(self.maxsize, self.entries, self.size)


class HpackMemo:
    """Shared memo of decoded header blocks; one per capture run.

    A state is named by how it was reached (a state and a block), not by its content, so
    recording a decode costs no hashing of the table; connections that send the same
    blocks in the same order share states. Only the first ``max_depth`` table changes of a
    direction are shared: past them histories diverge (deadlines, trace ids), snapshots
    would cost more than they save, and the direction continues on its own table."""

    def __init__(self, max_transitions: int = 32768, max_state_bytes: int = 32 << 20,
                 max_depth: int = 6) -> None:
        self.max_transitions = max_transitions
        self.max_state_bytes = max_state_bytes
        self.max_depth = max_depth
        self._next_sid = 1
        self.empty = TableState(0, 4096, (), 0, 0)
        self._transitions: dict[tuple[int, bytes], tuple[Fields, TableState]] = {}
        self._state_bytes = 0
        self.hits = 0
        self.misses = 0
        self.resets = 0

    def remember(self, state: TableState, block: bytes, fields: Fields,
                 table: DynamicTable | None) -> TableState | None:
        """Record a decode; ``table`` is the table after it, None when the block left the
        table as it was. Returns the shared state after the block, or None when the
        direction goes on with a private table."""
        if table is not None and state.depth >= self.max_depth:
            return None
        if (
            len(self._transitions) >= self.max_transitions
            or self._state_bytes >= self.max_state_bytes
        ):
            self._transitions.clear()
            self._state_bytes = 0
            self.resets += 1
        if table is None:
            new = state
        else:
            new = TableState(self._next_sid, table.maxsize, tuple(table.entries), table.size,
                             state.depth + 1)
            self._next_sid += 1
            self._state_bytes += new.size + 16 * len(new.entries)
        self._transitions[(state.sid, block)] = (fields, new)
        return new


class HpackError(Exception):
    """A header block that cannot be decoded; the direction's table is now unknown."""


_huffman_memo: dict[bytes, bytes] = {}


def _huffman(raw: bytes) -> bytes:
    decoded = _huffman_memo.get(raw)
    if decoded is None:
        try:
            decoded = decode_huffman(raw)
        except HPACKError as exc:
            raise HpackError(str(exc)) from None
        if len(_huffman_memo) >= MAX_HUFFMAN_MEMO:
            _huffman_memo.clear()
        _huffman_memo[raw] = decoded
    return decoded


def _integer(block: bytes, pos: int, mask: int) -> tuple[int, int]:
    """RFC 7541 5.1 integer with a ``mask``-sized prefix at ``pos``; (value, next pos)."""
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    count = 1
    n = len(block)
    while True:
        if pos >= n:
            raise HpackError("truncated integer")
        b = block[pos]
        pos += 1
        count += 1
        value += (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if count > VARINT_MAX_LENGTH:
            raise HpackError("integer representation too long")


def _string(block: bytes, pos: int) -> tuple[bytes, int]:
    huffman = block[pos] & 0x80
    length, pos = _integer(block, pos, 0x7F)
    end = pos + length
    if end > len(block):
        raise HpackError("truncated header block")
    raw = block[pos:end]
    return (_huffman(raw) if huffman and raw else raw), end


def _entry(index: int, dynamic: deque[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    if 0 < index <= STATIC_LEN:
        return STATIC[index - 1]
    index -= STATIC_LEN + 1
    if 0 <= index < len(dynamic):
        return dynamic[index]
    raise HpackError(f"invalid table index {index + STATIC_LEN + 1}")


def decode_block(table: DynamicTable, block: bytes) -> tuple[Fields, bool]:
    """Decode one header block into ``table``: its allow-listed fields, and whether the
    block changed the table.

    Raises HpackError where hpack.Decoder would raise (the table is then unusable)."""
    try:
        return _decode_block(table, block)
    except IndexError:
        # A representation runs past the end of the block (the cheap checks are left to
        # the bytes indexing itself).
        raise HpackError("truncated header block") from None


def _decode_block(table: DynamicTable, block: bytes) -> tuple[Fields, bool]:
    dynamic = table.entries
    allowed = ALLOWED_HEADERS
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    n = len(block)
    inflated = 0
    seen_field = False
    changed = False
    # hpack's limit on the decoded header list: a block can only reach it when it is long
    # against the table (each field inflates by at most the table size or twice the
    # block's length): short blocks, nearly all of them, skip the accounting.
    account = n * (32 + table.maxsize + 2 * n) > MAX_HEADER_LIST_SIZE
    while pos < n:
        b = block[pos]
        if b & 0x80:
            # Indexed field (the common case): inline the one-byte integer and the lookup.
            index = b & 0x7F
            if index == 0x7F:
                index, pos = _integer(block, pos, 0x7F)
            else:
                pos += 1
            if 0 < index <= STATIC_LEN:
                name, value = STATIC[index - 1]
            elif 0 <= index - STATIC_LEN - 1 < len(dynamic):
                name, value = dynamic[index - STATIC_LEN - 1]
            else:
                raise HpackError(f"invalid table index {index}")
        elif b & 0x40:
            index, pos = _integer(block, pos, 0x3F)
            if index:
                name = _entry(index, dynamic)[0]
            else:
                name, pos = _string(block, pos)
            value, pos = _string(block, pos)
            table.add(name, value)
            changed = True
        elif b & 0x20:
            if seen_field:
                raise HpackError("table size update not at the start of the block")
            size, pos = _integer(block, pos, 0x1F)
            if size > MAX_TABLE_SIZE:
                raise HpackError(f"table size {size} above {MAX_TABLE_SIZE}")
            table.resize(size)
            changed = True
            account = n * (32 + table.maxsize + 2 * n) > MAX_HEADER_LIST_SIZE
            continue
        else:
            index, pos = _integer(block, pos, 0x0F)
            if index:
                name = _entry(index, dynamic)[0]
            else:
                name, pos = _string(block, pos)
            if name in allowed:
                value, pos = _string(block, pos)
            else:
                # Neither kept nor indexed: skip the value undecoded. (The one place this
                # differs from hpack: a corrupt Huffman string here is not an error, and
                # the header list limit counts its encoded length.)
                length, pos = _integer(block, pos, 0x7F)
                if pos + length > n:
                    raise HpackError("truncated header block")
                value = block[pos:pos + length]
                pos += length
        seen_field = True
        if account:
            inflated += 32 + len(name) + len(value)
        if name in allowed:
            out.append((name, value))
    if inflated > MAX_HEADER_LIST_SIZE:
        raise HpackError(f"header list larger than {MAX_HEADER_LIST_SIZE}")
    return tuple(out), changed


class HpackDirection:
    """The HPACK decoding context of one direction of one connection.

    Shared while ``state`` is set (memo lookups); private once ``state`` is None: then
    ``table`` is the only copy and ``pure`` remembers the blocks that did not change it
    (a pooled connection repeating the same indexed request), until the table changes."""

    __slots__ = ("memo", "pure", "state", "table", "table_state")

    def __init__(self, memo: HpackMemo, state: TableState | None = None) -> None:
        self.memo = memo
        self.state: TableState | None = state if state is not None else memo.empty
        self.table: DynamicTable | None = None  # live table; matches table_state if shared
        self.table_state: TableState | None = None
        self.pure: dict[bytes, Fields] | None = None

    def reset(self) -> None:
        """Forget the table (after a lost header block or a decode error)."""
        self.state = self.memo.empty
        self.table = None
        self.table_state = None
        self.pure = None

    def decode(self, block: bytes) -> Fields:
        """Allow-listed fields of one complete header block; raises HpackError."""
        memo = self.memo
        state = self.state
        if state is None:
            return self._decode_private(block)
        hit = memo._transitions.get((state.sid, block))
        if hit is not None:
            memo.hits += 1
            self.state = hit[1]
            return hit[0]
        memo.misses += 1
        table = self.table
        if table is None or self.table_state is not state:
            table = state.table()
        try:
            fields, changed = decode_block(table, block)
        except HpackError:
            self.reset()
            raise
        self.state = memo.remember(state, block, fields, table if changed else None)
        self.table = table
        self.table_state = self.state
        return fields

    def _decode_private(self, block: bytes) -> Fields:
        pure = self.pure
        if pure is not None:
            fields = pure.get(block)
            if fields is not None:
                self.memo.hits += 1
                return fields
        self.memo.misses += 1
        assert self.table is not None
        try:
            fields, changed = decode_block(self.table, block)
        except HpackError:
            self.reset()
            raise
        if changed:
            self.pure = None
        elif pure is None:
            self.pure = {block: fields}
        elif len(pure) < MAX_PURE_BLOCKS:
            pure[block] = fields
        return fields
