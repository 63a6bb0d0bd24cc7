"""Verdicts a person can act on (store/queries.py `_verdict`): each rule and its
boundaries, then real processes where the wire hides what a verdict would rest on: RPCs
inside TLS, and pools that were open before the capture began.

The live tests need root (the agent captures on loopback) and openssl (a certificate for
the TLS server); each starts its own grpcio server, clients and agent.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import live_support as ls
import pytest
import realtraffic_support as rt
from support import tracer

from store.queries import FEW_RPCS, FEW_TLS_RECORDS, MANY_LEFT_BEHIND, _verdict


def client(**counts: Any) -> dict[str, Any]:
    """A report entry as client_report builds it, every count 0 unless given."""
    c: dict[str, Any] = {
        "opened": 0, "closed": 0, "open": 0, "pre_existing": 0, "health_checks": 0,
        "left_behind": 0, "left_behind_seen": 0, "left_behind_tls": 0,
        "left_behind_before": 0, "closed_by_client": 0, "closed_by_server": 0,
        "oldest_open_s": 10.0, "oldest_open_before_capture": False,
        "open_growth_per_min": 0.0, "rpcs": 0, "rpcs_per_connection": None,
        "methods": {}, "tls_records": 0, "open_rpc_in_progress": 0,
        "open_waiting_for_server": 0,
    }
    c.update(counts)
    return c


SPAN = 20.0


# -- rule 1: keeps opening connections it leaves behind, closes far fewer -----------------


def test_three_left_behind_opened_in_the_capture_and_few_closed_is_a_leak() -> None:
    c = client(opened=5, closed=2, open=3, left_behind=3, left_behind_seen=3, rpcs=5,
               rpcs_per_connection=1.0, methods={"/pkg.S/M": 5})
    verdict, reason = _verdict(c, SPAN)
    assert verdict == "leak"
    assert reason.startswith("opened 5, closed 2 in 20.0s; 1 RPC each, then idle; "
                             "method /pkg.S/M; 3 still open")


def test_two_left_behind_is_only_suspect() -> None:
    c = client(opened=2, open=2, left_behind=2, left_behind_seen=2, rpcs=2,
               rpcs_per_connection=1.0)
    assert _verdict(c, SPAN)[0] == "suspect"


def test_closing_half_of_what_it_opens_is_not_rule_1() -> None:
    # 3 left behind, but it closed 3 of 6: not "far fewer" (closed * 2 < opened fails).
    c = client(opened=6, closed=3, open=3, left_behind=3, left_behind_seen=3,
               closed_by_client=3, rpcs=6, rpcs_per_connection=1.0)
    assert _verdict(c, SPAN)[0] == "suspect"


def test_left_behind_only_before_the_capture_does_not_make_rule_1() -> None:
    """Growth must be seen: connections open before the capture and silent are counted,
    but a handful of them is no leak (an idle pool looks the same for a while)."""
    c = client(opened=4, open=4, pre_existing=4, left_behind=4, left_behind_before=4,
               oldest_open_before_capture=True)
    verdict, reason = _verdict(c, SPAN)
    assert verdict == "suspect"
    assert "4 open before the capture and silent all through it" in reason


# -- rule 2: never closes a connection itself, holds many left behind ---------------------


def test_never_closing_itself_with_many_left_behind_is_a_leak_whoever_closed_the_rest() -> None:
    """A grpc-go leaker behind a server's max-connection-age: every close was the
    server's, the process keeps holding its idle connections."""
    c = client(opened=459, closed=409, open=50, left_behind=50, left_behind_seen=50,
               closed_by_server=409, rpcs=50, rpcs_per_connection=0.11)
    verdict, reason = _verdict(c, SPAN)
    assert verdict == "leak"
    assert reason.startswith("never closes a connection itself: holds 50 left behind")
    assert "the server closed 409 of its connections and it dialled again" in reason


