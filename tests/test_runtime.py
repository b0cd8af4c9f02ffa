"""The runtime on glm4-tiny converted to INT8 and INT4: the eval suite through ChatSession, streaming,
cancel, and the tool loop with Python functions, all on openvino-genai (CPU).

With ``--backend ipex`` (in .venv-xeon) the same tests run on the IPEX engine over glm4-tiny's
checkpoint, in fp32 and, where the CPU computes it natively, bf16, and over its chatglm twin
(the original glm-4-9b-chat's architecture, IPEX's fused path) with weight-only INT8 and INT4.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pytest

import runtime
from models.evaluate import load_eval
from chat_format import Reply
from hostcpu import onednn_cpu_flags
from runtime.engine import ChatSession, Engine, GenerationOptions, ReplyChunk, conversation_ids
from runtime.ipex_engine import pick_dtype
from tests.conftest import TINY, drain

ITEMS = load_eval(TINY / "eval.jsonl")
ALLOWED_DROP = {"int8": 0.005, "int4": 0.02,  # accuracy points below FP32 transformers
                "ipex-fp32": 0.0, "ipex-bf16": 0.02, "ipex-chatglm-int8": 0.005, "ipex-chatglm-int4": 0.02}
FACT_EN = next(i for i in ITEMS if i["kind"] == "fact_en")
LONG = GenerationOptions(max_new_tokens=200, ignore_eos=True)  # 200 tokens whatever the model would say


@dataclass
class Turn:
    """One eval item run through a fresh ChatSession."""

    item: dict[str, Any]
    chunks: list[ReplyChunk]
    reply: Reply
    finish_reason: str
    prompt_tokens: int
    ids: list[int]


def reply_as_expected(reply: Reply) -> str:
    """A reply in eval.jsonl's form: the answer without its leading newline, or ``name\\n{json}``."""
    if reply.tool_call and not reply.malformed:
        return f"{reply.tool_call.name}\n{reply.tool_call.raw_arguments}"
    return reply.text


