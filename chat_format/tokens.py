"""GLM-4's special tokens, and prompts as control tokens and ordinary text kept apart."""

from __future__ import annotations

import re
from typing import Callable, Sequence

SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)
# All three must stop generation: end of text, end of a chat turn, end of a tool call.
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
SPECIAL_PATTERN = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))

Part = tuple[str, bool]  # (text, is_control_token)


def split_specials(text: str) -> list[str]:
    """Cut ``text`` so that no piece contains a whole special-token string.

    Encoded piece by piece, untrusted text that spells ``<|assistant|>`` stays ordinary tokens.
    """
    pieces, rest = [], text
    while True:
        hits = [(rest.find(token), token) for token in SPECIAL_TOKENS if token in rest]
        if not hits:
            return pieces + ([rest] if rest else [])
        at = min(hits)[0]
        pieces.append(rest[: at + 1])
        rest = rest[at + 1:]


def encode_prompt(parts: Sequence[Part], encode_text: Callable[[str], list[int]],
                  token_id: Callable[[str], int]) -> list[int]:
    """Token ids of ``parts``: control parts by id, text (template and untrusted content alike)
    encoded so that it can never produce a control token."""
    ids: list[int] = []
    pending = ""
    for text, control in list(parts) + [("", True)]:
        if not control:
            pending += text
            continue
        for piece in split_specials(pending):
            ids += encode_text(piece)
        pending = ""
        if text:
            ids.append(token_id(text))
    return ids
