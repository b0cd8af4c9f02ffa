"""A checkpoint's own chat template, rendered as transformers renders it, with untrusted text kept apart.

The template is the source of truth for every prompt. It is rendered the way transformers'
``apply_chat_template`` does (sandboxed Jinja with ``trim_blocks`` and ``lstrip_blocks``, a
``tojson`` that keeps non-ASCII, ``raise_exception``, the tokenizer's special tokens as variables).
GLM-4 conversations use GLM roles (system, user, assistant, observation); a replayed tool call is
an assistant message with ``metadata`` = the function name and ``content`` = its arguments.

Tools go where the template reads them: on a first ``{"role": "system", "content": "", "tools": [...]}``
item for the original glm-4-9b-chat and -hf templates, top-level for GLM-4-0414's; which one is
found by rendering a probe tool both ways.

:meth:`ChatTemplate.parts` renders with every special-token string inside message text, metadata
and tools defused by an invisible marker, so that the only control tokens in a prompt are those
the template itself writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from chat_format.reply import Message
from chat_format.tokens import SPECIAL_PATTERN, SPECIAL_TOKENS, Part

PROBE_TOOL = "glm4_intel_probe_tool"
TOP_LEVEL, ON_MESSAGE = "top-level", "message"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """The chat template cannot render a conversation (or cannot declare tools)."""


def _environment() -> Any:
    """A Jinja environment that renders like transformers 4.57's chat templates."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it): renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Generation, loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment


def openai_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool in OpenAI's form ``{"type": "function", "function": {...}}``, which every GLM-4 template reads."""
    return tool if isinstance(tool.get("function"), dict) else {"type": "function", "function": tool}


def _marker_for(values: Sequence[Any]) -> str:
    """A private-use character that occurs in none of ``values``."""
    text = json.dumps(values, ensure_ascii=False)
    return next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text)


def _defuse(value: Any, marker: str) -> Any:
    """``value`` with every special-token string in its strings (keys too) broken by ``marker``."""
    if isinstance(value, str):
        return SPECIAL_PATTERN.sub(lambda m: m.group(0)[0] + marker + m.group(0)[1:], value)
    if isinstance(value, dict):
        return {_defuse(k, marker): _defuse(v, marker) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_defuse(v, marker) for v in value]
    return value


