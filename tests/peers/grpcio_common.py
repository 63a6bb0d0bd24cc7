"""What the grpcio test peers share: the few protobuf bytes of the Greeter messages (no
protoc) and their end on a signal. Imported from the script's own folder."""

from __future__ import annotations

import signal
import threading
from types import FrameType


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def string_field(data: bytes, number: int) -> str:
    """Field ``number`` (a string) of a protobuf message, or "" when absent."""
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = read_varint(data, pos)
        elif wire_type == 2:
            length, pos = read_varint(data, pos)
            if key >> 3 == number:
                return data[pos:pos + length].decode("utf-8", "replace")
            pos += length
        else:  # fixed32/64 never occur in this service; stop rather than misparse
            break
    return ""


def encode_string(number: int, text: str) -> bytes:
    """Field ``number``, a string, of a protobuf message."""
    raw = text.encode()
    return varint(number << 3 | 2) + varint(len(raw)) + raw


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: the peer's way out."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
