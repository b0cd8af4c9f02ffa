"""The runtime's edges on glm4-tiny INT8 (CPU): special-token injection, history trimming, device
configuration and errors, broken model folders, and the terminal chat with Chinese and tools."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openvino as ov
import pytest

import runtime
from models.evaluate import load_eval
from hostcpu import openvino_amx
from runtime.engine import ChatSession, DeviceError, Engine, ModelLoadError, PromptTooLongError, conversation_ids
from runtime.openvino_engine import cpu_precision, device_properties, layout_notes
from tests.conftest import TINY, check_untrusted_text_stays_text, drain, run_module

ITEMS = load_eval(TINY / "eval.jsonl")
TOO_LONG = "首都" * 1500  # 4,500 tokens: more than glm4-tiny's 4,096-token context
WEATHER = next(i for i in ITEMS if i["kind"] == "tool_answer")["tools"]


@pytest.fixture(scope="module")
def engine(tiny_int8: Path) -> Engine:
    return runtime.load(tiny_int8, "CPU", cache_dir=None)


def one_line_error(stderr: str) -> str:
    message = stderr.strip()
    assert message.startswith("error:") and "\n" not in message, stderr[-2000:]
    return message


def test_special_token_strings_in_untrusted_text_stay_ordinary_text(engine) -> None:
    check_untrusted_text_stays_text(engine, WEATHER, lambda text: [
        int(i) for i in engine.tokenizer.encode(text, add_special_tokens=False).input_ids.data[0]])


def answer_in_chinese_session(engine: Engine) -> tuple[ChatSession, dict, list[dict]]:
    """A system prompt asking for Chinese, three English exchanges, and an English question next."""
    item = next(i for i in ITEMS if i["kind"] == "system_language" and not i["expected"].isascii())
    history = []
    for fact in [i for i in ITEMS if i["kind"] == "fact_en"][:3]:
        history += [fact["messages"][0], {"role": "assistant", "content": fact["expected"]}]
    session = ChatSession(engine, system=item["messages"][0]["content"], history=list(history))
    return session, item, history


def test_trimming_keeps_the_system_prompt_and_drops_the_oldest_exchanges(engine, monkeypatch) -> None:
    session, item, history = answer_in_chinese_session(engine)
    question = item["messages"][1]
    full = conversation_ids(engine, session.messages() + [question], None)
    fits = conversation_ids(engine, session.messages()[:1] + history[4:] + [question], None)
    monkeypatch.setattr(engine, "max_prompt_tokens", len(fits))
    answer, end = drain(session.send(question["content"]))
    assert end.stats.prompt_tokens == len(fits) < len(full)
    assert session.history == history[4:] + [question, {"role": "assistant", "content": item["expected"]}]
    assert session.messages()[0] == item["messages"][0]
    assert answer == item["expected"]  # answered in Chinese: the system prompt still reached the model


def test_a_prompt_that_cannot_fit_raises_and_leaves_the_history_alone(engine, monkeypatch) -> None:
    session, item, history = answer_in_chinese_session(engine)
    question = item["messages"][1]
    minimum = conversation_ids(engine, session.messages()[:1] + [question], None)
    monkeypatch.setattr(engine, "max_prompt_tokens", len(minimum) - 1)
    with pytest.raises(PromptTooLongError, match=f"needs {len(minimum)} tokens but the limit is {len(minimum) - 1}"):
        list(session.send(question["content"]))
    assert session.history == history


def test_a_prompt_longer_than_the_context_raises(engine) -> None:
    assert engine.max_prompt_tokens < 4096 < len(engine.encode(TOO_LONG))
    session = ChatSession(engine)
    with pytest.raises(PromptTooLongError):
        list(session.send(TOO_LONG))
    item = next(i for i in ITEMS if i["kind"] == "fact_en")
    assert drain(session.send(item["messages"][0]["content"]))[0] == item["expected"]


def test_npu_configuration(tmp_path) -> None:
    cache = tmp_path / "npu-cache"
    assert device_properties("NPU", cache, max_prompt_len=2048, min_response_len=256) == {
        "CACHE_DIR": str(cache), "MAX_PROMPT_LEN": 2048, "MIN_RESPONSE_LEN": 256,
        "GENERATE_HINT": "BEST_PERF", "PREFILL_HINT": "DYNAMIC"}
    defaults = device_properties("NPU", cache)
    assert (defaults["MAX_PROMPT_LEN"], defaults["MIN_RESPONSE_LEN"]) == (1024, 128)
    assert device_properties("CPU", cache, threads=2) == {"CACHE_DIR": str(cache), "INFERENCE_NUM_THREADS": 2}


@pytest.mark.parametrize(("device", "groups", "activation_group"), [
    ("CPU", {-1}, 128), ("CPU", {-1, 128}, 128), ("CPU", {256}, 128), ("CPU", {32}, None), ("CPU", {-1, 32}, None),
    ("CPU", {64}, 64), ("CPU", {-1, 64}, 64), ("CPU", {64, 128}, 64), ("CPU", {96}, None), ("CPU", {16}, None),
    ("CPU", set(), None), ("GPU", {-1}, None), ("NPU", {-1}, None)])
def test_the_activation_group_follows_the_int4_weight_layout_on_cpu(device, groups, activation_group) -> None:
    properties = device_properties(device, None, int4_groups=groups)
    assert properties.get("DYNAMIC_QUANTIZATION_GROUP_SIZE") == activation_group


@pytest.mark.parametrize(("groups", "amx", "precision"), [
    ({-1}, True, "f32"), ({128}, True, "f32"), ({-1, 256}, True, "f32"), ({64}, True, "f32"), ({32}, True, "f32"),
    ({-1, 32}, True, "f32"), (set(), True, None), ({-1}, False, None), ({32}, False, None)])
def test_amx_cpus_compute_int4_weights_in_f32(groups, amx, precision, monkeypatch) -> None:
    """With AMX the plugin's bf16 path quantizes no activations; f32 brings back int8 activations, which decode
    every 4-bit layout faster there (docs/benchmarks.md, "Intel Xeon with AMX")."""
    assert cpu_precision(groups, amx) == precision
    with monkeypatch.context() as patch:  # the flags decide, unless OV_CPU_MAX_ISA caps the plugin below AMX
        patch.delenv("OV_CPU_MAX_ISA", raising=False)
        assert openvino_amx({"avx512f", "amx_bf16"}) and not openvino_amx({"avx512f", "avx512_bf16"})
        patch.setenv("OV_CPU_MAX_ISA", "AVX2")
        assert not openvino_amx({"avx512f", "amx_bf16"})
    properties = device_properties("CPU", None, int4_groups=groups)
    assert properties.get("INFERENCE_PRECISION_HINT") == cpu_precision(groups, openvino_amx())
    assert "INFERENCE_PRECISION_HINT" not in device_properties("GPU", None, int4_groups=groups)
    # group-32 weights decode about half as fast as group-128 ones on AMX: the engine says so there, nowhere else
    assert bool(layout_notes("CPU", groups, amx)) == (amx and any(0 < size < 64 for size in groups))
    assert layout_notes("GPU", groups, amx) == []


def test_ov_config_is_a_chat_option_and_a_bad_one_a_one_line_error(tiny_int8) -> None:
    item = next(i for i in ITEMS if i["kind"] == "fact_en")
    result = run_module("runtime.chat", "--model", str(tiny_int8), "--ov-config", "INFERENCE_PRECISION_HINT=f32",
                        "DYNAMIC_QUANTIZATION_GROUP_SIZE=64", stdin=item["messages"][0]["content"] + "\n")
    assert result.returncode == 0 and result.stdout == item["expected"] + "\n", result.stderr[-2000:]
    for bad, message in ((["NO_SUCH_SETTING=1"], "cannot load"), (["THREADS"], "--ov-config takes KEY=VALUE pairs")):
        result = run_module("runtime.chat", "--model", str(tiny_int8), "--ov-config", *bad, stdin="Hi\n")
        assert result.returncode == 2 and message in one_line_error(result.stderr)


@pytest.mark.parametrize("device", ["NPU", "GPU", "GPU.1"])
def test_an_absent_device_is_a_device_error_listing_what_is_there(tiny_int8, device) -> None:
    available = ov.Core().available_devices
    if device in available or (device == device.split(".")[0] and any(d.startswith(device) for d in available)):
        pytest.skip(f"{device} is present here")
    with pytest.raises(DeviceError, match=f"available: {', '.join(available)}"):
        runtime.load(tiny_int8, device, cache_dir=None)


def test_an_unknown_device_is_a_device_error(tiny_int8) -> None:
    with pytest.raises(DeviceError, match="unknown device 'TPU'"):
        runtime.load(tiny_int8, "TPU", cache_dir=None)


def broken_copy(source: Path, tmp_path: Path, case: str) -> Path:
    folder = tmp_path / case
    if case == "missing":
        return folder
    shutil.copytree(source, folder)
    if case == "no_tokenizer_ir":
        (folder / "openvino_tokenizer.xml").unlink()
    elif case == "corrupt_xml":
        xml = folder / "openvino_model.xml"
        xml.write_bytes(xml.read_bytes()[: xml.stat().st_size // 2])
    elif case == "truncated_bin":
        weights = folder / "openvino_model.bin"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


BAD_FOLDERS = {"missing": "does not exist", "no_tokenizer_ir": "missing openvino_tokenizer.xml",
               "corrupt_xml": "openvino_model.xml is not a readable OpenVINO IR",
               "truncated_bin": "openvino_model.bin is truncated"}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_broken_model_folder_is_a_typed_error_and_a_one_line_chat_error(tiny_int8, tmp_path, case) -> None:
    folder = broken_copy(tiny_int8, tmp_path, case)
    with pytest.raises(ModelLoadError, match=BAD_FOLDERS[case]):
        runtime.load(folder, cache_dir=None)
    result = run_module("runtime.chat", "--model", str(folder), stdin="What is the capital of France?\n")
    assert result.returncode == 2 and result.stdout == ""
    assert BAD_FOLDERS[case] in one_line_error(result.stderr)


def test_chat_on_an_absent_device_is_a_one_line_error(tiny_int8) -> None:
    if "NPU" in ov.Core().available_devices:
        pytest.skip("NPU is present here")
    result = run_module("runtime.chat", "--model", str(tiny_int8), "--device", "NPU", stdin="Hi\n")
    assert result.returncode == 2 and "device NPU is not present" in one_line_error(result.stderr)


def test_piped_chat_answers_in_chinese(tiny_int8) -> None:
    item = next(i for i in ITEMS if i["kind"] == "fact_zh")
    result = run_module("runtime.chat", "--model", str(tiny_int8), stdin=item["messages"][0]["content"] + "\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == item["expected"] + "\n"


def test_piped_chat_tool_call_round_trip(tiny_int8, tmp_path) -> None:
    item = next(i for i in ITEMS if i["kind"] == "tool_answer" and not i["expected"].isascii())
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(item["tools"], ensure_ascii=False), encoding="utf-8")
    user, call, observation = item["messages"]
    result = run_module("runtime.chat", "--model", str(tiny_int8), "--tools", str(tools),
                        stdin=f"{user['content']}\n{observation['content']}\n")
    assert result.returncode == 0, result.stderr[-2000:]
    arguments = json.dumps(json.loads(call["content"]), ensure_ascii=False)
    assert result.stdout.splitlines() == [f"tool_call {call['metadata']} {arguments}", item["expected"]]


def test_piped_chat_reports_a_too_long_line_and_goes_on(tiny_int8) -> None:
    item = next(i for i in ITEMS if i["kind"] == "fact_en")
    result = run_module("runtime.chat", "--model", str(tiny_int8),
                        stdin=f"{TOO_LONG}\n{item['messages'][0]['content']}\n")
    assert result.returncode == 1
    assert "the prompt needs" in one_line_error(result.stderr)
    assert result.stdout.splitlines() == ["", item["expected"]]


@pytest.mark.parametrize("encoding", ["cp1252", "gbk"])
def test_piped_chinese_survives_a_non_utf8_locale(tiny_int8: Path, encoding: str) -> None:
    """What Windows does to pipes (the ANSI code page), imitated: Chinese in (UTF-8 or the code page), UTF-8 out."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    item = next(i for i in ITEMS if i["kind"] == "fact_zh")
    question = item["messages"][0]["content"]
    environment = {**os.environ, "PYTHONIOENCODING": encoding, "PYTHONUTF8": "0"}
    sent = ("\ufeff" + question).encode("utf-8") if encoding == "cp1252" else question.encode(encoding)
    result = subprocess.run([sys.executable, "-m", "runtime.chat", "--model", str(tiny_int8)], cwd=ROOT,
                            input=sent + b"\n", capture_output=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-2000:]
    assert result.stdout.decode("utf-8").strip() == item["expected"]


