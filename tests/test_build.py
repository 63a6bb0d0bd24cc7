"""Which build of the core the tests run against, and that the CLI reports it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tracer


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
