"""Write a random-weight GLM-4 checkpoint with GLM-4-9B's real widths, for benchmarks.

    python -m models.shape_model --layers 4 --output build/glm4-shape-4l

Hidden 4096, FFN 13696, 32 query heads, 2 KV heads, head dim 128, vocab 151552, half-rotary
heads, like glm-4-9b-chat-hf; only the number of layers is chosen. The weights are random (the
answers are noise), so it measures speed and memory, never accuracy. It uses the bundled
tokenizer, whose ids all fall inside the real vocabulary. ``--arch chatglm`` writes the original
glm-4-9b-chat's layout instead (model_type chatglm, rope_ratio 500, the project's remote code;
load it with trust_remote_code).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, GlmConfig, GlmForCausalLM

from convert.atomic import OutputError, staged_output
from models.chatglm_twin import chatglm_config, save_chatglm
from models.tokenizer import stop_token_ids

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# Context windows: glm-4-9b-chat(-hf) and glm-4-9b-chat-1m(-hf). Only the positions differ here; the 1M
# checkpoint's own rotary settings are not known to this project (no hub), and random weights ignore them.
VARIANTS = {"128k": 131072, "1m": 1048576}
ARCHS = ("glm", "chatglm")  # glm-4-9b-chat-hf's GlmForCausalLM, or the original remote-code ChatGLMModel


def shape_model(output: str | Path, layers: int, tokenizer_dir: str | Path = "models/glm4-tiny",
                dtype: str = "bf16", seed: int = 0, overwrite: bool = False, vocab_size: int = 151552,
                variant: str = "128k", arch: str = "glm") -> Path:
    """Create the checkpoint in ``output`` (atomically) and return its path."""
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch}")
    if layers < 1 or layers > 40:
        raise ValueError(f"--layers must be between 1 and 40 (GLM-4-9B has 40), got {layers}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not len(tokenizer) <= vocab_size <= 151552:
        raise ValueError(f"--vocab-size must be from the tokenizer's {len(tokenizer)} to 151552, got {vocab_size}")
    stops = stop_token_ids(tokenizer)
    config = GlmConfig(num_hidden_layers=layers, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
                       torch_dtype=dtype_name(dtype), vocab_size=vocab_size,
                       max_position_embeddings=VARIANTS[variant])
    with staged_output(output, overwrite) as staging:
        if arch == "chatglm":
            save_chatglm(staging, dict(chatglm_config(config.to_dict(), config.head_dim), rope_ratio=500),
                         dtype=DTYPES[dtype], seed=seed)
        else:
            torch.manual_seed(seed)
            previous = torch.get_default_dtype()
            torch.set_default_dtype(DTYPES[dtype])
            try:
                model = GlmForCausalLM(config).eval()
            finally:
                torch.set_default_dtype(previous)
            model.save_pretrained(staging, safe_serialization=True, max_shard_size="2GB")
        GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return Path(output)


def dtype_name(dtype: str) -> str:
    return str(DTYPES[dtype]).removeprefix("torch.")


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a random-weight GLM-4 checkpoint with GLM-4-9B's widths and N layers (for benchmarks).")
    parser.add_argument("--layers", type=int, required=True, help="number of decoder layers (1-40)")
    parser.add_argument("--output", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--tokenizer", default="models/glm4-tiny", help="tokenizer to bundle (default: glm4-tiny's)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weight precision on disk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=151552,
                        help="embedding rows (default GLM-4-9B's 151552; smaller gives a small model for tests)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="128k",
                        help="context settings: 128k (glm-4-9b-chat) or 1m (glm-4-9b-chat-1m)")
    parser.add_argument("--arch", choices=ARCHS, default="glm",
                        help="glm: glm-4-9b-chat-hf's layout (default); chatglm: the original glm-4-9b-chat's "
                             "(remote code, needs trust_remote_code to load)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if not Path(args.tokenizer, "tokenizer.json").is_file():
        print(f"error: no tokenizer.json in {args.tokenizer}", file=sys.stderr)
        return 2
    try:
        path = shape_model(args.output, args.layers, args.tokenizer, args.dtype, args.seed, args.overwrite,
                           args.vocab_size, args.variant, args.arch)
    except (ValueError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.arch}, {args.layers} layers, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
