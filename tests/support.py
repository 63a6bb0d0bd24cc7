"""What every test shares: where things are, running the tracer command line, waiting
with a deadline, and the reasons a test skips.

Plain functions, imported by the test modules and by the other support modules
(store_support, realtraffic_support, live_support); the pytest fixtures built on them
are in conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from tracer.options import CoreOptions

REPO = Path(__file__).resolve().parent.parent
DEMO_CAPTURE = REPO / "cli" / "demo-capture.pcapng"
# Real captures beside the repository (external/ and generated/, with a README of facts).
SHARED_CAPTURES = (REPO / ".." / "shared" / "captures").resolve()
TRACER_TIMEOUT_S = 120.0
# The core's options the core tests run with: everything it can produce, server header
# blocks decoded (grpc-status) and one event per RPC, PING and RST_STREAM (the command
# line's --grpc-status --events all).
FULL = CoreOptions(decode_server_headers=True, rpc_events=True)

T = TypeVar("T")


# -- the command line ------------------------------------------------------------------


def tracer_command() -> list[str]:
    """The installed console script next to this interpreter, else the module (also with
    TRACER_TEST_SOURCES=1: the sources in the working directory, as they are)."""
    script = Path(sys.executable).parent / "tracer"
    if script.exists() and os.environ.get("TRACER_TEST_SOURCES") != "1":
        return [str(script)]
    return [sys.executable, "-m", "cli.main"]


def tracer(*args: str | os.PathLike[str], check: bool = True, timeout: float = TRACER_TIMEOUT_S,
           env: Mapping[str, str] | None = None, input: str | bytes | None = None,
           stdin: IO[Any] | int | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``tracer ARGS`` in the repository and wait for it; its exit code and output.

    ``check``: an exit code other than 0 is an assertion error showing everything.
    ``env`` is added to this process's environment. Standard input is ``input`` (the
    bytes of a capture, say), else ``stdin``, else nothing (never this terminal).
    """
    argv = [os.fspath(a) for a in args]
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run(
        [*tracer_command(), *argv], check=False, capture_output=True, cwd=REPO,
        timeout=timeout, env={**os.environ, **env} if env is not None else None,
        input=data, stdin=None if data is not None else
        (stdin if stdin is not None else subprocess.DEVNULL),
    )
    done = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                       proc.stderr.decode())
    if check and done.returncode != 0:
        raise AssertionError(
            f"tracer {' '.join(argv)} exited with {done.returncode}\n"
            f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
    return done


# -- waiting ---------------------------------------------------------------------------


def poll(sample: Callable[[], T], *, until: Callable[[T], object] = bool, timeout: float,
         interval: float = 0.05) -> T:
    """Call ``sample`` every ``interval`` seconds until ``until`` holds for what it gave or
    ``timeout`` seconds have passed; the last sample either way (the caller judges it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = sample()
        if until(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_for(sample: Callable[[], T], what: str, *, until: Callable[[T], object] = bool,
             timeout: float, interval: float = 0.05,
             error: Callable[[str], Exception] = AssertionError) -> T:
    """``poll`` that fails when time runs out: ``error`` says what was awaited and the
    last sample. ``sample`` may raise itself (a process that died meanwhile, say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = sample()
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise error(f"timed out after {timeout:g}s waiting until {what}; last: {value!r}")
        time.sleep(interval)


@contextlib.contextmanager
def in_background(work: Callable[[threading.Event], None], name: str) -> Iterator[None]:
    """``work(stop)`` on a daemon thread while the block runs; at its end ``stop`` is set
    and the thread joined (``work`` returns soon after ``stop`` is set)."""
    stop = threading.Event()
    thread = threading.Thread(target=work, args=(stop,), name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5.0)


# -- the machine -----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on at the moment (on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def skip_if(reason: str | None) -> None:
    """Skip the test with ``reason``, the answer of an ``*_unavailable_reason()`` (None: it
    can run)."""
    if reason is not None:
        pytest.skip(reason)


def is_root() -> bool:
    return os.geteuid() == 0


def need_root(what: str) -> None:
    """Skip the test (or the whole module, called at its top) unless it runs as root;
    ``what`` is what needs root."""
    if not is_root():
        pytest.skip(f"{what} needs root", allow_module_level=True)


def requires_root(what: str) -> pytest.MarkDecorator:
    """``need_root`` as a decorator."""
    return pytest.mark.skipif(not is_root(), reason=f"{what} needs root")


def shared_captures() -> Path:
    """SHARED_CAPTURES; the whole test module skips where they are missing."""
    if not (SHARED_CAPTURES / "external").is_dir() or \
            not (SHARED_CAPTURES / "generated").is_dir():
        pytest.skip(f"shared captures not found at {SHARED_CAPTURES} (expected external/ and "
                    "generated/ beside the repository, in ../shared/captures)",
                    allow_module_level=True)
    return SHARED_CAPTURES


@contextlib.contextmanager
def tmpfs(mount: Path, size: str, mode: str = "0700") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on the new folder ``mount`` (skips without root or where
    it cannot be mounted), unmounted when the block ends."""
    need_root("mounting a tmpfs")
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs",
                           str(mount)], check=False, capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False, timeout=10).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False, timeout=10)
