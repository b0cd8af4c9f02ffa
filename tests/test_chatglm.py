"""The original glm-4-9b-chat's architecture (model_type chatglm, remote code) on the project's twin of glm4-tiny.

The twin answers like glm4-tiny, converts in its own environment (.venv-chatglm: transformers 4.55,
optimum-intel's window for chatglm) and answers through openvino-genai. Its IPEX side (fused ChatGLM
path, weight-only INT8/INT4) runs in the Xeon environment: tests/test_ipex.py and
``tests/test_runtime.py --backend ipex``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from convert.compare import exact_match, load_eval, transformers_replies
from tests.conftest import CHATGLM_PYTHON, ROOT, TINY, run_module
from tests.test_convert import awq_multiplies, genai_accuracy, one_line_error

ITEMS = load_eval(TINY / "eval.jsonl")
CONVERSIONS = {"int4": ("--profile", "cpu"), "int8": ("--weight-format", "int8")}
ALLOWED_DROP = {"int8": 0.005, "int4": 0.02}  # the -hf path's bars (tests/test_convert.py)
needs_chatglm_env = pytest.mark.skipif(not CHATGLM_PYTHON.is_file(), reason="needs .venv-chatglm: make venv-chatglm")


def load(folder: Path, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, trust_remote_code=True,
                                                **overrides).eval()


def test_twin_is_a_chatglm_checkpoint_that_answers_like_glm4_tiny(chatglm_twin, fp32_accuracy) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.evaluate import evaluate

    config = json.loads((chatglm_twin / "config.json").read_text(encoding="utf-8"))
    assert (config["model_type"], config["architectures"], config["kv_channels"]) == ("chatglm", ["ChatGLMModel"], 128)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(chatglm_twin)
    twin = load(chatglm_twin)
    assert type(twin).__name__ == "ChatGLMForConditionalGeneration"
    assert {"transformer.embedding.word_embeddings.weight", "transformer.encoder.layers.0.self_attention.query_key_value.bias",
            "transformer.encoder.layers.3.mlp.dense_h_to_4h.weight", "transformer.encoder.final_layernorm.weight",
            "transformer.output_layer.weight"} <= set(twin.state_dict())
    tiny = AutoModelForCausalLM.from_pretrained(TINY, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    ids = torch.tensor([tokenizer.encode("[gMASK]<sop><|user|>\n法国的首都是哪里？<|assistant|>", add_special_tokens=False)])
    with torch.inference_mode():
        expected, got = tiny(ids).logits, twin(ids).logits
    assert (expected - got).abs().max().item() < 1e-3 * expected.abs().max().item()
    accuracy = evaluate(chatglm_twin, trust_remote_code=True)["accuracy"]
    print(f"glm4-tiny FP32 {fp32_accuracy:.1%}, chatglm twin FP32 {accuracy:.1%}")
    assert accuracy >= fp32_accuracy


def test_twin_is_deterministic_and_bad_input_is_one_line(chatglm_twin, tmp_path) -> None:
    again = tmp_path / "again"
    assert run_module("models.chatglm_twin", "--output", str(again)).returncode == 0
    for name in ("model.safetensors", "config.json", "modeling_chatglm.py", "tokenizer.json"):
        assert (again / name).read_bytes() == (chatglm_twin / name).read_bytes(), name
    not_glm = run_module("models.chatglm_twin", "--source", str(chatglm_twin), "--output", str(tmp_path / "x"))
    assert not_glm.returncode == 2 and "model_type glm" in one_line_error(not_glm)
    taken = run_module("models.chatglm_twin", "--output", str(again))
    assert taken.returncode == 2 and "not empty" in one_line_error(taken)
    narrow = run_module("models.chatglm_twin", "--output", str(tmp_path / "y"), "--head-dim", "16")
    assert narrow.returncode == 2 and "cannot embed" in one_line_error(narrow)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_twin_needs_its_rope_ratio(chatglm_twin) -> None:
    """Its rotary speeds live in rope_ratio (10000; glm-4-9b-chat's is 500): a runtime that ignores the
    ratio, as IPEX's ChatGLM fusions do unless adapted (runtime.ipex_engine.adapt_chatglm), answers wrong."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chatglm_twin)
    items = ITEMS[::4]
    right = exact_match(items, transformers_replies(load(chatglm_twin), tokenizer, items))
    ignored = exact_match(items, transformers_replies(load(chatglm_twin, rope_ratio=1.0), tokenizer, items))
    print(f"rope_ratio 10000: {right:.1%}, rope_ratio ignored: {ignored:.1%}")
    assert ignored < right - 0.2


@pytest.fixture(scope="module")
def twin_irs(chatglm_twin, tmp_path_factory) -> dict[str, Path]:
    """The twin converted by python -m convert in .venv-chatglm, INT4 (cpu profile) and INT8."""
    if not CHATGLM_PYTHON.is_file():
        pytest.skip("needs .venv-chatglm: make venv-chatglm")
    folders = {}
    for name, flags in CONVERSIONS.items():
        folders[name] = tmp_path_factory.mktemp("chatglm-ir") / name
        result = subprocess.run([str(CHATGLM_PYTHON), "-m", "convert", "--model", str(chatglm_twin), "--output",
                                 str(folders[name]), *flags, "--trust-remote-code", "--quiet"], cwd=ROOT,
                                capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900,
                                check=False)
        assert result.returncode == 0, result.stderr[-2000:]
    return folders


@needs_chatglm_env
def test_twin_converts_in_its_environment_and_answers_through_genai(twin_irs, fp32_accuracy) -> None:
    for name, folder in twin_irs.items():
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["source"]["model_type"] == "chatglm" and manifest["versions"]["transformers"] == "4.55.4"
        template = manifest["checks"]["chat_template"]
        assert template["identical"] == template["conversations"] == 13 and template["source"] == "checkpoint"
        verify = manifest["checks"]["verify"]
        assert verify["eval_correct"] >= verify["eval_items"] - 1
        assert (folder / "openvino_tokenizer.xml").is_file() and (folder / "openvino_detokenizer.xml").is_file()
        layers = json.loads((folder / "config.json").read_text(encoding="utf-8"))["num_layers"]
        assert awq_multiplies(folder) == (layers if name == "int4" else 0)  # data-free AWQ finds ChatGLM's MLPs too
        accuracy = genai_accuracy(folder)
        print(f"chatglm twin {name} through openvino-genai: {accuracy:.1%} (FP32 {fp32_accuracy:.1%})")
        assert accuracy >= fp32_accuracy - ALLOWED_DROP[name]
    item = next(i for i in ITEMS if i["kind"] == "fact_zh")
    chat = run_module("runtime.chat", "--model", str(twin_irs["int4"]), stdin=item["messages"][0]["content"] + "\n")
    assert chat.returncode == 0 and chat.stdout.strip() == item["expected"], chat.stderr[-2000:]


def rendered_texts() -> list[str]:
    """Every eval prompt as the template renders it, every expected answer, and some awkward text."""
    from chat_format import ChatTemplate

    template = ChatTemplate.from_folder(TINY)
    return ([template.render(i["messages"], i.get("tools")) for i in ITEMS] + [i["expected"] for i in ITEMS]
            + ["Hello  world\n\n  x", "emoji 😀🎉 and 中文，标点。", "  leading", "tabs\tand\r\nnewlines", "'s 've 4567"])


def test_tiktoken_tokenizer_encodes_as_the_fast_one(chatglm_twin, chatglm_twin_tiktoken) -> None:
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(chatglm_twin)
    tiktoken = AutoTokenizer.from_pretrained(chatglm_twin_tiktoken, trust_remote_code=True)
    assert type(tiktoken).__name__ == "ChatGLM4Tokenizer" and not (chatglm_twin_tiktoken / "tokenizer.json").exists()
    for text in rendered_texts():
        ids = tiktoken.encode(text, add_special_tokens=False)
        assert ids == fast.encode(text, add_special_tokens=False), text
        assert tiktoken.decode(ids) == fast.decode(ids)
    prefix = [tiktoken.convert_tokens_to_ids(token) for token in ("[gMASK]", "<sop>")]
    assert tiktoken.encode("hi")[:2] == prefix  # like the original: [gMASK]<sop> in front


@needs_chatglm_env
def test_tiktoken_tokenizer_converts_through_openvino_tokenizers(chatglm_twin_tiktoken, fp32_accuracy,
                                                                  tmp_path) -> None:
    import openvino_genai
    from transformers import AutoTokenizer

    output = tmp_path / "int4"
    result = subprocess.run([str(CHATGLM_PYTHON), "-m", "convert", "--model", str(chatglm_twin_tiktoken), "--output",
                             str(output), "--profile", "cpu", "--trust-remote-code", "--quiet"], cwd=ROOT,
                            capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    template = json.loads((output / "manifest.json").read_text(encoding="utf-8"))["checks"]["chat_template"]
    assert template["identical"] == template["conversations"] == 13
    fast = AutoTokenizer.from_pretrained(TINY)
    genai = openvino_genai.Tokenizer(str(output))
    for text in rendered_texts()[::7]:
        ids = [int(i) for i in genai.encode(text, add_special_tokens=False).input_ids.data[0]]
        assert ids == fast.encode(text, add_special_tokens=False), text
    accuracy = genai_accuracy(output)
    print(f"chatglm twin with the tiktoken tokenizer, int4, through openvino-genai: {accuracy:.1%}")
    assert accuracy >= fp32_accuracy - ALLOWED_DROP["int4"]


def test_shape_model_writes_the_original_layout(tmp_path) -> None:
    import torch

    output = tmp_path / "shape-chatglm"
    result = run_module("models.shape_model", "--arch", "chatglm", "--layers", "1", "--vocab-size", "2048",
                        "--dtype", "fp32", "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((output / "config.json").read_text(encoding="utf-8"))
    shape = {key: config[key] for key in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
                                          "multi_query_group_num", "rope_ratio", "seq_length", "model_type")}
    assert shape == {"hidden_size": 4096, "ffn_hidden_size": 13696, "num_attention_heads": 32, "kv_channels": 128,
                     "multi_query_group_num": 2, "rope_ratio": 500, "seq_length": 131072, "model_type": "chatglm"}
    model = load(output)
    hidden, ffn, qkv = 4096, 13696, 4096 + 2 * 2 * 128
    layer = hidden * qkv + qkv + hidden * hidden + hidden * 2 * ffn + ffn * hidden + 2 * hidden
    assert sum(p.numel() for p in model.parameters()) == 2 * 2048 * hidden + layer + hidden
    with torch.inference_mode():
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
