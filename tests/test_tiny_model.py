"""The bundled glm4-tiny: architecture, size, held-out eval set, and accuracy with transformers FP32."""

from __future__ import annotations

import json
from collections import Counter

from models import tasks
from models.evaluate import evaluate, load_eval
from tests.conftest import TINY


def test_checkpoint_is_glm4_hf_architecture() -> None:
    config = json.loads((TINY / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["GlmForCausalLM"] and config["model_type"] == "glm"
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention
    assert config["partial_rotary_factor"] == 0.5 and config["hidden_act"] == "silu"
    assert config["attention_bias"] is True
    weights = sum(p.stat().st_size for p in TINY.glob("*.safetensors"))
    assert 0 < weights <= 20 * 2**20


def test_eval_set_is_large_held_out_and_covers_every_kind() -> None:
    items = load_eval(TINY / "eval.jsonl")
    assert len(items) >= 200
    kinds = Counter(item["kind"] for item in items)
    assert {"fact_en", "fact_zh", "system_language", "system_persona", "memory", "follow_up",
            "tool_call", "tool_answer", "tool_unneeded"} <= set(kinds)
    assert any(not item["expected"].isascii() for item in items)
    assert items == json.loads(json.dumps(tasks.eval_items(), ensure_ascii=False))
    held_out = {tasks.prompt_key(item) for item in items}
    stream = tasks.training_stream(seed=2, held_out=held_out)
    seen = {tasks.prompt_key({**item, "messages": item["messages"][:-1]}) for item in (next(stream) for _ in range(20000))}
    assert not seen & held_out
    assert len(seen) > 5000  # the training stream is varied, not a few repeated items


def test_fp32_greedy_exact_match_at_least_95_percent() -> None:
    result = evaluate(TINY)
    assert result["accuracy"] >= 0.95, (result["per_kind"], result["failures"][:5])
    assert min(result["per_kind"].values()) >= 0.8, result["per_kind"]
