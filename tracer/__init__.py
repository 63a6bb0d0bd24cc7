"""grpc connection-leak tracer: the capture and decoding core, its events and its I/O adapters."""

from __future__ import annotations

import importlib.machinery
import os

from tracer import compiled

__version__ = "0.1.0"

_HERE = os.path.dirname(os.path.abspath(__file__))


def _compiled_paths() -> list[tuple[str, str, str]]:
    """(source name, source, compiled) for each compiled module present in this package."""
    found = []
    for module in compiled.MODULES:
        source = os.path.join(_HERE, *compiled.source_name(module).split("/"))
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            binary = os.path.join(_HERE, *module.split("/")) + suffix
            if os.path.exists(binary):
                found.append((compiled.source_name(module), source, binary))
                break
    return found


def build_kind() -> str:
    """"compiled" when the core was built with mypyc, else "interpreted"."""
    return "compiled" if _compiled_paths() else "interpreted"


def _refuse_stale_build() -> None:
    # Python imports a compiled module before the .py beside it. In an in-place (editable)
    # build both sit in the source tree, so after an edit the old code would run silently.
    # Staleness is decided by content: the build records the SHA-256 of every source it
    # compiled (tracer/compiled.py) and each one must still match the .py beside its
    # binary. Not by mtimes: installers write files in any order with fresh mtimes (a
    # wheel's .py files often come out newer than its .so files), checkouts and copies
    # reset them, so an mtime check fires on good installs and misses real edits. Not only
    # in a source checkout either: an installed copy whose sources no longer match its
    # binaries is just as stale, and a matching one, the normal case, always passes.
    found = _compiled_paths()
    if not found:
        return
    record = compiled.read_record(_HERE)
    stale = [name for name, source, _ in found
             if os.path.exists(source) and record.get(name) != compiled.source_digest(source)]
    if stale:
        listed = ", ".join(f"tracer/{name}" for name in stale)
        raise ImportError(
            f"the compiled core in {_HERE} does not match its sources ({listed} changed "
            "since it was compiled, or no build record): rebuild with `make venv` (or "
            "`pip install -e .`, or reinstall), or delete the compiled modules (`make pure`) "
            "to run the sources as they are"
        )


_refuse_stale_build()
