"""The Engine protocol every backend implements, and the chat session built on it.

An engine turns prompt token ids into a stream of text chunks; the session owns the history,
renders it with the model's own chat template (:mod:`chat_format`), trims it to the engine's prompt
budget, and decodes replies into text or tool calls. Backends never see GLM-4's format.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import chat_format
from chat_format import ChatTemplate, Message, Reply


class EngineError(Exception):
    """Base of the runtime's typed errors (shown to users as one line)."""


class ModelLoadError(EngineError):
    """The model folder is missing, incomplete or corrupt."""


class DeviceError(EngineError):
    """The requested device is not present or not usable."""


class PromptTooLongError(EngineError):
    """The prompt does not fit the context even after trimming history."""


@dataclass
class GenerationOptions:
    """Sampling settings for one reply; temperature 0 means greedy.

    ``min_new_tokens`` keeps the stop tokens from being chosen before that many tokens;
    ``ignore_eos`` generates exactly ``max_new_tokens`` (stop tokens are generated and passed over),
    for benchmarks and for tests that need a long reply whatever the model would say.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0
    ignore_eos: bool = False
    # LoRA adapters (by name) to apply: None applies every adapter the engine loaded, () none.
    adapters: tuple[str, ...] | None = None
    # An openvino_genai.StructuredOutputConfig (JSON schema, grammar, structural tags) or None.
    structured_output: Any = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be from 0 to max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.min_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("temperature >= 0, 0 < top_p <= 1, top_k >= 0 and repetition_penalty > 0 are required")


@dataclass
class PromptLookup:
    """Prompt-lookup decoding: each step drafts up to ``num_assistant_tokens`` tokens by finding the last
    ``max_ngram_size`` (or fewer) tokens earlier in the prompt and copying what followed them; the model
    checks a whole draft in one pass, so text the reply copies from the prompt comes several tokens a step.
    Greedy replies stay the same."""

    num_assistant_tokens: int = 5
    max_ngram_size: int = 3

    def validate(self) -> None:
        if self.num_assistant_tokens < 1 or self.max_ngram_size < 1:
            raise ValueError("prompt lookup needs num_assistant_tokens >= 1 and max_ngram_size >= 1")


@dataclass
class ReplyStats:
    """What one reply cost and why it ended (stop, length, tool_calls or cancelled).

    ``tokens_per_step``: generated tokens per forward pass of the model; 1 without prompt lookup, more
    when drafts copied from the prompt were accepted (0 when the engine cannot tell).
    """

    finish_reason: str = "stop"
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0
    tokens_per_step: float = 0.0


@dataclass
class Generation:
    """A finished generation: the raw reply text (special tokens removed) and its statistics."""

    text: str
    stats: ReplyStats


class Engine(Protocol):
    """A loaded model that continues prompts given as token ids."""

    name: str
    device: str
    max_prompt_tokens: int
    template: ChatTemplate  # the model's own chat template

    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text (the caller keeps control tokens out of it)."""

    def token_id(self, token: str) -> int:
        """Id of one special token."""

    def generate(self, prompt_ids: Sequence[int], options: GenerationOptions,
                 on_text: Callable[[str], bool]) -> Generation:
        """Generate until a stop token or the limit; ``on_text`` gets each chunk of whole
        characters and returns True to cancel."""


def conversation_ids(engine: Engine, messages: Sequence[Message], tools: Sequence[dict] | None) -> list[int]:
    """Prompt ids of a conversation rendered with the model's own template; no message or tool text
    becomes a control token."""
    return chat_format.encode_prompt(engine.template.parts(messages, tools), engine.encode, engine.token_id)


def trim_history(engine: Engine, history: list[Message], tools: Sequence[dict] | None) -> tuple[list[Message], list[int]]:
    """Drop the oldest exchanges (never system messages, never the last one) until the prompt fits."""
    kept = list(history)
    while True:
        ids = conversation_ids(engine, kept, tools)
        if len(ids) <= engine.max_prompt_tokens:
            return kept, ids
        starts = [i for i, m in enumerate(kept) if m["role"] == "user"]
        if len(starts) < 2:
            raise PromptTooLongError(f"the prompt needs {len(ids)} tokens but the limit is "
                                     f"{engine.max_prompt_tokens}; shorten the message or the system prompt")
        first, second = starts[0], starts[1]
        kept = kept[:first] + [m for m in kept[first:second] if m["role"] == "system"] + kept[second:]


