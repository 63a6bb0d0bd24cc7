"""Which build of the core the tests run against, and that the CLI reports it."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tracer
from tracer import compiled


def test_the_expected_build_is_under_test() -> None:
    """`make test` runs the core tests twice: compiled (when a compiler was there) and
    interpreted from a copy of the sources; each run checks it got the one it wanted."""
    expected = os.environ.get("TRACER_EXPECT_BUILD")
    if expected:
        assert tracer.build_kind() == expected, tracer.__file__


def test_version_says_which_core() -> None:
    proc = subprocess.run([sys.executable, "-m", "cli.main", "--version"], capture_output=True,
                          text=True, check=True, cwd=Path(tracer.__file__).parent.parent)
    assert tracer.build_kind() in proc.stdout


def _package_with_binary(tmp_path: Path, record: bool) -> Path:
    """A copy of the package's build check beside decode.py and a stand-in for its compiled
    module (never imported: `import tracer` only looks at it)."""
    package = tmp_path / "tracer"
    package.mkdir()
    source = Path(tracer.__file__).parent
    for name in ("__init__.py", "compiled.py", "decode.py"):
        shutil.copy2(source / name, package / name)
    (package / f"decode{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"stand-in")
    if record:
        digest = compiled.source_digest(str(package / "decode.py"))
        (package / compiled.RECORD).write_text(compiled.format_record({"decode.py": digest}))
    return package


def _import_error(package: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", "import tracer; print(tracer.build_kind())"],
                          cwd=package.parent, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(package.parent)})
    if proc.returncode == 0:
        assert proc.stdout.strip() == "compiled"
        return ""
    return proc.stderr


def test_stale_build_is_decided_by_content_not_mtime(tmp_path: Path) -> None:
    """A compiled module whose source is unchanged loads whatever the mtimes say (installers
    write files in any order); one whose source was edited since the build, or that no
    build recorded, is refused at import instead of silently running old code."""
    package = _package_with_binary(tmp_path, record=True)
    source = package / "decode.py"
    os.utime(source, (time.time() + 3600, time.time() + 3600))  # newer than the binary
    assert _import_error(package) == ""

    source.write_text(source.read_text() + "# edited after the build\n")
    error = _import_error(package)
    assert "ImportError" in error and "tracer/decode.py changed" in error, error

    (package / compiled.RECORD).unlink()
    source.write_text(source.read_text().removesuffix("# edited after the build\n"))
    assert "no build record" in _import_error(package)
