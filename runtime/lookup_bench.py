"""Measure prompt-lookup decoding against plain decoding on one converted model, in one run.

    python -m runtime.lookup_bench --model build/glm4-tiny-int4 [--num-assistant-tokens 5] [--max-ngram-size 3]

Two prompt sets, each prompt answered greedily by both pipelines in turn (plain, lookup, plain...):
*ordinary*: a question the prompt says nothing more about; *grounded*: the same question asked again
after the model's own answer to it, so the reply can be copied from the prompt (what happens when a
reply quotes a document, edits code or restates an answer). Printed per set: decode tokens/s of
each, the speed-up, tokens per model step with lookup (1 = no draft accepted) and the share of
replies that differ (0: greedy replies must not change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

from chat_format import parse_reply
from chat_format.conversations import CONVERSATIONS
from runtime.cli import add_max_new_tokens
from runtime.engine import EngineError, GenerationOptions, PromptLookup, conversation_ids


def questions() -> list[str]:
    """The user questions of the template-check conversations that stand alone (no tools)."""
    return [messages[-1]["content"] for _, messages, tools in CONVERSATIONS if not tools and len(messages) <= 2]


def measure(plain: Any, lookup: Any, prompts: list[list[dict[str, Any]]], options: GenerationOptions,
            runs: int) -> dict[str, float]:
    """Decode tokens/s of both engines (median over prompts and runs), tokens per step and differing replies."""
    rates: dict[str, list[float]] = {"plain": [], "lookup": []}
    steps, differ = [], 0
    for messages in prompts:
        ids = conversation_ids(plain, messages, None)
        for _ in range(runs):
            first = plain.generate(ids, options, lambda _: False)
            second = lookup.generate(ids, options, lambda _: False)
            rates["plain"].append(first.stats.tokens_per_s)
            rates["lookup"].append(second.stats.tokens_per_s)
            steps.append(second.stats.tokens_per_step)
            differ += first.text != second.text
    plain_rate, lookup_rate = statistics.median(rates["plain"]), statistics.median(rates["lookup"])
    return {"plain_tokens_per_s": plain_rate, "lookup_tokens_per_s": lookup_rate,
            "speedup": lookup_rate / plain_rate if plain_rate else 0.0,
            "tokens_per_step": statistics.mean(steps), "differing_replies": differ / len(steps)}


def lookup_bench(model: str, device: str = "CPU", lookup: PromptLookup | None = None, max_new_tokens: int = 128,
                 runs: int = 2) -> dict[str, dict[str, float]]:
    """Both prompt sets on ``model``; one row of figures per set."""
    import runtime

    lookup = lookup or PromptLookup()
    plain = runtime.load(model, device, cache_dir=None)
    drafted = runtime.load(model, device, cache_dir=None, prompt_lookup=lookup)
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    ordinary = [[{"role": "user", "content": question}] for question in questions()]
    grounded = []
    for messages in ordinary:
        answer = parse_reply(plain.generate(conversation_ids(plain, messages, None), options, lambda _: False).text)
        grounded.append(messages + [{"role": "assistant", "content": answer.text}] + messages)
    return {"ordinary": measure(plain, drafted, ordinary, options, runs),
            "grounded": measure(plain, drafted, grounded, options, runs)}


def format_rows(rows: dict[str, dict[str, float]]) -> str:
    lines = [("prompts", "plain tok/s", "lookup tok/s", "speed-up", "tokens/step", "replies differing")]
    for name, r in rows.items():
        lines.append((name, f"{r['plain_tokens_per_s']:.1f}", f"{r['lookup_tokens_per_s']:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['tokens_per_step']:.2f}", f"{r['differing_replies']:.0%}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.lookup_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder written by python -m convert")
    parser.add_argument("--device", default="CPU", help="CPU or GPU (default CPU)")
    parser.add_argument("--num-assistant-tokens", type=int, default=5, help="longest draft per step (default 5)")
    parser.add_argument("--max-ngram-size", type=int, default=3, help="longest n-gram looked up (default 3)")
    add_max_new_tokens(parser, 128, "longest reply")
    parser.add_argument("--runs", type=int, default=2, help="runs per prompt and pipeline (default 2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        lookup = PromptLookup(args.num_assistant_tokens, args.max_ngram_size)
        lookup.validate()
        if args.max_new_tokens < 1 or args.runs < 1:
            raise ValueError("--max-new-tokens and --runs must be at least 1")
        rows = lookup_bench(args.model, args.device, lookup, args.max_new_tokens, args.runs)
    except (EngineError, ValueError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    print(f"{args.model} on {args.device}: prompt lookup (num_assistant_tokens {lookup.num_assistant_tokens}, "
          f"max_ngram_size {lookup.max_ngram_size}), greedy, up to {args.max_new_tokens} new tokens")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
