"""Convert the tokenizer to OpenVINO IR, with the chat template openvino-genai renders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("openvino_tokenizer.xml", "openvino_tokenizer.bin",
                   "openvino_detokenizer.xml", "openvino_detokenizer.bin")


class TokenizerError(Exception):
    """The tokenizer could not be converted, or GenAI's prompts differ from transformers'."""


def save_tokenizer_ir(hf_tokenizer: Any, output: Path, chat_template: str) -> None:
    """Write openvino_tokenizer/detokenizer IR into ``output`` with ``chat_template`` (what openvino-genai
    and OpenVINO Model Server render) in its metadata; fail loudly (optimum-intel does not)."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer

    try:
        tokenizer, detokenizer = convert_tokenizer(hf_tokenizer, with_detokenizer=True, skip_special_tokens=True)
        tokenizer.set_rt_info(chat_template, "chat_template")
        ov.save_model(tokenizer, output / "openvino_tokenizer.xml")
        ov.save_model(detokenizer, output / "openvino_detokenizer.xml")
    except Exception as error:
        raise TokenizerError(f"openvino-tokenizers could not convert the tokenizer: {error}") from error
    missing = [name for name in TOKENIZER_FILES if not (output / name).is_file()]
    if missing:
        raise TokenizerError(f"tokenizer conversion wrote no {', '.join(missing)}")
