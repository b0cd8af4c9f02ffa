"""Tabulate what each compression recipe costs in quality, against the FP32 source.

    python -m convert.accuracy --model models/glm4-tiny
    python -m convert.accuracy --model build/glm4-shape-4l --recipes int8,cpu,npu
    python -m convert.accuracy --model build/smollm2-glm --text /usr/share/common-licenses/GPL-3

Each recipe is converted into a temporary folder with ``python -m convert``'s own code and scored
with :func:`convert.compare.compare`: eval exact match where the source has an eval.jsonl, top-1
token agreement, mean KL divergence and perplexity for any model (on ``--text``, windows of a plain-text
file, when given). ``--ov-config`` scores every recipe under OpenVINO runtime settings, such as
DYNAMIC_QUANTIZATION_GROUP_SIZE.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from convert.calibration import BUILTIN
from convert.compare import compare, reference
from convert.convert import convert, quiet_output
from convert.recipes import make_recipe

RECIPES: dict[str, dict[str, Any]] = {
    "fp16": {"weight_format": "fp16"},
    "int8": {"weight_format": "int8"},
    "cpu": {"profile": "cpu"},
    "npu": {"profile": "npu"},
    "gpu": {"profile": "gpu"},
    "cpu-all-layers": {"profile": "cpu", "all_layers": True},
    "int4-sym-g32": {"weight_format": "int4", "sym": True, "group_size": 32, "ratio": 1.0},
    "int4-sym-g64": {"weight_format": "int4", "sym": True, "group_size": 64, "ratio": 1.0},
    "int4-sym-g128": {"weight_format": "int4", "sym": True, "group_size": 128, "ratio": 1.0},
    "int4-sym-cw-r0.8": {"weight_format": "int4", "sym": True, "group_size": -1, "ratio": 0.8},
    "int4-sym-cw-r0.6": {"weight_format": "int4", "sym": True, "group_size": -1, "ratio": 0.6},
    "int4-asym-g128": {"weight_format": "int4", "sym": False, "group_size": 128, "ratio": 1.0},
    "int4-asym-g128-r0.8": {"weight_format": "int4", "sym": False, "group_size": 128, "ratio": 0.8},
    "int4-sym-g32-awq": {"weight_format": "int4", "sym": True, "group_size": 32, "ratio": 1.0, "awq": True},
    "int4-sym-g64-awq": {"weight_format": "int4", "sym": True, "group_size": 64, "ratio": 1.0, "awq": True},
    "int4-sym-g128-awq": {"weight_format": "int4", "sym": True, "group_size": 128, "ratio": 1.0, "awq": True},
    "int4-sym-g128-r0.8": {"weight_format": "int4", "sym": True, "group_size": 128, "ratio": 0.8},
    "int4-sym-g128-awq-r0.9": {"weight_format": "int4", "sym": True, "group_size": 128, "ratio": 0.9, "awq": True},
    "int4-sym-g128-awq-r0.8": {"weight_format": "int4", "sym": True, "group_size": 128, "ratio": 0.8, "awq": True},
    "int4-sym-g64-awq-r0.9": {"weight_format": "int4", "sym": True, "group_size": 64, "ratio": 0.9, "awq": True},
    "int4-sym-cw-awq": {"weight_format": "int4", "sym": True, "group_size": -1, "ratio": 1.0, "awq": True},
    "int4-awq-se": {"weight_format": "int4", "group_size": 64, "awq": True, "scale_estimation": True,
                    "dataset": BUILTIN},
    "int4-sym-g128-awq-se": {"weight_format": "int4", "sym": True, "group_size": 128, "ratio": 1.0, "awq": True,
                             "scale_estimation": True, "dataset": BUILTIN},
    "int4-sym-cw-awq-se": {"weight_format": "int4", "sym": True, "group_size": -1, "ratio": 1.0, "awq": True,
                           "scale_estimation": True, "dataset": BUILTIN},
    "int4-sym-cw-gptq": {"weight_format": "int4", "sym": True, "group_size": -1, "ratio": 1.0, "gptq": True,
                         "dataset": BUILTIN},
}
DEFAULT = ("fp16", "int8", "cpu", "npu", "int4-asym-g128-r0.8", "int4-awq-se")


def accuracy(model: str, recipes: list[str], trust_remote_code: bool = False, text: str | None = None,
             ov_config: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per recipe: its settings, the converted size and the comparison with the source."""
    rows = []
    ref = reference(model, trust_remote_code, text)
    for name in recipes:
        settings = dict(RECIPES[name])
        if "profile" not in settings and settings.get("weight_format") == "int4":
            settings.setdefault("awq", False)  # a named layout is only what its name says: AWQ when it says awq
        recipe = make_recipe(settings.pop("profile", None), **settings)
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as scratch:  # Windows: files may stay open
            folder = Path(scratch) / name
            manifest = convert(model, folder, recipe, trust_remote_code, verify=False, quiet=True)
            result = compare(model, folder, trust_remote_code, ref, ov_config)
        rows.append({"recipe": name, "settings": recipe.as_dict(), "bytes": manifest["weights"]["total_bytes"],
                     "ov_config": ov_config or {}, **result})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [("recipe", "IR MiB", "exact match (source)", "top-1 agreement", "mean KL", "perplexity (source)")]
    for r in rows:
        exact = (f"{r['converted_exact_match']:.1%} ({r['source_exact_match']:.1%})"
                 if "eval_items" in r else "-")
        lines.append((r["recipe"], f"{r['bytes'] / 2**20:.1f}", exact, f"{r['top1_agreement']:.2%}",
                      f"{r['mean_kl']:.5f}", f"{r['perplexity']:.3f} ({r['source_perplexity']:.3f})"))
    widths = [max(len(line[i]) for line in lines) for i in range(6)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.accuracy",
                                     description="Quality of each compression recipe against the FP32 source.")
    parser.add_argument("--model", required=True, help="source checkpoint folder")
    parser.add_argument("--recipes", default=",".join(DEFAULT),
                        help=f"comma-separated, from: {', '.join(RECIPES)} (default: {','.join(DEFAULT)})")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--text", help="plain-text file (UTF-8): score on windows of 256 of its tokens (up to 32) "
                        "instead of conversations")
    parser.add_argument("--ov-config", nargs="+", default=[], metavar="KEY=VALUE",
                        help="OpenVINO runtime settings for the converted models, e.g. "
                             "DYNAMIC_QUANTIZATION_GROUP_SIZE=128")
    parser.add_argument("--json", help="write the rows as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        print(f"error: unknown recipe {', '.join(unknown) or '(none)'}; choose from {', '.join(RECIPES)}",
              file=sys.stderr)
        return 2
    if not Path(args.model, "config.json").is_file():
        print(f"error: {args.model} is not a checkpoint folder (no config.json)", file=sys.stderr)
        return 2
    if args.text and not Path(args.text).is_file():
        print(f"error: no such text file: {args.text}", file=sys.stderr)
        return 2
    pairs = [item.partition("=") for item in args.ov_config]
    if any(not key or not sep for key, sep, _ in pairs):
        print("error: --ov-config takes KEY=VALUE pairs", file=sys.stderr)
        return 2
    try:
        with quiet_output(True):
            rows = accuracy(args.model, recipes, args.trust_remote_code, args.text,
                            {key: value for key, _, value in pairs})
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
