"""The IPEX engine (runtime/ipex_engine.py) on glm4-tiny's checkpoint, in the Xeon environment.

Run with ``make test-xeon``. Where torch 2.8 + IPEX 2.8 are missing (the main .venv) the tests that
need them are skipped, and the one-line refusal is tested instead. The shared runtime tests run
on this engine with ``pytest tests/test_runtime.py --backend ipex``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from models.evaluate import load_eval
from chat_format import STOP_TOKENS
from hostcpu import onednn_cpu_flags
from runtime.engine import (ChatSession, DeviceError, GenerationOptions, ModelLoadError, PromptTooLongError,
                            conversation_ids)
from runtime.ipex_engine import IPEXEngine, IPEXUnavailableError, check_environment, pick_dtype
from tests.conftest import ROOT, TINY, check_untrusted_text_stays_text

ITEMS = load_eval(TINY / "eval.jsonl")
LONG_PROMPT = "首都首都首都首都首都"  # off the task suite: an answer of any length


def ipex_problem() -> str | None:
    """Why this environment cannot run IPEX, or None."""
    try:
        check_environment(onednn_cpu_flags())
    except IPEXUnavailableError as error:
        return str(error)
    return None


PROBLEM = ipex_problem()
needs_ipex = pytest.mark.skipif(PROBLEM is not None, reason=f"needs the Xeon environment: {PROBLEM}")


def one_line_error(stderr: str) -> str:
    message = stderr.strip()
    assert message.startswith("error:") and "\n" not in message, stderr[-2000:]
    return message


def test_dtype_follows_the_cpu() -> None:
    sapphire_rapids, avx512_bf16, avx2_only = {"avx2", "avx512f", "amx_bf16"}, {"avx2", "avx512_bf16"}, {"avx2"}
    assert pick_dtype("auto", sapphire_rapids) == pick_dtype("auto", avx512_bf16) == "bf16"
    assert pick_dtype("auto", avx2_only) == "fp32" and pick_dtype("fp32", sapphire_rapids) == "fp32"
    assert pick_dtype("auto", set()) == "fp32"  # flags unknown (not Linux): the safe choice
    with pytest.raises(IPEXUnavailableError, match="neither AVX-512 BF16 nor AMX.*--dtype fp32"):
        pick_dtype("bf16", avx2_only)
    with pytest.raises(ValueError):
        pick_dtype("fp16", sapphire_rapids)


def test_a_python_without_ipex_gets_one_line_and_exit_code_2() -> None:
    python = sys.executable if PROBLEM else str(ROOT / ".venv" / "bin" / "python")
    if not Path(python).is_file():
        pytest.skip("no interpreter without IPEX here (the main .venv is missing)")
    result = subprocess.run([python, "-m", "runtime.chat", "--model", "models/glm4-tiny", "--backend", "ipex"],
                            cwd=ROOT, input="Hello\n", capture_output=True, text=True, encoding="utf-8", timeout=300,
                            check=False)
    assert result.returncode == 2 and result.stdout == ""
    message = one_line_error(result.stderr)
    assert "torch 2.8" in message and "make venv-xeon" in message and ".venv-xeon/bin/python" in message


def test_bad_model_folders_and_arguments_are_typed_errors(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        IPEXEngine(tmp_path / "missing")
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "openvino_model.xml").write_text("<net/>")
    with pytest.raises(ModelLoadError, match="converted OpenVINO model: use --backend openvino"):
        IPEXEngine(converted)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(TINY / "config.json", no_weights)
    with pytest.raises(ModelLoadError, match="holds no weights"):
        IPEXEngine(no_weights)
    with pytest.raises(DeviceError, match="CPU only"):
        IPEXEngine(TINY, device="GPU")
    with pytest.raises(ValueError, match="quantize"):
        IPEXEngine(TINY, quantize="int3")


@pytest.fixture(scope="module")
def engine() -> IPEXEngine:
    return IPEXEngine(TINY, dtype="fp32")


@pytest.fixture(scope="module")
def plain() -> Any:
    """glm4-tiny in plain transformers, FP32, not optimized: the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY, torch_dtype=torch.float32).eval()


