"""Conversations every template check renders: the cases where GLM-4 templates differ from each other.

Each is ``(name, messages, tools)`` in GLM-4's form (roles system, user, assistant, observation; a
replayed call is an assistant message with ``metadata``). :func:`openai_form` gives the same
conversation as an OpenAI client sends it.
"""

from __future__ import annotations

import json
from typing import Any

from chat_format.reply import Message, call_message, function_of

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "获取某个城市的当前时间。", "parameters": {"type": "object", "properties": {}}}}
SYSTEM = {"role": "system", "content": "You are a concise assistant. 请简洁地回答。"}


def _call(name: str, arguments: dict[str, Any]) -> Message:
    return call_message(name, json.dumps(arguments, ensure_ascii=False))


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


CONVERSATIONS: list[tuple[str, list[Message], list[dict] | None]] = [
    ("plain English", [_user("What is the capital of France?")], None),
    ("plain Chinese", [_user("法国的首都是哪里？")], None),
    ("system", [SYSTEM, _user("Name three primary colours.")], None),
    ("empty system", [{"role": "system", "content": ""}, _user("Hi")], None),
    ("system mid-conversation", [_user("Hi"), {"role": "assistant", "content": "Hello!"},
                                 {"role": "system", "content": "From now on answer in Chinese."}, _user("Thanks")],
     None),
    ("multi-turn", [SYSTEM, _user("My favourite colour is green."), {"role": "assistant", "content": "Noted."},
                    _user("What is my favourite colour?")], None),
    ("newlines and emoji", [_user("Line one\nline two\n\n  indented 😀 ✓"),
                            {"role": "assistant", "content": "Got it:\n- one\n- two 🎉"}, _user("再来一次 🙂")],
     None),
    ("one tool", [_user("What's the weather in Paris?")], [WEATHER]),
    ("two tools, Chinese descriptions", [_user("北京现在几点？")], [WEATHER, CLOCK]),
    ("tools with system", [SYSTEM, _user("杭州天气怎么样？")], [WEATHER, CLOCK]),
    ("call, observation, answer", [
        _user("What's the weather in Paris?"), _call("get_weather", {"city": "Paris"}),
        {"role": "observation", "content": '{"temperature": 18, "condition": "cloudy"}'},
        {"role": "assistant", "content": "It is cloudy and 18°C in Paris."}, _user("And tomorrow?")], [WEATHER]),
    ("two calls in a row", [
        _user("Weather and time in 东京?"), _call("get_weather", {"city": "东京"}),
        {"role": "observation", "content": '{"temperature": 12, "condition": "晴"}'},
        _call("get_time", {}), {"role": "observation", "content": '{"time": "09:30"}'}], [WEATHER, CLOCK]),
    ("tools declared, unused", [SYSTEM, _user("Tell me a joke."),
                                {"role": "assistant", "content": "Why did the chicken cross the road?"},
                                _user("Why?")], [WEATHER]),
]


def openai_form(messages: list[Message], tools: list[dict] | None) -> dict[str, Any]:
    """The conversation as an OpenAI chat-completions body's ``messages`` and ``tools``."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "assistant" and message.get("metadata"):
            number = sum(1 for m in out for _ in m.get("tool_calls", ())) + 1
            out.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{number}", "type": "function",
                "function": {"name": message["metadata"], "arguments": message["content"]}}]})
        elif message["role"] == "observation":
            out.append({"role": "tool", "tool_call_id": f"call_{sum(1 for m in out if m.get('tool_calls'))}",
                        "content": message["content"]})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    body: dict[str, Any] = {"messages": out}
    if tools:
        body["tools"] = [{"type": "function", "function": function_of(t)} for t in tools]
    return body
