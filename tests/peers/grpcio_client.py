#!/usr/bin/env python3
"""Test peer: a grpcio Greeter client that leaks, pools or closes its connections.

Usage: grpcio_client.py {leak,pool,close,dial,watch} --target HOST:PORT --count N [--interval S]
                         [--connect-timeout S] [--log FILE] [--channels K] [--tls-ca PEM]

- leak:  N channels opened one after another (--pace seconds apart), one RPC each,
         never closed; with
         --keep-busy the first one then carries an RPC every --interval until the end.
- pool:  --channels channels (default 1), N RPCs each, every --interval seconds (the
         channels in turn), never closed.
- close: N times: open a channel, one RPC, close it.
- watch: --channels channels, each with one server-streaming Watch RPC that lasts as long
         as the process (a subscription); DONE once each stream brought N replies.
- dial:  N times: open a channel whose connection attempt gives up after
         --connect-timeout seconds, one RPC, close it; a failed RPC is logged to --log as
         a JSON line (zap's layout: ts, level, pid, msg) in gRPC's own words, e.g.
         "connection attempt timed out before receiving SETTINGS frame".

Prints ``DONE`` when its work is done, then stays alive (holding whatever it left open)
until SIGTERM/SIGINT or --max-lifetime seconds, so a test decides when the process ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import grpc
from grpcio_common import encode_string, stop_on_signals

METHOD = "/helloworld.Greeter/SayHello"
WATCH = "/helloworld.Greeter/Watch"  # server streaming (tests/peers/grpcio_server.py)
# grpcio shares one TCP connection among all channels to the same target through its
# global subchannel pool; a local pool gives every channel its own connection (DESIGN.md).
# The proxy is disabled so that an http_proxy in the environment cannot reroute the RPCs.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0)]
RPC_TIMEOUT_S = 5.0


def hello_request(name: str) -> bytes:
    """A serialized HelloRequest{name}: field 1, length-delimited."""
    return encode_string(1, name)


def say_hello(channel: grpc.Channel, name: str) -> None:
    call = channel.unary_unary(METHOD)  # no (de)serializers: raw bytes both ways
    reply = call(hello_request(name), timeout=RPC_TIMEOUT_S)
    if b"Hello " + name.encode() not in reply:
        raise RuntimeError(f"unexpected reply {reply!r}")


TLS_CA: bytes | None = None  # --tls-ca: channels are TLS, trusting this certificate


def new_channel(target: str) -> grpc.Channel:
    if TLS_CA is not None:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(TLS_CA),
                                   options=[*CHANNEL_OPTIONS,
                                            ("grpc.ssl_target_name_override", "localhost")])
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


def dial(target: str, count: int, interval: float, connect_timeout: float,
         log: str | None) -> None:
    """Dial with a short connection timeout; log each failure as a service would."""
    # C-core's connection attempt deadline is the minimum reconnect backoff.
    options = [*CHANNEL_OPTIONS, ("grpc.min_reconnect_backoff_ms", int(connect_timeout * 1000))]
    for i in range(count):
        if i:
            time.sleep(interval)
        with grpc.insecure_channel(target, options=options) as channel:
            try:
                say_hello(channel, f"dial-{i}")
            except grpc.RpcError as err:
                line = {"level": "error", "ts": time.time(), "pid": os.getpid(),
                        "logger": "dialer", "target": target,
                        "msg": f"SayHello failed: {err.code().name}: {err.details()}"}
                if log:
                    with open(log, "a", encoding="utf-8") as f:
                        f.write(json.dumps(line) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("leak", "pool", "close", "dial", "watch"))
    parser.add_argument("--target", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--max-lifetime", type=float, default=120.0)
    parser.add_argument("--connect-timeout", type=float, default=1.0)
    parser.add_argument("--log", help="dial: append failed RPCs here as JSON lines")
    parser.add_argument("--channels", type=int, default=1, help="pool, watch: channels")
    parser.add_argument("--tls-ca", help="TLS channels, trusting this certificate (PEM)")
    parser.add_argument("--pace", type=float, default=0.0,
                        help="leak: seconds between two leaked channels (default: none)")
    parser.add_argument("--keep-busy", action="store_true",
                        help="leak: an RPC every --interval on the first channel afterwards")
    args = parser.parse_args()
    if args.tls_ca:
        global TLS_CA
        with open(args.tls_ca, "rb") as f:
            TLS_CA = f.read()

    stop = stop_on_signals()

    kept: list[grpc.Channel] = []  # referenced until exit so nothing is garbage-collected
    if args.mode == "leak":
        for i in range(args.count):
            channel = new_channel(args.target)
            kept.append(channel)
            say_hello(channel, f"leak-{i}")
            if args.pace and i < args.count - 1:
                stop.wait(args.pace)
        if args.keep_busy:
            def busy(channel: grpc.Channel = kept[0]) -> None:
                n = 0
                while not stop.wait(args.interval):
                    n += 1
                    try:
                        say_hello(channel, f"busy-{n}")
                    except grpc.RpcError as exc:
                        print(f"BUSY FAILED {exc.code()}", flush=True)
            threading.Thread(target=busy, daemon=True).start()
    elif args.mode == "pool":
        kept += [new_channel(args.target) for _ in range(args.channels)]
        for i in range(args.count * args.channels):
            if i:
                time.sleep(args.interval / args.channels)
            say_hello(kept[i % args.channels], f"pool-{i}")
    elif args.mode == "watch":
        kept += [new_channel(args.target) for _ in range(args.channels)]
        streams = [ch.unary_stream(WATCH)(hello_request(f"watch-{i}")) for i, ch in
                   enumerate(kept)]
        for stream in streams:  # N replies from each, then DONE; read on until the end
            for _ in range(args.count):
                next(stream)
        for stream in streams:
            threading.Thread(target=lambda s=stream: [None for _ in s], daemon=True).start()
    elif args.mode == "dial":
        dial(args.target, args.count, args.interval, args.connect_timeout, args.log)
    else:
        for i in range(args.count):
            with new_channel(args.target) as channel:  # __exit__ closes the channel
                say_hello(channel, f"close-{i}")
    print("DONE", flush=True)
    stop.wait(args.max_lifetime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
