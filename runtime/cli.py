"""Command-line arguments shared by the commands that load a model (chat, demo, server)."""

from __future__ import annotations

import argparse

from runtime.adapters import LoraAdapter, parse_adapter
from runtime.engine import PromptLookup
from runtime.openvino_engine import CACHE_DIR_HELP

BACKENDS = ("openvino", "ipex")
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
