"""The modes of one direction's stream parser (tracer.http2.observer.Direction), and the
table of every change between them."""

from __future__ import annotations

DETECT = 0  # start of a stream: look at the first bytes
FRAMES = 1  # in frame sync
RESYNC = 2  # frame boundaries unknown: wait for a segment that starts on one
HTTP1 = 3  # inside an HTTP/1.x head or body
TLS = 4  # collecting a TLS hello
IGNORE = 5  # nothing more to learn from this direction
TLS_RECORDS = 6  # inside TLS after the hello: record headers counted, bodies skipped
MODE_NAMES = ("DETECT", "FRAMES", "RESYNC", "HTTP1", "TLS", "IGNORE", "TLS_RECORDS")

# Every mode change a direction's parser makes, and why. A direction starts in DETECT;
# a change not listed here is a bug (Direction._set_mode asserts it).
TRANSITIONS: dict[tuple[int, int], str] = {
    (DETECT, FRAMES): "the client preface, or the server's first frames",
    (DETECT, HTTP1): "an HTTP/1 request or status line",
    (DETECT, TLS): "a TLS record",
    (DETECT, IGNORE): "none of these (or an HTTP/1 body that cannot be followed)",
    (DETECT, RESYNC): "picked up mid-stream, or bytes lost before the start was read",
    (FRAMES, RESYNC): "bytes lost across a frame header",
    (RESYNC, FRAMES): "a segment that starts a plausible chain of frames, or a preface",
    (RESYNC, DETECT): "a client preface cut across segments",
    (RESYNC, HTTP1): "a whole HTTP/1 request or status line at a segment start",
    (RESYNC, TLS_RECORDS): "TLS application data records at a segment start",
    (HTTP1, DETECT): "after a 101 or a CONNECT's 2xx, or bytes that are not HTTP/1",
    (HTTP1, IGNORE): "a chunked or unreadable body, a head too long, or bytes lost",
    (TLS, TLS_RECORDS): "the hello read: the records after it are counted",
    (TLS, IGNORE): "a hello too long, or not TLS after all",
    (TLS, RESYNC): "bytes lost inside the hello",
    (TLS_RECORDS, RESYNC): "bytes lost across a record header, or a header that is not TLS",
}
