"""The modules of the core that setup.py compiles with mypyc, and the build's record of them.

This is the one list of compiled modules: setup.py loads this file on its own, without
importing the package (whose __init__ checks the build), so it uses the standard library
only and does nothing when loaded.

The record ties each compiled module to the exact source it was compiled from: the build
writes the SHA-256 of every source it hands to mypyc into RECORD, next to the compiled
modules, and `import tracer` compares it with the .py file beside each compiled module.
"""

from __future__ import annotations

import hashlib
import os

# The modules on the per-packet path, as paths below tracer/ without ".py".
# Everything else stays interpreted.
MODULES = (
    "decode", "outbox", "pipeline", "record", "tcp/flow", "tcp/sleepers", "tcp/state",
    "http2/frames", "http2/hpack_memo", "http2/http1", "http2/modes", "http2/observer",
    "http2/text", "http2/tls", "sources/pcapfile", "attribution/unixdiag",
)

# One "<sha256>  <module path>.py" line per compiled module (the format of sha256sum, so
# `cd tracer && sha256sum -c compiled.sha256` checks it too).
RECORD = "compiled.sha256"


def source_name(module: str) -> str:
    """The record's name of a module's source: "tcp/flow" -> "tcp/flow.py"."""
    return module + ".py"


def source_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def format_record(digests: dict[str, str]) -> str:
    """The RECORD file's text for {source name: digest}."""
    return "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))


def read_record(package_dir: str) -> dict[str, str]:
    """{source name: digest} as the build wrote it into package_dir; {} without a record."""
    try:
        with open(os.path.join(package_dir, RECORD), encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return {}
    record = {}
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if sep:
            record[name] = digest
    return record
