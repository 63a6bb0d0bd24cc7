"""The ``ip:port`` endpoints a log line mentions, normalised as the connections table writes
addresses (so the two join): IPv4 dotted quads; IPv6 in brackets, in inet_ntop form with
the zone dropped, IPv4-mapped ones as plain IPv4 (on the wire they are IPv4)."""

from __future__ import annotations

import re
import socket

from tracer.logs.records import Address

# Distinct addresses kept per line; a line listing more is a dump, not an event.
MAX_ADDRESSES = 16

# The pattern starts with a plain digit class so the regex engine skips to the next digit
# at C speed (a leading repetition or lookbehind would make it try every position); the
# lookbehind after that first digit rejects a quad that continues a longer dotted or word
# token (v1.2.3.4:5, a.1.2.3.4:5, 1.2.3.4.5:6), while "ipv4:1.2.3.4:5" and
# "dns:1.2.3.4:5" (grpc's peer and target strings) match.
_V4 = re.compile(
    r"(\d(?<![\w.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}):(\d{1,5})(?!\d)", re.ASCII
)
_UNUSUAL_OCTET = re.compile(r"(?:^|\.)(?:0\d|2[6-9]\d|25[6-9]|[3-9]\d\d)", re.ASCII)
_V6 = re.compile(r"\[([0-9A-Fa-f:.]{2,45})(?:%[\w.-]{1,32})?\]:(\d{1,5})(?!\d)", re.ASCII)
_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


def normal_ip(text: str) -> str | None:
    """An IPv4 or IPv6 address in the form find_addresses gives (None if it is not one)."""
    try:
        return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):
        return _ipv6(text)


def _ipv6(text: str) -> str | None:
    try:
        raw = socket.inet_pton(socket.AF_INET6, text)
    except (OSError, ValueError):
        return None
    if raw[:12] == _MAPPED_PREFIX:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def find_addresses(text: str) -> tuple[Address, ...]:
    """Every distinct valid ``ip:port`` in ``text``, IPv4 ones first, then IPv6, each in
    order of appearance; at most MAX_ADDRESSES."""
    out: list[Address] = []
    for ip, port_text in _V4.findall(text):
        if _UNUSUAL_OCTET.search(ip):  # 256..999 or a leading zero: check and normalise
            octets = [int(o) for o in ip.split(".")]
            if max(octets) > 255:
                continue
            ip = ".".join(map(str, octets))
        port = int(port_text)
        if 0 < port < 65536:
            address = (ip, port)
            if address not in out:
                out.append(address)
                if len(out) >= MAX_ADDRESSES:
                    return tuple(out)
    if "]:" in text:
        for v6, port_text in _V6.findall(text):
            ip6 = _ipv6(v6)
            port = int(port_text)
            if ip6 is None or not 0 < port < 65536 or (ip6, port) in out:
                continue
            out.append((ip6, port))
            if len(out) >= MAX_ADDRESSES:
                break
    return tuple(out)
