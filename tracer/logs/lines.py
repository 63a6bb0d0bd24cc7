"""Bytes to text lines, whatever the chunking: bounded, and the same lines for any cut."""

from __future__ import annotations

# Characters kept of one line; the rest of a longer line is skipped (and counted), so a
# file without newlines never fills memory.
MAX_LINE = 64 * 1024
# UTF-8 takes at most 4 bytes a character: a line still without its newline past this
# many bytes has more than max_line characters (and one more than that, so a final \r
# stripped at its end cannot bring it back under), whatever the rest of it holds.
_BYTES_PER_CHAR = 4
_SLACK = 8


class LineSplitter:
    """Feed bytes as they come; get back the complete lines (UTF-8, invalid bytes as
    U+FFFD, line ends \\n or \\r\\n removed). ``finish`` gives the last line when the
    input does not end with a newline. A line longer than ``max_line`` characters is
    cut to its first ``max_line`` and counted in ``cut_lines``."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.cut_lines = 0
        self._carry = b""
        self._skipping = False  # inside a cut line: drop bytes up to its newline
        self._too_long = _BYTES_PER_CHAR * max_line + _SLACK

    def feed(self, data: bytes) -> list[str]:
        if self._skipping:
            nl = data.find(b"\n")
            if nl < 0:
                return []
            data = data[nl + 1:]
            self._skipping = False
        if self._carry:
            data = self._carry + data
        cut = data.rfind(b"\n")
        if cut < 0:
            if len(data) > self._too_long:
                # Far too long: keep its start now and skip the rest as it arrives. Its
                # first max_line characters lie in its first 4 * max_line bytes, so they
                # are the same as if the whole line had been decoded.
                self._carry = b""
                self._skipping = True
                self.cut_lines += 1
                return [data[:self._too_long].decode("utf-8", "replace")[:self.max_line]]
            self._carry = data
            return []
        self._carry = data[cut + 1:]
        text = data[:cut].decode("utf-8", "replace")
        lines = text.split("\n")
        if "\r" in text:
            lines = [line.removesuffix("\r") for line in lines]
        if len(text) > self.max_line and max(map(len, lines)) > self.max_line:
            lines = [self._cut(line) for line in lines]
        return lines

    def finish(self) -> list[str]:
        """The last line, if the input did not end with a newline."""
        if self._skipping or not self._carry:
            return []
        text = self._carry.decode("utf-8", "replace").removesuffix("\r")
        self._carry = b""
        return [self._cut(text)]

    def _cut(self, line: str) -> str:
        if len(line) <= self.max_line:
            return line
        self.cut_lines += 1
        return line[:self.max_line]
