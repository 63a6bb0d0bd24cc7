"""The agent runs as root and must be safe with files (issue 8): no symbolic link is ever
followed, no file clobbered, no FIFO, device or directory used as a database, no other
file turned into one; and readers open the database read-only, so archived copies (a 0444
file, a read-only mount) can be reported on and stay byte-for-byte as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from support import DEMO_CAPTURE, free_port, requires_root, tmpfs, tracer

from cli.demo import SHIPPED_PORT
from store import aggregates
from store.queries import report
from store.schema import StoreError, migrations, open_database
from store.stored_report import store_report
from tracer.decode import LINKTYPE_LINUX_SLL2
from tracer.sources.pcapfile import CaptureReader
from tracer.sources.pcapwriter import PcapngWriter, PcapWriteError
from tracer.sources.ring import SOCKADDR_LL

SIDE_FILES = ("-wal", "-shm", "-journal")
NOBODY = 65534  # an unprivileged uid that owns no file here


def capture_demo(db: Path) -> subprocess.CompletedProcess[str]:
    return tracer("capture", "-q", "--read", str(DEMO_CAPTURE), "--port", str(SHIPPED_PORT),
                  "--db", str(db), check=False)


def assert_refused(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    """Failed with one clear line, no traceback, saying each of ``words``."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], proc.stderr


def snapshot(path: Path) -> tuple[bytes, int, int]:
    """A file's content, mode and owner, as lstat and the bytes say (never via a link)."""
    st = os.lstat(path)
    return path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def side_files(db: Path) -> list[str]:
    return sorted(p.name for p in db.parent.glob(db.name + "-*"))


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real database: the shipped demo capture read by `tracer capture --read`."""
    db = tmp_path_factory.mktemp("demo") / "demo.db"
    proc = capture_demo(db)
    assert proc.returncode == 0, proc.stderr
    assert side_files(db) == [], "a finished capture leaves its database alone"
    return db


@pytest.fixture
def report_json(demo_db: Path) -> str:
    """`tracer report --format json` on the original database."""
    proc = tracer("report", "--db", str(demo_db), "--format", "json", check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- A. no symbolic link followed, no file clobbered ------------------------------------------

LINK_CASES = ["existing file", "empty file", "dangling"]


def planted_link(tmp_path: Path, case: str) -> tuple[Path, Path]:
    """A --db name that is a symbolic link, and where it points."""
    target = tmp_path / "target"
    if case == "existing file":
        target.write_text("precious\n")
        target.chmod(0o644)
    elif case == "empty file":
        target.write_bytes(b"")
        target.chmod(0o640)
    link = tmp_path / "tracer.db"
    link.symlink_to(target)
    return link, target


@pytest.mark.parametrize("case", LINK_CASES)
@pytest.mark.parametrize("command", ["capture", "report"])
def test_symlinked_db_is_refused(tmp_path: Path, case: str, command: str) -> None:
    link, target = planted_link(tmp_path, case)
    before = snapshot(target) if case != "dangling" else None
    if command == "capture":
        proc = capture_demo(link)
    else:
        proc = tracer("report", "--db", str(link), check=False)
    assert_refused(proc, "refusing to open DB", "symbolic link to", str(target.name),
                   "give the real path")
    if before is None:
        assert not target.exists() and not os.path.lexists(target), "the target was created"
    else:
        assert snapshot(target) == before
    assert link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["tracer.db"] + (["target"] if before is not None else []))


@pytest.mark.parametrize("suffix", SIDE_FILES)
@pytest.mark.parametrize("command", ["capture", "report"])
def test_symlinked_side_file_is_refused(tmp_path: Path, demo_db: Path, suffix: str,
                                        command: str) -> None:
    """SQLite opens -wal, -shm and -journal by name: a planted link there would have it
    truncate and write another file."""
    db = tmp_path / "copy.db"
    shutil.copyfile(demo_db, db)
    target = tmp_path / "victim"
    target.write_text("precious\n")
    (tmp_path / ("copy.db" + suffix)).symlink_to(target)
    before, db_hash = snapshot(target), sha256(db)
    proc = capture_demo(db) if command == "capture" else tracer("report", "--db", str(db),
                                                               check=False)
    assert_refused(proc, "refusing to open DB", "copy.db" + suffix, "symbolic link")
    assert snapshot(target) == before
    assert sha256(db) == db_hash


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
@pytest.mark.parametrize("command", ["capture", "report"])
def test_db_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str,
                                                  command: str) -> None:
    if kind == "fifo":
        db = tmp_path / "fifo.db"
        os.mkfifo(db)
        words = ["a FIFO"]
    elif kind == "directory":
        db = tmp_path / "dir.db"
        db.mkdir()
        words = ["a directory"]
    else:
        db = Path(os.devnull)
        words = ["a device"]
    # A FIFO opened for reading would block: the timeout catches a hang.
    proc = capture_demo(db) if command == "capture" else tracer("report", "--db", str(db),
                                                               timeout=60, check=False)
    assert_refused(proc, "refusing to open DB", "not a regular file", *words)
    if kind == "directory":
        assert list(db.iterdir()) == []


def test_a_file_that_is_not_a_database_never_becomes_one(tmp_path: Path) -> None:
    db = tmp_path / "notes.txt"
    db.write_text("not a database, and it stays so\n")
    before = snapshot(db)
    for proc in (capture_demo(db), tracer("report", "--db", str(db), check=False),
                 tracer("logs", "list", "--db", str(db), check=False)):
        assert_refused(proc, str(db), "file is not a database")
        assert snapshot(db) == before
    assert side_files(db) == []


def test_an_empty_file_of_ours_becomes_a_private_database(tmp_path: Path) -> None:
    db = tmp_path / "touched.db"
    db.write_bytes(b"")
    db.chmod(0o644)
    proc = capture_demo(db)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    assert tracer("report", "--db", str(db), check=False).returncode == 0


@requires_root("giving a file to another user")
def test_an_empty_file_of_another_user_is_refused(tmp_path: Path) -> None:
    """Planted in a shared directory for root's agent to fill: its owner could read it."""
    db = tmp_path / "planted.db"
    db.write_bytes(b"")
    os.chown(db, NOBODY, -1)
    db.chmod(0o666)
    before = snapshot(db)
    assert_refused(capture_demo(db), "refusing to use", "empty file owned by",
                   "remove it or give another path")
    assert snapshot(db) == before
    assert side_files(db) == []


