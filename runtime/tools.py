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
from typing import Any, Callable, Iterable, Mapping

from chat_format import ToolCall
from runtime.engine import ChatSession, EngineError


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


def run_tool_loop(session: ChatSession, user_text: str, functions: Mapping[str, Callable[..., Any]],
                  max_steps: int = 5) -> ToolLoopResult:
    """Send ``user_text``, run each tool call the model makes, send the result back, and repeat.

    Functions are called with the call's JSON arguments as keyword arguments; their return value
    (any JSON-serialisable value, or text) becomes the observation. A call to a name missing from
    ``functions``, arguments that are not a JSON object, or a function that raises are reported
    to the model as ``{"error": "..."}`` and the loop goes on; they never raise here. At most
    ``max_steps`` calls are run: one more raises :class:`ToolStepsExceeded`. A cancelled reply
    ends the loop with the text received so far.
    """
    if max_steps < 0:
        raise ValueError("max_steps must be 0 or more")
    calls: list[ToolCallRecord] = []
    _drain(session.send(user_text))
    while True:
        reply, stats = session.last, session.last_stats
        if reply is None or reply.tool_call is None or (stats and stats.finish_reason == "cancelled"):
            return ToolLoopResult(reply.text if reply else "", calls)
        if len(calls) >= max_steps:
            raise ToolStepsExceeded(max_steps, calls, reply.tool_call)
        record = run_call(reply.tool_call, functions)
        calls.append(record)
        _drain(session.send_tool_result(observation_text(record.result)))


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


def _drain(chunks: Iterable[str]) -> None:
    for _ in chunks:
        pass