@dataclass
class ReplyChunk:
    """A piece of a streamed reply, as :meth:`ChatSession.send` yields it.

    ``text`` is what to show now: an answer without GLM-4's leading newline; a tool call is never
    shown as text. The last chunk of a reply also carries ``finish_reason`` (stop, length,
    tool_calls or cancelled), ``stats``, and ``reply``: the whole reply, text or a tool call.
    """

    text: str
    finish_reason: str | None = None
    stats: ReplyStats | None = None
    reply: Reply | None = None


@dataclass
class ChatSession:
    """A multi-turn conversation with one engine: system prompt, tools, history."""

    engine: Engine
    system: str | None = None
    tools: list[dict[str, Any]] | None = None
    options: GenerationOptions = field(default_factory=GenerationOptions)
    history: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cancel = threading.Event()

    def messages(self) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reset(self) -> None:
        """Forget the conversation (system prompt and tools stay)."""
        self.history.clear()

    def cancel(self) -> None:
        """Stop the reply being generated (safe from another thread)."""
        self._cancel.set()

    def send(self, text: str, role: str = "user") -> Iterator[ReplyChunk]:
        """Add a user message (or a tool result with role ``observation``) and stream the reply."""
        if role not in ("user", "observation"):
            raise ValueError("send() takes user messages and observations")
        if not text:
            raise ValueError("the message is empty")
        self.options.validate()
        return self._stream({"role": role, "content": text})

    def send_tool_result(self, result: Any) -> Iterator[ReplyChunk]:
        """Return a tool's result (any JSON value or text) to the model and stream its reply."""
        return self.send(result if isinstance(result, str) else json.dumps(result, ensure_ascii=False),
                         role="observation")

    def _stream(self, message: Message) -> Iterator[ReplyChunk]:
        """Generate on a worker thread and hand its text over as it comes.

        The engine hears a cancel() at its next chunk (openvino-genai streams from its own thread,
        so it may run a few tokens further); text generated after cancel() is dropped, and a
        cancelled reply, in the last chunk and the history, is what was generated before it. A
        stream closed before its end leaves the history as it was.
        """
        pending = self.messages() + [message]
        kept, ids = trim_history(self.engine, pending, self.tools)
        self._cancel.clear()
        decoder = chat_format.ReplyDecoder([chat_format.function_of(t)["name"] for t in self.tools or []])
        queue: list[str] = []
        result: dict[str, Any] = {}
        ready = threading.Condition()

        def on_text(chunk: str) -> bool:
            with ready:
                queue.append(chunk)
                ready.notify()
            return self._cancel.is_set()

        def run() -> None:
            try:
                result["done"] = self.engine.generate(ids, self.options, on_text)
            except BaseException as error:  # handed to the consuming thread
                result["error"] = error
            with ready:
                ready.notify()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            while True:
                with ready:
                    ready.wait_for(lambda: queue or result)
                    chunk = queue.pop(0) if queue else None
                if chunk is None:
                    break
                if not self._cancel.is_set() and (visible := decoder.feed(chunk)):
                    yield ReplyChunk(visible)
        finally:
            if worker.is_alive():
                self._cancel.set()
            worker.join()
        if "error" in result:
            raise result["error"]
        yield self._finish(kept, result["done"], decoder)

    def _finish(self, kept: list[Message], generation: Generation, decoder: chat_format.ReplyDecoder) -> ReplyChunk:
        """Record the reply in the history and describe it in the last chunk."""
        self.history = kept[1:] if self.system else kept
        stats = generation.stats
        if self._cancel.is_set() and not (decoder.raw == generation.text and stats.finish_reason == "stop"):
            stats.finish_reason = "cancelled"
        rest, reply = decoder.finish()
        if reply.tool_call and not reply.malformed and stats.finish_reason != "cancelled":
            stats.finish_reason = "tool_calls"
        if reply.tool_call and reply.tool_call.raw_arguments:  # replayed as generated, even when unusable
            self.history.append(chat_format.tool_call_message(reply.tool_call))
        elif reply.text:
            self.history.append({"role": "assistant", "content": reply.text})
        return ReplyChunk(rest, stats.finish_reason, stats, reply)
