"""Text kept from the wire: bounded, printable."""

from __future__ import annotations

MAX_TEXT = 256


def printable(raw: bytes, limit: int = MAX_TEXT) -> str:
    """Text for storage: UTF-8 where it decodes, control characters escaped, bounded."""
    text = raw[:limit].decode("utf-8", "replace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
