"""Optional compilation of the decoding core with mypyc (as black and mypy ship).

The core is strictly typed Python; compiled with mypyc it runs about 1.6 times faster
(benchmarks/README.md). Compilation needs a C compiler and Python's headers. Without
them, or with TRACER_PURE_PYTHON=1, the same code is installed and runs interpreted.
`tracer --version` says which one is installed. MYPYC_OPT_LEVEL (0-3, default 3) sets the
C compiler's optimisation: 0 compiles in about half the time, for tests of the build itself.

The list of compiled modules lives in tracer/compiled.py. A build that compiles writes
tracer/compiled.sha256 beside the compiled modules: the SHA-256 of each source as mypyc
read it, which `import tracer` checks against the .py files it finds (see its
_refuse_stale_build). Each build also removes compiled modules that it did not make:
from its build directory (a build/ left by an earlier build is reused) and, when it
installs in place (`pip install -e .`), from the source tree, so an interpreted in-place
build really runs the sources.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Collection, Iterable
from importlib.machinery import EXTENSION_SUFFIXES
from types import ModuleType

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

PACKAGE = "tracer"


def _load_compiled() -> ModuleType:
    # tracer/compiled.py as a lone file: importing the package would run its build check.
    path = os.path.join(PACKAGE, "compiled.py")
    spec = importlib.util.spec_from_file_location("_tracer_compiled_list", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compiled = _load_compiled()
# {"tcp/flow.py": "tracer/tcp/flow.py", ...}: record name -> path from the project root.
SOURCES = {
    compiled.source_name(m): os.path.join(PACKAGE, *compiled.source_name(m).split("/"))
    for m in compiled.MODULES
}
# The digests of the sources as handed to mypyc, for the record (filled by _ext_modules).
DIGESTS: dict[str, str] = {}


def _warn(message: str) -> None:
    print(f"*** tracer: {message}; installing the interpreted version", file=sys.stderr)


def _is_binary(name: str) -> bool:
    return name.endswith(tuple(EXTENSION_SUFFIXES))


def _binaries(top: str, package_dir: str) -> list[str]:
    """Compiled modules a build of ours may have left: mypyc's shared library at the top,
    and any extension module below the package directory."""
    found = []
    if os.path.isdir(top):
        found = [os.path.join(top, name) for name in os.listdir(top)
                 if "__mypyc" in name and _is_binary(name)]
    for directory, _, files in os.walk(package_dir):
        found.extend(os.path.join(directory, name) for name in files if _is_binary(name))
    return found


def _remove(paths: Iterable[str], keep: Collection[str] = ()) -> None:
    for path in paths:
        if os.path.abspath(path) not in keep and os.path.lexists(path):
            print(f"tracer: removing {path} (not made by this build)", file=sys.stderr)
            os.remove(path)


def _outputs(cmd: build_py, extensions: list[Extension]) -> tuple[set[str], set[str]]:
    """Where the extensions land: in the build directory, and in place (source tree)."""
    ext_cmd = cmd.get_finalized_command("build_ext")
    built, in_place = set(), set()
    for ext in extensions:
        fullname = ext_cmd.get_ext_fullname(ext.name)
        filename = ext_cmd.get_ext_filename(fullname)
        built.add(os.path.abspath(os.path.join(cmd.build_lib, filename)))
        package = ".".join(fullname.split(".")[:-1])
        in_place.add(os.path.abspath(
            os.path.join(cmd.get_package_dir(package), os.path.basename(filename))))
    return built, in_place


def _tree_dirs(cmd: build_py) -> tuple[str, str]:
    """The source tree's top directory and package directory."""
    return cmd.get_package_dir("") or os.curdir, cmd.get_package_dir(PACKAGE)


def _remove_record(directory: str) -> None:
    _remove([os.path.join(directory, compiled.RECORD)])


class CleanBuildPy(build_py):
    """Before building: drop compiled modules that this build will not make (left in a
    reused build directory, or in place by an earlier `pip install -e .`), and the old
    record; a build that compiles writes both anew (OptionalBuildExt)."""

    def run(self) -> None:
        extensions = list(self.distribution.ext_modules or [])
        built, in_place = _outputs(self, extensions)
        _remove(_binaries(self.build_lib, os.path.join(self.build_lib, PACKAGE)), built)
        _remove_record(os.path.join(self.build_lib, PACKAGE))
        if self.editable_mode:  # the sources are imported from the tree itself
            top, package_dir = _tree_dirs(self)
            _remove(_binaries(top, package_dir), in_place)
            _remove_record(package_dir)
        super().run()


class OptionalBuildExt(build_ext):
    """Build the compiled modules, or none of them: a half-compiled core cannot import."""

    def run(self) -> None:
        in_place = self.inplace or self.editable_mode  # setuptools resets inplace while building
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - no compiler, or it failed: fall back, loudly
            _warn(f"compiling the core failed ({exc})")
            build_py_cmd = self.get_finalized_command("build_py")
            built, placed = _outputs(build_py_cmd, self.extensions)
            _remove(sorted(built | (placed if in_place else set())))
            self.extensions = []
            return
        if self.extensions:
            self._write_record(in_place)

    def _write_record(self, in_place: bool) -> None:
        directories = [os.path.join(self.build_lib, PACKAGE)]
        if in_place:
            directories.append(self.get_finalized_command("build_py").get_package_dir(PACKAGE))
        for directory in directories:
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, compiled.RECORD), "w", encoding="ascii") as f:
                f.write(compiled.format_record(DIGESTS))


def _only_metadata(args: list[str]) -> bool:
    """True when setup.py runs for metadata or a source archive only, as pip runs it twice
    before each build: mypyc's type check and code generation (2 s) are skipped then, which
    changes nothing in what those commands write. Any other command word compiles."""
    words = [arg for arg in args if not arg.startswith("-")]
    return bool(words) and words[0] in ("egg_info", "dist_info", "sdist") and not any(
        word.startswith(("build", "bdist", "install", "develop", "editable")) for word in words)


def _ext_modules() -> list[Extension]:
    if os.environ.get("TRACER_PURE_PYTHON") == "1" or _only_metadata(sys.argv[1:]):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not available")
        return []
    # Hashed before mypyc reads them: a source edited during the build then no longer
    # matches the record, and the guard refuses the build instead of running old code.
    digests = {name: compiled.source_digest(path) for name, path in SOURCES.items()}
    try:
        extensions: list[Extension] = mypycify(
            list(SOURCES.values()), opt_level=os.environ.get("MYPYC_OPT_LEVEL", "3"))
    except BaseException as exc:  # noqa: BLE001 - type errors make mypyc sys.exit()
        _warn(f"mypyc could not compile the core ({exc})")
        return []
    DIGESTS.update(digests)
    return extensions


setup(ext_modules=_ext_modules(),
      cmdclass={"build_py": CleanBuildPy, "build_ext": OptionalBuildExt})
