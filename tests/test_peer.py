"""The benchmark's peer: our GGUF writer (python -m models.gguf_export) read back by the gguf package and run by
the real llama.cpp (make peer), which must answer glm4-tiny's eval as our runtime does; runtime.bench with
--peer-gguf measuring both in one run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from chat_format import ChatTemplate
from convert.compare import exact_match, load_eval
from runtime.peer import DEFAULT_LLAMA_BENCH
from tests.conftest import TINY, run_module

PEER_BIN = DEFAULT_LLAMA_BENCH.parent
needs_peer = pytest.mark.skipif(not DEFAULT_LLAMA_BENCH.is_file(), reason="needs llama.cpp's tools (make peer)")


def export(tmp_path: Path, outtype: str, model: Path = TINY) -> Path:
    output = tmp_path / f"{model.name}-{outtype}.gguf"
    result = run_module("models.gguf_export", "--model", str(model), "--output", str(output), "--outtype", outtype,
                        "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    return output


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(tmp_path_factory.mktemp("gguf"), "f32")


def test_the_gguf_holds_glm4_tiny(tiny_gguf: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from models.tokenizer import stop_token_ids

    reader = GGUFReader(tiny_gguf)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    config = json.loads((TINY / "config.json").read_text(encoding="utf-8"))
    assert fields["general.architecture"] == "chatglm" and fields["chatglm.block_count"] == config["num_hidden_layers"]
    assert fields["chatglm.rope.dimension_count"] == config["head_dim"] // 2  # rotary on half of each head
    assert fields["chatglm.attention.head_count_kv"] == config["num_key_value_heads"]
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    stops = stop_token_ids(tokenizer)
    assert [fields[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom")] == stops
    assert fields["tokenizer.ggml.tokens"][:len(tokenizer)] == [tokenizer.convert_ids_to_tokens(i)
                                                                for i in range(len(tokenizer))]
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 7 * config["num_hidden_layers"]  # q/k/v fused with their bias, gate+up fused
    qkv = tensors["blk.0.attn_qkv.weight"]
    heads = config["num_attention_heads"] + 2 * config["num_key_value_heads"]
    assert list(qkv.shape) == [config["hidden_size"], heads * config["head_dim"]]  # GGML lists the inner dim first
    from safetensors.torch import load_file

    state = load_file(TINY / "model.safetensors")
    q_rows, kv_rows = (config[k] * config["head_dim"] for k in ("num_attention_heads", "num_key_value_heads"))
    layer = "model.layers.0.self_attn."
    assert (qkv.data[:q_rows] == state[layer + "q_proj.weight"].numpy()).all()  # q, k, v stacked as they are
    assert (qkv.data[q_rows + kv_rows:] == state[layer + "v_proj.weight"].numpy()).all()


def test_quantized_files_are_smaller_and_bad_input_is_one_line(tmp_path: Path, tiny_gguf: Path) -> None:
    q8, q4 = export(tmp_path, "q8_0"), export(tmp_path, "q4_0")
    assert q4.stat().st_size < q8.stat().st_size < tiny_gguf.stat().st_size
    before = q8.read_bytes()
    again = run_module("models.gguf_export", "--model", str(TINY), "--output", str(q8), "--quiet")
    assert again.returncode == 2 and "exists" in again.stderr and q8.read_bytes() == before  # never replaced silently
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    (tmp_path / "llama" / "model.safetensors").write_bytes(TINY.joinpath("model.safetensors").read_bytes())
    for model in (tmp_path / "llama", tmp_path / "missing"):
        bad = run_module("models.gguf_export", "--model", str(model), "--output", str(tmp_path / "bad.gguf"))
        assert bad.returncode == 2 and bad.stderr.startswith("error:") and "\n" not in bad.stderr.strip()
    assert not list(tmp_path.glob("*bad.gguf*"))  # no partial file left behind


def llama_simple(gguf: Path, prompt: str) -> str:
    """llama.cpp's greedy reply to ``prompt`` (special tokens written as text are parsed), from its llama-simple,
    which prints the prompt's pieces and then the reply, each flushed as it goes."""
    result = subprocess.run([str(PEER_BIN / "llama-simple"), "-m", str(gguf), "-n", "48", prompt], capture_output=True,
                            text=True, encoding="utf-8", errors="replace", timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(prompt), result.stderr[-2000:]
    return result.stdout[len(prompt):].removesuffix("\n")


def llama_cpp_accuracy(gguf: Path, template_source: Path) -> float:
    from transformers import AutoTokenizer

    template = ChatTemplate.from_tokenizer(AutoTokenizer.from_pretrained(template_source))
    items = load_eval(TINY / "eval.jsonl")
    return exact_match(items, [llama_simple(gguf, template.render(i["messages"], i.get("tools"))) for i in items])


@needs_peer
def test_llama_cpp_answers_the_eval_from_our_gguf(tiny_gguf: Path, fp32_accuracy: float) -> None:
    accuracy = llama_cpp_accuracy(tiny_gguf, TINY)
    print(f"llama.cpp on our GGUF of glm4-tiny: {accuracy:.1%} of the eval (FP32 transformers: {fp32_accuracy:.1%})")
    assert accuracy >= fp32_accuracy - 0.02  # measured: equal (97.5%, 240 items, AMD EPYC)


@needs_peer
def test_llama_cpp_answers_from_the_chatglm_layout(tmp_path: Path, fp32_accuracy: float) -> None:
    """The original glm-4-9b-chat's layout (fused q/k/v, ``transformer.*`` names, rope_ratio) written as GGUF. The
    twin keeps glm4-tiny's 32-wide heads: llama.cpp's chatglm needs heads x head width = hidden, as GLM-4-9B has."""
    made = run_module("models.chatglm_twin", "--output", str(tmp_path / "twin"), "--head-dim", "32")
    assert made.returncode == 0, made.stderr[-2000:]
    accuracy = llama_cpp_accuracy(export(tmp_path, "q8_0", tmp_path / "twin"), TINY)
    print(f"llama.cpp on our Q8_0 GGUF of the chatglm twin: {accuracy:.1%} (FP32 transformers: {fp32_accuracy:.1%})")
    assert accuracy >= fp32_accuracy - 0.02
    wide = run_module("models.chatglm_twin", "--output", str(tmp_path / "wide"))  # 128-wide heads in hidden 192
    assert wide.returncode == 0, wide.stderr[-2000:]
    refused = run_module("models.gguf_export", "--model", str(tmp_path / "wide"), "--output", str(tmp_path / "w.gguf"))
    assert refused.returncode == 2 and "heads x head width" in refused.stderr and not (tmp_path / "w.gguf").exists()


@needs_peer
def test_bench_measures_the_peer_in_the_same_run(tiny_gguf: Path, tiny_int4: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_module("runtime.bench", "--model", str(tiny_int4), "--peer-gguf", str(tiny_gguf), "--prompt-lengths",
                        "16,48", "--max-new-tokens", "8", "--runs", "2", "--threads", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text(encoding="utf-8"))
    peer = [r for r in rows if r["runner"] == "llama.cpp"]
    assert [r["prompt_tokens"] for r in peer] == [16, 48] and all(0 < r["spread"] <= 1 for r in peer)
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_rss_bytes"] > 2**20
               for r in peer)
    lines = result.stdout.splitlines()  # machine, header, peer (first pass), ours, peer (best of both), ratios
    assert [line.split()[1] for line in lines[2:8]] == ["llama.cpp"] * 2 + ["openvino"] * 2 + ["llama.cpp"] * 2
    assert sum(line.startswith(f"{tiny_int4.name} (openvino) / {tiny_gguf.name}") for line in lines) == 2
    missing = run_module("runtime.bench", "--model", str(tiny_int4), "--peer-gguf", str(tmp_path / "none.gguf"))
    assert missing.returncode == 2 and missing.stderr.startswith("error:") and "\n" not in missing.stderr.strip()
