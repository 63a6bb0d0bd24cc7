"""Where a client runs: its network namespace, container id, Kubernetes pod uid and pod name,
from /proc/PID/cgroup (and, for a socket no process was found holding, from the cgroup id
sock_diag reports for it).

The parsers get crafted /proc/PID/cgroup texts of each layout the issue names (docker,
containerd, cri-o, systemd; cgroupfs and systemd drivers; cgroup v1, v2 and hybrid). The
live test runs real clients (a grpcio leaker, a grpc-js closer) in a network namespace of
their own, each moved into a crafted cgroup of this host's cgroup v2 hierarchy, as a
container runtime would, with a pod's HOSTNAME: the report names each one's container,
pod and namespace.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import live_support as ls
import netns
import pytest
import realtraffic_support as rt
from support import skip_if, tracer

from tracer.attribution.sockdiag import INET_DIAG_CGROUP_ID, parse_message
from tracer.attribution.sockets import (
    CgroupPaths,
    _cgroup2_mount,
    cgroup_names,
    parse_cgroup,
    parse_environ_hostname,
    read_in_root,
)

ID = "4f2d" * 16  # a container id: 64 hex digits
ID2 = "9a0c" * 16
POD = "1d3f0c2b-6a7e-4f11-9c5d-2b8e7a6f0c41"
POD_ = POD.replace("-", "_")


# -- the layouts -------------------------------------------------------------------------


@pytest.mark.parametrize("path,container,pod", [
    # docker, cgroupfs driver (v1 and v2) and systemd driver
    (f"/docker/{ID}", ID, None),
    (f"/system.slice/docker-{ID}.scope", ID, None),
    # containerd under Kubernetes: cgroupfs driver, then systemd driver
    (f"/kubepods/besteffort/pod{POD}/{ID}", ID, POD),
    (f"/kubepods/pod{POD}/{ID}", ID, POD),
    ((f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/"
     f"cri-containerd-{ID}.scope"), ID, POD),
    (f"/kubepods.slice/kubepods-pod{POD_}.slice/cri-containerd-{ID}.scope", ID, POD),
    # cri-o: the container, and its conmon monitor
    ((f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_}.slice/"
     f"crio-{ID}.scope"), ID, POD),
    ((f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_}.slice/"
     f"crio-conmon-{ID}.scope"), ID, POD),
    # podman
    (f"/machine.slice/libpod-{ID}.scope", ID, None),
    # a kind node (a container) running a pod: the innermost container is the pod's
    ((f"/system.slice/docker-{ID2}.scope/kubelet.slice/kubelet-kubepods.slice/"
     f"kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{POD_}.slice/"
     f"cri-containerd-{ID}.scope"), ID, POD),
    # systemd services and sessions: no container, no pod
    ("/system.slice/flintlockd.service", None, None),
    ("/user.slice/user-1000.slice/session-4.scope", None, None),
    # almost: 63 hex digits, a pod uid with a digit short
    (f"/docker/{ID[:-1]}", None, None),
    (f"/kubepods/besteffort/pod{POD[:-1]}/{ID}", ID, None),
])
def test_cgroup_layouts(path: str, container: str | None, pod: str | None) -> None:
    names = cgroup_names(path)
    assert (names.container, names.pod, names.path) == (container, pod, path)


def test_root_cgroup_says_nothing() -> None:
    assert cgroup_names("/") == cgroup_names("") == cgroup_names("/").__class__(None, None, None)


def test_cgroup_v1_v2_and_hybrid_files() -> None:
    v2 = f"0::/system.slice/docker-{ID}.scope\n"
    assert parse_cgroup(v2).container == ID
    v1 = "".join(f"{n}:{c}:/kubepods/besteffort/pod{POD}/{ID}\n"
                 for n, c in ((12, "pids"), (3, "cpu,cpuacct"), (1, "name=systemd")))
    names = parse_cgroup(v1)
    assert (names.container, names.pod) == (ID, POD)
    # hybrid: v1 controllers at the root, the v2 line names the container
    hybrid = f"9:name=systemd:/\n4:memory:/\n0::/kubepods/pod{POD}/{ID}\n"
    assert (parse_cgroup(hybrid).container, parse_cgroup(hybrid).pod) == (ID, POD)
    # no container anywhere: the v2 path, else systemd's, else any other non-root one
    plain = "1:name=systemd:/system.slice/cron.service\n0::/system.slice/ssh.service\n"
    assert parse_cgroup(plain).path == "/system.slice/ssh.service"
    assert parse_cgroup("1:name=systemd:/system.slice/cron.service\n0::/\n").path == \
        "/system.slice/cron.service"
    assert parse_cgroup("4:memory:/batch/job-7\n0::/\n").path == "/batch/job-7"
    assert parse_cgroup("0::/\n") == parse_cgroup("") == parse_cgroup("garbage")


def test_pod_name_from_the_environment() -> None:
    env = b"PATH=/bin\0HOSTNAME=checkout-7d9f8c-x2v4q\0HOME=/\0"
    assert parse_environ_hostname(env) == "checkout-7d9f8c-x2v4q"
    assert parse_environ_hostname(b"HOSTNAME=\x1b[31mred\0") is None  # not a host name
    assert parse_environ_hostname(b"HOSTNAME=" + b"a" * 300) is None
    assert parse_environ_hostname(b"PATH=/bin\0") is None


def test_cgroup2_mount_from_mountinfo() -> None:
    pure = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
    assert _cgroup2_mount(pure) == ("/sys/fs/cgroup", "/")
    hybrid = ("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
              "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    assert _cgroup2_mount(hybrid) == ("/sys/fs/cgroup/unified", "/")
    # inside a container: its own cgroup is the mount's root
    inner = "700 690 0:26 /kubepods/pod1/abc /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n"
    assert _cgroup2_mount(inner) == ("/sys/fs/cgroup", "/kubepods/pod1/abc")
    assert _cgroup2_mount("") is None
    assert CgroupPaths("").path(1) is None  # no cgroup2 mount: ids mean nothing


def test_hostname_in_the_container_root_is_read_without_following_links(tmp_path: Path) -> None:
    """read_in_root refuses a symbolic link planted in the container's filesystem (the agent
    runs as root: /etc/hostname -> /etc/shadow must not be read)."""
    if not Path(f"/proc/{os.getpid()}/root").exists():
        pytest.skip("no /proc/PID/root")
    me = os.getpid()
    target = tmp_path / "hostname"
    target.write_text("pod-a\n")
    relative = tuple(str(target).lstrip("/").split("/"))
    assert read_in_root(me, relative, 64) == b"pod-a\n"
    link = tmp_path / "link"
    link.symlink_to(target)
    assert read_in_root(me, (*relative[:-1], "link"), 64) is None
    os.mkfifo(tmp_path / "fifo")
    assert read_in_root(me, (*relative[:-1], "fifo"), 64) is None  # and never blocks


def test_sock_diag_message_with_its_cgroup_id() -> None:
    """An inet_diag_msg as the kernel lays it out (72 bytes, then attributes): a one-byte
    INET_DIAG_SHUTDOWN (padded to 8), then INET_DIAG_CGROUP_ID."""
    msg = bytes([socket.AF_INET, 1, 0, 0])
    msg += struct.pack(">HH", 40000, 9090) + socket.inet_aton("10.0.0.7").ljust(16, b"\0")
    msg += socket.inet_aton("10.0.0.1").ljust(16, b"\0")
    msg += struct.pack("=III", 0, 0x1234, 0x1)  # if, cookie[0], cookie[1]
    msg += struct.pack("=IIIII", 0, 0, 0, 1000, 777)  # expires, rqueue, wqueue, uid, inode
    assert len(msg) == 72
    msg += struct.pack("=HHB", 5, 8, 0) + b"\0" * 3
    msg += struct.pack("=HHQ", 12, INET_DIAG_CGROUP_ID, 709)
    entry = parse_message(b"\0" * 16 + msg, 16, 16 + len(msg), netns=4026531840)
    assert entry is not None
    assert (entry.local, entry.remote, entry.uid, entry.inode) == \
        (("10.0.0.7", 40000), ("10.0.0.1", 9090), 1000, 777)
    assert (entry.cookie, entry.cgroup, entry.netns) == (0x1234 | 1 << 32, 709, 4026531840)
    # cut inside the attribute: no cgroup, never an error
    short = parse_message(msg[:-4], 0, len(msg) - 4, netns=1)
    assert short is not None and short.cgroup is None


def test_sock_diag_reports_the_cgroup_of_a_real_socket(tmp_path: Path) -> None:
    """This kernel's sock_diag names the cgroup v2 directory a socket was made in."""
    from tracer.attribution.sockdiag import SockDiag

    ls.need_root()
    root = _cgroup2_root()
    if root is None or not os.access(root, os.W_OK):
        pytest.skip("no writable cgroup v2 hierarchy")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    with _crafted_cgroup(root, f"tracer-test-{uuid.uuid4().hex[:8]}") as cgroup:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))
                client = socket.create_connection(("127.0.0.1", port))
                client.recv(1)  # until the parent closes its end
            finally:
                os._exit(0)
        conn, addr = server.accept()
        try:
            entry = SockDiag().lookup(addr, ("127.0.0.1", port))
            assert entry is not None and entry.cgroup == cgroup.stat().st_ino, entry
            assert CgroupPaths().path(entry.cgroup) == "/" + str(cgroup.relative_to(root))
        finally:
            conn.close()
            os.waitpid(pid, 0)
            server.close()


