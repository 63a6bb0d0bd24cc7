"""The HPACK layer against the hpack library's own Decoder, the reference.

decode_block must give the same allow-listed fields and leave the same dynamic table as
hpack.Decoder for every block hpack accepts, and fail where hpack fails (one documented
exception). The memo must never change a result: decoding through HpackDirection (memo
hits, shared states, private tables) equals decoding every block from scratch.
"""

from __future__ import annotations

from typing import Any

import pytest
from hpack import Decoder, Encoder
from hpack.exceptions import HPACKError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tracer.http2.hpack_memo import (
    ALLOWED_HEADERS,
    MAX_HEADER_LIST_SIZE,
    MAX_TABLE_SIZE,
    DynamicTable,
    HpackDirection,
    HpackError,
    HpackMemo,
    decode_block,
)

SETTINGS = settings(
    max_examples=120, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

NAMES = [":method", ":path", ":authority", ":scheme", "content-type", "user-agent", "te",
         "grpc-timeout", "grpc-status", "grpc-message", "authorization", "cookie",
         "x-trace-id", "grpc-accept-encoding"]
header = st.tuples(
    st.sampled_from(NAMES),
    st.one_of(st.sampled_from(["POST", "/a.B/C", "/pkg.Svc/Get", "application/grpc", "0",
                               "1S", "grpc-go/1.64.0", "secret"]),
              st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/._-", max_size=40)),
)
blocks = st.lists(st.lists(header, min_size=1, max_size=12), min_size=1, max_size=12)


def reference() -> Decoder:
    d = Decoder(max_header_list_size=MAX_HEADER_LIST_SIZE)
    d.max_allowed_table_size = MAX_TABLE_SIZE
    return d


def ref_fields(decoder: Decoder, block: bytes) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((bytes(n), bytes(v)) for n, v in decoder.decode(block, raw=True)
                 if n in ALLOWED_HEADERS)


def encode_all(lists: list[list[tuple[str, str]]], draw: Any = None,
               sizes: list[int] | None = None, huffman: bool = True) -> list[bytes]:
    enc = Encoder()
    out = []
    for i, headers in enumerate(lists):
        if sizes and i < len(sizes) and sizes[i] >= 0:
            enc.header_table_size = sizes[i]
        sensitive = [(n, v, n in ("authorization", "cookie")) for n, v in headers]
        out.append(enc.encode(sensitive, huffman=huffman))
    return out


@SETTINGS
@given(blocks, st.lists(st.integers(-1, 8192), max_size=12), st.booleans())
def test_same_fields_and_table_as_hpack(lists: list[list[tuple[str, str]]], sizes: list[int],
                                         huffman: bool) -> None:
    ref = reference()
    table = DynamicTable()
    for block in encode_all(lists, sizes=sizes, huffman=huffman):
        fields, _changed = decode_block(table, block)
        assert fields == ref_fields(ref, block)
        assert tuple(table.entries) == tuple(ref.header_table.dynamic_entries)
        assert table.maxsize == ref.header_table.maxsize


@SETTINGS
@given(blocks, st.data())
@example(lists=[[(":path", "/a.B/C")]], data=None)
def test_mutated_blocks_fail_where_hpack_fails(lists: list[list[tuple[str, str]]],
                                               data: Any) -> None:
    """Flip, cut and insert bytes: where hpack decodes, the results agree; where hpack
    raises, so do we (except for a corrupt Huffman value nobody keeps or indexes)."""
    ref = reference()
    table = DynamicTable()
    for block in encode_all(lists):
        if data is not None:
            raw = bytearray(block)
            for _ in range(data.draw(st.integers(0, 3))):
                op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
                if op == "flip" and raw:
                    i = data.draw(st.integers(0, len(raw) - 1))
                    raw[i] ^= 1 << data.draw(st.integers(0, 7))
                elif op == "cut" and raw:
                    del raw[data.draw(st.integers(0, len(raw) - 1)):]
                else:
                    raw.insert(data.draw(st.integers(0, len(raw))), data.draw(st.integers(0, 255)))
            block = bytes(raw)
        try:
            expected = ref_fields(ref, block)
        except HPACKError as error:
            try:
                decode_block(table, block)
            except HpackError:
                return  # both tables are unusable now, as the decoders say
            # The documented exception: a value neither kept nor indexed is skipped
            # undecoded, so a corrupt Huffman string there goes unnoticed.
            assert "Huffman" in str(error), error
            return
        except (IndexError, ValueError):
            pytest.skip("hpack raised a non-HPACK exception on this input")
        fields, _changed = decode_block(table, block)
        assert fields == expected
        assert tuple(table.entries) == tuple(ref.header_table.dynamic_entries)


@SETTINGS
@given(st.lists(blocks, min_size=1, max_size=6), st.data())
def test_memo_never_changes_a_result(connections: list[list[list[tuple[str, str]]]],
                                     data: Any) -> None:
    """Several connections, interleaved, sharing one memo (including a memo small enough to
    be reset midway): every block decodes as a fresh hpack decoder per connection says."""
    memo = HpackMemo(max_transitions=data.draw(st.sampled_from([4, 64, 32768])),
                     max_depth=data.draw(st.sampled_from([0, 1, 6])))
    streams = []
    for lists in connections:
        # Connections often repeat each other: copy some block lists.
        if streams and data.draw(st.booleans()):
            lists = connections[0]
        streams.append((encode_all(lists), HpackDirection(memo), reference()))
    pending = [list(range(len(s[0]))) for s in streams]
    while any(pending):
        i = data.draw(st.sampled_from([k for k, p in enumerate(pending) if p]))
        blocks_, direction, ref = streams[i]
        block = blocks_[pending[i].pop(0)]
        assert direction.decode(block) == ref_fields(ref, block)
    assert memo.hits + memo.misses == sum(len(s[0]) for s in streams)


def test_repeated_first_blocks_hit_the_memo() -> None:
    """What the memo is for: a leaking client opens connection after connection and sends
    the same first request on each."""
    memo = HpackMemo()
    request = [(":method", "POST"), (":path", "/pkg.Svc/Get"), ("te", "trailers"),
               ("content-type", "application/grpc"), ("user-agent", "grpc-go/1.64.0")]
    for _ in range(100):
        block = Encoder().encode(request)
        assert dict(HpackDirection(memo).decode(block))[b":path"] == b"/pkg.Svc/Get"
    assert memo.misses == 1 and memo.hits == 99


def test_pooled_connection_with_changing_values_stays_right() -> None:
    """Past the shared depth a direction goes on with its own table; values that change on
    every request (deadlines) keep being decoded right."""
    memo = HpackMemo(max_depth=2)
    enc = Encoder()
    direction = HpackDirection(memo)
    for i in range(50):
        block = enc.encode([(":path", f"/svc/M{i % 3}"), ("grpc-timeout", f"{990 - i}m")])
        assert dict(direction.decode(block))[b":path"] == f"/svc/M{i % 3}".encode()
    assert direction.state is None  # private after the shared depth


@SETTINGS
@given(st.lists(st.lists(header, min_size=1, max_size=8), min_size=2, max_size=10), st.data())
def test_mid_stream_decoding_is_never_wrong(lists: list[list[tuple[str, str]]],
                                            data: Any) -> None:
    """Starting at block k with an empty table (a connection picked up mid-stream): every
    :path decoded is the one that was sent; the rest are errors, never wrong values."""
    encoded = encode_all(lists)
    k = data.draw(st.integers(0, len(encoded) - 1))
    direction = HpackDirection(HpackMemo())
    truth = reference()
    for i, block in enumerate(encoded):
        expected = ref_fields(truth, block)
        if i < k:
            continue
        try:
            got = direction.decode(block)
        except HpackError:
            continue
        assert got == expected


def test_errors_leave_the_direction_usable() -> None:
    direction = HpackDirection(HpackMemo())
    with pytest.raises(HpackError):
        direction.decode(b"\xff\xff\xff\xff\xff\xff\xff")  # index past everything
    block = Encoder().encode([(":path", "/a.B/C")])
    assert direction.decode(block) == ((b":path", b"/a.B/C"),)


def test_table_size_update_above_the_limit_is_an_error() -> None:
    enc = Encoder()
    enc.header_table_size = MAX_TABLE_SIZE + 1
    block = enc.encode([(":path", "/x")])
    assert block[0] & 0xE0 == 0x20  # the block starts with the size update
    with pytest.raises(HpackError):
        decode_block(DynamicTable(), block)
