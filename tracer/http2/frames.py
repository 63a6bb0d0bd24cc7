"""HTTP/2 frame layout (RFC 9113 section 4 and 6): types, flags, and which headers are plausible.

Plausibility is how a direction picked up mid-stream (or after a gap) regains frame sync:
a segment that starts with a chain of frame headers that each obey their type's rules is
very unlikely to be the middle of a DATA payload.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id with R bit
FRAME_HEADER_LEN = 9

DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

FRAME_NAMES = {
    DATA: "DATA",
    HEADERS: "HEADERS",
    PRIORITY: "PRIORITY",
    RST_STREAM: "RST_STREAM",
    SETTINGS: "SETTINGS",
    PUSH_PROMISE: "PUSH_PROMISE",
    PING: "PING",
    GOAWAY: "GOAWAY",
    WINDOW_UPDATE: "WINDOW_UPDATE",
    CONTINUATION: "CONTINUATION",
}

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

DEFAULT_MAX_FRAME_SIZE = 16384
MAX_FRAME_SIZE_LIMIT = (1 << 24) - 1

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_MAX_FRAME_SIZE = 0x5

# Per type: (allowed flag bits, stream id rule: 0 = must be zero, 1 = must be non-zero,
# 2 = either), exact payload length or None, minimum payload length.
_RULES: dict[int, tuple[int, int, int | None, int]] = {
    DATA: (FLAG_END_STREAM | FLAG_PADDED, 1, None, 0),
    HEADERS: (FLAG_END_STREAM | FLAG_END_HEADERS | FLAG_PADDED | FLAG_PRIORITY, 1, None, 0),
    PRIORITY: (0, 1, 5, 5),
    RST_STREAM: (0, 1, 4, 4),
    SETTINGS: (FLAG_ACK, 0, None, 0),
    PUSH_PROMISE: (FLAG_END_HEADERS | FLAG_PADDED, 1, None, 4),
    PING: (FLAG_ACK, 0, 8, 8),
    GOAWAY: (0, 0, None, 8),
    WINDOW_UPDATE: (0, 2, 4, 4),
    CONTINUATION: (FLAG_END_HEADERS, 1, None, 0),
}


def plausible_header(ftype: int, flags: int, stream_id: int, length: int, max_frame: int) -> bool:
    """Whether a frame header obeys the rules of its type (used only while resyncing)."""
    rule = _RULES.get(ftype)
    if rule is None or stream_id & 0x80000000 or length > max_frame:
        return False
    allowed, sid_rule, exact, minimum = rule
    if flags & ~allowed:
        return False
    if sid_rule == 0 and stream_id:
        return False
    if sid_rule == 1 and not stream_id:
        return False
    if exact is not None and length != exact:
        return False
    if length < minimum:
        return False
    return not (ftype == SETTINGS and (length % 6 or (flags & FLAG_ACK and length)))


def plausible_chain(data: bytes, max_frame: int = DEFAULT_MAX_FRAME_SIZE) -> bool:
    """Whether ``data`` starts on a frame boundary: its frame headers chain plausibly.

    One frame is enough when it ends exactly at the end of ``data``; otherwise two
    plausible headers in a row are needed."""
    pos = 0
    n = len(data)
    count = 0
    unpack = FRAME_HEADER.unpack_from
    while pos + FRAME_HEADER_LEN <= n:
        lt, flags, sid = unpack(data, pos)
        if not plausible_header(lt & 0xFF, flags, sid, lt >> 8, max_frame):
            return False
        count += 1
        pos += FRAME_HEADER_LEN + (lt >> 8)
    if pos == n:
        return count >= 1
    return count >= 2
