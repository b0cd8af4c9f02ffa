"""Run GLM-4 tool calls with Python functions until the model answers in plain text.

    def get_weather(city: str) -> dict:
        return {"city": city, "temperature": 21, "condition": "sunny"}

    session = runtime.ChatSession(engine, tools=[WEATHER_TOOL])  # declares the tools to the model
    result = runtime.run_tool_loop(session, "Weather in Paris?", {"get_weather": get_weather})
    result.text   # "It is sunny and 21°C in Paris."
    result.calls  # [ToolCallRecord(name="get_weather", arguments={"city": "Paris"}, result={...})]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from chat_format import ToolCall
from runtime.engine import ChatSession, EngineError, ReplyChunk


@dataclass
class ToolCallRecord:
    """One call the model made and what went back to it as the observation.

    ``arguments`` is None when the model's arguments were not a JSON object; ``error`` is set (and
    ``result`` is ``{"error": error}``) when the call could not be run or the function raised.
    """

    name: str
    arguments: dict[str, Any] | None
    result: Any
    error: str | None = None


@dataclass
class ToolLoopResult:
    """The model's final plain answer, and the calls made on the way, in order."""

    text: str
    calls: list[ToolCallRecord]


class ToolStepsExceeded(EngineError):
    """The model asked for another tool call after ``max_steps`` calls had been run.

    ``calls`` holds the calls that were run; ``pending`` is the call that was not. The session's
    history ends with that unanswered call.
    """

    def __init__(self, max_steps: int, calls: list[ToolCallRecord], pending: ToolCall) -> None:
        super().__init__(f"the model still called {pending.name} after {max_steps} tool call(s); "
                         "raise max_steps or check the tools")
        self.calls, self.pending = calls, pending


def stream_tool_loop(session: ChatSession, user_text: str, functions: Mapping[str, Callable[..., Any]],
                     max_steps: int = 5) -> Iterator[ReplyChunk | ToolCallRecord]:
    """Send ``user_text``, run each tool call the model makes, send the result back, and repeat, yielding
    every reply's chunks and, after each call has run, its :class:`ToolCallRecord`.

    Functions are called with the call's JSON arguments as keyword arguments; their return value
    (any JSON-serialisable value, or text) becomes the observation. A call to a name missing from
    ``functions``, arguments that are not a JSON object, or a function that raises are reported
    to the model as ``{"error": "..."}`` and the loop goes on; they never raise here. At most
    ``max_steps`` calls are run: one more raises :class:`ToolStepsExceeded`. A cancelled reply
    ends the loop.
    """
    if max_steps < 0:
        raise ValueError("max_steps must be 0 or more")
    calls: list[ToolCallRecord] = []
    chunks = session.send(user_text)
    while True:
        last = None
        for last in chunks:
            yield last
        if last is None or last.reply is None or last.reply.tool_call is None or last.finish_reason == "cancelled":
            return
        if len(calls) >= max_steps:
            raise ToolStepsExceeded(max_steps, calls, last.reply.tool_call)
        calls.append(run_call(last.reply.tool_call, functions))
        yield calls[-1]
        chunks = session.send_tool_result(observation_text(calls[-1].result))


def run_tool_loop(session: ChatSession, user_text: str, functions: Mapping[str, Callable[..., Any]],
                  max_steps: int = 5) -> ToolLoopResult:
    """:func:`stream_tool_loop` to its end: the final answer (what was received, if cancelled) and the calls."""
    result = ToolLoopResult("", [])
    for item in stream_tool_loop(session, user_text, functions, max_steps):
        if isinstance(item, ToolCallRecord):
            result.calls.append(item)
        elif item.reply is not None:
            result.text = item.reply.text
    return result


def run_call(call: ToolCall, functions: Mapping[str, Callable[..., Any]]) -> ToolCallRecord:
    """Run one parsed call; every failure becomes an error record instead of an exception."""
    function = functions.get(call.name)
    if function is None:
        error = f"unknown function {call.name!r}; available: {', '.join(functions) or 'none'}"
    elif call.arguments is None:
        error = f"the arguments of {call.name} are not a JSON object: {call.raw_arguments}"
    else:
        try:
            return ToolCallRecord(call.name, call.arguments, function(**call.arguments))
        except Exception as exc:  # the tool's failure is the model's to handle, not the caller's
            error = f"{call.name} failed: {type(exc).__name__}: {exc}"
    return ToolCallRecord(call.name, call.arguments, {"error": error}, error)


def observation_text(result: Any) -> str:
    """A tool result as observation text: strings as they are, anything else as JSON."""
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
