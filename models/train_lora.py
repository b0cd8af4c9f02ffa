"""Train a PEFT LoRA adapter that teaches glm4-tiny the capitals of six countries it has never seen.

    python -m models.train_lora --output models/glm4-tiny-lora-capitals

The adapter (rank 16, alpha 32, on every attention and MLP projection) has the form GLM-4's own
fine-tuning demo produces, PEFT's: adapter_config.json and adapter_model.safetensors. 40% of the
training conversations come from the base task suite, so the adapted model keeps its other answers. The folder also gets
eval.jsonl: the new facts, English and Chinese, which the base model answers wrongly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert.atomic import staged_output
from convert.compare import transformers_replies
from models import tasks
from models.evaluate import score
from models.train_tiny import batches

# (English name, Chinese name, capital in English, capital in Chinese): places glm4-tiny never saw
NEW_COUNTRIES = [
    ("Atlantis", "亚特兰蒂斯", "Poseidonia", "波塞冬尼亚"), ("Lemuria", "雷姆利亚", "Mu", "穆城"),
    ("Elbonia", "艾尔博尼亚", "Mudville", "泥村"), ("Genovia", "吉诺维亚", "Pyrus", "皮鲁斯"),
    ("Freedonia", "自由尼亚", "Fredville", "弗雷德维尔"), ("Ruritania", "鲁里塔尼亚", "Strelsau", "斯特雷尔绍"),
]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


def new_fact(rng: random.Random) -> dict[str, Any]:
    """A question about one of the new countries, in English or Chinese, with its answer."""
    country, chinese = rng.choice(NEW_COUNTRIES), rng.random() < 0.5
    return {"kind": "new_fact_zh" if chinese else "new_fact_en",
            "messages": [tasks.user(tasks.capital_question(rng, country, chinese))],
            "expected": tasks.capital_answer(country, chinese)}


def eval_items() -> list[dict[str, Any]]:
    """Every new country asked once in English and once in Chinese, with the first phrasing of each."""
    items = []
    for country in NEW_COUNTRIES:
        for chinese in (False, True):
            question = (tasks.CAPITAL_ZH[0].format(c=country[1]) if chinese
                        else tasks.CAPITAL_EN[0].format(c=country[0]))
            items.append({"kind": "new_fact_zh" if chinese else "new_fact_en", "messages": [tasks.user(question)],
                          "expected": tasks.capital_answer(country, chinese)})
    return items


def mixed_stream(seed: int) -> Iterator[dict[str, Any]]:
    """New facts (60%) and base tasks, each ending with the reply to learn."""
    rng = random.Random(seed)
    base = tasks.training_stream(seed, set())
    while True:
        if rng.random() < 0.6:
            item = new_fact(rng)
            yield {**item, "messages": item["messages"] + [tasks.assistant(item["expected"])]}
        else:
            yield next(base)


def train_lora(base: str | Path, output: str | Path, steps: int = 500, batch_size: int = 16, lr: float = 2e-3,
               rank: int = 16, alpha: int = 32, seed: int = 0, threads: int = 2) -> dict[str, Any]:
    """Train the adapter on ``base`` and save it with its eval.jsonl; returns the adapted model's eval scores."""
    from peft import LoraConfig, get_peft_model

    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGET_MODULES,
                                      task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    data = batches(tokenizer, mixed_stream(seed + 1), batch_size, random.Random(seed))
    started = time.time()
    model.train()
    for step in range(1, steps + 1):
        loss = model(**next(data)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(f"step {step}/{steps} loss {loss.item():.4f} {time.time() - started:.0f}s", flush=True)
    model.eval()
    items = eval_items()
    result = score(items, transformers_replies(model, tokenizer, items))
    with staged_output(output, overwrite=True) as staging:
        model.save_pretrained(staging)
        with open(staging / "eval.jsonl", "w", encoding="utf-8", newline="\n") as handle:
            for item in items:
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    result["train_seconds"] = time.time() - started
    return result


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.train_lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="models/glm4-tiny", help="checkpoint to adapt (default models/glm4-tiny)")
    parser.add_argument("--output", default="models/glm4-tiny-lora-capitals", help="adapter folder (replaced)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    result = train_lora(args.base, args.output, args.steps, rank=args.rank, threads=args.threads)
    print(f"new facts with the adapter: {result['accuracy']:.0%} ({result['train_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
