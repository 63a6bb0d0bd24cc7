"""The demo's gRPC programs: a grpcio server and clients that close, pool or leak connections.

    python -m cli.demo_peers server PORT [--bind ADDRESS] [--max-fds N] [--option KEY=INT ...]
    python -m cli.demo_peers {close,pool,leak,check} HOST:PORT [--interval S] [--lifetime S]
                             [--option KEY=INT ...]
    python -m cli.demo_peers dial HOST:PORT --log FILE [--log-format json|logfmt]
                             [--connect-timeout S] [--interval S] [--lifetime S]

Generic handlers with raw bytes: no protoc, no generated code. Each client calls
/demo.Inventory/Lookup every --interval seconds until SIGTERM or --lifetime:
- close: a new channel for each call, closed after it (healthy);
- pool:  one channel for every call (healthy: one long-lived connection);
- leak:  a new channel for each call, never closed: one more idle connection per call,
         the bug this tool finds;
- check: a TCP health check: connect, send nothing, close (no gRPC at all);
- dial:  a new channel for each call, given --connect-timeout seconds to connect, closed
         after it; each failed call is logged to --log as a service would: a JSON line
         (zap's layout: level, ts, pid, msg) or a logfmt one (time, level, pid, msg), in
         gRPC's own words ("timed out before receiving SETTINGS frame").
The server's --max-fds sets its RLIMIT_NOFILE (as `prlimit --nofile=N:N` would): a leak
then takes its last descriptor and it stops accepting, the freeze `tracer demo --freeze`
shows.
Each channel gets its own TCP connection (grpc.use_local_subchannel_pool, DESIGN.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import signal
import sys
import threading
import time
from concurrent import futures
from types import FrameType
from typing import Any

import grpc

SERVICE = "demo.Inventory"
METHOD = f"/{SERVICE}/Lookup"
OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0)]


def serve(port: int, bind: str, options: list[tuple[str, int]]) -> int:
    def lookup(request: bytes, context: Any) -> bytes:
        return b"item:" + request

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Lookup": grpc.unary_unary_rpc_method_handler(lookup)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{bind}:{port}")
    server.start()
    print("READY", flush=True)
    done = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    done.wait()
    server.stop(grace=1).wait()
    return 0


def client(mode: str, target: str, interval: float, lifetime: float,
           options: list[tuple[str, int]]) -> int:
    done = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    leaked = []
    channel_options = OPTIONS + options
    pooled = grpc.insecure_channel(target, options=channel_options) if mode == "pool" else None
    deadline = time.monotonic() + lifetime
    n = 0
    while not done.is_set() and time.monotonic() < deadline:
        channel = pooled or grpc.insecure_channel(target, options=channel_options)
        call = channel.unary_unary(METHOD)
        try:
            call(f"sku-{n}".encode(), timeout=5)
        except grpc.RpcError as exc:
            print(f"call failed: {exc.code()}", file=sys.stderr, flush=True)
        n += 1
        if mode == "close":
            channel.close()
        elif mode == "leak":
            leaked.append(channel)  # the bug: kept, never closed
        done.wait(interval)
    return 0


def dial(target: str, interval: float, lifetime: float, connect_timeout: float, log: str,
         log_format: str) -> int:
    done = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # C-core's connection attempt deadline is the minimum reconnect backoff.
    options = [*OPTIONS, ("grpc.min_reconnect_backoff_ms", int(connect_timeout * 1000))]
    deadline = time.monotonic() + lifetime
    n = 0
    while not done.is_set() and time.monotonic() < deadline:
        with grpc.insecure_channel(target, options=options) as channel:
            try:
                channel.unary_unary(METHOD)(f"sku-{n}".encode(), timeout=connect_timeout)
            except grpc.RpcError as exc:
                _log(log, log_format, f"Lookup failed: {exc.code().name}: {exc.details()}")
        n += 1
        done.wait(interval)
    return 0


def _log(path: str, log_format: str, message: str) -> None:
    now = time.time()
    if log_format == "json":
        line = json.dumps({"level": "error", "ts": round(now, 6), "pid": os.getpid(),
                           "logger": "dialer", "msg": message})
    else:
        iso = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        line = f'time={iso} level=error pid={os.getpid()} msg={json.dumps(message)}'
    # Never through a symbolic link planted where the demo (root) writes.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def health_check(target: str, interval: float, lifetime: float) -> int:
    """A load balancer's TCP health check: connect, say nothing, close."""
    import socket

    host, port = target.rsplit(":", 1)
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline:
        with socket.create_connection((host, int(port)), timeout=5):
            time.sleep(0.05)
        time.sleep(interval)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cli.demo_peers")
    ap.add_argument("mode", choices=["server", "close", "pool", "leak", "check", "dial"])
    ap.add_argument("where", help="PORT for the server, HOST:PORT for clients")
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--lifetime", type=float, default=300.0)
    ap.add_argument("--bind", default="127.0.0.1", help="server: address to listen on")
    ap.add_argument("--max-fds", type=int, help="server: its RLIMIT_NOFILE, soft and hard")
    ap.add_argument("--connect-timeout", type=float, default=2.0,
                    help="dial: seconds to connect and answer")
    ap.add_argument("--log", help="dial: append each failed call here")
    ap.add_argument("--log-format", choices=["json", "logfmt"], default="json")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=INT",
                    help="a grpc channel or server argument, e.g. grpc.max_connection_age_ms=1000")
    args = ap.parse_args(argv)
    options = [(k, int(v)) for k, v in (o.split("=", 1) for o in args.option)]
    if args.mode == "server":
        if args.max_fds:
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.max_fds, args.max_fds))
        return serve(int(args.where), args.bind, options)
    if args.mode == "dial":
        if not args.log:
            ap.error("dial needs --log FILE")
        return dial(args.where, args.interval, args.lifetime, args.connect_timeout, args.log,
                    args.log_format)
    if args.mode == "check":
        return health_check(args.where, args.interval, args.lifetime)
    return client(args.mode, args.where, args.interval, args.lifetime, options)


if __name__ == "__main__":
    sys.exit(main())
