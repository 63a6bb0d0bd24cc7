"""Optional compilation of the decoding core with mypyc (as black and mypy ship).

The core is strictly typed Python; compiled with mypyc it runs about 1.6 times faster
(benchmarks/README.md). Compilation needs a C compiler and Python's headers. Without
them, or with TRACER_PURE_PYTHON=1, the same code is installed and runs interpreted.
`tracer --version` says which one is installed.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The modules on the per-packet path. Everything else stays interpreted.
COMPILED = [
    "tracer/decode.py",
    "tracer/pipeline.py",
    "tracer/record.py",
    "tracer/tcp/flow.py",
    "tracer/tcp/state.py",
    "tracer/http2/frames.py",
    "tracer/http2/observer.py",
    "tracer/http2/tls.py",
    "tracer/sources/pcapfile.py",
]


def _warn(message: str) -> None:
    print(f"*** tracer: {message}; installing the interpreted version", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Build the compiled modules, or none of them: a half-compiled core cannot import."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - no compiler, or it failed: fall back, loudly
            _warn(f"compiling the core failed ({exc})")
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    os.remove(path)
            self.extensions = []


def _ext_modules() -> list:
    if os.environ.get("TRACER_PURE_PYTHON") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not available")
        return []
    try:
        return mypycify(COMPILED, opt_level="3")
    except BaseException as exc:  # noqa: BLE001 - type errors make mypyc sys.exit()
        _warn(f"mypyc could not compile the core ({exc})")
        return []


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