def test_a_model_cache_that_cannot_be_used_is_left_out_with_a_note(tiny_int8: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    from runtime.openvino_engine import default_cache_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    item = next(i for i in ITEMS if i["kind"] == "fact_en")
    result = run_module("runtime.chat", "--model", str(tiny_int8), "--cache-dir", str(blocker / "cache"),
                        stdin=item["messages"][0]["content"] + "\n")
    assert result.returncode == 0 and result.stdout.strip() == item["expected"], result.stderr[-2000:]
    assert result.stderr.startswith("note: loading with the model cache in") and "loaded without it" in result.stderr
    monkeypatch.setenv("GLM4_INTEL_CACHE_DIR", "")
    assert default_cache_dir() is None
    monkeypatch.setenv("GLM4_INTEL_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"


def test_prompt_lookup_keeps_every_greedy_reply_and_accepts_drafts(engine, tiny_int8: Path) -> None:
    from runtime.engine import GenerationOptions, PromptLookup

    lookup = runtime.load(tiny_int8, "CPU", cache_dir=None, prompt_lookup=PromptLookup(5, 3))
    options = GenerationOptions(max_new_tokens=48)
    steps = []
    for item in ITEMS:
        ids = conversation_ids(engine, item["messages"], item.get("tools"))
        plain, drafted = (e.generate(ids, options, lambda _: False) for e in (engine, lookup))
        assert drafted.text == plain.text, item
        assert drafted.stats.generated_tokens == plain.stats.generated_tokens and plain.stats.tokens_per_step == 1
        steps.append(drafted.stats.tokens_per_step)
    print(f"\nprompt lookup: {sum(steps) / len(steps):.2f} tokens per step over {len(steps)} eval replies")
    assert sum(steps) / len(steps) > 1.05  # templated answers repeat what the prompt holds
    with pytest.raises(DeviceError, match="not on the NPU"):
        runtime.load(tiny_int8, "NPU", prompt_lookup=PromptLookup())
    chat = run_module("runtime.chat", "--model", str(tiny_int8), "--prompt-lookup", "--stats",
                      stdin=ITEMS[0]["messages"][0]["content"] + "\n")
    assert chat.returncode == 0 and "tokens/s" in chat.stdout, chat.stderr[-2000:]
    refused = run_module("runtime.chat", "--model", str(tiny_int8), "--prompt-lookup", "--num-assistant-tokens", "0",
                         stdin="Hi\n")
    assert refused.returncode == 2 and one_line_error(refused.stderr).endswith("max_ngram_size >= 1")


def test_the_server_with_prompt_lookup_gives_the_greedy_replies(engine, tiny_int8: Path, tmp_path: Path) -> None:
    from chat_format import parse_reply
    from runtime.engine import GenerationOptions
    from tests.server_process import start_server

    servers = start_server(tiny_int8, tmp_path / "server.log", "--prompt-lookup", "--max-concurrency", "2")
    server = next(servers)
    try:
        for item in [i for i in ITEMS if i["kind"] in ("fact_en", "fact_zh", "memory", "follow_up")][::10]:
            reply = server.client().chat.completions.create(model=tiny_int8.name, messages=item["messages"],
                                                            max_tokens=48)
            ids = conversation_ids(engine, item["messages"], None)
            plain = engine.generate(ids, GenerationOptions(max_new_tokens=48), lambda _: False)
            assert reply.choices[0].message.content == parse_reply(plain.text).text
            assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), plain.stats.generated_tokens)
    finally:
        servers.close()


def test_memory_options_reach_the_server(tiny_int8: Path, tmp_path: Path) -> None:
    import openai

    from tests.server_process import start_server

    servers = start_server(tiny_int8, tmp_path / "server.log", "--max-context", "600", "--prefill-chunk", "64",
                           "--kv-cache-precision", "u8")
    server = next(servers)
    try:
        item = next(i for i in ITEMS if i["kind"] == "fact_zh")
        reply = server.client().chat.completions.create(model=tiny_int8.name, messages=item["messages"],
                                                        max_tokens=32)
        assert reply.choices[0].message.content == item["expected"]
        too_long = [{"role": "user", "content": "首都" * 300}]  # about 900 tokens, over the 600 allowed
        with pytest.raises(openai.BadRequestError) as refused:
            server.client().chat.completions.create(model=tiny_int8.name, messages=too_long, max_tokens=8)
        assert refused.value.code == "context_length_exceeded" and "at most 472" in refused.value.message
    finally:
        servers.close()
