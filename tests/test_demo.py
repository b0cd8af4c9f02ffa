"""The main job end to end: glm4-tiny converted to INT4, then a scripted terminal chat."""

from __future__ import annotations

import json

from models.evaluate import load_eval
from tests.conftest import TINY, run_module


def test_converted_folder_is_complete(tiny_int4) -> None:
    for name in ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml",
                 "generation_config.json", "manifest.json"):
        assert (tiny_int4 / name).is_file(), name
    manifest = json.loads((tiny_int4 / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["settings"]["weight_format"] == "int4"
    assert manifest["weights"]["share"].get("i4", 0) > 0.5
    assert json.loads((tiny_int4 / "generation_config.json").read_text(encoding="utf-8"))["eos_token_id"] == \
        json.loads((TINY / "config.json").read_text(encoding="utf-8"))["eos_token_id"]


def test_piped_chat_answers_eval_questions(tiny_int4) -> None:
    # The piped chat keeps history between lines, so each single-turn question gets its own run.
    items = [i for i in load_eval(TINY / "eval.jsonl") if i["kind"] in ("fact_en", "fact_zh")][:4]
    for item in items:
        result = run_module("runtime.chat", "--model", str(tiny_int4), stdin=item["messages"][0]["content"] + "\n")
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == item["expected"]


def test_piped_chat_keeps_history_across_lines(tiny_int4) -> None:
    item = next(i for i in load_eval(TINY / "eval.jsonl") if i["kind"] == "memory" and len(i["messages"]) == 3)
    stdin = item["messages"][0]["content"] + "\n" + item["messages"][2]["content"] + "\n"
    result = run_module("runtime.chat", "--model", str(tiny_int4), stdin=stdin)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [item["messages"][1]["content"], item["expected"]]


def test_chat_bad_model_folder_is_one_line_error(tmp_path) -> None:
    result = run_module("runtime.chat", "--model", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and result.stderr.strip().count("\n") == 0