def test_one_close_of_its_own_and_rule_2_does_not_apply() -> None:
    c = client(opened=459, closed=409, open=50, left_behind=50, left_behind_seen=50,
               closed_by_server=408, closed_by_client=1, rpcs=50, rpcs_per_connection=0.11)
    assert _verdict(c, SPAN)[0] == "suspect"


@pytest.mark.parametrize(("left", "verdict"), [(MANY_LEFT_BEHIND - 1, "suspect"),
                                                (MANY_LEFT_BEHIND, "leak")])
def test_many_means_many(left: int, verdict: str) -> None:
    """A pool of a few idle connections recycled by the server stays under the bar."""
    c = client(opened=left * 10, closed=left * 9, open=left, left_behind=left,
               left_behind_seen=left, closed_by_server=left * 9)
    assert _verdict(c, SPAN)[0] == verdict


def test_many_silent_since_before_the_capture_is_a_leak() -> None:
    """The agent started after the leak began: the socket table's connections, silent."""
    c = client(opened=119, open=119, pre_existing=119, left_behind=119,
               left_behind_before=119, oldest_open_s=20.0, oldest_open_before_capture=True)
    verdict, reason = _verdict(c, SPAN)
    assert verdict == "leak"
    assert "119 open before the capture and silent all through it" in reason
    assert "oldest at least 20.0s (opened before the capture)" in reason


# -- TLS: never on RPC counts ---------------------------------------------------------------


def test_a_tls_leaker_is_named_in_records_and_the_reason_says_the_rpcs_are_encrypted() -> None:
    c = client(opened=6, open=6, left_behind=6, left_behind_seen=6, left_behind_tls=6,
               tls_records=36)
    verdict, reason = _verdict(c, SPAN)
    assert verdict == "leak"
    assert (f"6 TLS, whose RPCs are encrypted: at most {FEW_TLS_RECORDS} records from the "
            "client each") in reason
    assert "RPC each" not in reason


def test_a_busy_tls_pool_is_ok_and_says_what_it_carried() -> None:
    c = client(opened=4, open=4, tls_records=396)
    verdict, reason = _verdict(c, SPAN)
    assert verdict == "ok"
    assert reason == ("4 long-lived connections (RPCs encrypted: 396 TLS records from the "
                      "client); 0 closed")


# -- ok ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("c", "reason"), [
    (client(opened=1, open=1, rpcs=40), "1 long-lived connection (40 RPCs in all); 0 closed"),
    (client(opened=30, closed=30, closed_by_client=30, rpcs=30),
     "all 30 connections closed"),
    (client(health_checks=5), "5 health checks only (connect, no HTTP/2, close)"),
    (client(health_checks=1), "1 health check only (connect, no HTTP/2, close)"),
])
def test_ok(c: dict[str, Any], reason: str) -> None:
    assert _verdict(c, SPAN) == ("ok", reason)


def test_few_rpcs_boundary_is_what_the_query_counts() -> None:
    assert FEW_RPCS == 2  # the reason's "at most 2 RPCs each" says the same number


def test_connections_the_server_never_answered_are_not_left_behind(tmp_path: Path) -> None:
    """A closing client caught by a frozen server: its last calls' connections sent the
    preface and got nothing back; open at the end, yet the client left nothing behind."""
    from store_support import record, stored

    from store.queries import client_report

    rows = [record(f"Cc{i}", 1.0 + i, ("10.0.0.7", 41000 + i), close=1.5 + i,
                   preface=1.001 + i, settings=1.002 + i) for i in range(10)]
    for i in range(3):
        r = record(f"Cw{i}", 12.0 + i, ("10.0.0.7", 42000 + i), close=None,
                   preface=12.001 + i, settings=None)
        r.update(streams=0, trailers=0, resp_bytes=0, resp_pkts=1, methods={})
        rows.append(r)
    db = stored(tmp_path / "waiting.db", rows, first_ts=rows[0]["ts"],
                last_ts=rows[0]["ts"] + 20.0, packets=30, elapsed_s=20.0)
    [c] = client_report(db)
    assert (c["verdict"], c["left_behind"], c["open_waiting_for_server"]) == ("ok", 0, 3), c
    assert c["reason"] == ("10 closed; 3 open waiting for the server's answer (it never sent "
                           "a byte: a victim of the server, not left behind)"), c["reason"]


