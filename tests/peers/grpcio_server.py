#!/usr/bin/env python3
"""Test peer: a grpcio helloworld.Greeter server with raw-bytes handlers (no protoc).

Usage: grpcio_server.py PORT [--max-lifetime SECONDS] [--tls-cert PEM --tls-key PEM]
                         [--bind ADDRESS]

Listens on 0.0.0.0:PORT (0 picks a free port), or on --bind (any address grpcio takes:
``unix:/path/s.sock``, ``unix-abstract:name``, ``127.0.0.1:0``), prints ``READY <port>``
once serving, and
stops on SIGTERM or SIGINT. It also stops by itself after --max-lifetime seconds so that a
test run killed hard never leaves a server behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent import futures

import grpc
from grpcio_common import encode_string, stop_on_signals, string_field

SERVICE = "helloworld.Greeter"


def say_hello(request: bytes, context: grpc.ServicerContext) -> bytes:
    # HelloRequest.name is field 1; HelloReply.message is field 1.
    return encode_string(1, "Hello " + string_field(request, 1))


WATCH_PERIOD_S = 1.0  # Watch: a reply this often


def watch(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
    """Server streaming: a HelloReply every WATCH_PERIOD_S until the client cancels (a
    watch or subscription stream: one RPC that lasts as long as the connection)."""
    name = string_field(request, 1)
    n = 0
    while context.is_active():
        yield encode_string(1, f"Hello {name} #{n}")
        n += 1
        time.sleep(WATCH_PERIOD_S)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--max-lifetime", type=float, default=300.0)
    parser.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)...")
    parser.add_argument("--tls-key", help="...and this private key (PEM)")
    parser.add_argument("--bind", help="listen on this address instead of 0.0.0.0:PORT")
    args = parser.parse_args()

    stop = stop_on_signals()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    # request_deserializer/response_serializer left as None: handlers see raw bytes.
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(
            SERVICE, {"SayHello": grpc.unary_unary_rpc_method_handler(say_hello),
                      "Watch": grpc.unary_stream_rpc_method_handler(watch)}
        ),
    ))
    if args.tls_cert:
        with open(args.tls_cert, "rb") as cert, open(args.tls_key, "rb") as key:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        port = server.add_secure_port(args.bind or f"0.0.0.0:{args.port}", credentials)
    else:
        port = server.add_insecure_port(args.bind or f"0.0.0.0:{args.port}")
    if port == 0:
        print(f"cannot listen on port {args.port}", file=sys.stderr, flush=True)
        return 1
    server.start()
    print(f"READY {port}", flush=True)
    stop.wait(args.max_lifetime)
    server.stop(grace=0.5).wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