# -- live: clients in a network namespace, in crafted cgroups ----------------------------


def _cgroup2_root() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        mount = _cgroup2_mount(f.read())
    if mount is None or mount[1] != "/":
        return None
    return Path(mount[0])


@contextlib.contextmanager
def _crafted_cgroup(root: Path, relative: str) -> Iterator[Path]:
    """A cgroup at ``relative`` below the v2 root, removed (with the parents made for it)
    afterwards; its processes must have ended."""
    path = root / relative.lstrip("/")
    made = []
    for parent in reversed([path, *path.parents]):
        if parent == root or root not in parent.parents:
            continue
        if not parent.exists():
            parent.mkdir()
            made.append(parent)
    try:
        yield path
    finally:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()


def _in_cgroup(cgroup: Path, argv: list[str]) -> list[str]:
    """``argv`` run as a member of ``cgroup`` (the way a runtime starts a container)."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *argv]


@pytest.mark.live
def test_clients_in_a_namespace_and_crafted_cgroups(tmp_path: Path) -> None:
    ls.need_root()
    skip_if(netns.unavailable_reason() or rt.grpcjs_unavailable_reason())
    root = _cgroup2_root()
    if root is None or not os.access(root, os.W_OK):
        pytest.skip("no writable cgroup v2 hierarchy to craft a container's cgroup in")
    tag = uuid.uuid4().hex[:8]
    pod = str(uuid.uuid4())
    leaker_id, closer_id = (uuid.uuid4().hex * 2), (uuid.uuid4().hex * 2)
    # containerd under the kubelet's systemd driver, and docker's cgroupfs layout
    leaker_cg = (f"tracer-test-{tag}.slice/kubepods-besteffort-pod{pod.replace('-', '_')}"
                 f".slice/cri-containerd-{leaker_id}.scope")
    closer_cg = f"tracer-test-{tag}-docker/{closer_id}"
    leak = rt.PeerSpec("grpcio-leak-pod", "grpcio", "leak", 5)
    close = rt.PeerSpec("grpcjs-close-docker", "grpc-js", "close", 20)
    db = tmp_path / "containers.db"
    with rt.nothing_left_behind(), netns.hosts(1) as hosts, \
            _crafted_cgroup(root, leaker_cg) as leaker_dir, \
            _crafted_cgroup(root, closer_cg) as closer_dir, \
            rt.started_processes() as processes:
        host = hosts[0]
        port = ls.start_server(processes)
        agent = ls.Agent(processes, db, port, "--iface", host.root_if)
        agent.wait_ready()
        target = f"{host.gateway}:{port}"
        # Into the cgroup first: `ip netns exec` mounts a /sys of the namespace's own,
        # without the cgroup hierarchies.
        leaker = processes.start(leak.name, _in_cgroup(leaker_dir, host.command([
            "env", "HOSTNAME=checkout-7d9f8c-x2v4q", *leak.argv(target),
            "--max-lifetime", "60"])))
        closer = processes.start(close.name, _in_cgroup(closer_dir, host.command([
            *close.argv(target), "--interval", "0.05", "--max-lifetime", "60"])))
        rt.wait_done([leaker, closer])
        ls.wait_client_ports(leaker.popen.pid, port, leak.count)
        agent.wait_for_rows(
            "SELECT COUNT(*) AS n FROM connections WHERE attribution IS NOT NULL", [],
            lambda rows: rows[0]["n"] >= leak.count + close.count, "every connection judged")
        os.kill(agent.pid, 2)
        assert agent.wait_exit() == 0, agent.output()
        pids = {leaker.popen.pid: "leaker", closer.popen.pid: "closer"}
        leaker_netns = os.stat(f"/proc/{leaker.popen.pid}/ns/net").st_ino
    data = ls.report(db)
    by_pid = {c["pid"]: c for c in data["clients"]}
    c = by_pid[leaker.popen.pid]
    assert (c["verdict"], c["open"], c["client"]) == ("leak", leak.count, host.ip), c
    assert (c["container"], c["pod"], c["pod_name"]) == \
        (leaker_id, pod, "checkout-7d9f8c-x2v4q"), c
    assert c["netns"] == leaker_netns and c["cgroup"].endswith(leaker_cg), c
    # The closer's calls last a few ms: nearly all are attributed; one closed before a
    # look could see it is counted as such, never given to another process, and where the
    # kernel showed its socket alive, what it said of it (namespace, container) is kept.
    closer_rows = [r for r in ls.connections(db) if r["pid"] != leaker.popen.pid]
    assert len(closer_rows) == close.count, closer_rows
    attributed = [r for r in closer_rows if r["pid"] is not None]
    assert len(attributed) >= close.count * 3 // 4, closer_rows
    assert all(r["pid"] == closer.popen.pid for r in attributed), closer_rows
    for r in closer_rows:
        if r["pid"] is None:
            assert r["attribution"] == "closed_before_attribution", r
            assert r["client_netns"] in (None, leaker_netns), r
            assert r["client_container"] in (None, closer_id), r
    entries = [e for e in data["clients"] if e["pid"] != leaker.popen.pid]
    for e in entries:
        assert e["verdict"] == "ok", e
        if e["pid"] is not None:
            assert (e["container"], e["netns"], e["pod"]) == (closer_id, leaker_netns, None), e
    assert sum(e["opened"] for e in entries) == close.count
    assert set(pids) >= {e["pid"] for e in data["clients"] if e["pid"] is not None}
    # The text report says where each one runs.
    text = tracer("report", "--db", str(db)).stdout
    assert f"pid {leaker.popen.pid}: container {leaker_id[:12]}, pod checkout-7d9f8c-x2v4q " \
        f"(uid {pod})" in " ".join(text.split()), text
    assert all(len(line) <= 100 for line in text.split("\n\n")[1].splitlines()[-2:]), text
