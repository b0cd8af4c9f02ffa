"""Command-line arguments shared by the commands that load a model (chat, demo, server)."""

from __future__ import annotations

import argparse
from typing import Any

from runtime import BACKENDS
from runtime.adapters import LoraAdapter, parse_adapter
from runtime.engine import PromptLookup
from runtime.openvino_engine import CACHE_DIR_HELP

DEVICE_HELP = "CPU, GPU, GPU.0, GPU.1, NPU or AUTO (default CPU)"
MODEL_HELP = "folder written by python -m convert (--backend ipex: the Hugging Face checkpoint folder)"


def add_model_arguments(parser: argparse.ArgumentParser, backends: tuple[str, ...] = BACKENDS) -> None:
    """--model, --device, --backend (when there is a choice) and --cache-dir, the same in every command."""
    parser.add_argument("--model", required=True, help=MODEL_HELP if len(backends) > 1 else MODEL_HELP.split(" (")[0])
    parser.add_argument("--device", default="CPU", help=DEVICE_HELP)
    if len(backends) > 1:
        parser.add_argument("--backend", choices=backends, default=backends[0],
                            help="openvino (default), or ipex: PyTorch with intel-extension-for-pytorch on a Xeon, in "
                            "the environment make venv-xeon creates")
    parser.add_argument("--cache-dir", help=("--backend openvino: " if len(backends) > 1 else "") + CACHE_DIR_HELP)


def add_max_new_tokens(parser: argparse.ArgumentParser, default: int, help: str) -> None:
    """--max-new-tokens, the one name of the reply's token limit."""
    parser.add_argument("--max-new-tokens", type=int, default=default, help=f"{help} (default {default})")


def add_prompt_lookup_arguments(parser: argparse.ArgumentParser) -> None:
    """--prompt-lookup and its two knobs (OpenVINO on CPU or GPU)."""
    group = parser.add_argument_group("prompt-lookup decoding (copies drafts from the prompt; pays off when replies "
                                      "quote the prompt: summaries, RAG answers, code edits)")
    group.add_argument("--prompt-lookup", action="store_true", help="turn it on (greedy replies stay the same)")
    group.add_argument("--num-assistant-tokens", type=int, default=5, help="longest draft per step (default 5)")
    group.add_argument("--max-ngram-size", type=int, default=3,
                       help="longest run of last tokens looked up in the prompt (default 3)")


def prompt_lookup_of(args: argparse.Namespace) -> PromptLookup | None:
    """The PromptLookup the arguments ask for, or None."""
    if not args.prompt_lookup:
        return None
    lookup = PromptLookup(args.num_assistant_tokens, args.max_ngram_size)
    lookup.validate()
    return lookup


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """--adapter PATH[:SCALE], as often as needed (OpenVINO on CPU or GPU)."""
    parser.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]",
                        help="a PEFT LoRA adapter folder (or .safetensors file) to apply at run time, scaled by SCALE "
                        "(default 1: the adapter as trained); repeat for several")


def adapters_of(args: argparse.Namespace) -> list[LoraAdapter]:
    """The adapters the arguments name (ModelLoadError for one that cannot be read)."""
    return [parse_adapter(spec) for spec in args.adapter]


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """--kv-cache-precision, --max-context, --prefill-chunk (OpenVINO on CPU or GPU; see python -m runtime.plan)
    and --ov-config."""
    group = parser.add_argument_group("memory and plugin settings (python -m runtime.plan tells what fits)")
    group.add_argument("--kv-cache-precision", choices=("f16", "u8", "u4", "i8"),
                       help="KV-cache element type: CPU f16, u8 (its default) or u4; GPU f16 or i8")
    group.add_argument("--max-context", type=int, help="tokens of history and prompt to keep (default: the model's)")
    group.add_argument("--prefill-chunk", type=int, metavar="TOKENS",
                       help="process prompts this many tokens at a time (paged-attention backend), so a long prompt "
                       "needs the workspace of TOKENS tokens only")
    group.add_argument("--ov-config", nargs="+", default=[], metavar="KEY=VALUE",
                       help="OpenVINO plugin settings on top of the defaults, e.g. DYNAMIC_QUANTIZATION_GROUP_SIZE=32 "
                       "(on CPU the runtime picks 128 for channel-wise INT4 weights)")


def memory_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine keyword arguments the memory and plugin arguments ask for (ValueError for a bad --ov-config)."""
    names = ("kv_cache_precision", "max_context", "prefill_chunk")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {**options, "extra_properties": ov_config_of(args.ov_config)} if args.ov_config else options


def ov_config_of(items: list[str]) -> dict[str, str]:
    """``--ov-config`` KEY=VALUE items as plugin settings (ValueError for an item without both)."""
    pairs = [item.partition("=") for item in items]
    if any(not key or not sep for key, sep, _ in pairs):
        raise ValueError("--ov-config takes KEY=VALUE pairs")
    return {key: value for key, _, value in pairs}
