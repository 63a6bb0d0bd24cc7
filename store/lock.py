"""One capture writes a database at a time: the writer's lock, and who holds it.

Two captures writing one database at once would interleave their transactions (and one
of them dies of "database is locked" when a transaction of the other lasts longer than
the busy timeout). So a capture run holds an exclusive flock(2) on the database file for
as long as it writes; its worker processes share it (they inherit the descriptor). A
second capture run says who holds the lock (the running capture's row: its id, kind and
process) and waits for it, or gives up at once where waiting makes no sense.

flock and SQLite's own POSIX locks do not interfere on a local filesystem, and SQLite's
write-ahead log only works on a local filesystem anyway. Readers never take this lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable

import sqlite_utils

from store.schema import StoreError


def process_running(pid: object, start_time: object) -> bool | None:
    """Whether the process ``pid`` that started at ``start_time`` still runs; None when
    that cannot be told (no pid recorded: a capture made by an older tracer)."""
    if not isinstance(pid, int) or not isinstance(start_time, float):
        return None
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - start_time) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return None


class StoreBusy(StoreError):
    """Another capture is writing the database."""


def running_captures(db: sqlite_utils.Database) -> list[dict[str, object]]:
    """The captures whose rows say running, newest first."""
    cur = db.execute(
        "SELECT id, kind, started_at, pid, pid_start, interface FROM captures"
        " WHERE status = 'running'"
        " ORDER BY id DESC")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def describe(capture: dict[str, object] | None) -> str:
    if capture is None:
        return "another tracer process"
    kind = "a live capture" if capture["kind"] == "live" else "a file read"
    pid = f", pid {capture['pid']}" if capture.get("pid") else ""
    return f"capture {capture['id']} ({kind}{pid}, started {capture['started_at']})"


class WriterLock:
    """The exclusive write lock of one database file, held until ``release`` (or the end
    of every process that shares it)."""

    def __init__(self, db: sqlite_utils.Database, path: str) -> None:
        self.db = db
        self.path = path
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"cannot lock {path}: {exc.strerror}") from None

    def holder(self) -> dict[str, object] | None:
        """The running capture whose process is alive (a row left 'running' by a process
        that died holds nothing)."""
        for capture in running_captures(self.db):
            if process_running(capture.get("pid"), capture.get("pid_start")):
                return capture
        return None

    def acquire(self, *, wait: Callable[[str], None] | None,
                refuse_if: Callable[[dict[str, object] | None], bool] | None = None) -> None:
        """Take the lock. When another capture holds it: if ``refuse_if(holder)`` or
        there is no ``wait``, raise StoreBusy naming the holder; else say so through
        ``wait`` and block until it is free (Ctrl-C gives up)."""
        assert self.fd is not None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = self.holder()
        who = describe(holder)
        if wait is None or (refuse_if is not None and refuse_if(holder)):
            raise StoreBusy(f"{self.path} is being written by {who}: wait for it to end, "
                            "or give this capture a database of its own (--db)")
        wait(f"{self.path} is being written by {who}; waiting for it to finish "
             "(Ctrl-C to give up)")
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