@requires_root("giving a file to another user")
def test_a_side_file_of_another_user_is_refused(tmp_path: Path, demo_db: Path) -> None:
    """A -wal someone else owns would receive the database's pages, readable by them."""
    db = tmp_path / "copy.db"
    shutil.copyfile(demo_db, db)
    wal = tmp_path / "copy.db-wal"
    wal.write_bytes(b"")
    os.chown(wal, NOBODY, -1)
    db_hash = sha256(db)
    assert_refused(capture_demo(db), "refusing to open DB", "copy.db-wal", "belongs to")
    assert sha256(db) == db_hash and wal.read_bytes() == b""


def test_a_stale_side_file_beside_a_new_database_is_refused(tmp_path: Path) -> None:
    """SQLite would take a planted -wal's pages into the database being created."""
    db = tmp_path / "new.db"
    (tmp_path / "new.db-wal").write_bytes(b"planted")
    assert_refused(capture_demo(db), "refusing to open DB", "new.db-wal", "remove it")
    assert not db.exists(), "the refused database is not left behind"
    assert (tmp_path / "new.db-wal").read_bytes() == b"planted"


def test_a_created_database_is_private(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    open_database(str(db)).close()
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    assert side_files(db) == []


def test_open_database_raises_store_error(tmp_path: Path) -> None:
    link = tmp_path / "link.db"
    link.symlink_to(tmp_path / "nowhere.db")
    for readonly in (False, True):
        with pytest.raises(StoreError, match=r"symbolic link to .*nowhere\.db; give the real"):
            open_database(str(link), readonly=readonly)
    assert not (tmp_path / "nowhere.db").exists()
    with pytest.raises(StoreError, match="no database at"):
        open_database(str(tmp_path / "missing.db"), readonly=True)
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.parametrize("case", ["existing file", "empty file", "symlink to a file",
                                  "dangling symlink"])
def test_pcapng_writer_never_clobbers(tmp_path: Path, case: str) -> None:
    path = tmp_path / "dump.pcapng"
    target = tmp_path / "target"
    if case == "existing file":
        path.write_text("an earlier capture\n")
        path.chmod(0o644)
        watched, words = path, ["already exists", "choose another name or remove it"]
    elif case == "empty file":
        path.write_bytes(b"")
        watched, words = path, ["already exists", "choose another name or remove it"]
    else:
        if case == "symlink to a file":
            target.write_text("precious\n")
            target.chmod(0o644)
        path.symlink_to(target)
        watched, words = target, ["symbolic link to", "target", "give the real path"]
    before = snapshot(watched) if watched.exists() else None
    with pytest.raises(PcapWriteError) as raised:
        PcapngWriter(str(path))
    message = str(raised.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message
    if before is None:
        assert not target.exists()
    else:
        assert snapshot(watched) == before


def test_pcapng_writer_creates_a_new_private_file(tmp_path: Path) -> None:
    path = tmp_path / "dump.pcapng"
    writer = PcapngWriter(str(path), comment="test")
    link = SOCKADDR_LL.pack(socket.AF_PACKET, b"\x08\x00", 1, 772, 0, 0, b"")
    writer.write(1_790_000_000.25, b"\x45" + b"\x00" * 39, link, 40)
    writer.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with CaptureReader.open(str(path)) as reader:
        packets = list(reader)
    assert [(round(ts, 6), link, len(frame)) for ts, link, frame in packets] == [
        (1_790_000_000.25, LINKTYPE_LINUX_SLL2, 20 + 40)]


@requires_root("a live capture (packet sockets)")
@pytest.mark.parametrize("case", ["existing file", "symlink"])
def test_capture_write_refuses_an_existing_name(tmp_path: Path, case: str) -> None:
    pcap = tmp_path / "dump.pcapng"
    target = tmp_path / "target"
    target.write_text("precious\n")
    target.chmod(0o644)
    if case == "symlink":
        pcap.symlink_to(target)
        words = ["symbolic link to", "give the real path"]
    else:
        shutil.copyfile(target, pcap)
        pcap.chmod(0o644)
        words = ["already exists", "choose another name or remove it"]
    watched = target if case == "symlink" else pcap
    before = snapshot(watched)
    proc = tracer("capture", "-q", "--iface", "lo", "--port", str(free_port()),
                  "--duration", "1s", "--write", str(pcap), "--db", str(tmp_path / "t.db"),
                  timeout=60, check=False)
    if proc.returncode == 4 and str(pcap) not in proc.stderr:
        pytest.skip(f"live capture cannot start here: {proc.stderr.strip()}")
    assert_refused(proc, str(pcap), *words)
    assert snapshot(watched) == before


# -- B. readers open the database read-only --------------------------------------------------


@contextlib.contextmanager
def read_only_mount(tmp_path: Path, *files: Path) -> Iterator[Path]:
    """A small tmpfs holding copies of ``files``, then remounted read-only."""
    with tmpfs(tmp_path / "media", "16m", mode="0755") as mnt:
        for f in files:
            shutil.copy2(f, mnt / f.name)
        proc = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True,
                              text=True, check=False, timeout=10)
        if proc.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {proc.stderr.strip()}")
        yield mnt


READER_COMMANDS = [
    ("report", "--format", "json"),
    ("report", "--format", "json", "--since", "-5s"),
    ("timeline", "--bucket", "2s", "--format", "json"),
    ("connections", "--format", "json"),
    ("correlate", "--format", "json"),
    ("logs", "list", "--format", "json"),
    ("logs", "show", "--format", "json"),
]


def run_readers(db: Path) -> list[str]:
    outputs = []
    for command in READER_COMMANDS:
        proc = tracer(*command, "--db", str(db), check=False)
        assert proc.returncode == 0, (command, proc.stderr)
        outputs.append(proc.stdout)
    return outputs


def test_report_on_a_read_only_copy(tmp_path: Path, demo_db: Path, report_json: str) -> None:
    """An archived 0444 copy, in a writable directory: the same report, nothing written,
    nothing created beside it."""
    copy = tmp_path / "archived.db"
    shutil.copyfile(demo_db, copy)
    copy.chmod(0o444)
    digest = sha256(copy)
    proc = tracer("report", "--db", str(copy), "--format", "json", check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(report_json)
    assert proc.stdout == report_json
    assert run_readers(copy) == run_readers(demo_db)
    assert sha256(copy) == digest
    assert side_files(copy) == []
    assert stat.S_IMODE(os.stat(copy).st_mode) == 0o444


def test_report_on_a_read_only_mount(tmp_path: Path, demo_db: Path, report_json: str) -> None:
    with read_only_mount(tmp_path, demo_db) as mnt:
        copy = mnt / demo_db.name
        digest = sha256(copy)
        proc = tracer("report", "--db", str(copy), "--format", "json", check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == report_json
        assert run_readers(copy) == run_readers(demo_db)
        assert sha256(copy) == digest
        assert side_files(copy) == []


def _wal_with_content(tmp_path: Path, demo_db: Path) -> tuple[Path, Path]:
    """A copy of the database whose last change is still only in its -wal (as a copy taken
    while a capture runs): the database file and that -wal."""
    work = tmp_path / "work"
    work.mkdir()
    db = work / "busy.db"
    shutil.copyfile(demo_db, db)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    with conn:  # the stored report goes too: the change must be read, not the cache
        conn.execute("UPDATE captures SET packets = packets + 1000")
        conn.execute("DELETE FROM report_cache")
    out = tmp_path / "copied"
    out.mkdir()
    shutil.copyfile(db, out / db.name)
    shutil.copyfile(work / "busy.db-wal", out / "busy.db-wal")
    conn.close()
    return out / db.name, out / "busy.db-wal"


def test_changes_in_a_wal_are_never_ignored(tmp_path: Path, demo_db: Path) -> None:
    """An immutable reader would not see the -wal: with one, the reader reads it, or says
    why it cannot (no -shm can be made on read-only media)."""
    db, wal = _wal_with_content(tmp_path, demo_db)
    packets = json.loads(report_packets(demo_db))
    db.chmod(0o444)
    assert json.loads(report_packets(db)) == packets + 1000
    for f in (db, wal):
        f.chmod(0o644)
    for leftover in db.parent.glob("busy.db-shm"):
        leftover.unlink()
    with read_only_mount(tmp_path, db, wal) as mnt:
        proc = tracer("report", "--db", str(mnt / db.name), check=False)
        assert_refused(proc, "busy.db-wal", "copy both files somewhere writable")


def report_packets(db: Path) -> str:
    proc = tracer("report", "--db", str(db), "--format", "json", check=False)
    assert proc.returncode == 0, proc.stderr
    return json.dumps(json.loads(proc.stdout)["capture"]["packets"])


def test_readers_never_store_the_report(tmp_path: Path, demo_db: Path,
                                        report_json: str) -> None:
    """`tracer report` computes a report the capture did not store and keeps nothing."""
    db = tmp_path / "copy.db"
    shutil.copyfile(demo_db, db)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DELETE FROM report_cache")
    conn.close()
    for leftover in side_files(db):
        (tmp_path / leftover).unlink()
    db.chmod(0o444)
    digest = sha256(db)
    proc = tracer("report", "--db", str(db), "--format", "json", check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == report_json
    assert sha256(db) == digest
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM report_cache").fetchone()[0] == 0
    conn.close()


def test_report_stores_only_when_asked(tmp_path: Path, demo_db: Path) -> None:
    """The cache table comes from a migration; only the writer side writes it
    (store_report), and a reader serves what a writer stored while its fingerprint
    matches."""
    db_path = tmp_path / "copy.db"
    shutil.copyfile(demo_db, db_path)
    db = open_database(str(db_path))
    assert "m005_report_cache" in [m.name for m in migrations.applied(db)]
    db.execute("DELETE FROM report_cache")
    db.conn.commit()
    fresh = report(db)
    assert db.execute("SELECT COUNT(*) FROM report_cache").fetchone()[0] == 0
    assert store_report(db) == fresh
    [(fingerprint, stored)] = db.execute("SELECT fingerprint, report FROM report_cache")
    assert isinstance(stored, bytes) and json.loads(zlib.decompress(stored)) == fresh
    assert len(stored) < len(json.dumps(fresh)) / 2
    # Mark the stored report: a reader that gets the mark read it from the cache, in the
    # compressed form and in the JSON text earlier versions stored.
    marked = {**fresh, "marker": 1}
    with db.conn:
        db.execute("UPDATE report_cache SET report = ?",
                   [zlib.compress(json.dumps(marked).encode())])
    assert report(db) == marked
    marked = {**fresh, "marker": 2}
    with db.conn:
        db.execute("UPDATE report_cache SET report = ?", [json.dumps(marked)])
    db.close()
    reader = open_database(str(db_path), readonly=True)
    assert report(reader) == marked
    with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only|query_only"):
        store_report(reader, preface_timeout=1.0)
    reader.close()
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT fingerprint FROM report_cache").fetchone()[0] == fingerprint


READ_ONLY_WINDOWS: list[dict[str, Any]] = [
    {}, {"since": -5.0}, {"client": "10.151.3.2"}, {"since": -5.0, "client": "10.151.1.2"},
    {"preface_timeout": 0.5}]


def _reports(db: Any, last_ts: float) -> list[str]:
    out = []
    for window in READ_ONLY_WINDOWS:
        args = dict(window)
        if "since" in args:
            args["since"] += last_ts
        out.append(json.dumps(report(db, **args)))
    return out


def test_a_read_only_copy_computes_the_same_report(tmp_path: Path, demo_db: Path) -> None:
    """With no stored report, computed afresh (from the clients' totals): a 0444 copy in
    a 0555 directory (opened immutable) and a copy opened through a `file:...?mode=ro`
    URI give what the writable database gives, and nothing is written."""
    writable = tmp_path / "writable.db"
    shutil.copyfile(demo_db, writable)
    with contextlib.closing(sqlite3.connect(writable)) as conn, conn:
        conn.execute("DELETE FROM report_cache")
    db = open_database(str(writable))
    assert aggregates.present(db)
    last_ts = db.execute("SELECT MAX(last_ts) FROM captures").fetchone()[0]
    expected = _reports(db, last_ts)
    assert json.loads(expected[0])["clients"]  # something to compare
    db.close()
    sealed = tmp_path / "sealed"
    sealed.mkdir()
    copy = sealed / "archived.db"
    shutil.copyfile(writable, copy)
    copy.chmod(0o444)
    sealed.chmod(0o555)
    try:
        digest = sha256(copy)
        reader = open_database(str(copy), readonly=True)
        assert _reports(reader, last_ts) == expected
        reader.close()
        proc = tracer("report", "--db", str(copy), "--format", "json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == json.loads(expected[0])
        assert sha256(copy) == digest
        assert side_files(copy) == []
        # Someone's own read-only connection (SQLite itself may add an empty -wal and a
        # -shm beside a WAL database, root even in a 0555 directory): nothing written.
        uri = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
        try:
            assert _reports(sqlite_utils.Database(uri), last_ts) == expected
        finally:
            uri.close()
        assert sha256(copy) == digest
        wal = Path(str(copy) + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0
    finally:
        sealed.chmod(0o755)


def _forget(db: Path, *names: str, add: str | None = None) -> None:
    """Make the database look written by another version: migrations not recorded (and
    their objects dropped), or one recorded that this version does not know."""
    conn = sqlite3.connect(db)
    with conn:
        for name in names:
            conn.execute("DELETE FROM _sqlite_migrations WHERE name = ?", [name])
        if "m005_report_cache" in names:
            conn.execute("DROP TABLE report_cache")
        if "m004_preface_index" in names:
            conn.execute("DROP INDEX connections_preface")
        if add:
            conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at)"
                         " VALUES ('tracer', ?, '2030-01-01')", [add])
    conn.close()


def test_reader_of_a_database_from_an_older_tracer(tmp_path: Path, demo_db: Path,
                                                   report_json: str) -> None:
    # Lacking only what a reader can do without (an index, the cache): read as it is.
    old = tmp_path / "old.db"
    shutil.copyfile(demo_db, old)
    _forget(old, "m004_preface_index", "m005_report_cache")
    old.chmod(0o444)
    digest = sha256(old)
    proc = tracer("report", "--db", str(old), "--format", "json", check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(report_json)
    assert sha256(old) == digest and side_files(old) == []
    # Lacking tables the queries read: says so, and how to upgrade.
    older = tmp_path / "older.db"
    shutil.copyfile(demo_db, older)
    _forget(older, "m003_logs")
    older.chmod(0o444)
    digest = sha256(older)
    assert_refused(tracer("report", "--db", str(older), check=False), "written by an older tracer",
                   "m003_logs", "tracer capture")
    assert sha256(older) == digest


def test_reader_of_a_database_from_a_newer_tracer(tmp_path: Path, demo_db: Path) -> None:
    newer = tmp_path / "newer.db"
    shutil.copyfile(demo_db, newer)
    _forget(newer, add="m999_from_the_future")
    digest = sha256(newer)
    assert_refused(tracer("report", "--db", str(newer), check=False), "written by a newer tracer",
                   "m999_from_the_future")
    assert sha256(newer) == digest


def test_a_writer_refuses_a_read_only_file(tmp_path: Path, demo_db: Path) -> None:
    """Root could write a 0444 file anyway; it is an archived copy (and readers open it
    immutable), so the capture refuses it."""
    copy = tmp_path / "archived.db"
    shutil.copyfile(demo_db, copy)
    copy.chmod(0o444)
    digest = sha256(copy)
    assert_refused(capture_demo(copy), "read-only", "chmod u+w")
    assert sha256(copy) == digest and side_files(copy) == []
