"""GLM-4 reply text, chunk by chunk, as OpenAI chat-completion messages and stream chunks.

A GLM-4 answer starts with ``\\n`` (dropped here); a tool call starts with the tool's name, so
when tools are declared a reply that does not start with ``\\n`` is held back until it ends and is
then parsed with :func:`chat_format.parse_reply`. Stop strings end the answer before
them; text that could be the start of one is held back until it cannot.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Sequence

from chat_format import parse_reply


class ReplyAssembler:
    """Feeds on reply text and hands out OpenAI deltas: ``{"content": ...}`` or ``{"tool_calls": [...]}``."""

    def __init__(self, tool_names: Sequence[str] = (), stop: Sequence[str] = (), keep_newline: bool = False) -> None:
        self.tool_names, self.stops = list(tool_names), list(stop)
        self.mode = "plain" if keep_newline else "start"
        self.held = ""
        self.content = ""
        self.tool_call: dict[str, Any] | None = None
        self.stopped = False

    def feed(self, chunk: str) -> list[dict[str, Any]]:
        """Deltas to send for ``chunk``; after a stop string, nothing more is taken."""
        if self.stopped or not chunk:
            return []
        self.held += chunk
        if self.mode == "start":
            if self.tool_names and not self.held.startswith("\n"):
                self.mode = "call"
            else:
                self.mode, self.held = "plain", self.held.removeprefix("\n")
        return [] if self.mode == "call" else self._release(final=False)

    def finish(self) -> list[dict[str, Any]]:
        """Deltas still held back once generation has ended."""
        if self.stopped:
            return []
        if self.mode != "call":
            return self._release(final=True)
        reply = parse_reply(self.held, self.tool_names)
        if reply.tool_call and not reply.malformed:
            self.held = ""
            self.tool_call = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                              "function": {"name": reply.tool_call.name,
                                           "arguments": reply.tool_call.raw_arguments}}
            return [{"tool_calls": [dict(self.tool_call, index=0)]}]
        self.held = reply.text  # not a usable call: it is the answer
        return self._release(final=True)

    def _release(self, final: bool) -> list[dict[str, Any]]:
        text = self.held
        hits = [text.find(stop) for stop in self.stops if stop in text]
        if hits:
            text, self.stopped = text[:min(hits)], True
        elif not final:
            text = text[:len(text) - self._partial_stop(text)]
        self.held = self.held[len(text):] if not self.stopped else ""
        self.content += text
        return [{"content": text}] if text else []

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

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
