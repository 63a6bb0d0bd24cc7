"""The stored full report: computed and kept by the writer side, read by every reader.

A capture run computes the report once at its end, and so do `tracer logs add`, `tracer
logs remove` and `tracer prune` after they change the data; `tracer report` then serves
it while its fingerprint matches the data (store.queries.report), and never writes. The
report_cache table comes with migration m005_report_cache. The report is kept as
zlib-compressed JSON (a BLOB, about a tenth of its text: 223 kB of JSON for the bench
capture's 243 clients); reports stored as JSON text by earlier versions are read as well.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import sqlite_utils

from store.queries import report, report_fingerprint, stored_report
from store.sql import DEFAULT_PREFACE_TIMEOUT


def store_report(db: sqlite_utils.Database, *,
                 preface_timeout: float = DEFAULT_PREFACE_TIMEOUT) -> dict[str, Any]:
    """Compute the full report and keep it with the fingerprint of the data, unless the
    one kept is current; the report either way. A writer's call: on a database opened
    read-only it raises sqlite3.OperationalError."""
    fingerprint = report_fingerprint(db, preface_timeout)
    current = stored_report(db, fingerprint)
    if current is not None:
        return current
    data = report(db, preface_timeout=preface_timeout, cache=False)
    with db.conn:
        db.execute("DELETE FROM report_cache")
        db.execute("INSERT INTO report_cache VALUES (?, ?)",
                   [fingerprint, zlib.compress(json.dumps(data).encode(), 6)])
    return data
