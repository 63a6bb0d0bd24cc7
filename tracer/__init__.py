"""grpc connection-leak tracer: the capture and decoding core, its events and its I/O adapters."""

__version__ = "0.1.0"
