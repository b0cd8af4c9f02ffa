"""LoRA fine-tunes: the bundled PEFT adapter (trained by models/train_lora.py) teaches glm4-tiny six capitals,
merged at conversion (python -m convert --lora) and applied at run time (--adapter) alike; the server picks
it by model name, the demo lists it, and adapters that do not fit are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from safetensors.numpy import load_file, save_file

import runtime
from chat_format import parse_reply
from models.evaluate import load_eval
from runtime.adapters import parse_adapter
from runtime.engine import Engine, GenerationOptions, ModelLoadError, conversation_ids
from tests.conftest import ROOT, TINY, convert_tiny, run_module
from tests.server_process import start_server

ADAPTER = ROOT / "models" / "glm4-tiny-lora-capitals"
NEW_FACTS = load_eval(ADAPTER / "eval.jsonl")
BASE_FACTS = [i for i in load_eval(TINY / "eval.jsonl") if i["kind"] in ("fact_en", "fact_zh")][:12]


def answers(engine: Engine, items: list[dict[str, Any]], adapters: tuple[str, ...] | None = None) -> list[str]:
    options = GenerationOptions(max_new_tokens=32, adapters=adapters)
    return [parse_reply(engine.generate(conversation_ids(engine, i["messages"], None), options, lambda _: False).text).text
            for i in items]


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_tiny(tmp_path_factory, "glm4-tiny-capitals-int8", "--weight-format", "int8", "--lora", str(ADAPTER))


def test_the_adapter_teaches_new_facts_merged_and_at_run_time_alike(tiny_int8: Path, merged: Path) -> None:
    expected = [i["expected"] for i in NEW_FACTS]
    base = runtime.load(tiny_int8, "CPU", cache_dir=None, adapters=[parse_adapter(str(ADAPTER))])
    without = answers(base, NEW_FACTS, adapters=())
    at_run_time = answers(base, NEW_FACTS + BASE_FACTS)
    merged_answers = answers(runtime.load(merged, "CPU", cache_dir=None), NEW_FACTS + BASE_FACTS)
    print(f"\nnew facts: base {sum(a == e for a, e in zip(without, expected))}/12, with the adapter "
          f"{sum(a == e for a, e in zip(at_run_time, expected))}/12 at run time, "
          f"{sum(a == e for a, e in zip(merged_answers, expected))}/12 merged")
    assert sum(a == e for a, e in zip(without, expected)) == 0  # the base model does not know them
    assert at_run_time[:12] == expected and merged_answers == at_run_time  # identical, merged or not
    assert sum(a == i["expected"] for a, i in zip(at_run_time[12:], BASE_FACTS)) >= 11  # the rest is kept
    check = json.loads((merged / "manifest.json").read_text(encoding="utf-8"))["checks"]["lora_merged"]
    assert check["scale"] == 1.0 and check["path"] == str(ADAPTER.resolve())
    half = runtime.load(tiny_int8, "CPU", cache_dir=None, adapters=[parse_adapter(f"{ADAPTER}:0")])
    assert answers(half, NEW_FACTS) == without  # scale 0: the base model


def test_the_server_picks_the_adapter_by_model_name(tiny_int8: Path, tmp_path: Path) -> None:
    servers = start_server(tiny_int8, tmp_path / "server.log", "--adapter", str(ADAPTER))
    server = next(servers)
    try:
        client = server.client()
        names = [m.id for m in client.models.list()]
        assert names == [tiny_int8.name, f"{tiny_int8.name}:{ADAPTER.name}"]
        assert server.health()["scheduler"] == "serial"  # continuous batching cannot switch adapters per request
        for name, knows in zip(names, (False, True)):
            for item in NEW_FACTS[:4]:
                reply = client.chat.completions.create(model=name, messages=item["messages"], max_tokens=32)
                assert (reply.choices[0].message.content == item["expected"]) == knows and reply.model == name
    finally:
        servers.close()


def test_the_demo_lists_the_adapters(tiny_int8: Path) -> None:
    from demos.gradio_chat import NO_ADAPTER, build_demo

    engine = SimpleNamespace(name="glm4-tiny-int8", device="CPU", max_prompt_tokens=1024, adapters={"capitals": None})
    (dropdown,) = [b for b in build_demo(engine, tiny_int8).blocks.values() if b.elem_id == "adapter"]
    assert dropdown.visible and [c[0] for c in dropdown.choices] == [NO_ADAPTER, "capitals"]
    assert dropdown.value == "capitals"


def misfit(tmp_path: Path, case: str) -> Path:
    """A copy of the adapter renamed to another architecture's projections, or with the wrong width."""
    folder = tmp_path / case
    shutil.copytree(ADAPTER, folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if case == "names":  # the original glm-4-9b-chat calls its fused projection query_key_value
        tensors = {k.replace("self_attn.q_proj", "self_attention.query_key_value"): v for k, v in tensors.items()}
        config["target_modules"] = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    else:
        import numpy as np

        tensors = {k: np.pad(v, ((0, 0), (0, 64))) if "q_proj.lora_A" in k else v for k, v in tensors.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("case", ["names", "shapes"])
def test_an_adapter_that_does_not_fit_is_a_one_line_error(tiny_int8: Path, tmp_path: Path, case: str) -> None:
    adapter = misfit(tmp_path, case)
    converted = run_module("convert", "--model", str(TINY), "--output", str(tmp_path / "out"), "--lora", str(adapter),
                           "--weight-format", "int8", "--quiet")
    chatted = run_module("runtime.chat", "--model", str(tiny_int8), "--adapter", str(adapter), stdin="Hi\n")
    for result in (converted, chatted):
        message = result.stderr.strip()
        assert result.returncode == 2 and "\n" not in message and "does not fit" in message, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelLoadError, match="no adapter_model.safetensors"):
        parse_adapter(str(TINY))
