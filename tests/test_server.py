"""The OpenAI-compatible server (python -m runtime.server) on glm4-tiny INT4, driven with the official
openai client: eval answers plain and streamed, usage, tool calls, JSON schema, stop strings,
32 concurrent streams with clients that leave midway, the queue limit, API keys and bad requests."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

import runtime
from models.evaluate import load_eval
from runtime.engine import Engine, GenerationOptions, conversation_ids
from tests.conftest import TINY
from tests.server_process import Server, announce_body, fetch, logged_at, post, start_server

ITEMS = load_eval(TINY / "eval.jsonl")
MODEL = "glm4-tiny-int4"
LONG_QUESTION = [{"role": "user", "content": "首都首都首都首都首都"}]  # off the task suite: an answer of any length
TO_LIMIT = {"extra_body": {"ignore_eos": True}}  # vLLM's extension: run to max_tokens, past the stop tokens
KEY = "test-key-123"
LEAVER_MAX_TOKENS = 4000  # the server cuts this to what the context leaves (about 4,070 tokens)


@pytest.fixture(scope="module")
def server(tiny_int4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_server(tiny_int4, tmp_path_factory.mktemp("server") / "server.log",
                            "--max-concurrency", "16", "--max-queue", "64")


@pytest.fixture(scope="module")
def small_server(tiny_int4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One request at a time (the NPU path, on CPU), one queue place, an API key."""
    yield from start_server(tiny_int4, tmp_path_factory.mktemp("server") / "small.log", "--scheduler", "serial",
                            "--max-queue", "1", "--api-key", KEY)


@pytest.fixture(scope="module")
def engine(tiny_int4: Path) -> Engine:
    """The same model in-process, for the token counts the server must report."""
    return runtime.load(tiny_int4, "CPU", cache_dir=None)


def openai_messages(item: dict[str, Any]) -> list[dict[str, Any]]:
    """An eval item's GLM-4 history in OpenAI's form (tool calls and role tool)."""
    messages = []
    for message in item["messages"]:
        if message["role"] == "assistant" and message.get("metadata"):
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": message["metadata"], "arguments": message["content"]}}]})
        elif message["role"] == "observation":
            messages.append({"role": "tool", "tool_call_id": "call_1", "content": message["content"]})
        else:
            messages.append({"role": message["role"], "content": message["content"]})
    return messages


def ask(client: openai.OpenAI, item: dict[str, Any], **extra: Any) -> Any:
    tools = {"tools": item["tools"]} if item.get("tools") else {}
    extra.setdefault("max_tokens", 48)
    return client.chat.completions.create(model=MODEL, messages=openai_messages(item), **tools, **extra)


def streamed(client: openai.OpenAI, item: dict[str, Any], **extra: Any) -> tuple[str, list[Any]]:
    chunks = list(ask(client, item, stream=True, stream_options={"include_usage": True}, **extra))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def first(kind: str, language: str | None = None) -> dict[str, Any]:
    return next(i for i in ITEMS if i["kind"] == kind and (language is None or
                                                            (language == "zh") != i["expected"].isascii()))


@pytest.mark.parametrize("item", [first("fact_en"), first("fact_zh"), first("system_language"), first("memory"),
                                  first("tool_answer", "zh")], ids=lambda i: i["kind"])
def test_plain_and_streamed_answers_equal_the_eval(server, item) -> None:
    client = server.client()
    reply = ask(client, item)
    assert reply.choices[0].message.content == item["expected"]
    assert reply.choices[0].finish_reason == "stop" and reply.model == MODEL
    text, chunks = streamed(client, item)
    assert text == item["expected"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_usage_counts_match_the_tokenizer_and_the_engine(server, engine) -> None:
    client = server.client()
    call = first("tool_call")
    system = {"role": "system", "content": "Answer briefly."}
    for item, messages in [(first("fact_zh"), None), (call, [system] + call["messages"])]:
        messages = messages or item["messages"]
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=item.get("tools"), max_tokens=48)
        ids = conversation_ids(engine, messages, item.get("tools"))
        generation = engine.generate(ids, GenerationOptions(max_new_tokens=48), lambda _: False)
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.usage.completion_tokens == generation.stats.generated_tokens
        assert reply.usage.total_tokens == len(ids) + generation.stats.generated_tokens
    # the system prompt is kept next to the tools block
    assert len(ids) > len(conversation_ids(engine, call["messages"], call["tools"]))


