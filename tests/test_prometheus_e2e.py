"""End to end with a real Prometheus: the server (Debian's prometheus package) on
loopback scrapes a live agent (`tracer capture --metrics`) that watches a real grpcio
leaker, a pooled client and a busy client that closes each connection, and evaluates
the SHIPPED alert rules (deploy/prometheus/tracer-rules.yml, its 10m windows shortened
to WINDOW by substitution): TracerConnectionLeak fires for the leaker's pid, and no
alert, pending or firing, names the two healthy clients.

Needs root (AF_PACKET) and the prometheus binary. About 40 s.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import live_support as ls
import metrics_support as ms
import pytest
import realtraffic_support as rt
from support import free_port, wait_for

pytestmark = [pytest.mark.live, pytest.mark.slow]

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "tracer-rules.yml"
WINDOW = "15s"  # what the rules' 10m windows and holds become here
FIRE_TIMEOUT_S = 90.0
READY_TIMEOUT_S = 30.0
LEAK_INTERVAL_S = 0.5  # the leaker dials a new channel this often


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5.0) as response:
        return json.loads(response.read().decode())


def _alerts(prom: int) -> list[dict[str, Any]] | None:
    try:
        data = _get(f"http://127.0.0.1:{prom}/api/v1/alerts")
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None
    alerts: list[dict[str, Any]] = data["data"]["alerts"]
    return alerts


def _demo_peer(processes: rt.Processes, mode: str, port: int, interval: float) -> rt.Process:
    return processes.start(f"demo-{mode}", [sys.executable, "-m", "cli.demo_peers", mode,
                                            f"127.0.0.1:{port}", "--interval", str(interval),
                                            "--lifetime", "120"])


def test_prometheus_fires_the_leak_alert_for_the_leaker_only(tmp_path: Path) -> None:
    ls.need_root()
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (Debian's prometheus package: "
                    "make system-deps)")
    rules = RULES.read_text()
    short = rules.replace("10m", WINDOW)
    assert short != rules and "10m" not in short
    assert short.count(WINDOW) >= 6  # every range and the hold of the leak rule
    (tmp_path / "rules.yml").write_text(short)
    metrics_port, prom_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [rules.yml]
scrape_configs:
  - job_name: tracer
    static_configs:
      - targets: ['127.0.0.1:{metrics_port}']
""")
    with ls.processes() as processes:
        port = ls.start_server(processes)
        agent = ls.Agent(processes, tmp_path / "tracer.db", port, "--iface", "lo",
                         "--duration", "150", "-q", "--metrics", f"127.0.0.1:{metrics_port}")
        server = processes.start("prometheus", [
            prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"])
        agent.wait_ready()
        wait_for(lambda: _alerts(prom_port) is not None, "prometheus answers",
                 timeout=READY_TIMEOUT_S, interval=0.25,
                 error=lambda m: rt.PeerFailed(f"{m}\n{server.output()}"))
        leaker = _demo_peer(processes, "leak", port, LEAK_INTERVAL_S)
        pool = _demo_peer(processes, "pool", port, 0.1)
        closer = _demo_peer(processes, "close", port, 0.1)
        healthy = {str(pool.popen.pid), str(closer.popen.pid)}
        started = time.monotonic()

        def sample() -> list[dict[str, Any]]:
            alerts = _alerts(prom_port) or []
            named = [a for a in alerts if a["labels"].get("pid") in healthy]
            assert not named, f"an alert for a healthy client: {named}"
            for proc in (agent.proc, leaker, pool, closer, server):
                if proc.popen.poll() is not None:
                    raise rt.PeerFailed(f"{proc.name} exited:\n{proc.output()}")
            return [a for a in alerts if a["labels"].get("alertname") == "TracerConnectionLeak"
                    and a["labels"].get("pid") == str(leaker.popen.pid)
                    and a["state"] == "firing"]

        fired = wait_for(sample, "TracerConnectionLeak fires for the leaker",
                         timeout=FIRE_TIMEOUT_S, interval=0.5,
                         error=lambda m: rt.PeerFailed(f"{m}\nagent: {agent.output()}\n"
                                                       f"prometheus: {server.output()}"))
        took = time.monotonic() - started
        scrape = ms.fetch(metrics_port)
        s = ms.parse(scrape)
        still_open = ms.of_pid(s, "tracer_client_open_connections", leaker.popen.pid)
        assert still_open is not None and still_open >= 10, still_open
        assert ms.of_pid(s, "tracer_client_open_connections", pool.popen.pid) == 1
        alert = fired[0]
        assert alert["labels"]["severity"] == "warning"
        assert f"tracer report --client {leaker.popen.pid}" in alert["annotations"]["description"]
        # Kept for the README: what a scrape shows and what Prometheus said, with the time.
        print(f"\nfired {took:.1f}s after the leaker started\n--- scrape ---\n{scrape}"
              f"--- alert ---\n{json.dumps(alert, indent=2)}")
        # The healthy clients once more, now that the rules had all this time.
        assert not [a for a in _alerts(prom_port) or [] if a["labels"].get("pid") in healthy]
