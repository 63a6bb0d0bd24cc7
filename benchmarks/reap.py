"""How long `tracer reap` takes on a big leak: a grpcio client in a network namespace
(tests/netns.py) opens --connections channels, one RPC each, never closed; a grpcio
server here; the live agent on the veth. Then `tracer reap --client PID` (the list) and
`tracer reap --client PID --yes` (SOCK_DESTROY of each server socket and client socket,
checked with the kernel, recorded), each timed as a whole command; the kernel's tables
are counted before and after.

Usage: benchmarks/reap.py [--connections 1000]

Needs root (packet capture, `ip netns`). About a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("reap: skipped (needs root for packet capture and network namespaces)")
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    import live_support as live
    import netns
    import realtraffic_support as rt
    from support import tracer_command

    from tracer.attribution.sockdiag import SockDiag

    n = args.connections

    def server_sockets(port: int) -> int:
        diag = SockDiag()
        try:
            return sum(1 for s in diag.sockets(frozenset({port}))
                       if s.state == 1 and s.local[1] == port)
        finally:
            diag.close()

    with tempfile.TemporaryDirectory() as tmp, live.processes() as procs, \
            netns.hosts(1) as (host,):
        db = Path(tmp) / "tracer.db"
        server = procs.start("server", [*rt.grpcio_peer("server"), "0", "--max-lifetime",
                                        "600"])
        port = rt.ready_port(server)
        agent = live.Agent(procs, db, port, "--iface", host.root_if, "--duration", "600")
        agent.wait_ready()
        started = time.monotonic()
        leaker = procs.start("leaker", host.command(
            [*rt.grpcio_peer("client"), "leak", "--target", f"{host.gateway}:{port}",
             "--count", str(n), "--max-lifetime", "500"]))
        leaker.wait_for("DONE", time.monotonic() + 300)
        print(f"leaker opened {n} connections in {time.monotonic() - started:.1f}s")
        pid = leaker.popen.pid
        agent.wait_for_rows("SELECT uid FROM connections WHERE is_open = 1 AND pid = ?",
                            [pid], lambda rows: len(rows) == n,
                            f"{n} open connections attributed", timeout=120)
        time.sleep(2.5)
        timings = {}
        for label, extra in (("list", []), ("close", ["--yes"])):
            before = server_sockets(port)
            t = time.monotonic()
            done = subprocess.run([*tracer_command(), "reap", "--db", str(db), "--client",
                                   str(pid), "--older-than", "1s", "--idle", "2s",
                                   "--format", "json", *extra], capture_output=True,
                                  text=True, timeout=300, cwd=ROOT, check=False)
            timings[label] = time.monotonic() - t
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-2000:])
                return 1
            data = json.loads(done.stdout)
            print(f"reap {label}: {timings[label]:.2f}s for {len(data['candidates'])} "
                  f"candidates, results {data['results']}; server sockets {before} -> "
                  f"{server_sockets(port)}; the leaker's {len(live.client_ports(pid, port))} "
                  "established left")
        return 0


if __name__ == "__main__":
    sys.exit(main())