def run_item(engine: Engine, item: dict[str, Any]) -> Turn:
    """Replay the item's history into a session and send its last message (user text or observation)."""
    messages = item["messages"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    session = ChatSession(engine, system=system, tools=item.get("tools"),
                          options=GenerationOptions(max_new_tokens=48))
    session.history = [dict(m) for m in messages[1 if system else 0:-1]]
    last = messages[-1]
    ids = conversation_ids(engine, messages, item.get("tools"))
    chunks = list(session.send(last["content"], role=last["role"]))
    end = chunks[-1]
    assert end.reply is not None and end.stats is not None and all(c.finish_reason is None for c in chunks[:-1])
    return Turn(item, chunks, end.reply, end.finish_reason, end.stats.prompt_tokens, ids)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that takes ``precision`` runs once per engine of the chosen --backend."""
    if "precision" in metafunc.fixturenames:
        if metafunc.config.getoption("backend") == "ipex":
            precisions = ["ipex-fp32"] + (["ipex-bf16"] if pick_dtype("auto", onednn_cpu_flags()) == "bf16" else []) + [
                "ipex-chatglm-int8", "ipex-chatglm-int4"]  # the original architecture: IPEX's fused path
        else:
            precisions = ["int8", "int4"]
        metafunc.parametrize("precision", precisions, scope="module")


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest, precision: str) -> Engine:
    if precision.startswith("ipex-chatglm-"):  # auto precision, weight-only quantized
        return runtime.load(request.getfixturevalue("chatglm_twin"), "CPU", backend="ipex", trust_remote_code=True,
                            quantize=precision.removeprefix("ipex-chatglm-"))
    if precision.startswith("ipex-"):
        return runtime.load(TINY, "CPU", backend="ipex", dtype=precision.removeprefix("ipex-"))
    return runtime.load(request.getfixturevalue(f"tiny_{precision}"), "CPU", cache_dir=None)


@pytest.fixture(scope="module")
def eval_turns(engine: Engine) -> list[Turn]:
    return [run_item(engine, item) for item in ITEMS]


def test_eval_suite_through_the_runtime_holds_fp32_accuracy(precision, eval_turns, fp32_accuracy) -> None:
    per_kind: dict[str, list[bool]] = defaultdict(list)
    for turn in eval_turns:
        per_kind[turn.item["kind"]].append(reply_as_expected(turn.reply) == turn.item["expected"])
    accuracy = sum(sum(oks) for oks in per_kind.values()) / len(eval_turns)
    kinds = {kind: f"{sum(oks) / len(oks):.1%}" for kind, oks in sorted(per_kind.items())}
    print(f"\n{precision} through the runtime: {accuracy:.1%} (FP32 transformers {fp32_accuracy:.1%}) {kinds}")
    assert accuracy >= fp32_accuracy - ALLOWED_DROP[precision], kinds
    assert {"tool_call", "tool_answer", "tool_unneeded"} <= set(per_kind)


def test_eval_prompts_and_tool_turns_are_well_formed(eval_turns) -> None:
    for turn in eval_turns:
        assert turn.prompt_tokens == len(turn.ids)  # the whole history fitted, nothing was trimmed
        correct = reply_as_expected(turn.reply) == turn.item["expected"]
        if turn.item["kind"] == "tool_call" and correct:
            assert turn.finish_reason == "tool_calls" and turn.reply.tool_call.arguments is not None
        elif correct:
            assert turn.finish_reason == "stop" and turn.reply.tool_call is None
    observations = [t for t in eval_turns if t.item["messages"][-1]["role"] == "observation"]
    assert len(observations) == 30


def test_streamed_chunks_join_to_the_reply_without_broken_characters(eval_turns) -> None:
    chinese = 0
    for turn in eval_turns:
        joined = "".join(chunk.text for chunk in turn.chunks)
        assert "\ufffd" not in joined, turn.chunks
        plain = turn.reply.tool_call is None or turn.reply.malformed
        assert joined == (turn.reply.text if plain else ""), turn.chunks  # a tool call is never shown as text
        chinese += plain and not turn.reply.text.isascii()
    assert chinese >= 40  # fact_zh, tool answers and system_language items answer in Chinese


def test_cancel_after_the_second_chunk_stops_generation(engine) -> None:
    question = FACT_EN["messages"][0]["content"]
    session = ChatSession(engine, options=LONG)
    full = list(session.send(question))
    assert (full[-1].finish_reason, full[-1].stats.generated_tokens) == ("length", 200)
    assert len(full) > 50 and "".join(c.text for c in full).startswith(FACT_EN["expected"])

    session.reset()
    received: list[ReplyChunk] = []
    for chunk in session.send(question):
        received.append(chunk)
        if len(received) == 2:
            session.cancel()
    shown, end = "".join(c.text for c in received), received[-1]
    print(f"\ncancelled after {len(engine.encode(shown))} tokens shown; the engine generated "
          f"{end.stats.generated_tokens}")
    assert end.finish_reason == "cancelled"
    assert len(received) == 3 and end.text == ""  # after cancel() only the last chunk, with nothing to show
    # openvino-genai streams from its own thread, so it runs a few tokens past the cancel (5 when idle,
    # up to 14 seen on a loaded 2-core machine), against 200 without it.
    assert end.stats.generated_tokens <= len(engine.encode(shown)) + 20
    assert session.history[-1] == {"role": "assistant", "content": shown} == {"role": "assistant",
                                                                             "content": end.reply.text}

    session.options = GenerationOptions(max_new_tokens=200)
    answer, end = drain(session.send(question))
    assert answer == FACT_EN["expected"] and end.finish_reason == "stop"


def test_min_new_tokens_and_ignore_eos_lengthen_a_reply(engine) -> None:
    question = FACT_EN["messages"][0]["content"]
    session = ChatSession(engine, options=GenerationOptions(max_new_tokens=64, min_new_tokens=40))
    text, end = drain(session.send(question))
    assert end.stats.generated_tokens >= 40 and len(text) > len(FACT_EN["expected"])
    session = ChatSession(engine, options=GenerationOptions(max_new_tokens=64, ignore_eos=True))
    text, end = drain(session.send(question))
    assert text.startswith(FACT_EN["expected"]) and (end.stats.generated_tokens, end.finish_reason) == (64, "length")
    with pytest.raises(ValueError, match="min_new_tokens must be from 0 to max_new_tokens"):
        list(ChatSession(engine, options=GenerationOptions(max_new_tokens=4, min_new_tokens=5)).send(question))


def test_leaving_the_stream_early_stops_generation_and_keeps_the_session_usable(engine) -> None:
    session = ChatSession(engine, options=LONG)
    stream = session.send(FACT_EN["messages"][0]["content"])
    next(stream)
    stream.close()
    assert session.history == []  # an abandoned turn is not recorded
    item = next(i for i in ITEMS if i["kind"] == "fact_zh")
    session.options = GenerationOptions(max_new_tokens=200)
    assert drain(session.send(item["messages"][0]["content"]))[0] == item["expected"]


def weather_service(item: dict[str, Any]) -> dict[str, Any]:
    """Python tools that answer like the item's observation (an error for any other city)."""
    observation = json.loads(item["messages"][2]["content"])

    def call(city: str) -> dict[str, Any]:
        if city != observation["city"]:
            raise KeyError(city)
        return observation

    return {"get_weather": call, "get_time": call}


def test_tool_loop_runs_python_functions_to_the_final_answer(engine) -> None:
    items = [i for i in ITEMS if i["kind"] == "tool_answer"]
    correct = 0
    for item in items:
        session = ChatSession(engine, tools=item["tools"], options=GenerationOptions(max_new_tokens=48))
        result = runtime.run_tool_loop(session, item["messages"][0]["content"], weather_service(item))
        call = item["messages"][1]
        assert [(c.name, c.arguments, c.error) for c in result.calls] == \
            [(call["metadata"], json.loads(call["content"]), None)]
        assert result.calls[0].result == json.loads(item["messages"][2]["content"])
        assert [m["role"] for m in session.history] == ["user", "assistant", "observation", "assistant"]
        correct += result.text == item["expected"]
    assert correct >= len(items) - 1, f"{correct}/{len(items)}"


def broken(city: str) -> dict[str, Any]:
    raise ConnectionError(f"weather service for {city} is down")


@pytest.mark.parametrize("case, expected_error", [
    ("raises", "get_weather failed: ConnectionError: weather service"),
    ("no_function", "unknown function 'get_weather'; available: get_time"),
    ("undeclared", "unknown function 'get_weather'; available: get_time"),  # the model calls a tool not offered
])
def test_tool_loop_reports_failures_to_the_model(engine, case, expected_error) -> None:
    item = next(i for i in ITEMS if i["kind"] == "tool_answer" and i["messages"][1]["metadata"] == "get_weather")
    tools = [t for t in item["tools"] if case != "undeclared" or t["function"]["name"] == "get_time"]
    functions = {"get_weather": broken} if case == "raises" else {"get_time": broken}
    session = ChatSession(engine, tools=tools, options=GenerationOptions(max_new_tokens=48))
    result = runtime.run_tool_loop(session, item["messages"][0]["content"], functions, max_steps=3)
    assert 1 <= len(result.calls) <= 3
    first = result.calls[0]
    assert first.name == "get_weather" and first.arguments == json.loads(item["messages"][1]["content"])
    assert expected_error in first.error and first.result == {"error": first.error}
    call, observation = session.history[1:3]
    assert call == item["messages"][1]  # replayed as the model wrote it, declared or not
    assert observation["role"] == "observation" and json.loads(observation["content"]) == {"error": first.error}


def test_tool_loop_over_max_steps_raises_a_typed_error(engine) -> None:
    item = next(i for i in ITEMS if i["kind"] == "tool_call")
    session = ChatSession(engine, tools=item["tools"], options=GenerationOptions(max_new_tokens=48))
    with pytest.raises(runtime.ToolStepsExceeded) as caught:
        runtime.run_tool_loop(session, item["messages"][0]["content"], {"get_weather": dict, "get_time": dict},
                              max_steps=0)
    assert caught.value.calls == [] and f"{caught.value.pending.name}\n{caught.value.pending.raw_arguments}" \
        == item["expected"]


def test_the_streamed_tool_loop_yields_each_call_between_the_replies(engine) -> None:
    item = next(i for i in ITEMS if i["kind"] == "tool_answer")
    session = ChatSession(engine, tools=item["tools"], options=GenerationOptions(max_new_tokens=48))
    steps = list(runtime.stream_tool_loop(session, item["messages"][0]["content"], weather_service(item)))
    records = [n for n, step in enumerate(steps) if isinstance(step, runtime.ToolCallRecord)]
    ends = [n for n, step in enumerate(steps) if not isinstance(step, runtime.ToolCallRecord) and step.finish_reason]
    assert len(records) == 1 and ends == [records[0] - 1, len(steps) - 1]
    call_reply = steps[records[0] - 1]
    assert call_reply.finish_reason == "tool_calls" and call_reply.reply.tool_call.name == steps[records[0]].name
    assert all(step.text == "" for step in steps[:records[0]])  # the call itself is never shown as text
    answer = "".join(step.text for step in steps[records[0] + 1:])
    assert answer == steps[-1].reply.text and steps[-1].finish_reason == "stop"
