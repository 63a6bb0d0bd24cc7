"""Crafted captures: one tiny scapy-built capture per edge case, with committed expected output.

``cases.py`` builds the packets (fixed ISNs, timestamps and ports), ``harness.py`` runs them
through the project's own reader and pipeline and renders the comparable summary, and
``golden/<case>.json`` holds the expected summary, written by hand-checked reasoning (see
tests/test_crafted.py for how to regenerate them deliberately).
"""
