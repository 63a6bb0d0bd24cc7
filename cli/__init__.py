"""The `tracer` command line: a thin click layer over the tracer core and the store."""
