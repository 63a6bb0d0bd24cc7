"""Write packets as pcapng (what `tracer capture --write` keeps): one interface, raw IP packets.

The file is created 0600: it holds payloads, which the database never does. It is always a
new file: an existing name (a file, or a symbolic link planted where root's agent writes) is
refused, never followed, truncated or chmod-ed.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from typing import BinaryIO

from tracer.decode import LINKTYPE_RAW

_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_EPB = 0x00000006


def _block(btype: int, body: bytes) -> bytes:
    pad = (-len(body)) % 4
    length = 12 + len(body) + pad
    return struct.pack("<II", btype, length) + body + b"\0" * pad + struct.pack("<I", length)


def _option(code: int, value: bytes) -> bytes:
    pad = (-len(value)) % 4
    return struct.pack("<HH", code, len(value)) + value + b"\0" * pad


class PcapWriteError(Exception):
    """The pcapng file cannot be created; the message says why and what to do."""


def _create_new(path: str) -> int:
    """A descriptor on ``path``, created now (0600): O_EXCL, so an existing file or a
    symbolic link (even a dangling one) there is refused, and never followed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ELOOP):
            raise PcapWriteError(f"cannot create {path}: {exc.strerror}") from None
        try:
            found = os.lstat(path)
        except OSError:
            found = None
        if found is not None and stat.S_ISLNK(found.st_mode):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise PcapWriteError(
                f"refusing to write {path}: it is a symbolic link to {target}; give the real "
                f"path of a new file") from None
        raise PcapWriteError(
            f"refusing to write {path}: it already exists; choose another name or remove "
            f"it") from None
    os.fchmod(fd, 0o600)  # whatever the umask
    return fd


class PcapngWriter:
    """Raises PcapWriteError when ``path`` exists (file or link) or cannot be created."""

    def __init__(self, path: str, *, linktype: int = LINKTYPE_RAW, snaplen: int = 262144,
                 comment: str = "") -> None:
        fd = _create_new(path)
        self._f: BinaryIO = os.fdopen(fd, "wb", buffering=1 << 20)
        self.path = path
        self.packets = 0
        shb_options = (_option(1, comment.encode()) if comment else b"") + _option(0, b"")
        self._f.write(_block(_SHB, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + shb_options))
        idb_options = _option(9, b"\x06") + _option(0, b"")  # if_tsresol: microseconds
        self._f.write(_block(_IDB, struct.pack("<HHI", linktype, 0, snaplen) + idb_options))

    def write(self, ts: float, data: bytes) -> None:
        units = round(ts * 1_000_000)
        body = struct.pack("<IIIII", 0, units >> 32, units & 0xFFFFFFFF, len(data), len(data))
        self._f.write(_block(_EPB, body + data))
        self.packets += 1

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()
