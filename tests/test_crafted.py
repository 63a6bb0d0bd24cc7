"""Crafted edge-case captures against their committed expected output (Zeek btest style).

Each case in tests/crafted/cases.py is built with scapy, written as a pcap, read back
through the project's own reader and pipeline, and its summary compared with
tests/crafted/golden/<case>.json.

To regenerate the golden files deliberately (after a change whose every diff you have
checked by hand):

    TRACER_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_crafted.py

Cases listed in ``cases.KNOWN_BUGS`` are never rewritten: their golden file holds the
correct expectation, not what the code prints today.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import pytest

try:
    from crafted import cases, harness  # tests/ on sys.path (no tests/__init__.py)
except ImportError:  # pragma: no cover - tests/ became a package
    from tests.crafted import cases, harness

UPDATE = os.environ.get("TRACER_UPDATE_GOLDEN") == "1"


def _params() -> list[object]:
    params: list[object] = []
    for name in cases.CASES:
        reason = cases.KNOWN_BUGS.get(name)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("name", _params())
def test_crafted_case(name: str, tmp_path: Path) -> None:
    case = cases.build(name)
    summary, everything = harness.run(case, tmp_path)
    actual_text = harness.render(summary)
    golden = harness.golden_path(name)

    if UPDATE:
        if name in cases.KNOWN_BUGS:
            pytest.skip("known bug: its golden file is edited by hand, never regenerated")
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual_text)

    assert golden.exists(), f"no golden file {golden}: run with TRACER_UPDATE_GOLDEN=1"
    expected_text = golden.read_text()
    expected = json.loads(expected_text)
    actual = json.loads(actual_text)
    if actual != expected:
        diff = "\n".join(
            difflib.unified_diff(
                harness.render(expected).splitlines(),
                actual_text.splitlines(),
                f"golden/{name}.json (expected)",
                "actual",
                lineterm="",
            )
        )
        pytest.fail(f"{name}: output differs from the golden file\n{diff}")

    # Header values outside the allow-list never reach a record, an event or an anomaly.
    for secret in case.secrets:
        assert secret not in everything, f"{secret!r} leaked into the output"


def test_secrets_are_really_in_the_capture(tmp_path: Path) -> None:
    """The secret-headers case proves something only if the secrets are on the wire."""
    for name in cases.CASES:
        case = cases.build(name)
        if not case.secrets:
            continue
        path = tmp_path / f"{name}.pcap"
        harness.write_pcap(case, path)
        raw = path.read_bytes()
        for secret in case.secrets:
            assert secret.encode() in raw, f"{name}: {secret!r} is not in the capture"


def test_every_golden_file_has_a_case() -> None:
    files = {p.stem for p in harness.GOLDEN_DIR.glob("*.json")}
    assert files == set(cases.CASES), (
        f"golden files without a case: {sorted(files - set(cases.CASES))}; "
        f"cases without a golden file: {sorted(set(cases.CASES) - files)}"
    )


def test_known_bugs_name_real_cases() -> None:
    assert set(cases.KNOWN_BUGS) <= set(cases.CASES)


def test_cases_are_deterministic(tmp_path: Path) -> None:
    """Building a case twice gives the same bytes (fixed ISNs, times, ports, encoders)."""
    for name in ("tcp_sf", "h2_hpack_dynamic_ref", "tcp_ipv6_hop_by_hop"):
        a, b = tmp_path / f"{name}.a.pcap", tmp_path / f"{name}.b.pcap"
        harness.write_pcap(cases.build(name), a)
        harness.write_pcap(cases.build(name), b)
        assert a.read_bytes() == b.read_bytes(), name