def greedy_tokens(model: Any, engine: IPEXEngine, ids: list[int], max_new_tokens: int = 48) -> list[int]:
    import torch

    input_ids = torch.tensor([ids])
    config = engine.generation_config(GenerationOptions(max_new_tokens=max_new_tokens), len(ids))
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                             use_model_defaults=False)
    return out[0, len(ids):].tolist()


def collect(chunks: list[str]) -> Any:
    """An on_text callback that keeps every chunk and never cancels."""

    def on_text(chunk: str) -> bool:
        chunks.append(chunk)
        return False

    return on_text


@needs_ipex
def test_greedy_replies_equal_plain_transformers_token_for_token(engine, plain) -> None:
    stops = {engine.token_id(token): token for token in STOP_TOKENS}
    endings = set()
    for item in ITEMS:
        ids = conversation_ids(engine, item["messages"], item.get("tools"))
        expected = greedy_tokens(plain, engine, ids)
        assert greedy_tokens(engine.model, engine, ids) == expected, item
        chunks: list[str] = []
        generation = engine.generate(ids, GenerationOptions(max_new_tokens=48), collect(chunks))
        assert generation.text == engine.tokenizer.decode(expected, skip_special_tokens=True)
        assert "".join(chunks) == generation.text and "\ufffd" not in generation.text
        stats = generation.stats
        assert (stats.generated_tokens, stats.prompt_tokens) == (len(expected), len(ids))
        assert stats.finish_reason == ("stop" if expected[-1] in stops else "length")
        assert stats.ttft_s > 0 and (stats.tokens_per_s > 0 or len(expected) == 1)
        endings.add(stops.get(expected[-1]))
    assert {"<|user|>", "<|observation|>"} <= endings  # answers end a turn, tool calls end with an observation


@needs_ipex
def test_glm4_0414_architecture_matches_plain_transformers(tmp_path) -> None:
    import torch
    from transformers import Glm4Config, Glm4ForCausalLM

    torch.manual_seed(0)
    config = Glm4Config(vocab_size=1536, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                        eos_token_id=[0, 7, 9], pad_token_id=0, architectures=["Glm4ForCausalLM"])
    Glm4ForCausalLM(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TINY / name, tmp_path)
    engine = IPEXEngine(tmp_path, dtype="fp32")
    plain = Glm4ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    for item in ITEMS[:5]:
        ids = conversation_ids(engine, item["messages"], item.get("tools"))
        assert greedy_tokens(engine.model, engine, ids, 16) == greedy_tokens(plain, engine, ids, 16)


@needs_ipex
@pytest.mark.parametrize("template", ["glm-4-9b-chat-hf", "glm-4-0414"])
def test_prompts_follow_the_checkpoint_template(tmp_path, template) -> None:
    from transformers import AutoTokenizer

    from chat_format.conversations import CONVERSATIONS

    shutil.copytree(TINY, tmp_path / "model")
    shutil.copy(TINY.parent / "templates" / f"{template}.jinja", tmp_path / "model" / "chat_template.jinja")
    engine = IPEXEngine(tmp_path / "model", dtype="fp32")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    for name, messages, tools in CONVERSATIONS:
        items, top = engine.template.template_input(messages, tools)
        expected = tokenizer.apply_chat_template(items, tools=top, tokenize=True, add_generation_prompt=True)
        assert conversation_ids(engine, messages, tools) == list(expected), name
    assert answers(engine, "fact_en")


@needs_ipex
def test_cancel_stops_generation_at_the_step_it_is_asked_for(engine) -> None:
    ids = conversation_ids(engine, [{"role": "user", "content": LONG_PROMPT}], None)
    chunks: list[str] = []

    def on_text(chunk: str) -> bool:
        chunks.append(chunk)
        return len(chunks) == 2

    generation = engine.generate(ids, GenerationOptions(max_new_tokens=200, ignore_eos=True), on_text)
    assert len(chunks) == 2 and generation.stats.generated_tokens == 2
    assert generation.text == "".join(chunks)


