"""Scraping the live agent's /metrics (tracer capture --metrics) in tests: the exposition
fetched with urllib and parsed by prometheus_client's own parser."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_S = 5.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def fetch(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics",
                                timeout=SCRAPE_TIMEOUT_S) as response:
        text: str = response.read().decode()
        return text


def parse(text: str) -> Samples:
    """Every sample: (sample name, its labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def scrape(port: int) -> Samples | None:
    """The agent's samples, or None while it does not answer yet."""
    try:
        return parse(fetch(port))
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def value(samples: Samples, name: str, **labels: Any) -> float | None:
    """The one sample of ``name`` with exactly ``labels``; None when there is none."""
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())))


def of_pid(samples: Samples, name: str, pid: int | str, **labels: Any) -> float | None:
    """The sample of ``name`` for the client process ``pid`` (with ``labels`` too); None
    when there is none. Fails when there are several (one series per process and
    address)."""
    want = {"pid": str(pid), **{k: str(v) for k, v in labels.items()}}
    found = [v for (n, ls), v in samples.items()
             if n == name and want.items() <= dict(ls).items()]
    assert len(found) <= 1, (name, want, found)
    return found[0] if found else None


def names(samples: Samples, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of ``name``."""
    return [dict(labels) for (n, labels) in samples if n == name]
