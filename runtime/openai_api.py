"""OpenAI's chat-completions request, checked and mapped to GLM-4 conversations.

``parse_chat_request`` turns a request body into a :class:`ChatRequest`: GLM-4 messages (role
``tool`` becomes ``observation``; an assistant turn's ``tool_calls`` replay as GLM-4 calls, metadata
= name, content = arguments), the tools to declare, a forced call (``tool_choice`` "required" or a
named function), sampling options (with vLLM's extensions ``min_tokens`` and ``ignore_eos``), stop
strings and the response format. Every bad value raises
:class:`ApiError` with the status, message and parameter OpenAI's clients expect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from chat_format import Message, call_message, function_of
from runtime.engine import GenerationOptions

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "server_error"}
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_STOP = 4
UNSUPPORTED = {"logprobs": False, "top_logprobs": None, "logit_bias": None, "audio": None, "prediction": None}


class ApiError(Exception):
    """A request the server refuses, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A checked request: GLM-4 messages, what to declare and force, how to sample, how to answer."""

    model: str
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None
    forced: list[dict[str, Any]] | None = None
    options: GenerationOptions = field(default_factory=GenerationOptions)
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    json_schema: Any = None

    def tool_names(self) -> list[str]:
        """Names the model may call; replies are parsed for calls only when there are some."""
        return [function_of(tool)["name"] for tool in self.tools or []]


def parse_chat_request(body: Any, served: dict[str, tuple[str, ...]]) -> ChatRequest:
    """Check a chat-completions body against the served model names (each with the LoRA adapters it
    applies) and map it to GLM-4."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", "model")
    if model not in served:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves {', '.join(served)}", "model",
                       "model_not_found")
    for name, allowed in UNSUPPORTED.items():
        if body.get(name) not in (None, allowed, {}):
            raise ApiError(400, f"{name} is not supported by this server", name)
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise ApiError(400, f"n must be 1 (one reply per request), got {body.get('n')!r}", "n")
    tools = parse_tools(body.get("tools"))
    declared, forced = parse_tool_choice(body.get("tool_choice"), tools)
    stream = flag(body, "stream")
    options_field = body.get("stream_options")
    if options_field is not None and (not stream or not isinstance(options_field, dict)):
        raise ApiError(400, "stream_options is only allowed with stream: true and must be an object",
                       "stream_options")
    request = ChatRequest(model=model, messages=parse_messages(body.get("messages")), tools=declared, forced=forced,
                          stop=parse_stop(body.get("stop")), stream=stream,
                          include_usage=flag(options_field or {}, "include_usage"),
                          json_schema=parse_response_format(body.get("response_format")))
    if request.json_schema is not None and declared:
        raise ApiError(400, "response_format cannot be combined with tools here; send tool_choice \"none\" "
                       "or leave out response_format", "response_format")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    request.max_tokens = integer(body, key, 1, None, None)
    for penalty in ("frequency_penalty", "presence_penalty"):
        if number(body, penalty, -2.0, 2.0, 0.0) != 0.0:
            raise ApiError(400, f"{penalty} is not supported by this server (only 0)", penalty)
    request.options = GenerationOptions(temperature=number(body, "temperature", 0.0, 2.0, 0.0),
                                        top_p=number(body, "top_p", 0.0, 1.0, 1.0),
                                        seed=integer(body, "seed", 0, 2**63 - 1, None),
                                        min_new_tokens=integer(body, "min_tokens", 0, None, 0),
                                        ignore_eos=flag(body, "ignore_eos"), adapters=served[model])
    if request.options.top_p == 0.0:
        raise ApiError(400, "top_p must be greater than 0", "top_p")
    if request.max_tokens is not None and request.options.min_new_tokens > request.max_tokens:
        raise ApiError(400, f"min_tokens ({request.options.min_new_tokens}) cannot exceed {key} "
                       f"({request.max_tokens})", "min_tokens")
    return request


def flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{key} must be a boolean", key)
    return bool(value)


def number(body: dict[str, Any], key: str, low: float, high: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{key} must be a number from {low:g} to {high:g}, got {value!r}", key)
    return float(value)


def integer(body: dict[str, Any], key: str, low: int, high: int | None, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ApiError(400, f"{key} must be an integer {bound}, got {value!r}", key)
    return value


def text_of(content: Any, where: str) -> str:
    """A message's text: a string, null, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"{where}: only text content parts are supported, got {kind!r}", where)
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", where)


def parse_messages(messages: Any) -> list[Message]:
    """OpenAI messages as GLM-4 messages."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    glm: list[Message] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object", where)
        role = message.get("role")
        content = text_of(message.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            glm.append({"role": "system", "content": content})
        elif role == "user":
            glm.append({"role": "user", "content": content})
        elif role == "tool":
            glm.append({"role": "observation", "content": content})
        elif role == "assistant":
            if content:
                glm.append({"role": "assistant", "content": content})
            glm += replayed_calls(message.get("tool_calls"), f"{where}.tool_calls")
        else:
            raise ApiError(400, f"{where}.role must be system, developer, user, assistant or tool, got {role!r}",
                           f"{where}.role")
    return glm


def replayed_calls(calls: Any, where: str) -> list[Message]:
    """An assistant turn's tool calls as GLM-4 replays: metadata = name, content = arguments."""
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise ApiError(400, f"{where} must be a list", where)
    replays = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments"), str):
            raise ApiError(400, f"{where}: each call needs function.name and function.arguments (a string)", where)
        replays.append(call_message(function["name"], function["arguments"]))
    return replays


def parse_tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ApiError(400, "tools must be a list", "tools")
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ApiError(400, f"tools[{index}] must be {{\"type\": \"function\", \"function\": {{...}}}}",
                           f"tools[{index}]")
        if not isinstance(function.get("name"), str) or not FUNCTION_NAME.match(function["name"]):
            raise ApiError(400, f"tools[{index}].function.name must be 1-64 letters, digits, _ or -",
                           f"tools[{index}].function.name")
        if not isinstance(function.get("parameters", {}), dict):
            raise ApiError(400, f"tools[{index}].function.parameters must be a JSON schema object",
                           f"tools[{index}].function.parameters")
    return tools


def parse_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> tuple[list[dict] | None, list[dict] | None]:
    """(tools declared to the model, tools one of which it must call). "none" declares none."""
    if choice is None or choice == "auto":
        return tools or None, None
    if choice == "none":
        return None, None
    if not tools:
        raise ApiError(400, "tool_choice needs tools", "tool_choice")
    if choice == "required":
        return tools, tools
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise ApiError(400, "tool_choice must be \"none\", \"auto\", \"required\" or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    named = [tool for tool in tools if function_of(tool)["name"] == name]
    if not named:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return tools, named


def parse_stop(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    return stops


def parse_response_format(response_format: Any) -> Any:
    """The JSON schema a reply must match (json_object: any object), or None for free text."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema (an object)",
                           "response_format")
        return schema
    raise ApiError(400, "response_format.type must be text, json_object or json_schema", "response_format")
