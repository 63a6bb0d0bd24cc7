"""HTTP/1.x on a watched port: an h2c upgrade, a CONNECT tunnel, or plain HTTP/1. One
direction's heads are read (method, target, Host, User-Agent, Upgrade; status), bodies of
known length skipped; after a 101 or a CONNECT's 2xx a new stream starts (back to
DETECT). Functions of one direction (tracer.http2.observer.Direction) and its observer."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from tracer.events import Http1RequestSeen, Http1ResponseSeen
from tracer.http2.frames import PREFACE
from tracer.http2.modes import DETECT, IGNORE
from tracer.http2.text import printable

if TYPE_CHECKING:
    from tracer.http2.observer import Direction, Http2Observer

MAX_HTTP1_HEAD = 1 << 14
# A direction's HPACK table is unknown before a new stream's preface (see new_stream).
UNKNOWN_PRE_EXISTING = "unknown (pre-existing)"
HTTP1_REQUEST = re.compile(rb"[A-Z]{3,10} ")
# While resyncing, a segment must show a whole request or status line to count as HTTP/1:
# DATA payloads may well begin with a capital word and a space.
HTTP1_REQUEST_LINE = re.compile(
    rb"(?:GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH) \S+ HTTP/1\.[01]\r\n")
HTTP1_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5]\d\d[ \r]")


def http1_data(d: Direction, obs: Http2Observer, ts: float, data: bytes) -> bool:
    buf = d.pending + data if d.pending else data
    d.pending = b""
    while buf:
        if d.body_left:
            take = min(d.body_left, len(buf))
            d.body_left -= take
            buf = buf[take:]
            continue
        if not _starts(d, buf):
            # Not another HTTP/1 message: whatever follows (an HTTP/2 preface after an
            # upgrade, a server's SETTINGS) starts a stream of its own.
            d.set_mode(DETECT)
            return d.detect(obs, ts, buf)
        idx = buf.find(b"\r\n\r\n")
        if idx < 0:
            if len(buf) > MAX_HTTP1_HEAD:
                obs.anomaly(
                    ts, "http1_head_too_long", f"{d.dir} head over {MAX_HTTP1_HEAD} bytes"
                )
                d.set_mode(IGNORE)
            else:
                d.pending = buf
            return False
        head, buf = buf[:idx], buf[idx + 4:]
        if d.is_client:
            _request(d, obs, ts, head)
        else:
            _response(d, obs, ts, head)
        if d.mode == IGNORE:
            return False
        if d.mode == DETECT:
            # After a 101 or a CONNECT's 2xx: a new stream starts right here.
            return d.detect(obs, ts, buf) if buf else False
    return False


def new_stream(d: Direction) -> None:
    """What follows starts a stream of its own (after a 101, in a CONNECT tunnel): its
    beginning is known, even on a connection picked up mid-stream."""
    d.set_mode(DETECT)
    d.lose_table(UNKNOWN_PRE_EXISTING)
    d.unknown_label = None


def _starts(d: Direction, buf: bytes) -> bool:
    """Whether ``buf`` can be (the start of) the next HTTP/1 message of this side."""
    if d.is_client:
        if PREFACE.startswith(buf[:len(PREFACE)]):
            return False
        return bool(HTTP1_REQUEST.match(buf)) or (
            len(buf) < 11 and buf.isalpha() and buf.isupper())
    return buf.startswith(b"HTTP/"[:len(buf)]) if len(buf) < 5 else buf.startswith(b"HTTP/")


def _split_head(head: bytes) -> tuple[list[bytes], dict[bytes, bytes]]:
    lines = head.split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return lines[0].split(b" ", 2), headers


def _body(d: Direction, obs: Http2Observer, ts: float, headers: dict[bytes, bytes]) -> None:
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        d.set_mode(IGNORE)
        return
    try:
        length = int(headers.get(b"content-length", b"0"))
    except ValueError:
        length = -1
    if length < 0:
        obs.anomaly(ts, "bad_content_length", f"{d.dir} HTTP/1 head")
        d.set_mode(IGNORE)
        return
    d.body_left = length


def _request(d: Direction, obs: Http2Observer, ts: float, head: bytes) -> None:
    start, headers = _split_head(head)
    method = printable(start[0], 16)
    target = printable(start[1]) if len(start) > 1 else ""
    upgrade = headers.get(b"upgrade", b"").lower()
    h2c = b"h2c" in upgrade
    obs.budget.emit(Http1RequestSeen, ts, d.dir, method, target, printable(upgrade, 32))
    if obs.protocol is None:
        obs.protocol = "http1"
    if b"host" in headers and obs.authority is None:
        obs.authority = printable(headers[b"host"])
    if b"user-agent" in headers and obs.user_agent is None:
        obs.user_agent = printable(headers[b"user-agent"])
    if method == "CONNECT":
        obs.connect_pending = True
        new_stream(d)  # the tunnel's first bytes follow
    elif h2c:
        # RFC 7540 3.2: the upgraded request is stream 1.
        obs.upgraded = True
        d.count_request(obs, ts, 1, target)
    _body(d, obs, ts, headers)


def _response(d: Direction, obs: Http2Observer, ts: float, head: bytes) -> None:
    start, headers = _split_head(head)
    try:
        status = int(start[1]) if len(start) > 1 else 0
    except ValueError:
        status = 0
    obs.budget.emit(Http1ResponseSeen, ts, d.dir, status)
    if status == 101:
        new_stream(d)  # HTTP/2 frames follow (server preface first)
        return
    if 100 <= status < 200:
        return  # 100 Continue: the real response follows
    if obs.connect_pending and 200 <= status < 300:
        obs.connect_pending = False
        new_stream(d)  # a tunnel: whatever follows starts a new stream
        return
    if status in (204, 304):
        return
    _body(d, obs, ts, headers)