@dataclass
class ChatTemplate:
    """A chat template (Jinja source) and the special-token variables transformers passes to it."""

    source: str
    variables: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def builtin(cls) -> ChatTemplate:
        """GLM-4's format as this project writes it, for checkpoints that carry no template."""
        from chat_format.builtin import BUILTIN_TEMPLATE

        return cls(BUILTIN_TEMPLATE, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTemplate:
        """The template a checkpoint or converted folder carries (chat_template.jinja, then
        tokenizer_config.json), with its special tokens; the built-in one when it has none."""
        folder = Path(folder)
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        source = None
        if (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(config.get("chat_template"), str):
            source = config["chat_template"]
        elif isinstance(config.get("chat_template"), list):  # named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in config["chat_template"] if isinstance(t, dict)}
            source = named.get("default")
        if source is None:
            return cls.builtin()
        return cls(source, special_token_variables(config))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTemplate:
        """The template of a transformers tokenizer (the built-in one when it has none)."""
        if not isinstance(getattr(tokenizer, "chat_template", None), str):
            return cls.builtin()
        return cls(tokenizer.chat_template, dict(tokenizer.special_tokens_map))

    @cached_property
    def compiled(self) -> Any:
        import jinja2

        try:
            return _environment().from_string(self.source)
        except jinja2.TemplateError as error:
            raise TemplateError(f"the chat template does not parse: {error}") from None

    @cached_property
    def tools_placement(self) -> str | None:
        """Where the template reads tools: ``top-level``, ``message`` (a system item's ``tools``) or None.

        Raises TemplateError when the template does not parse."""
        _ = self.compiled  # parse errors surface here, not as a failed probe
        probe = [openai_tool({"name": PROBE_TOOL, "description": "probe",
                              "parameters": {"type": "object", "properties": {}}})]
        user = [{"role": "user", "content": "hi"}]
        for placement, messages, tools in ((TOP_LEVEL, user, probe),
                                           (ON_MESSAGE, [{"role": "system", "content": "", "tools": probe}] + user,
                                            None)):
            try:
                if PROBE_TOOL in self._render(messages, tools, True):
                    return placement
            except TemplateError:
                continue
        return None

    def template_input(self, messages: Sequence[Message],
                       tools: Sequence[dict[str, Any]] | None) -> tuple[list[Message], list[dict] | None]:
        """The messages and top-level tools to render: tools where this template reads them."""
        items = [dict(m) for m in messages]
        if not tools:
            return items, None
        declared = [openai_tool(t) for t in tools]
        if self.tools_placement == TOP_LEVEL:
            return items, declared
        if self.tools_placement == ON_MESSAGE:
            return [{"role": "system", "content": "", "tools": declared}] + items, None
        raise TemplateError("this model's chat template declares no tools (neither top-level nor on a message), "
                            "so the model cannot be given tools")

    def _render(self, items: Sequence[Message], tools: Sequence[dict] | None, add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self.compiled.render(messages=list(items), tools=tools, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.variables)
        except jinja2.TemplateError as error:
            raise TemplateError(f"the chat template cannot render this conversation: {error}") from None

    def render(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        """The prompt text, exactly as transformers renders the same conversation with this template."""
        items, top = self.template_input(messages, tools)
        return self._render(items, top, add_generation_prompt)

    def parts(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None,
              add_generation_prompt: bool = True) -> list[Part]:
        """The prompt as control tokens and text; no message or tool text can become a control token."""
        items, top = self.template_input(messages, tools)
        marker = _marker_for([items, top])
        text = self._render(_defuse(items, marker), _defuse(top, marker), add_generation_prompt)
        parts: list[Part] = []
        at = 0
        for match in SPECIAL_PATTERN.finditer(text):
            parts += [(text[at:match.start()].replace(marker, ""), False), (match.group(0), True)]
            at = match.end()
        return [p for p in parts + [(text[at:].replace(marker, ""), False)] if p[0]]

    def segments(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None
                 ) -> list[tuple[str, bool]]:
        """The conversation as ``(text, is_model_output)`` pieces, for training.

        Model output is each assistant message (everything after its ``<|assistant|>``) and the role
        token that ends it: the next message's, or when the conversation ends with the assistant,
        ``<|observation|>`` after a tool call and ``<|user|>`` after an answer.
        """
        pieces: list[tuple[str, bool]] = []

        def add_prompt(text: str) -> None:
            head = SPECIAL_PATTERN.match(text)
            if pieces and pieces[-1][1] and head:  # the role token that ends a reply is model output too
                pieces.append((head.group(0), True))
                text = text[head.end():]
            if text:
                pieces.append((text, False))

        done = ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:index], tools, add_generation_prompt=True)
            after = self.render(messages[:index + 1], tools, add_generation_prompt=False)
            if not (before.startswith(done) and after.startswith(before)):
                raise TemplateError("the chat template does not render conversations as growing prefixes")
            add_prompt(before[len(done):])
            pieces.append((after[len(before):], True))
            done = after
        if messages and messages[-1]["role"] == "assistant":
            pieces.append(("<|observation|>" if messages[-1].get("metadata") else "<|user|>", True))
        else:
            add_prompt(self.render(messages, tools, add_generation_prompt=False)[len(done):])
        return pieces


def special_token_variables(config: dict[str, Any]) -> dict[str, Any]:
    """The special tokens of a tokenizer_config.json, as transformers hands them to templates."""
    def content(value: Any) -> Any:
        return value.get("content") if isinstance(value, dict) else value

    variables = {key: content(config[key]) for key in SPECIAL_TOKEN_KEYS if config.get(key) is not None}
    if config.get("additional_special_tokens"):
        variables["additional_special_tokens"] = [content(v) for v in config["additional_special_tokens"]]
    return variables


__all__ = ["ChatTemplate", "TemplateError", "SPECIAL_TOKENS", "openai_tool", "special_token_variables"]
