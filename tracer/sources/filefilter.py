"""`tracer capture --read FILE --filter EXPR`: a tcpdump filter expression on the records
of capture files, run by libpcap as `tcpdump -r FILE EXPR` runs it.

The expression is compiled by libpcap for each link type met (a pcapng file may hold
several), and each record is matched against its own link type's program, link layer
included (`ether host`, `vlan` and the rest mean what they mean to tcpdump). Records it
rejects are counted, never analysed. libpcap is loaded only when a filter is given; where
it is missing the error says so, as for live capture.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

# libpcap's DLT numbers differ from the LINKTYPE numbers files carry for a few types.
_LINKTYPE_TO_DLT = {101: 12}  # LINKTYPE_RAW -> DLT_RAW (Linux)
_SNAPLEN = 262144
_NETMASK_UNKNOWN = 0xFFFFFFFF


class FilterError(Exception):
    """The expression cannot be used; the message says why."""


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _PktHdr(ctypes.Structure):
    _fields_ = [("ts", _Timeval), ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32)]


def _libpcap() -> Any:
    name = ctypes.util.find_library("pcap")
    if name is None:
        raise FilterError(
            "--filter needs libpcap to compile the expression, and it is not installed "
            "(Debian: apt-get install libpcap0.8)")
    lib = ctypes.CDLL(name)
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_compile.restype = ctypes.c_int
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram),
                                 ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_close.restype = None
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    lib.pcap_freecode.restype = None
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_offline_filter.restype = ctypes.c_int
    lib.pcap_offline_filter.argtypes = [ctypes.POINTER(_BpfProgram), ctypes.POINTER(_PktHdr),
                                        ctypes.c_char_p]
    return lib


class FileFilter:
    """A prefilter for tracer.sources.pcapfile.CaptureReader: True for a record the
    expression accepts. ``rejected`` counts the others; ``errors`` says which link types
    the expression cannot apply to (their records are all rejected)."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self._lib = _libpcap()
        self._programs: dict[int, _BpfProgram | None] = {}
        self._header = _PktHdr()
        self.rejected = 0
        self.errors: list[str] = []
        self._compile(1)  # Ethernet: a syntax error is said before any file is read
        if self._programs[1] is None:
            raise FilterError(self.errors.pop())

    def _compile(self, linktype: int) -> _BpfProgram | None:
        lib = self._lib
        handle = lib.pcap_open_dead(_LINKTYPE_TO_DLT.get(linktype, linktype), _SNAPLEN)
        if not handle:
            self.errors.append(f"--filter: libpcap does not know link type {linktype}")
            self._programs[linktype] = None
            return None
        program = _BpfProgram()
        try:
            if lib.pcap_compile(handle, ctypes.byref(program), self.expression.encode(), 1,
                                _NETMASK_UNKNOWN) != 0:
                why = (lib.pcap_geterr(handle) or b"").decode(errors="replace")
                self.errors.append(f"--filter {self.expression!r}: {why}" + (
                    f" (for link type {linktype}: its records are left out)"
                    if linktype != 1 else ""))
                compiled: _BpfProgram | None = None
            else:
                compiled = program
        finally:
            lib.pcap_close(handle)
        self._programs[linktype] = compiled
        return compiled

    def __call__(self, linktype: int, buf: bytes, start: int, end: int) -> bool:
        try:
            program = self._programs[linktype]
        except KeyError:
            program = self._compile(linktype)
        if program is not None:
            header = self._header
            header.caplen = header.len = end - start
            if self._lib.pcap_offline_filter(ctypes.byref(program), ctypes.byref(header),
                                             buf[start:end]):
                return True
        self.rejected += 1
        return False

    def close(self) -> None:
        for program in self._programs.values():
            if program is not None:
                self._lib.pcap_freecode(ctypes.byref(program))
        self._programs.clear()
