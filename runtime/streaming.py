"""Generated token ids to reply text as they come, for the engine and the server.

openvino_genai.TextStreamer cannot be used with a Python callback: when a reply's bytes hold an
encoded UTF-16 surrogate (ED A0 80, which a byte-level tokenizer can generate), it hands the
callback bytes Python refuses to decode; the callback then raises inside the pipeline, which
aborts the process (LLMPipeline) or kills the thread that called it. ``TextDecoder`` decodes with
``Tokenizer.decode``, which turns such bytes into U+FFFD.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

REPLACEMENT = "\ufffd"


class TextDecoder:
    """Whole characters of a reply from its token ids, in order.

    Text ending in replacement characters may be an unfinished character, so it is held until a
    later character follows it (or the reply ends). UTF-8 resynchronises at every character, so
    what came before never changes: the pieces join to ``tokenizer.decode`` of all the ids.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []  # ids since the last point where all their text was given out
        self.given = 0  # characters of the pending ids' text already given out

    def write(self, ids: Sequence[int]) -> str:
        """The text these ids finish (empty while a character is unfinished)."""
        self.pending.extend(ids)
        text = self.tokenizer.decode(self.pending)
        settled = text.rstrip(REPLACEMENT)
        piece = settled[self.given:]
        if settled == text:
            self.pending, self.given = [], 0
        else:
            self.given = max(self.given, len(settled))
        return piece

    def end(self) -> str:
        """The text still held, at the end of the reply."""
        piece = self.tokenizer.decode(self.pending)[self.given:] if self.pending else ""
        self.pending, self.given = [], 0
        return piece


def step_counting_streamer(tokenizer: Any, on_chunk: Callable[[str], Any]) -> Any:
    """An openvino_genai streamer that hands whole characters to ``on_chunk`` (which returns a
    StreamingStatus) and counts the generation steps: each step writes the tokens it produced,
    several with accepted drafts. An exception in ``on_chunk`` cancels the generation and waits in
    ``error`` for the caller (raised inside the pipeline's thread, it would abort the process)."""
    import openvino_genai

    class Streamer(openvino_genai.StreamerBase):
        def __init__(self) -> None:
            super().__init__()
            self.decoder, self.steps, self.error = TextDecoder(tokenizer), 0, None

        def write(self, token: Any) -> Any:
            self.steps += 1
            try:
                text = self.decoder.write([token] if isinstance(token, int) else list(token))
                return on_chunk(text) if text else openvino_genai.StreamingStatus.RUNNING
            except BaseException as error:  # handed to the caller after generate() returns
                self.error = error
                return openvino_genai.StreamingStatus.CANCEL

        def end(self) -> None:
            try:
                if (text := self.decoder.end()) and self.error is None:
                    on_chunk(text)
            except BaseException as error:
                self.error = error

    return Streamer()