def test_tool_call_round_trip(server) -> None:
    client = server.client()
    item = first("tool_answer", "en")
    question = [{"role": "user", "content": item["messages"][0]["content"]}]
    reply = client.chat.completions.create(model=MODEL, messages=question, tools=item["tools"], max_tokens=48)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == item["messages"][1]["metadata"]
    assert json.loads(call.function.arguments) == json.loads(item["messages"][1]["content"])

    history = question + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": item["messages"][2]["content"]}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=item["tools"], max_tokens=48)
    assert final.choices[0].message.content == item["expected"] and final.choices[0].finish_reason == "stop"

    chunks = list(client.chat.completions.create(model=MODEL, messages=question, tools=item["tools"], stream=True))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [(call.function.name, call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_named(server, engine) -> None:
    client = server.client()
    item = first("tool_call")
    plain = client.chat.completions.create(model=MODEL, messages=item["messages"], tools=item["tools"],
                                           tool_choice="none", max_tokens=48)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens == len(conversation_ids(engine, item["messages"], None))

    fact = first("fact_en")
    forced = client.chat.completions.create(model=MODEL, messages=fact["messages"], tools=item["tools"],
                                            tool_choice={"type": "function", "function": {"name": "get_time"}},
                                            max_tokens=48)
    (call,) = forced.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_time" and isinstance(arguments.get("city"), str), call


def test_json_schema_response_parses_and_matches(server) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 12}},
              "required": ["capital"], "additionalProperties": False}
    reply = server.client().chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}})
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"capital"} and isinstance(value["capital"], str) and len(value["capital"]) <= 12
    assert reply.choices[0].finish_reason == "stop"

    loose = server.client().chat.completions.create(model=MODEL, messages=QUESTION,
                                                    max_tokens=8, response_format={"type": "json_object"})
    assert loose.choices[0].message.content.startswith("{")


