"""The fixtures the test modules share (plain helpers are in support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def tmp_db(tmp_path: Path) -> Path:
    """Where a test's own database goes: a fresh temporary folder, no file there yet."""
    return tmp_path / "tracer.db"
