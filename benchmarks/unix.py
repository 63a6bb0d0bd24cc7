"""What a poll of the Unix sockets followed by `tracer capture --unix` costs: one unix_diag
dump, filtered in user space (the kernel has no filter by path), turned into connection
records (tracer.agent.unixwatch.UnixWatch.poll, attribution off: the owners are looked
for once per connection, not per poll).

Two cases, each the median of POLLS polls (wall time and this process's CPU time):
1. 10,000 connections open on our socket (a plain accept loop holds the server ends);
2. 10 connections to our socket among 10,000 unrelated Unix connections on the host.

Run as: python benchmarks/unix.py [--connections N] [--polls K]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tracer.agent.unixwatch import UnixWatch, poll_interval, resolve


def hold(path: str, n: int) -> tuple[list[socket.socket], int]:
    """``n`` connections to a new listening socket at ``path``: the server ends held here,
    the client ends by a child process (each process then needs n descriptors, not 2n);
    the child's pid (it exits when the parent closes its end of a socket pair)."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(4096)
    parent_end, child_end = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: connect, hold, and wait for the parent to let go
        # Only its end of the pair: a copy of another holder's parent end kept here would
        # keep that holder's child waiting after the parent let go.
        keep = child_end.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        clients = []
        for _ in range(n):
            client = socket.socket(socket.AF_UNIX)
            client.connect(path)
            clients.append(client)
        child_end.recv(1)
        os._exit(0)
    child_end.close()
    held = [server]
    for _ in range(n):
        accepted, _ = server.accept()
        held.append(accepted)
    held.append(parent_end)  # closing it ends the child
    return held, pid


def release(held: list[socket.socket], pid: int) -> None:
    for s in held:
        s.close()
    os.waitpid(pid, 0)


def measure(path: str, polls: int) -> tuple[float, float, int]:
    """Median wall and CPU milliseconds of one poll, and the connections it found."""
    watch = UnixWatch(resolve((path,)), attribution=False)
    walls, cpus = [], []
    found = 0
    try:
        watch.poll(time.time())  # the first poll: every connection is new
        for _ in range(polls):
            c0, w0 = time.process_time(), time.perf_counter()
            watch.poll(time.time())
            walls.append((time.perf_counter() - w0) * 1000)
            cpus.append((time.process_time() - c0) * 1000)
        found = len(watch.conns.open)
    finally:
        watch.close()
    return statistics.median(walls), statistics.median(cpus), found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--polls", type=int, default=9)
    args = parser.parse_args()
    need = args.connections + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
        except (ValueError, OSError):  # no CAP_SYS_RESOURCE: up to the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
            if hard < need:
                print(f"RLIMIT_NOFILE's hard limit is {hard}: {need} descriptors are "
                      "needed; run as root", file=sys.stderr)
                return 1
    with tempfile.TemporaryDirectory(prefix="tracer-bench-unix-") as folder:
        ours = os.path.join(folder, "ours.sock")
        held, child = hold(ours, args.connections)
        wall, cpu, found = measure(ours, args.polls)
        print(f"{found:,} connections open on our socket: one poll {wall:.1f} ms "
              f"(CPU {cpu:.1f} ms), median of {args.polls}; the agent polls every "
              f"{poll_interval(cpu / 1000):g}s", flush=True)
        release(held, child)
        other, other_child = hold(os.path.join(folder, "other.sock"), args.connections)
        few, few_child = hold(ours + ".2", 10)
        wall, cpu, found = measure(ours + ".2", args.polls)
        print(f"{found:,} connections on our socket among {args.connections:,} unrelated "
              f"ones: one poll {wall:.1f} ms (CPU {cpu:.1f} ms), median of {args.polls}; the "
              f"agent polls every {poll_interval(cpu / 1000):g}s")
        release(other, other_child)
        release(few, few_child)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