@needs_ipex
def test_sampling_is_seeded_and_top_k_1_is_greedy(engine) -> None:
    ids = conversation_ids(engine, [{"role": "user", "content": LONG_PROMPT}], None)

    def reply(options: GenerationOptions) -> str:
        return engine.generate(ids, options, lambda chunk: False).text

    greedy = reply(GenerationOptions(max_new_tokens=32))
    assert reply(GenerationOptions(max_new_tokens=32, temperature=1.5, top_k=1, seed=1)) == greedy
    hot = GenerationOptions(max_new_tokens=32, temperature=1.5, top_p=0.95, seed=7)
    assert reply(hot) == reply(hot)


@needs_ipex
def test_special_token_strings_in_untrusted_text_stay_ordinary_text(engine) -> None:
    weather = next(i for i in ITEMS if i["kind"] == "tool_answer")["tools"]
    check_untrusted_text_stays_text(engine, weather,
                                    lambda text: engine.tokenizer.encode(text, add_special_tokens=False))


@needs_ipex
def test_prompt_budget_comes_from_the_checkpoint(engine) -> None:
    context = json.loads((TINY / "config.json").read_text(encoding="utf-8"))["max_position_embeddings"]
    assert engine.max_prompt_tokens == context - 128
    with pytest.raises(PromptTooLongError):
        list(ChatSession(engine).send("首都" * 1500))  # 4,500 tokens


