"""The shipped Prometheus alert rules (deploy/prometheus/tracer-rules.yml): valid for
`promtool check rules`, and their unit tests (tracer-rules.test.yml: the leak alert fires
for a leaker and not for a pool or a busy client that closes what it opens; preface
timeouts; kernel drops) pass under `promtool test rules`.

promtool comes with Debian's prometheus package (`make system-deps` installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = RULES_DIR / "tracer-rules.yml"
RULE_TESTS = RULES_DIR / "tracer-rules.test.yml"
ALERTS = ("TracerConnectionLeak", "TracerServerPrefaceTimeouts", "TracerKernelDrops")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian's prometheus package: make system-deps)")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=60,
                          check=False, cwd=RULES_DIR)


def test_rules_are_valid() -> None:
    done = _run("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout, done.stdout


def test_rule_unit_tests_pass() -> None:
    done = _run("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout, done.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    text = RULE_TESTS.read_text()
    for alert in ALERTS:
        assert f"alert: {alert}" in RULES.read_text(), alert
        blocks = text.split(f"alertname: {alert}")[1:]
        assert any("exp_alerts: []" in b.split("alertname:")[0] for b in blocks), alert
        assert any("exp_labels" in b.split("alertname:")[0] for b in blocks), alert


def test_a_broken_rule_fails_its_unit_tests(tmp_path: Path) -> None:
    """The unit tests bite: without the 'closes fewer than half' condition the busy
    client that closes what it opens would be paged for."""
    rules = RULES.read_text()
    loosened = rules.replace("< 0.5 * increase", "< 5 * increase")
    assert loosened != rules
    (tmp_path / RULES.name).write_text(loosened)
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    done = subprocess.run([_promtool(), "test", "rules", RULE_TESTS.name], capture_output=True,
                          text=True, timeout=60, check=False, cwd=tmp_path)
    assert done.returncode != 0 and 'pid="777"' in done.stdout + done.stderr, done.stdout
