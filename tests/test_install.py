"""An installed tracer starts and works: a wheel, `pip install .` and `pip install -e .`,
interpreted and compiled, in a fresh virtual environment (issue 8).

The sources are copied first, as a clone has them (no .venv, build/, .git or compiled
modules), then given what a developer's tree often holds: the compiled modules and build
record that an in-place build (`make venv`) leaves beside the sources, and build/
directories left by earlier builds. None of it may reach an installed copy. Each
installed `tracer` runs from outside the source tree, so that the installed package,
not the tree, is imported, and analyses the capture that ships with it.

The venv is shared by the tests (its dependencies take most of the time to install);
each test installs, with --force-reinstall, the build it checks.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO

from cli.demo import SHIPPED_PORT
from tracer import compiled

pytestmark = pytest.mark.slow

SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)
SUFFIX = SUFFIXES[0]
# The shipped capture's three clients, each on its own address (cli/demo.py).
EXPECTED_CLIENTS = {"10.151.1.2": "ok", "10.151.2.2": "ok", "10.151.3.2": "leak"}
JUNK_GROUP = "0123456789abcdef0123__mypyc" + SUFFIX  # a stale mypyc shared library
JUNK = b"not a compiled module: an installed copy must never hold this file\n"
# Not part of a clone (all git-ignored), or large and not needed to build.
NOT_COPIED = {".venv", ".git", "node_modules", "__pycache__", ".mypy_cache", ".pytest_cache",
              ".ruff_cache", ".hypothesis", ".cache"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    ignored = {n for n in names if n in NOT_COPIED or n.endswith((*SUFFIXES, ".egg-info"))}
    if Path(directory) == REPO:
        ignored |= {n for n in names if n == "build" or n.endswith((".db", ".db-wal", ".db-shm"))}
    return ignored


def _env(**extra: str) -> dict[str, str]:
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRACER_PURE_PYTHON", "MYPYC_OPT_LEVEL"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


def _run(args: list[str | Path], cwd: Path, **env: str) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(**env), check=False,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("install")


@pytest.fixture(scope="module")
def source(work: Path) -> Path:
    src = work / "src"
    shutil.copytree(REPO, src, ignore=_ignore, symlinks=True)
    return src


@pytest.fixture(scope="module")
def venv(work: Path) -> Iterator[Path]:
    path = work / "venv"
    _run([sys.executable, "-m", "venv", path], cwd=work)  # no --system-site-packages
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _plant_stale(src: Path) -> None:
    """What `make venv` and earlier builds leave in a developer's tree, as junk files: any
    of them installed would fail to import (or, for the record, be ignored by the guard)."""
    platlib = f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
    for path in (src / "tracer" / f"decode{SUFFIX}", src / "tracer" / "tcp" / f"flow{SUFFIX}",
                 src / JUNK_GROUP,
                 src / "build" / "lib" / "tracer" / f"record{SUFFIX}",
                 src / "build" / platlib / "tracer" / "tcp" / f"gone{SUFFIX}",
                 src / "build" / platlib / JUNK_GROUP):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(JUNK)
    (src / "tracer" / compiled.RECORD).write_text("0" * 64 + "  decode.py\n")


def _binaries(package: Path) -> set[str]:
    """Compiled modules below the tracer package, and mypyc shared libraries beside it."""
    inside = {p.relative_to(package).as_posix() for p in package.rglob("*")
              if p.name.endswith(SUFFIXES)}
    beside = {p.name for p in package.parent.glob("*__mypyc*") if p.name.endswith(SUFFIXES)}
    return inside | beside


def _check_tracer(venv: Path, cwd: Path, kind: str) -> Path:
    """Run the venv's own `tracer` in cwd (a new directory outside the source tree) on the
    shipped capture; the tracer package it imports."""
    out = _run([venv / "bin" / "python", "-c", "import tracer, tracer.decode; "
                "print(tracer.__file__); print(tracer.decode.__file__)"], cwd=cwd)
    init, decode = out.split()
    assert decode.endswith(SUFFIXES if kind == "compiled" else ".py"), decode
    package = Path(init).parent
    assert f"({kind} core)" in _run([venv / "bin" / "tracer", "--version"], cwd=cwd)

    capture = package.parent / "cli" / "demo-capture.pcapng"  # shipped as package data
    db = cwd / "tracer.db"
    _run([venv / "bin" / "tracer", "capture", "--read", capture, "--port", str(SHIPPED_PORT),
          "--db", db], cwd=cwd)
    report = json.loads(_run([venv / "bin" / "tracer", "report", "--db", db, "--format", "json"],
                             cwd=cwd))
    assert {c["client"]: c["verdict"] for c in report["clients"]} == EXPECTED_CLIENTS
    return package


def _assert_interpreted(package: Path) -> None:
    assert _binaries(package) == set(), package
    assert not (package / compiled.RECORD).exists()


def test_pure_wheel(source: Path, venv: Path, work: Path, tmp_path: Path) -> None:
    """TRACER_PURE_PYTHON=1 builds an interpreted wheel, even in a tree full of binaries."""
    _plant_stale(source)
    wheels = work / "wheels"
    _run([venv / "bin" / "python", "-m", "pip", "wheel", "--no-deps", "-w", wheels, source],
         cwd=work, TRACER_PURE_PYTHON="1")
    [wheel] = wheels.glob("grpc_conntrace-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    pip: list[str | Path] = [venv / "bin" / "python", "-m", "pip", "install"]
    _run([*pip, wheel], cwd=work)  # with its dependencies, from the package registry
    _run([*pip, "--force-reinstall", "--no-deps", wheel], cwd=work)  # over any earlier build
    package = _check_tracer(venv, tmp_path, "interpreted")
    assert package.is_relative_to(venv)
    _assert_interpreted(package)


def test_pip_install_compiled(source: Path, venv: Path, work: Path, tmp_path: Path) -> None:
    """`pip install .` compiles the core; what gets installed is that build and only it.

    MYPYC_OPT_LEVEL=0 compiles the same C without optimisation: the build and the installed
    layout are the same as with the default -O3, in about half the time."""
    _plant_stale(source)
    _run([venv / "bin" / "python", "-m", "pip", "install", "--force-reinstall", "--no-deps",
          source], cwd=work, MYPYC_OPT_LEVEL="0")
    package = _check_tracer(venv, tmp_path, "compiled")
    assert package.is_relative_to(venv)
    binaries = _binaries(package)
    groups = {name for name in binaries if "__mypyc" in name}
    assert len(groups) == 1 and JUNK_GROUP not in groups, groups
    assert binaries - groups == {module + SUFFIX for module in compiled.MODULES}
    assert compiled.read_record(str(package)) == {
        compiled.source_name(m): compiled.source_digest(str(package / compiled.source_name(m)))
        for m in compiled.MODULES}


def test_pure_editable(source: Path, venv: Path, work: Path, tmp_path: Path) -> None:
    """An interpreted in-place install removes the binaries an earlier one left in the tree:
    left there, they would be imported instead of the sources."""
    _plant_stale(source)
    _run([venv / "bin" / "python", "-m", "pip", "install", "--force-reinstall", "--no-deps",
          "-e", source], cwd=work, TRACER_PURE_PYTHON="1")
    package = _check_tracer(venv, tmp_path, "interpreted")
    assert package == source / "tracer"
    _assert_interpreted(package)
