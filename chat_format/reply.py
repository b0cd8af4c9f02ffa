"""GLM-4's replies: plain text (after a leading newline) or a tool call ``name\\n{json arguments}``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

Message = dict[str, Any]


def function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """Return the function object of an OpenAI-style tool (``{"type": "function", ...}``) or a bare one."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


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


def call_message(name: str, arguments: str) -> Message:
    """The message that replays a tool call: an assistant message with metadata = the name, content = the
    arguments as written."""
    return {"role": "assistant", "metadata": name, "content": arguments}


def tool_call_message(call: ToolCall) -> Message:
    """The history entry that replays a parsed tool call, as the model generated it."""
    return call_message(call.name, call.raw_arguments)
