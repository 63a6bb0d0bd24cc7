#!/usr/bin/env python3
"""Test peer: a grpcio helloworld.Greeter server with raw-bytes handlers (no protoc).

Usage: grpcio_server.py PORT [--max-lifetime SECONDS] [--tls-cert PEM --tls-key PEM]

Listens on 0.0.0.0:PORT (0 picks a free port), prints ``READY <port>`` once serving, and
stops on SIGTERM or SIGINT. It also stops by itself after --max-lifetime seconds so that a
test run killed hard never leaves a server behind.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from concurrent import futures
from types import FrameType

import grpc

SERVICE = "helloworld.Greeter"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def string_field(data: bytes, number: int) -> str:
    """Field ``number`` (a string) of a protobuf message, or "" when absent."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _read_varint(data, pos)
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            if key >> 3 == number:
                return data[pos:pos + length].decode("utf-8", "replace")
            pos += length
        else:  # fixed32/64 never occur in this service; stop rather than misparse
            break
    return ""


def encode_string(number: int, text: str) -> bytes:
    raw = text.encode()
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


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
    args = parser.parse_args()

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

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
        port = server.add_secure_port(f"0.0.0.0:{args.port}", credentials)
    else:
        port = server.add_insecure_port(f"0.0.0.0:{args.port}")
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
