"""GLM-4 replies decoded as they stream: the text a user may see now, and at the end the parsed reply.

A plain answer starts with ``\\n`` (not part of the answer); a tool call starts with the tool's name
and is held back whole, because until its first line ends it cannot be told from an answer that
does not start with a newline. Stop strings end the answer before them, and text that could be the
start of one is held back until it cannot.
"""

from __future__ import annotations

from typing import Sequence

from chat_format.reply import Reply, parse_reply


class ReplyDecoder:
    """Feed it the generated text chunk by chunk; it hands out the visible text and, at the end, the reply."""

    def __init__(self, tool_names: Sequence[str] = (), stops: Sequence[str] = (), keep_newline: bool = False) -> None:
        self.tool_names, self.stops = list(tool_names), [s for s in stops if s]
        self.mode = "text" if keep_newline else "start"  # start -> text (an answer) or call (maybe a tool call)
        self.raw = ""  # everything fed, as generated
        self.held = ""  # text not yet handed out
        self.shown = ""  # text handed out
        self.stopped = False  # a stop string ended the answer

    def feed(self, chunk: str) -> str:
        """The text that may be shown now; nothing more is taken after a stop string."""
        if self.stopped or not chunk:
            return ""
        self.raw += chunk
        self.held += chunk
        if self.mode == "start":
            if self.tool_names and not self.held.startswith("\n"):
                self.mode = "call"
            else:
                self.mode, self.held = "text", self.held.removeprefix("\n")
        return "" if self.mode == "call" else self._release(final=False)

    def finish(self) -> tuple[str, Reply]:
        """The text still held back, and the whole reply: text (what was shown) or a tool call."""
        parsed = Reply(text="")
        if self.mode == "call":
            parsed = parse_reply(self.raw, self.tool_names)
            if parsed.tool_call and not parsed.malformed:
                return "", parsed
            self.held = parsed.text  # not a usable call: the raw reply is the answer
        rest = "" if self.stopped else self._release(final=True)
        return rest, Reply(text=self.shown, tool_call=parsed.tool_call, malformed=parsed.malformed)

    def _release(self, final: bool) -> str:
        text = self.held
        hits = [text.find(stop) for stop in self.stops if stop in text]
        if hits:
            text, self.stopped = text[:min(hits)], True
        elif not final:
            text = text[:len(text) - self._partial_stop(text)]
        self.held = "" if self.stopped else self.held[len(text):]
        self.shown += text
        return text

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