def test_stop_strings_max_tokens_and_seed(server) -> None:
    client = server.client()
    item = first("fact_en")
    word = item["expected"].split()[-1][:4]  # "The capital of Germany is Berlin." -> stop at "Berl"
    reply = client.chat.completions.create(model=MODEL, messages=item["messages"], stop=[word, "zzz"])
    assert reply.choices[0].message.content == item["expected"][:item["expected"].index(word)]
    assert reply.choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=item["messages"], stop=word, stream=True) if c.choices)
    assert text == reply.choices[0].message.content

    short = client.chat.completions.create(model=MODEL, messages=item["messages"], max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3

    full = client.chat.completions.create(model=MODEL, messages=item["messages"], max_tokens=40, **TO_LIMIT)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 40
    assert full.choices[0].message.content.startswith(item["expected"])
    longer = client.chat.completions.create(model=MODEL, messages=item["messages"], max_tokens=40,
                                            extra_body={"min_tokens": 30})
    assert longer.usage.completion_tokens >= 30

    sampled = [client.chat.completions.create(model=MODEL, messages=LONG_QUESTION,
                                              temperature=1.5, top_p=0.9, seed=7, max_tokens=24)
               .choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def stream_client(server: Server, item: dict[str, Any], leave_after: int | None, start: threading.Barrier,
                  results: dict[int, Any], index: int) -> None:
    """One of the load test's clients; a leaver closes its stream after ``leave_after`` content chunks."""
    try:
        client = server.client(timeout=60)
        start.wait(timeout=30)
        limit = {"max_tokens": LEAVER_MAX_TOKENS, **TO_LIMIT} if leave_after else {}
        stream = ask(client, item, stream=True, **limit)
        text, seen = "", 0
        for chunk in stream:
            results[f"id {index}"] = chunk.id
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                seen += 1
                if leave_after and seen == leave_after:
                    stream.close()
                    results[f"closed {index}"] = time.time()
                    break
        results[index] = text
    except Exception as error:  # reported by the test
        results[index] = error


def test_32_concurrent_streams_with_clients_leaving_midway(server, engine) -> None:
    correct = [i for i in ITEMS if i["kind"] in ("fact_en", "fact_zh", "tool_answer", "system_language")
               and run_engine(engine, i) == i["expected"]]
    stayers = (correct * 2)[:24]
    leaver = {"kind": "long", "messages": LONG_QUESTION}
    before, log_start = server.health(), len(server.log_lines())
    start, results = threading.Barrier(32), {}
    plan = [(item, None) for item in stayers] + [(leaver, 3)] * 8
    threads = [threading.Thread(target=stream_client, args=(server, item, leave, start, results, n), daemon=True)
               for n, (item, leave) in enumerate(plan)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(120 - (time.monotonic() - began), 1))
    assert not any(t.is_alive() for t in threads), "clients still running after 120 s"
    print(f"\n32 streams (8 leaving) in {time.monotonic() - began:.1f} s")
    for n, (item, leave) in enumerate(plan):
        assert not isinstance(results[n], Exception), results[n]
        assert results[n] == item["expected"] if leave is None else len(results[n]) > 0, (n, results[n])

    deadline = time.monotonic() + 10
    while (after := server.health())["running"] or after["waiting"] or after["engine_busy"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    # A leaver's outcome is read from the server's log line for its reply id. How many tokens it gets before its
    # client has read 3 chunks depends on how 32 client threads share 2 cores with the server (CI: 1600-2400 of
    # 4000 at times), so a leaver may even finish first: that is allowed when it was logged before the client
    # closed. One still running when its client closed must be cancelled, not run on to max_tokens: here within
    # 0.1 s, once in CI 3.5 s on a loaded machine, so the bound below is for a cancel that never comes early.
    outcomes = {match.group(1): line for line in server.log_lines()[log_start:]
                if (match := re.search(r" (\S+) \w+ prompt=", line))}  # reply id -> its finish line
    leavers = [(outcomes[results[f"id {n}"]], results[f"closed {n}"]) for n, (_, leave) in enumerate(plan) if leave]
    cancelled = [(line, closed) for line, closed in leavers if " cancelled prompt=" in line]
    finished_first = [(line, closed) for line, closed in leavers if " cancelled prompt=" not in line]
    assert cancelled and all(logged_at(line) <= closed + 0.01 for line, closed in finished_first), leavers
    lags = [logged_at(line) - closed for line, closed in cancelled]
    generated = [int(re.search(r"generated=(\d+)", line).group(1)) for line, _ in leavers]
    print(f"tokens generated for the clients that left: {generated} (max_tokens {LEAVER_MAX_TOKENS}); "
          f"{len(cancelled)} cancelled {min(lags) * 1000:.0f} to {max(lags) * 1000:.0f} ms after their clients closed")
    assert max(lags) < 10, leavers
    assert after["requests"] - before["requests"] == 32 and after["errors"] == before["errors"]
    assert after["completed"] - before["completed"] == 24 + len(finished_first)
    assert after["cancelled"] - before["cancelled"] == len(cancelled)
    assert after["tokens_after_cancel"] == 0  # the engine's own count: nothing generated past a cancel
    time.sleep(1)
    assert server.health()["tokens_generated"] == after["tokens_generated"]  # nothing runs in the background
    assert ask(server.client(), first("fact_zh")).choices[0].message.content == first("fact_zh")["expected"]


def test_a_waiting_non_streaming_client_that_leaves_cancels_its_generation(server) -> None:
    before, log_start = server.health(), len(server.log_lines())
    body = json.dumps({"model": MODEL, "messages": LONG_QUESTION, "max_tokens": LEAVER_MAX_TOKENS, "ignore_eos": True})
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    deadline = time.monotonic() + 10  # leaves once it runs: on a fast CPU 0.3 s were a third of the 4000 tokens
    while not server.health()["running"]:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    connection.close()
    closed = time.time()
    deadline = time.monotonic() + 5
    while (after := server.health())["running"] or after["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    assert after["cancelled"] - before["cancelled"] == 1 and after["tokens_after_cancel"] == 0
    (line,) = [line for line in server.log_lines()[log_start:] if " cancelled prompt=" in line]
    assert int(re.search(r"generated=(\d+)", line).group(1)) < LEAVER_MAX_TOKENS, line
    assert logged_at(line) - closed < 3, line  # in time, not tokens: the tiny model's speed varies 3x across CPUs


def run_engine(engine: Engine, item: dict[str, Any]) -> str:
    ids = conversation_ids(engine, item["messages"], item.get("tools"))
    return engine.generate(ids, GenerationOptions(max_new_tokens=48), lambda _: False).text.removeprefix("\n")


def test_queue_limit_answers_429_and_queued_clients_can_leave(small_server) -> None:
    client = small_server.client(KEY)
    running = client.chat.completions.create(model=MODEL, messages=LONG_QUESTION, max_tokens=3500, stream=True,
                                             **TO_LIMIT)
    next(iter(running))
    queued = client.chat.completions.create(model=MODEL, messages=LONG_QUESTION, max_tokens=3500, stream=True,
                                            **TO_LIMIT)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=LONG_QUESTION, max_tokens=10)
    assert refused.value.status_code == 429 and "retry later" in refused.value.body["message"]
    status = small_server.health()
    assert (status["running"], status["waiting"], status["scheduler"]) == (1, 1, "serial")
    queued.close()
    running.close()
    deadline = time.monotonic() + 10
    while (status := small_server.health())["running"] or status["waiting"]:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    assert status["cancelled"] == 2 and status["rejected"] == 1
    reply = client.chat.completions.create(model=MODEL, messages=first("fact_en")["messages"])
    assert reply.choices[0].message.content == first("fact_en")["expected"]


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_api_key_is_required_when_set(small_server, key) -> None:
    request = urllib.request.Request(small_server.url + "/v1/models",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    status, body = fetch(request)
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and "API key" in body["error"]["message"]
    if key:  # the openai client refuses to send no key at all
        with pytest.raises(openai.AuthenticationError):
            small_server.client(key).models.list()
    assert [m.id for m in small_server.client(KEY).models.list()] == [MODEL]


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
BAD = {
    "temperature -1": (400, "temperature", {"temperature": -1}),
    "max_tokens 0": (400, "max_tokens", {"max_tokens": 0}),
    "top_p 2": (400, "top_p", {"top_p": 2}),
    "n 2": (400, "n", {"n": 2}),
    "five stops": (400, "stop", {"stop": ["a", "b", "c", "d", "e"]}),
    "no messages": (400, "messages", {"messages": []}),
    "bad role": (400, "messages[0].role", {"messages": [{"role": "robot", "content": "hi"}]}),
    "image part": (400, "messages[0].content", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    "unknown tool": (400, "tool_choice", {"tools": first("tool_call")["tools"],
                                          "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
    "empty enum": (400, "response_format", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"enum": []}}}}),
    "min above max": (400, "response_format", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}}),
    "min_tokens over max_tokens": (400, "min_tokens", {"min_tokens": 50, "max_tokens": 10}),
    "ignore_eos not a boolean": (400, "ignore_eos", {"ignore_eos": "yes"}),
    "unknown model": (404, "model", {"model": "gpt-4o"}),
    "oversized prompt": (400, "messages", {"messages": [{"role": "user", "content": "首都" * 1500}]}),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_requests_get_4xx_with_a_clear_message(server, case) -> None:
    status, param, change = BAD[case]
    status_got, body = post(server, json.dumps({"model": MODEL, "messages": QUESTION, **change}).encode())
    assert status_got == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert len(error["message"]) > 10 and "Traceback" not in error["message"]
    if case == "oversized prompt":
        assert error["code"] == "context_length_exceeded"


def test_malformed_bodies_and_routes_get_4xx(server) -> None:
    cases = [(post(server, b"{not json"), 400, "invalid_json"),
             (post(server, b"[1, 2]"), 400, None),
             (announce_body(server, 9 * 2**20), 413, "request_too_large"),
             (fetch(urllib.request.Request(server.url + "/v1/nothing")), 404, None),
             (fetch(urllib.request.Request(server.url + "/v1/chat/completions")), 405, None)]
    for (status, body), expected, code in cases:
        assert status == expected and body["error"]["code"] == code and body["error"]["message"], body
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4o", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=-1)
    assert "temperature" in caught.value.body["message"]
    # bad schemas never reached the shared pipeline: it still answers
    assert ask(server.client(), first("fact_en")).choices[0].message.content == first("fact_en")["expected"]
    assert server.health()["errors"] == 0


def test_the_load_benchmark_measures_fixed_length_replies(server) -> None:
    from tests.conftest import run_module

    result = run_module("runtime.server_bench", "--url", server.url, "--concurrency", "1,2", "--requests", "1",
                        "--max-new-tokens", "24", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 streams:" in result.stderr and "2 streams:" in result.stderr
    assert f"{MODEL} at {server.url}, 1 requests per stream, max_tokens 24" in result.stdout
    table = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [(row[0], row[2], row[-1]) for row in table] == [("1", "24", "0"), ("2", "48", "0")]  # every reply 24 tokens