@pytest.mark.parametrize("ended,verdict", [(1, "leak"), (0, "ok")],
                         ids=["rpc-ended", "rpc-in-progress"])
def test_a_connection_with_an_rpc_in_progress_is_in_use(tmp_path: Path, ended: int,
                                                       verdict: str) -> None:
    """Three connections opened in the capture, one RPC each, never closed: a leak when
    each RPC ended (the server's trailers), connections in use when each RPC still runs
    (a watch or subscription stream: one RPC as long as the connection)."""
    from store_support import T0, record, stored

    from store.queries import client_report

    rows = []
    for i in range(3):
        r = record(f"Cw{i}", 1.0 + i, ("10.0.0.7", 41000 + i), close=None, preface=1.001 + i,
                   settings=1.002 + i)
        r.update(trailers=ended, last_activity_ts=T0 + 19.0)
        rows.append(r)
    db = stored(tmp_path / "streams.db", rows, first_ts=T0, last_ts=T0 + 20.0, packets=30,
                elapsed_s=20.0)
    [c] = client_report(db)
    assert c["verdict"] == verdict, c
    assert (c["left_behind"], c["open_rpc_in_progress"]) == ((3, 0) if ended else (0, 3))
    if not ended:
        assert c["reason"] == ("3 long-lived connections (3 RPCs in all; 3 with an RPC still "
                               "in progress (a stream)); 0 closed"), c["reason"]


# -- real processes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the TLS server")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-subj", "/CN=localhost", "-days", "2",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def _client(processes: rt.Processes, name: str, *args: str) -> rt.Process:
    return processes.start(name, [*rt.grpcio_peer("client"), *args, "--max-lifetime", "90"])


def _entries(db: Path, pids: dict[str, int]) -> dict[str, dict[str, Any]]:
    data = ls.report(db)
    by_pid = {c["pid"]: c for c in data["clients"]}
    return {name: by_pid[pid] for name, pid in pids.items() if pid in by_pid}


def _peer(processes: rt.Processes, impl: str, name: str, *args: str) -> rt.Process:
    if impl == "grpcio":
        return _client(processes, name, *args)
    return processes.start(name, [shutil.which("node") or "node",
                                  str(rt.PEERS_DIR / "grpcjs_client.js"), *args,
                                  "--max-lifetime", "90"])


@pytest.mark.parametrize("impl", ["grpcio", "grpc-js"])
def test_tls_pool_is_ok_and_tls_leaker_is_a_leak(tmp_path: Path, impl: str,
                                                 certificate: tuple[Path, Path]) -> None:
    """Busy TLS channels are a pool, as the same process is in plaintext (grpcio: four
    channels in turn; grpc-js: one); six TLS channels with one RPC each, never closed, are
    a leak, and the reason says the RPCs were encrypted."""
    ls.need_root()
    if impl == "grpc-js" and (reason := rt.grpcjs_unavailable_reason()) is not None:
        pytest.skip(reason)
    cert, key = certificate
    channels = 4 if impl == "grpcio" else 1
    with ls.processes() as processes:
        port = ls.start_server(processes, "--tls-cert", str(cert), "--tls-key", str(key))
        agent = ls.Agent(processes, tmp_path / "tls.db", port, "--iface", "lo",
                         "--duration", "12s")
        agent.wait_ready()
        target = f"127.0.0.1:{port}"
        pool = _peer(processes, impl, "pool", "pool", "--target", target, "--count", "25",
                     "--interval", "0.3", "--tls-ca", str(cert),
                     *(["--channels", str(channels)] if impl == "grpcio" else []))
        leak = _peer(processes, impl, "leak", "leak", "--target", target, "--count", "6",
                     "--tls-ca", str(cert))
        rt.wait_done([leak])
        ls.wait_client_ports(leak.popen.pid, port, 6)
        assert agent.wait_exit(30) == 0, agent.output()
        entries = _entries(agent.db, {"pool": pool.popen.pid, "leak": leak.popen.pid})
        everyone = ls.report(agent.db)["clients"]
    assert entries["pool"]["verdict"] == "ok", entries["pool"]
    assert "RPCs encrypted" in entries["pool"]["reason"]
    assert entries["pool"]["open"] == channels and entries["pool"]["open_tls"] == channels
    assert entries["pool"]["rpcs_per_connection"] is None  # not seen: not a number
    assert entries["leak"]["verdict"] == "leak", entries["leak"]
    assert entries["leak"]["open"] == 6
    assert "whose RPCs are encrypted" in entries["leak"]["reason"]
    # Nobody else is flagged.
    assert [c["pid"] for c in everyone if c["verdict"] != "ok"] == [leak.popen.pid], everyone