@needs_ipex
def test_auto_dtype_and_quantize_fallback_note_through_the_chat_cli() -> None:
    item = next(i for i in ITEMS if i["kind"] == "fact_zh")
    result = subprocess.run([sys.executable, "-m", "runtime.chat", "--model", str(TINY), "--backend", "ipex",
                             "--quantize", "int8", "--stats"], cwd=ROOT, input=item["messages"][0]["content"] + "\n",
                            capture_output=True, text=True, encoding="utf-8", timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    answer, stats = result.stdout.splitlines()
    assert answer == item["expected"] and stats.startswith("[stop; prompt ")
    dtype = pick_dtype("auto", onednn_cpu_flags())
    assert result.stderr.strip() == (f"note: IPEX has no weight-only int8 for GlmForCausalLM (it quantizes only the "
                                     f"architectures it knows); running {dtype} weights instead")


@needs_ipex
def test_benchmark_measures_the_ipex_backend(tmp_path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "runtime.bench", "--model", f"ipex-fp32:{TINY}", "--ipex-python",
                             sys.executable, "--prompt-lengths", "16", "--max-new-tokens", "8", "--runs", "1", "--threads",
                             "2", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(out.read_text(encoding="utf-8"))
    assert (row["runner"], row["model"], row["prompt_tokens"], row["new_tokens"]) == ("ipex-fp32", "glm4-tiny", 16, 8)
    assert row["decode_tokens_per_s"] > 0 and row["ttft_s"] > 0 and row["load_cold_s"] > 0
    assert 1e6 < row["weight_bytes_per_token"] < 1e8 and 2**20 < row["peak_rss_bytes"] < 2**34
    assert "ipex-fp32" in result.stdout


def answers(engine: IPEXEngine, kind: str) -> bool:
    """Whether the engine gives the expected answer to the first eval item of ``kind``."""
    item = next(i for i in ITEMS if i["kind"] == kind)
    reply = engine.generate(conversation_ids(engine, item["messages"], None), GenerationOptions(max_new_tokens=48),
                            lambda chunk: False)
    return reply.text.removeprefix("\n") == item["expected"]


@pytest.fixture(scope="module")
def twin_plain(chatglm_twin: Path) -> Any:
    """The chatglm twin in plain PyTorch (its own remote code), FP32: the reference of the fused path."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(chatglm_twin, torch_dtype=torch.float32, trust_remote_code=True).eval()


@needs_ipex
def test_chatglm_twin_runs_ipex_fused_path_token_for_token(chatglm_twin, twin_plain) -> None:
    engine = IPEXEngine(chatglm_twin, dtype="fp32", trust_remote_code=True)
    assert engine.notes == [] and engine.quantization is None
    fused = {type(m).__name__ for m in engine.model.modules()}
    assert {"_IPEXAttentionCPU", "_IPEXDecoderLayerCPU"} <= fused, fused
    for item in ITEMS[::4]:
        ids = conversation_ids(engine, item["messages"], item.get("tools"))
        assert greedy_tokens(engine.model, engine, ids) == greedy_tokens(twin_plain, engine, ids), item


@needs_ipex
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_chatglm_twin_gets_weight_only_quantization(chatglm_twin, quantize) -> None:
    engine = IPEXEngine(chatglm_twin, quantize=quantize, trust_remote_code=True)
    assert engine.quantization == quantize and engine.notes == []
    layers = json.loads((chatglm_twin / "config.json").read_text(encoding="utf-8"))["num_layers"]
    quantized = sum(type(m).__name__ == "WeightOnlyQuantizedLinear" for m in engine.model.modules())
    assert quantized == 5 * layers + 1  # q/k/v, dense, gate, up, down in each layer, and the output layer
    assert answers(engine, "fact_en")


@needs_ipex
def test_a_quantization_ipex_cannot_apply_falls_back_in_one_note(chatglm_twin, monkeypatch) -> None:
    import runtime.ipex_engine as ipex_engine

    def unavailable(*args: Any) -> Any:
        raise RuntimeError("no weight-only kernel for this CPU\nmore detail")

    monkeypatch.setattr(ipex_engine, "quantization_config", unavailable)
    engine = IPEXEngine(chatglm_twin, dtype="fp32", quantize="int4", trust_remote_code=True)
    assert engine.quantization is None
    assert engine.notes == ["ipex.llm.optimize failed on ChatGLMModel: no weight-only kernel for this CPU; running "
                            "fp32 weights instead of weight-only int4"]
    assert answers(engine, "fact_en")


@needs_ipex
def test_chatglm_twin_with_its_tiktoken_tokenizer(chatglm_twin, chatglm_twin_tiktoken) -> None:
    from chat_format.conversations import CONVERSATIONS

    engine = IPEXEngine(chatglm_twin_tiktoken, quantize="int8", trust_remote_code=True)
    reference = IPEXEngine(chatglm_twin, dtype="fp32", trust_remote_code=True)
    assert type(engine.tokenizer).__name__ == "ChatGLM4Tokenizer"
    for name, messages, tools in CONVERSATIONS:
        assert conversation_ids(engine, messages, tools) == conversation_ids(reference, messages, tools), name
    assert answers(engine, "fact_zh")


@needs_ipex
def test_int8_in_fp32_is_computed_where_ipex_answers_right(chatglm_twin, twin_plain) -> None:
    """IPEX 2.8's INT8 weight-only kernels answer wrong in fp32 at the AVX512_FP16 level: bf16 there, with a note."""
    from runtime.ipex_engine import import_ipex

    engine = IPEXEngine(chatglm_twin, dtype="fp32", quantize="int8", trust_remote_code=True)
    fp16_level = import_ipex()._C._get_current_isa_level() == "AVX512_FP16"
    assert engine.quantization == "int8" and bool(engine.notes) == fp16_level, engine.notes
    items = ITEMS[::6]
    right = sum(engine.generate(conversation_ids(engine, i["messages"], i.get("tools")),
                                GenerationOptions(max_new_tokens=48), lambda chunk: False).text.removeprefix("\n")
                == i["expected"] for i in items)
    plain = sum(engine.tokenizer.decode(greedy_tokens(twin_plain, engine, conversation_ids(engine, i["messages"],
                                                                                           i.get("tools"))),
                                        skip_special_tokens=True).removeprefix("\n") == i["expected"] for i in items)
    assert right >= plain - 1, (right, plain)
