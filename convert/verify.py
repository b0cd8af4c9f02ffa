"""Load a converted folder with openvino-genai on CPU and check that it answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class VerifyError(Exception):
    """The converted folder does not load or does not answer as expected."""


def genai_reply(pipeline: Any, item: dict[str, Any], max_new_tokens: int = 48) -> str:
    """Greedy reply to one eval item, rendered with the folder's own chat template."""
    import openvino_genai

    history = openvino_genai.ChatHistory(item["messages"])
    if item.get("tools"):
        history.set_tools(item["tools"])
    config = pipeline.get_generation_config()
    config.max_new_tokens, config.do_sample = max_new_tokens, False
    reply = pipeline.generate(history, config).texts[0]
    return reply[1:] if reply.startswith("\n") else reply


def verify_output(folder: Path, source_folder: Path | None, items: int = 8) -> dict[str, Any]:
    """Load ``folder`` on CPU; score the first eval items of the source's eval.jsonl when it has one."""
    import openvino_genai

    try:
        pipeline = openvino_genai.LLMPipeline(str(folder), "CPU")
    except Exception as error:
        raise VerifyError(f"openvino-genai cannot load the result: {error}") from error
    eval_file = source_folder / "eval.jsonl" if source_folder else None
    if not eval_file or not eval_file.is_file():
        reply = genai_reply(pipeline, {"messages": [{"role": "user", "content": "Hello"}]}, max_new_tokens=4)
        return {"loaded": True, "smoke_reply_chars": len(reply)}
    lines = [json.loads(line) for line in eval_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    picked = lines[:: max(len(lines) // items, 1)][:items]
    correct = sum(genai_reply(pipeline, item) == item["expected"] for item in picked)
    if correct < len(picked) // 2:
        raise VerifyError(f"the converted model answered only {correct}/{len(picked)} eval items correctly")
    return {"loaded": True, "eval_items": len(picked), "eval_correct": correct}
