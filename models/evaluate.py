"""Exact-match accuracy of a Hugging Face GLM-4 checkpoint on an eval.jsonl, with transformers.

    python -m models.evaluate --model models/glm4-tiny
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert.compare import load_eval, strip_answer, transformers_replies


def score(items: list[dict[str, Any]], replies: list[str]) -> dict[str, Any]:
    """Overall and per-kind exact match, with the failures."""
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    failures = []
    for item, reply in zip(items, replies):
        ok = strip_answer(reply) == item["expected"]
        kind = per_kind[item.get("kind", "all")]
        kind[0] += ok
        kind[1] += 1
        if not ok:
            failures.append({"expected": item["expected"], "got": strip_answer(reply)})
    return {"accuracy": sum(ok for ok, _ in per_kind.values()) / max(len(items), 1),
            "per_kind": {k: ok / n for k, (ok, n) in sorted(per_kind.items())}, "failures": failures}


def evaluate(model_dir: str | Path, eval_file: str | Path | None = None, limit: int | None = None,
             trust_remote_code: bool = False) -> dict[str, Any]:
    """Load ``model_dir`` in FP32 and score greedy replies on its eval file."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    items = load_eval(eval_file or Path(model_dir) / "eval.jsonl")[:limit]
    return score(items, transformers_replies(model, tokenizer, items))


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Exact-match accuracy of a GLM-4 checkpoint (transformers, FP32, greedy).")
    parser.add_argument("--model", default="models/glm4-tiny", help="Hugging Face checkpoint folder")
    parser.add_argument("--eval-file", help="eval.jsonl to score (default: MODEL/eval.jsonl)")
    parser.add_argument("--limit", type=int, help="score only the first N items")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the checkpoint's own model code (a chatglm checkpoint such as models.chatglm_twin's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if not Path(args.model, "config.json").is_file():
        print(f"error: {args.model} is not a Hugging Face checkpoint folder (no config.json)", file=sys.stderr)
        return 2
    result = evaluate(args.model, args.eval_file, args.limit, args.trust_remote_code)
    for kind, acc in result["per_kind"].items():
        print(f"{kind:16s} {acc:6.1%}")
    print(f"{'overall':16s} {result['accuracy']:6.1%}")
    for failure in result["failures"][:10]:
        print(f"  expected {failure['expected']!r} got {failure['got']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
