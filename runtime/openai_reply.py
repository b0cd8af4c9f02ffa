"""GLM-4 reply text, chunk by chunk, as OpenAI chat-completion messages and stream chunks.

:class:`chat_format.ReplyDecoder` decides what may be shown (leading newline, tool calls held back
whole, stop strings); this module only puts that into OpenAI's shapes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Sequence

from chat_format import ReplyDecoder


class ReplyAssembler:
    """Feeds on reply text and hands out OpenAI deltas: ``{"content": ...}`` or ``{"tool_calls": [...]}``."""

    def __init__(self, tool_names: Sequence[str] = (), stop: Sequence[str] = (), keep_newline: bool = False) -> None:
        self.decoder = ReplyDecoder(tool_names, stop, keep_newline)
        self.content = ""
        self.tool_call: dict[str, Any] | None = None

    @property
    def stopped(self) -> bool:
        """A stop string has ended the answer: nothing more is taken."""
        return self.decoder.stopped

    def feed(self, chunk: str) -> list[dict[str, Any]]:
        """Deltas to send for ``chunk``."""
        return self._content(self.decoder.feed(chunk))

    def finish(self) -> list[dict[str, Any]]:
        """Deltas still held back once generation has ended: the rest of the answer, or the tool call."""
        rest, reply = self.decoder.finish()
        if reply.tool_call and not reply.malformed:
            self.tool_call = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                              "function": {"name": reply.tool_call.name, "arguments": reply.tool_call.raw_arguments}}
            return [{"tool_calls": [dict(self.tool_call, index=0)]}]
        return self._content(rest)

    def _content(self, text: str) -> list[dict[str, Any]]:
        self.content += text
        return [{"content": text}] if text else []

    def finish_reason(self, engine_reason: str) -> str:
        return "tool_calls" if self.tool_call else "stop" if self.stopped else engine_reason


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(reply_id: str, model: str, assembler: ReplyAssembler, finish_reason: str,
               prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The whole reply as a ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant",
                               "content": None if assembler.tool_call else assembler.content}
    if assembler.tool_call:
        message["tool_calls"] = [assembler.tool_call]
    return {"id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(reply_id: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
          usage_of: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; with ``usage_of`` (and no delta) the final usage chunk."""
    body: dict[str, Any] = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model, "choices": []}
    if delta is not None:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    if usage_of is not None:
        body["usage"] = usage_of
    return body
