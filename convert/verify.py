"""Load a converted folder with openvino-genai on CPU and check that it answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chat_format import ChatTemplate, encode_prompt, parse_reply
from chat_format.genai import GenAIEncoder


class VerifyError(Exception):
    """The converted folder does not load or does not answer as expected."""


def genai_replies(pipeline: Any, folder: Path, items: list[dict[str, Any]], max_new_tokens: int = 48) -> list[str]:
    """Greedy replies (leading newline removed) to eval items, prompted as the runtime prompts: the folder's
    own chat template rendered by chat_format, encoded with the folder's OpenVINO tokenizer."""
    import numpy as np
    import openvino as ov

    template = ChatTemplate.from_folder(folder)
    tokenizer = pipeline.get_tokenizer()
    encoder = GenAIEncoder(tokenizer)
    config = pipeline.get_generation_config()
    config.max_new_tokens, config.do_sample = max_new_tokens, False
    replies = []
    for item in items:
        ids = encode_prompt(template.parts(item["messages"], item.get("tools")), encoder.encode, encoder.token_id)
        result = pipeline.generate(ov.Tensor(np.array([ids], dtype=np.int64)), config)
        reply = tokenizer.decode(list(result.tokens[0]))
        replies.append(parse_reply(reply).text)
    return replies


def verify_output(folder: Path, source_folder: Path | None, items: int = 8) -> dict[str, Any]:
    """Load ``folder`` on CPU; score the first eval items of the source's eval.jsonl when it has one."""
    import openvino_genai

    try:
        pipeline = openvino_genai.LLMPipeline(str(folder), "CPU")
    except Exception as error:
        raise VerifyError(f"openvino-genai cannot load the result: {error}") from error
    eval_file = source_folder / "eval.jsonl" if source_folder else None
    if not eval_file or not eval_file.is_file():
        (reply,) = genai_replies(pipeline, folder, [{"messages": [{"role": "user", "content": "Hello"}]}], 4)
        return {"loaded": True, "smoke_reply_chars": len(reply)}
    lines = [json.loads(line) for line in eval_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if ChatTemplate.from_folder(folder).tools_placement is None:  # a template without tools: tool-free items only
        lines = [line for line in lines if not line.get("tools")]
    picked = lines[:: max(len(lines) // items, 1)][:items]
    replies = genai_replies(pipeline, folder, picked)
    correct = sum(reply == item["expected"] for reply, item in zip(replies, picked, strict=True))
    if correct < len(picked) // 2:
        raise VerifyError(f"the converted model answered only {correct}/{len(picked)} eval items correctly")
    return {"loaded": True, "eval_items": len(picked), "eval_correct": correct}