def test_subscription_streams_are_in_use_and_a_leaker_beside_them_is_a_leak(
        tmp_path: Path) -> None:
    """Three channels, each with one server-streaming RPC that lasts as long as the
    channel (a reply a second): one RPC per connection, never closed, and in use all the
    time; beside it a leaker with one finished RPC per channel."""
    ls.need_root()
    with ls.processes() as processes:
        port = ls.start_server(processes)
        agent = ls.Agent(processes, tmp_path / "watch.db", port, "--iface", "lo",
                         "--duration", "8s")
        agent.wait_ready()
        target = f"127.0.0.1:{port}"
        watch = _client(processes, "watch", "watch", "--target", target, "--count", "2",
                        "--channels", "3")
        leak = _client(processes, "leak", "leak", "--target", target, "--count", "4")
        rt.wait_done([watch, leak])
        assert agent.wait_exit(30) == 0, agent.output()
        entries = _entries(agent.db, {"watch": watch.popen.pid, "leak": leak.popen.pid})
        everyone = ls.report(agent.db)["clients"]
    w = entries["watch"]
    assert (w["verdict"], w["open"], w["open_rpc_in_progress"], w["left_behind"]) == \
        ("ok", 3, 3, 0), w
    assert "3 with an RPC still in progress" in w["reason"], w
    assert (entries["leak"]["verdict"], entries["leak"]["open"]) == ("leak", 4), entries
    assert [c["pid"] for c in everyone if c["verdict"] != "ok"] == [leak.popen.pid], everyone


def test_a_sporadic_pool_opened_before_the_capture_is_ok(tmp_path: Path) -> None:
    """Three long-lived channels used every 8 s, opened 10 s before a 20 s capture: in
    use (their traffic is seen), and their age is at least the capture's length."""
    ls.need_root()
    with ls.processes() as processes:
        port = ls.start_server(processes)
        pool = _client(processes, "pool", "pool", "--target", f"127.0.0.1:{port}",
                       "--count", "8", "--interval", "8", "--channels", "3")
        ls.wait_client_ports(pool.popen.pid, port, 3)
        time.sleep(10.0)
        agent = ls.Agent(processes, tmp_path / "sporadic.db", port, "--iface", "lo",
                         "--duration", "20s")
        assert agent.wait_exit(60) == 0, agent.output()
        [entry] = _entries(agent.db, {"pool": pool.popen.pid}).values()
    assert entry["verdict"] == "ok", entry
    assert entry["open"] == 3 and entry["open_before_capture"] == 3
    assert entry["left_behind"] == 0
    assert entry["oldest_open_before_capture"] is True
    assert entry["oldest_open_s"] >= 19.0
    text = tracer("report", "--db", str(agent.db)).stdout
    [row] = [line for line in text.splitlines() if f" {pool.popen.pid} " in line]
    assert f">={entry['oldest_open_s']:.1f}s" in row, text
