"""Rebuild tests/data/first-release.sql and tests/data/schema-history/*.sql from git history.

Not a test: run by hand (from the repository, with its virtual environment) when a
release is added to RELEASES. Each listed commit's own code (``git archive`` into a
temporary directory, run interpreted with this virtual environment's libraries) makes a
fresh database; each of those is then opened by every later release (its migrations, as
that release had them; some fail part way, as they did). Every distinct schema found is
written with ``sqlite3 .dump`` (schema and the migrations table). The first release also
reads the first 260 packets of cli/demo-capture.pcapng into a database, dumped whole as
first-release.sql.

    .venv/bin/python tests/data/make_history.py
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
# The commits on main that changed store/schema.py or the record's field list, oldest
# first: the schemas a database in use can have been made with.
RELEASES = ("23843aa", "aa473ac", "ea7994c", "d31cd60", "207c860", "00189c7", "63585e7",
            "4b06aea", "f5bb523", "902ec82")
FIRST_PACKETS = 260
PORT = 50151
OPEN = ("import sys; sys.path.insert(0, sys.argv[1]); import store.schema as s\n"
        "try:\n    s.open_database(sys.argv[2]).conn.close()\n"
        "except s.StoreError as exc:\n    print(exc)\n")


def archive(commit: str, into: Path) -> Path:
    tree = into / commit
    tree.mkdir()
    data = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True,
                          capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=data, check=True)
    return tree


def signature(path: Path) -> tuple[object, ...]:
    conn = sqlite3.connect(path)
    try:
        objects = sorted(conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))
        applied = sorted(r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations"))
    finally:
        conn.close()
    return tuple(objects), tuple(applied)


def dump(path: Path, out: Path, header: str) -> None:
    text = subprocess.run(["sqlite3", str(path), ".dump"], check=True, capture_output=True,
                          text=True).stdout
    out.write_text("".join(f"-- {line}\n" if line else "--\n" for line in header.splitlines())
                   + text)


def first_release_capture(tree: Path, work: Path) -> None:
    from scapy.utils import PcapNgReader, wrpcap

    packets = list(PcapNgReader(str(REPO / "cli" / "demo-capture.pcapng")))[:FIRST_PACKETS]
    wrpcap(str(work / "first-release.pcap"), packets, linktype=101)  # raw IP, as the source
    subprocess.run([sys.executable, "-m", "cli.main", "capture", "--read", "first-release.pcap",
                    "--port", str(PORT), "--db", "first-release.db"], cwd=work, check=True,
                   env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})
    dump(work / "first-release.db", OUT / "first-release.sql",
         f"A database made by the first release (commit {RELEASES[0]}) with its own code:\n"
         f"`tracer capture --read first-release.pcap --port {PORT}`, where first-release.pcap\n"
         f"is the first {FIRST_PACKETS} packets of cli/demo-capture.pcapng; then `sqlite3\n"
         "first-release.db .dump`. Made by tests/data/make_history.py; read by\n"
         "tests/test_schema_history.py.")


def main() -> None:
    history = OUT / "schema-history"
    shutil.rmtree(history, ignore_errors=True)
    history.mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trees = {c: archive(c, work) for c in RELEASES}
        first_release_capture(trees[RELEASES[0]], work)
        seen: dict[tuple[object, ...], str] = {}
        for i, made in enumerate(RELEASES):
            fresh = work / f"{made}.db"
            subprocess.run([sys.executable, "-c", OPEN, str(trees[made]), str(fresh)],
                           check=True)
            states = [(fresh, f"made by {made}", f"{i:02d}-{made}")]
            for later in RELEASES[i + 1:]:
                opened = work / f"{made}-{later}.db"
                shutil.copy(fresh, opened)
                said = subprocess.run([sys.executable, "-c", OPEN, str(trees[later]),
                                       str(opened)], check=True, capture_output=True,
                                      text=True).stdout.strip()
                how = f"made by {made}, then opened by {later}"
                if said:
                    how += f" (which said: {said.replace(str(opened), 'the database')})"
                states.append((opened, how, f"{i:02d}-{made}-then-{later}"))
            for path, how, name in states:
                sig = signature(path)
                if sig in seen:
                    continue
                seen[sig] = name
                dump(path, history / f"{name}.sql",
                     f"The schema of a database {how}: each commit's own\n"
                     "code (git archive), then `sqlite3 DB .dump`. Made by\n"
                     "tests/data/make_history.py; read by tests/test_schema_history.py.")
    print(f"{len(seen)} distinct schemas in {history.relative_to(REPO)}")


if __name__ == "__main__":
    main()
