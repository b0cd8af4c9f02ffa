"""Command-line arguments shared by the commands that load a model (chat, demo, server)."""

from __future__ import annotations

import argparse

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
