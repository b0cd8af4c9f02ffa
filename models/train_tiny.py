"""Train glm4-tiny, a small GlmForCausalLM that answers GLM-4's synthetic chat task suite.

    python -m models.train_tiny --output models/glm4-tiny

Fixed seed, CPU only; the default schedule takes about 15 minutes on 2 cores. Loss is on the
model's own output only (assistant turns and the stop token that ends each), never on prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import GenerationConfig, GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

from convert.atomic import staged_output
from convert.compare import transformers_replies
from models import tasks
from models.evaluate import score
from models.tokenizer import build_tokenizer, stop_token_ids
from chat_format import ChatTemplate

IGNORE = -100


def tiny_config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> GlmConfig:
    """glm-4-9b-chat-hf's structure (GQA, half-rotary heads, SwiGLU, RMSNorm, qkv bias), only small."""
    settings = dict(
        vocab_size=math.ceil(len(tokenizer) / 64) * 64, hidden_size=192, intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
        partial_rotary_factor=0.5, max_position_embeddings=4096, rope_theta=10000.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer),
    )
    settings.update(overrides)
    return GlmConfig(**settings)


def encode(tokenizer: PreTrainedTokenizerFast, item: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Token ids and labels of one training conversation; pieces split at special tokens, so
    encoding them one by one gives the same ids as encoding the whole text."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in ChatTemplate(tokenizer.chat_template).segments(item["messages"], item.get("tools")):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def batches(tokenizer: PreTrainedTokenizerFast, stream: Iterator[dict[str, Any]], batch_size: int,
            rng: random.Random) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of similar-length conversations (8 batches are bucketed at a time)."""
    while True:
        pool = sorted((encode(tokenizer, next(stream)) for _ in range(batch_size * 8)), key=lambda p: len(p[0]))
        groups = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(groups)
        for group in groups:
            width = max(len(ids) for ids, _ in group)
            pad = [width - len(ids) for ids, _ in group]
            yield {
                "input_ids": torch.tensor([ids + [tokenizer.pad_token_id] * p for (ids, _), p in zip(group, pad)]),
                "labels": torch.tensor([lab + [IGNORE] * p for (_, lab), p in zip(group, pad)]),
                "attention_mask": torch.tensor([[1] * len(ids) + [0] * p for (ids, _), p in zip(group, pad)]),
            }


def save_checkpoint(model: GlmForCausalLM, tokenizer: PreTrainedTokenizerFast, output: Path,
                    eval_set: list[dict[str, Any]]) -> None:
    """Write model, tokenizer, generation config and eval.jsonl, replacing ``output`` atomically
    (its README.md is kept)."""
    with staged_output(output, overwrite=True) as staging:
        if (output / "README.md").exists():
            shutil.copy2(output / "README.md", staging / "README.md")
        model.save_pretrained(staging, safe_serialization=True)
        GenerationConfig(eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id,
                         do_sample=False, max_new_tokens=256).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(staging / "eval.jsonl", "w", encoding="utf-8", newline="\n") as handle:
            for item in eval_set:
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")


def train_tiny(output: str | Path, steps: int = 2000, batch_size: int = 32, lr: float = 2e-3,
               seed: int = 0, threads: int = 2, log_every: int = 100) -> dict[str, Any]:
    """Train the bundled model from scratch and save it with its eval set; returns its eval scores."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    eval_set = tasks.eval_items()
    held_out = {tasks.prompt_key(item) for item in eval_set}
    corpus_stream = tasks.training_stream(seed + 1, held_out)
    template = ChatTemplate.builtin()
    corpus = [template.render(i["messages"], i.get("tools"), add_generation_prompt=False)
              for i in (next(corpus_stream) for _ in range(20000))]
    tokenizer = build_tokenizer(corpus, vocab_size=1536)
    model = GlmForCausalLM(tiny_config(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup))))
    data = batches(tokenizer, tasks.training_stream(seed + 2, held_out), batch_size, random.Random(seed))
    started, running = time.time(), 0.0
    model.train()
    for step in range(1, steps + 1):
        loss = model(**next(data)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if step % log_every == 0:
            print(f"step {step}/{steps} loss {running / log_every:.4f} {time.time() - started:.0f}s", flush=True)
            running = 0.0
    model.eval()
    result = score(eval_set, transformers_replies(model, tokenizer, eval_set))
    save_checkpoint(model, tokenizer, Path(output), eval_set)
    result["train_seconds"] = time.time() - started
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the bundled glm4-tiny model (CPU, fixed seed).")
    parser.add_argument("--output", default="models/glm4-tiny", help="checkpoint folder to write (replaced atomically)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (linear warm-up and decay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        print("error: --steps and --batch-size must be positive", file=sys.stderr)
        return 2
    result = train_tiny(args.output, args.steps, args.batch_size, args.lr, args.seed, args.threads)
    for kind, acc in result["per_kind"].items():
        print(f"{kind:16s} {acc:6.1%}")
    print(f"overall exact match {result['accuracy']:.1%}, {result['parameters']:,} parameters, "
          f"{result['train_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
