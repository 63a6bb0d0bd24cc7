"""`tracer connections --format zeek|zeek-json`: the connections as a Zeek conn.log.

The TSV form is what Zeek's ASCII writer produces (its header lines, tab-separated
fields, `-` for unset and `(empty)` for empty, `\\xHH` escapes), so `zeek-cut` reads it;
the JSON form is Zeek's `LogAscii::use_json=T` output: one object per line, keys as the
field names (`id.orig_h` ...), times as epoch seconds, unset fields left out.

The fields are Zeek's conn.log fields this tool knows (not `orig_ip_bytes`/`resp_ip_bytes`,
`local_orig`/`local_resp` or `tunnel_parents`: never measured, so not written), then its
own, each prefixed `grpc_` or `tracer_` so that no Zeek name means something else here.
`orig_bytes`/`resp_bytes` are payload bytes by sequence numbers, as Zeek counts them.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tracer.events import error_name

# (field, Zeek type, value from a connection row)
_Field = tuple[str, str, Callable[[dict[str, Any]], Any]]


def _service(r: dict[str, Any]) -> str | None:
    # Zeek's analyzer names: ssl for TLS, http for HTTP/1, http2 for cleartext HTTP/2.
    return {"tls": "ssl", "http1": "http", "h2c": "http2"}.get(r["protocol"] or "")


def _goaway_error(r: dict[str, Any]) -> str | None:
    return None if r["goaway_error"] is None else error_name(r["goaway_error"])


def _since_open(column: str) -> Callable[[dict[str, Any]], float | None]:
    def delay(r: dict[str, Any]) -> float | None:
        value = r[column]
        return None if value is None else max(0.0, value - r["ts"])
    return delay


def _sender(r: dict[str, Any]) -> str | None:
    sender = r["goaway_sender"]
    return None if sender is None else ("server" if sender == "resp" else "client")


FIELDS: tuple[_Field, ...] = (
    ("ts", "time", lambda r: r["ts"]),
    ("uid", "string", lambda r: r["uid"]),
    ("id.orig_h", "addr", lambda r: r["orig_h"]),
    ("id.orig_p", "port", lambda r: r["orig_p"]),
    ("id.resp_h", "addr", lambda r: r["resp_h"]),
    ("id.resp_p", "port", lambda r: r["resp_p"]),
    ("proto", "enum", lambda r: "tcp"),
    ("service", "string", _service),
    ("duration", "interval", lambda r: r["duration"]),
    ("orig_bytes", "count", lambda r: r["orig_bytes"]),
    ("resp_bytes", "count", lambda r: r["resp_bytes"]),
    ("conn_state", "string", lambda r: r["conn_state"]),
    ("missed_bytes", "count", lambda r: r["missed_bytes"]),
    ("history", "string", lambda r: r["history"]),
    ("orig_pkts", "count", lambda r: r["orig_pkts"]),
    ("resp_pkts", "count", lambda r: r["resp_pkts"]),
    ("tracer_open", "bool", lambda r: bool(r["is_open"])),
    ("tracer_closed_by", "string", lambda r: r["close_kind"]),
    ("tracer_before_capture", "bool", lambda r: bool(r["from_snapshot"] or r["mid_stream"])),
    ("tracer_pid", "count", lambda r: r["pid"]),
    ("tracer_container", "string", lambda r: r.get("client_container")),
    ("grpc_preface_delay", "interval", _since_open("preface_ts")),
    ("grpc_server_settings_delay", "interval", _since_open("server_settings_ts")),
    ("grpc_streams", "count", lambda r: r["streams"]),
    ("grpc_first_method", "string", lambda r: r["first_method"]),
    ("grpc_authority", "string", lambda r: r["authority"]),
    ("grpc_user_agent", "string", lambda r: r["user_agent"]),
    ("grpc_goaway_sender", "string", _sender),
    ("grpc_goaway_error", "string", _goaway_error),
    ("grpc_rst_streams", "count", lambda r: r["rst_streams"]),
    ("tls_sni", "string", lambda r: r["tls_sni"]),
    ("tls_alpn", "string", lambda r: r["tls_alpn"]),
)

# What Zeek's ASCII writer escapes in a field: the separator, backslash, and bytes that
# are not printable ASCII (as \xHH, each byte of the UTF-8 encoding).
_ESCAPE = re.compile(r"[\\\t\x00-\x1f\x7f-\U0010ffff]")


def _escape_text(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        return "".join(f"\\x{b:02x}" for b in m.group(0).encode())
    return _ESCAPE.sub(one, text)


def _tsv_value(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind in ("time", "interval"):
        return f"{value:.6f}"
    if kind == "bool":
        return "T" if value else "F"
    if kind in ("count", "port"):
        return str(int(value))
    text = str(value)
    if text == "":
        return "(empty)"
    if text in ("-", "(empty)"):
        # a value that reads as the unset or empty marker: its first character escaped
        return f"\\x{ord(text[0]):02x}{_escape_text(text[1:])}"
    return _escape_text(text)


def _stamp(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%d-%H-%M-%S")


def zeek_tsv(rows: Iterable[dict[str, Any]],
             now: Callable[[], datetime.datetime] | None = None) -> Iterator[str]:
    """The lines of a Zeek conn.log (without their newlines)."""
    clock = now or (lambda: datetime.datetime.now(datetime.timezone.utc))
    yield "#separator \\x09"
    yield "#set_separator\t,"
    yield "#empty_field\t(empty)"
    yield "#unset_field\t-"
    yield "#path\tconn"
    yield f"#open\t{_stamp(clock())}"
    yield "#fields\t" + "\t".join(name for name, _, _ in FIELDS)
    yield "#types\t" + "\t".join(kind for _, kind, _ in FIELDS)
    for r in rows:
        yield "\t".join(_tsv_value(get(r), kind) for _, kind, get in FIELDS)
    yield f"#close\t{_stamp(clock())}"


def zeek_json(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """One JSON object per connection, as Zeek writes conn.log with use_json."""
    for r in rows:
        out: dict[str, Any] = {}
        for name, kind, get in FIELDS:
            value = get(r)
            if value is None:
                continue
            if kind in ("count", "port"):
                value = int(value)
            elif kind in ("time", "interval"):
                value = round(float(value), 6)
            out[name] = value
        yield json.dumps(out, separators=(",", ":"), ensure_ascii=False)
