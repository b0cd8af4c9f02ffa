"""GLM-4's chat format: the one place that knows how conversations become prompt text.

Rendering follows GLM-4-9B-Chat's template: a ``[gMASK]<sop>`` prefix, then each message as
``<|role|>`` + optional metadata + ``\\n`` + content, with no end-of-turn token; the generation
prompt is ``<|assistant|>`` with no trailing newline. Tools are declared in a system block.
A reply is either plain text (starting with ``\\n``) or a tool call ``name\\n{json arguments}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

PREFIX = "[gMASK]<sop>"
SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)
# All three must stop generation: end of text, end of a chat turn, end of a tool call.
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
ROLES = ("system", "user", "assistant", "observation")

# The -hf and 0414 templates name the assistant GLM-4; the original remote-code one ChatGLM.
TOOLS_PREAMBLE = {
    "glm": "你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。",
    "chatglm": "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。",
}
TOOLS_HEADER = "\n\n# 可用工具"
TOOL_ARGS_HINT = "在调用上述函数时，请使用 Json 格式表示调用的参数。"

Message = dict[str, Any]


def function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """Return the function object of an OpenAI-style tool (``{"type": "function", ...}``) or a bare one."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


Part = tuple[str, bool]  # (text, is_control_token)


def tools_parts(tools: Sequence[dict[str, Any]], flavour: str = "glm") -> list[Part]:
    """The system block that declares ``tools`` (each function as JSON indented by 4)."""
    body = [TOOLS_PREAMBLE[flavour], TOOLS_HEADER]
    for tool in tools:
        function = function_of(tool)
        body.append(f"\n\n## {function['name']}\n\n")
        body.append(json.dumps(function, indent=4, ensure_ascii=False))
        body.append("\n" + TOOL_ARGS_HINT)
    return [("<|system|>", True), ("\n" + "".join(body), False)]


def message_parts(message: Message) -> list[Part]:
    """One message; empty content renders nothing (message-level tools aside)."""
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; GLM-4 knows {', '.join(ROLES)}")
    parts = tools_parts(message["tools"]) if message.get("tools") else []
    if message.get("content"):
        parts += [(f"<|{role}|>", True), (f"{message.get('metadata') or ''}\n{message['content']}", False)]
    return parts


