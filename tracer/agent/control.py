"""How the agent's processes start, stop and stay small: signals, parent death, the cycle
collector and the C heap.

Stopping is cooperative in the capture loop (a flag checked at every turn, and a turn is
bounded in time) and immediate in file reads (a signal interrupts a blocking read), with
the writes in between shielded: a batch is written whole or not at all, never half.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import time
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TRIM_INTERVAL = 10.0  # seconds between two returns of freed memory to the system
PR_SET_PDEATHSIG = 1


class StopRequest:
    """SIGINT and SIGTERM set a flag; the loop finishes cleanly at its next turn.

    ``interrupt``: also raise KeyboardInterrupt (for a loop that may block in a read,
    such as a file read from a pipe: the signal must get it out of the read)."""

    def __init__(self, *, interrupt: bool = False) -> None:
        self.signum: int | None = None
        self.interrupt = interrupt
        self.previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        if self.interrupt:
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_status(self) -> int:
        """The shell's convention for a command ended by a signal: 128 + its number."""
        return 128 + (self.signum or signal.SIGINT)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (a batch is written whole, and what was
    drained for it is not lost to an interrupt in the middle)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def ignore_stop_signals() -> None:
    """For a worker whose parent decides when to stop: a signal to the whole process group
    (Ctrl-C in a terminal, systemd's KillMode=control-group) must not kill it first."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def die_with_parent(parent: int) -> None:
    """Let the kernel kill this process when its parent dies (kill -9 included), so that
    no worker goes on writing the database behind a dead command. Linux only; elsewhere
    the worker notices its closed pipe instead."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def own_identity() -> tuple[int, float]:
    """(pid, start time) of this process: what a capture row keeps to tell later whether
    the process writing it still runs (pids are reused)."""
    import psutil

    return os.getpid(), psutil.Process().create_time()


def quiet_cycle_collector() -> None:
    """Run Python's cycle collector rarely during analysis: it walks every live object
    (every open connection) and cost 10% of the time. Connections break their own
    reference cycles when they are written (Connection.release), so there is little for
    it to find; what it finds it still collects, later."""
    gc.freeze()
    gc.set_threshold(500_000, 1000, 1000)


class Trimmer:
    """Gives the C heap's free memory back to the system (glibc's malloc_trim), at most
    every TRIM_INTERVAL seconds. A long-running agent frees the batches it pickles and the
    records it builds; without this the heap keeps its peak size. A no-op elsewhere (musl)."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.trim: Callable[[int], int] | None
        try:
            self.trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            self.trim = None

    def __call__(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.trim is not None and (force or now - self.at >= TRIM_INTERVAL):
            self.at = now
            self.trim(0)
