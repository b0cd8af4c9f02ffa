"""Byte-level BPE tokenizer with GLM-4's special tokens and chat template, for the bundled model."""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from chat_format import BUILTIN_TEMPLATE, SPECIAL_TOKENS, STOP_TOKENS


def build_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus``; any UTF-8 text (English, Chinese, emoji) stays encodable."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = BUILTIN_TEMPLATE
    return tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids of GLM-4's three stop tokens in ``tokenizer``."""
    return [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
