"""Convert the tokenizer to OpenVINO IR and prove GenAI renders the chat template like transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convert.calibration import builtin_conversations

TOKENIZER_FILES = ("openvino_tokenizer.xml", "openvino_tokenizer.bin",
                   "openvino_detokenizer.xml", "openvino_detokenizer.bin")


class TokenizerError(Exception):
    """The tokenizer could not be converted, or GenAI's prompts differ from transformers'."""


def save_tokenizer_ir(hf_tokenizer: Any, output: Path) -> None:
    """Write openvino_tokenizer/detokenizer IR into ``output``; fail loudly (optimum-intel does not)."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer

    try:
        tokenizer, detokenizer = convert_tokenizer(hf_tokenizer, with_detokenizer=True, skip_special_tokens=True)
        ov.save_model(tokenizer, output / "openvino_tokenizer.xml")
        ov.save_model(detokenizer, output / "openvino_detokenizer.xml")
    except Exception as error:
        raise TokenizerError(f"openvino-tokenizers could not convert the tokenizer: {error}") from error
    missing = [name for name in TOKENIZER_FILES if not (output / name).is_file()]
    if missing:
        raise TokenizerError(f"tokenizer conversion wrote no {', '.join(missing)}")


def template_mismatches(hf_tokenizer: Any, output: Path,
                        conversations: list[dict[str, Any]] | None = None) -> list[str]:
    """Conversations whose GenAI prompt token ids differ from ``apply_chat_template``'s (empty if none)."""
    import openvino_genai

    genai = openvino_genai.Tokenizer(str(output))
    problems = []
    for conversation in conversations or builtin_conversations():
        messages, tools = conversation["messages"], conversation.get("tools")
        generation_prompt = messages[-1]["role"] != "assistant"
        expected = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=True,
                                                    add_generation_prompt=generation_prompt)
        if isinstance(expected, dict) or hasattr(expected, "input_ids"):
            expected = expected["input_ids"]
        try:
            text = genai.apply_chat_template(messages, add_generation_prompt=generation_prompt, tools=tools or None)
            got = genai.encode(text, add_special_tokens=False).input_ids.data[0].tolist()
        except Exception as error:
            problems.append(f"{messages[0]['content'][:40]!r}: GenAI failed to render ({error})")
            continue
        if got != list(expected):
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            problems.append(f"{messages[-1]['content'][:40]!r}: token ids differ from position {at} "
                            f"(GenAI {len(got)} tokens, transformers {len(expected)})")
    return problems
