"""Text through terminals and pipes as UTF-8 on every platform.

On Windows, Python reads and writes pipes and files in the ANSI code page (cp1252, gbk...), so
piped Chinese fails to decode and a Chinese reply fails to encode. The commands write UTF-8 and
read UTF-8, falling back to the stream's own encoding for input that is not UTF-8.
"""

from __future__ import annotations

import io
import sys
from typing import TextIO


def use_utf8_output() -> None:
    """Write stdout and stderr as UTF-8 (characters that cannot be written become replacements, never errors)."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(encoding="utf-8", errors="replace")


class InputLines:
    """Lines of a text stream read as UTF-8 (a leading byte-order mark dropped), else in the stream's encoding."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.first = stream, True

    def readline(self) -> str:
        buffer = getattr(self.stream, "buffer", None)
        if buffer is None:
            return self.stream.readline()
        raw = buffer.readline()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode(getattr(self.stream, "encoding", None) or "utf-8", errors="replace")
        if self.first:
            text, self.first = text.removeprefix("\ufeff"), False
        return text
