"""HTTP/2 (and the TLS and HTTP/1 that share its ports): frames, HPACK, the observer."""