def prompt_parts(
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> list[Part]:
    """A conversation as control tokens and ordinary text, in order."""
    parts: list[Part] = [("[gMASK]", True), ("<sop>", True)] + (tools_parts(tools) if tools else [])
    for message in messages:
        parts += message_parts(message)
    return parts + ([("<|assistant|>", True)] if add_generation_prompt else [])


def render_tools(tools: Sequence[dict[str, Any]], flavour: str = "glm") -> str:
    """The tools block as text."""
    return "".join(text for text, _ in tools_parts(tools, flavour))


def render_message(message: Message) -> str:
    """One message as text."""
    return "".join(text for text, _ in message_parts(message))


def split_specials(text: str) -> list[str]:
    """Cut ``text`` so that no piece contains a whole special-token string.

    Encoded piece by piece, untrusted text that spells ``<|assistant|>`` stays ordinary tokens.
    """
    pieces, rest = [], text
    while True:
        hits = [(rest.find(token), token) for token in SPECIAL_TOKENS if token in rest]
        if not hits:
            return pieces + ([rest] if rest else [])
        at = min(hits)[0]
        pieces.append(rest[: at + 1])
        rest = rest[at + 1:]


def encode_prompt(parts: Sequence[Part], encode_text: Callable[[str], list[int]],
                  token_id: Callable[[str], int]) -> list[int]:
    """Token ids of ``parts``: control parts by id, text (template and untrusted content alike)
    encoded so that it can never produce a control token."""
    ids: list[int] = []
    pending = ""
    for text, control in list(parts) + [("", True)]:
        if not control:
            pending += text
            continue
        for piece in split_specials(pending):
            ids += encode_text(piece)
        pending = ""
        if text:
            ids.append(token_id(text))
    return ids


def render_segments(
    messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None
) -> list[tuple[str, bool]]:
    """Render a conversation as ``(text, is_model_output)`` pieces, for training.

    Model output is what follows ``<|assistant|>`` (metadata, newline, content) plus the role token
    that ends it: the next message's role token, or when the conversation ends with the assistant,
    ``<|observation|>`` after a tool call and ``<|user|>`` after an answer.
    """
    pieces: list[tuple[str, bool]] = [(PREFIX + (render_tools(tools) if tools else ""), False)]
    after_assistant: Message | None = None
    for message in messages:
        text = render_message(message)
        if message["role"] == "assistant":
            head = "<|assistant|>"
            pieces += [(head, False), (text[len(head):], True)]
        elif after_assistant and text.startswith("<|"):
            role_token = text[: text.index("|>") + 2]
            pieces += [(role_token, True), (text[len(role_token):], False)]
        else:
            pieces.append((text, False))
        after_assistant = message if message["role"] == "assistant" else None
    if after_assistant:
        pieces.append(("<|observation|>" if after_assistant.get("metadata") else "<|user|>", True))
    return pieces


def render(
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation to prompt text exactly as GLM-4's chat template does."""
    return "".join(text for text, _ in prompt_parts(messages, tools, add_generation_prompt))


@dataclass
class ToolCall:
    """A tool call parsed from a reply. ``arguments`` is None when they were not valid JSON."""

    name: str
    arguments: dict[str, Any] | None
    raw_arguments: str


@dataclass
class Reply:
    """A parsed assistant reply: plain ``text``, or a ``tool_call`` (``malformed`` if unusable)."""

    text: str
    tool_call: ToolCall | None = None
    malformed: bool = False


def parse_reply(raw: str, tool_names: Iterable[str] = ()) -> Reply:
    """Split a generated reply into text or a tool call; never raises on model output.

    With no tools declared every reply is text. A call to an undeclared tool, or with arguments
    that are not a JSON object, keeps its ``tool_call`` (arguments None when not JSON) with
    ``malformed`` set and the raw reply as text.
    """
    names = set(tool_names)
    if not names or raw.startswith("\n") or "\n" not in raw:
        return Reply(text=raw[1:] if raw.startswith("\n") else raw)
    name, arguments = raw.split("\n", 1)
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = None
    call = ToolCall(name.strip(), parsed if isinstance(parsed, dict) else None, arguments)
    if call.arguments is None or call.name not in names:
        return Reply(text=raw, tool_call=call, malformed=True)
    return Reply(text="", tool_call=call)


def tool_call_prefix(name: str) -> str:
    """How a reply that calls ``name`` begins; its JSON arguments follow."""
    return f"{name}\n"


def tool_call_message(call: ToolCall) -> Message:
    """The history entry that replays a tool call: metadata = name, content = the arguments."""
    return {"role": "assistant", "metadata": call.name, "content": call.raw_arguments}


def jinja_template(flavour: str = "glm") -> str:
    """A Jinja chat template that renders what :func:`render` does (top-level or message tools)."""

    def tools_block(var: str) -> str:
        return (
            "{{- '<|system|>\\n' + " + json.dumps(TOOLS_PREAMBLE[flavour], ensure_ascii=False)
            + " + " + json.dumps(TOOLS_HEADER, ensure_ascii=False) + " -}}"
            "{%- for tool in " + var + " -%}"
            "{%- if tool.function is defined -%}{%- set function = tool.function -%}"
            "{%- else -%}{%- set function = tool -%}{%- endif -%}"
            "{{- '\\n\\n## ' + function.name + '\\n\\n' -}}"
            "{{- function | tojson(indent=4) -}}"
            "{{- '\\n' + " + json.dumps(TOOL_ARGS_HINT, ensure_ascii=False) + " -}}"
            "{%- endfor -%}"
        )

    return (
        "{{- '[gMASK]<sop>' -}}"
        "{%- if tools -%}" + tools_block("tools") + "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message.tools is defined and message.tools -%}" + tools_block("message.tools")
        + "{%- endif -%}"
        "{%- if message.content -%}"
        "{{- '<|' + message.role + '|>' -}}"
        "{%- if message.metadata is defined and message.metadata -%}{{- message.metadata -}}{%- endif -%}"
        "{{- '\\n' + message.content -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
    )
