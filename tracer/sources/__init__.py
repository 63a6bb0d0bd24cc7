"""Packet sources at the I/O edge: capture files and pipes, scapy's dissectors as a fallback."""
