"""The core's options the core tests run with."""

from __future__ import annotations

from tracer.options import CoreOptions

# Everything the core can produce: server header blocks decoded (grpc-status) and one
# event per RPC, PING and RST_STREAM (the command line's --grpc-status --events all).
FULL = CoreOptions(decode_server_headers=True, rpc_events=True)
