"""grpc connection-leak tracer: the capture and decoding core, its events and its I/O adapters."""

from __future__ import annotations

import importlib.machinery
import os

__version__ = "0.1.0"

# Modules that setup.py may compile with mypyc (kept in step with setup.py's list).
COMPILED_MODULES = (
    "decode", "pipeline", "record", "tcp/flow", "tcp/state", "http2/frames",
    "http2/observer", "http2/tls", "sources/pcapfile",
)


def _compiled_paths() -> list[tuple[str, str]]:
    """(source, compiled) pairs present side by side in this package directory."""
    here = os.path.dirname(os.path.abspath(__file__))
    pairs = []
    for module in COMPILED_MODULES:
        source = os.path.join(here, module + ".py")
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            binary = os.path.join(here, module + suffix)
            if os.path.exists(binary):
                pairs.append((source, binary))
                break
    return pairs


def build_kind() -> str:
    """"compiled" when the core was built with mypyc, else "interpreted"."""
    return "compiled" if _compiled_paths() else "interpreted"


def _refuse_stale_build() -> None:
    # An in-place (editable) build puts the compiled modules next to their sources, and
    # Python imports the compiled one first: after an edit the old code would run.
    for source, binary in _compiled_paths():
        if os.path.exists(source) and os.path.getmtime(source) > os.path.getmtime(binary):
            raise ImportError(
                f"{os.path.relpath(binary)} is older than {os.path.relpath(source)}: "
                "rebuild with `make venv` (or `pip install -e .`), or delete the compiled "
                "modules (`make pure`) to run the sources as they are"
            )


_refuse_stale_build()
