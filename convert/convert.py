"""Convert a GLM-4 checkpoint to OpenVINO IR with NNCF weight compression, ready for openvino-genai.

    python -m convert --model models/glm4-tiny --output build/glm4-tiny-int4 --profile cpu
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

from chat_format import BUILTIN_TEMPLATE, STOP_TOKENS, ChatTemplate, TemplateError
from chat_format.genai import genai_template
from convert.atomic import OutputError, abandon_staging, check_output, remove_stale_staging, staged_output
from convert.lora import LoraError, adapter_record, check_adapter_folder, merge_lora
from convert.calibration import BUILTIN, calibration_texts, load_conversations
from convert.manifest import MemoryWatch, write_manifest
from convert.ovms import write_graph
from convert.recipes import (PROFILES, WEIGHT_FORMATS, Recipe, RecipeError, default_profile, make_recipe,
                             quantization_config)
from convert.source import Source, SourceError, resolve
from convert.template_check import TemplateCheckError, check_templates
from convert.tokenizer_ir import save_tokenizer_ir
from convert.verify import verify_output
from convert.vocab import compress_vocab_weights

STAGES = ("export", "compress", "tokenizer", "template check", "verify", "manifest")


class ConversionError(Exception):
    """A stage of the conversion failed after the inputs were accepted."""


def stop_ids(tokenizer: Any) -> list[int]:
    """GLM-4's three stop ids in ``tokenizer``; all must exist."""
    vocabulary = tokenizer.get_vocab()  # not unk_token_id: a tokenizer may use <|endoftext|> as its unknown token
    missing = [token for token in STOP_TOKENS if token not in vocabulary]
    if missing:
        raise ConversionError(f"the tokenizer lacks GLM-4's stop token {', '.join(missing)} "
                              f"(it needs {', '.join(STOP_TOKENS)})")
    return [vocabulary[token] for token in STOP_TOKENS]


EXPORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def export_ir(source: Source, folder: Path, trust_remote_code: bool, dtype: str | None = None) -> None:
    """Export the checkpoint to a stateful OpenVINO IR with optimum-intel.

    By default the weights keep the checkpoint's own precision: a bf16 checkpoint then stays
    memory-mapped instead of being converted in RAM (0.2x of its size in anonymous memory
    instead of 1.1x for fp16 on the GLM-4-9B-shaped model).
    """
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    checkpoint_dtype = source.config.get("torch_dtype") or source.config.get("dtype") or "float32"
    dtype = dtype or EXPORT_DTYPES.get(str(checkpoint_dtype), "fp32")
    main_export(model_name_or_path=source.path, output=folder, task="text-generation-with-past",
                trust_remote_code=trust_remote_code, ov_config=OVConfig(dtype=dtype), convert_tokenizer=False)


def compress_ir(exported: Path, output: Path, recipe: Recipe, source: Source,
                calibration: list[str] | None, chunk_vocab: bool = True, trust_remote_code: bool = False) -> None:
    """Compress the exported IR's weights with NNCF and save the result to ``output``.

    The vocabulary-sized weights are compressed first, in row chunks (see convert.vocab); NNCF
    then compresses the rest through optimum-intel, data-aware methods included. With
    ``chunk_vocab=False`` NNCF compresses everything itself (the reference the tests compare with).
    """
    import gc

    import openvino as ov
    from optimum.intel import OVModelForCausalLM

    file_name, ignored, lm_head_done = "openvino_model.xml", [], False
    config = vocab_config(recipe)
    if chunk_vocab and config is not None:
        model = ov.Core().read_model(exported / file_name)
        vocab_size = int(source.config.get("vocab_size") or source.config.get("padded_vocab_size") or 0)
        ignored = compress_vocab_weights(model, vocab_size, config)
        lm_head_done = any(op.get_type_name() == "MatMul" for op in model.get_ops() if op.get_friendly_name() in ignored)
        if ignored:
            file_name = "openvino_model_vocab.xml"
            ov.save_model(model, exported / file_name, compress_to_fp16=False)
        del model
        gc.collect()
    model = OVModelForCausalLM.from_pretrained(exported, file_name=file_name, compile=False,
                                               quantization_config=quantization_config(recipe, source.path, calibration,
                                                                                       ignored, lm_head_done),
                                               trust_remote_code=trust_remote_code)
    model.save_pretrained(output)
    del model
    gc.collect()


def vocab_config(recipe: Recipe) -> Any:
    """NNCF's configuration for the vocabulary-sized weights when they can be compressed in row chunks, else None:
    INT8 channel-wise beside INT4 or INT8 layers; the recipe's own INT4 with --all-layers, unless NNCF must rank
    them against the other layers (ratio < 1) or calibrate them (data-aware methods)."""
    from convert.vocab import int4_mode, int8_mode

    if recipe.weight_format == "fp16":
        return None
    if not recipe.all_layers:
        return int8_mode(symmetric=recipe.weight_format == "int8" and recipe.sym)
    if recipe.ratio < 1.0 or recipe.data_aware:
        return None
    return int4_mode(recipe.sym, recipe.group_size)


def write_generation_config(output: Path, tokenizer: Any) -> None:
    """Make generation_config.json list all three GLM-4 stop ids (GenAI stops on these)."""
    path = output / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config.update(eos_token_id=stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def convert(model: str, output: str | Path, recipe: Recipe | None = None, trust_remote_code: bool = False,
            overwrite: bool = False, verify: bool = True, quiet: bool = False,
            on_stage: Callable[[str], None] | None = None, ovms_device: str | None = None,
            allow_template_mismatch: bool = False, lora: str | Path | None = None,
            lora_scale: float = 1.0) -> dict[str, Any]:
    """Convert ``model`` into ``output`` atomically and return the manifest.

    Raises TemplateCheckError when a prompt of the converted model would differ from what the
    checkpoint's chat template renders (unless ``allow_template_mismatch``; the manifest records it).
    """
    from transformers import AutoTokenizer

    recipe = recipe or make_recipe(default_profile())
    source = resolve(model, trust_remote_code)
    check_output(output, overwrite)
    conversations = load_conversations(recipe.dataset) if recipe.dataset else None
    started = time.time()

    def report(stage: str | None) -> None:
        if stage and on_stage:
            on_stage(stage)

    with MemoryWatch() as memory, staged_output(output, overwrite) as staging:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        stop_ids(tokenizer)
        own_template = isinstance(tokenizer.chat_template, str)
        if not own_template:  # the converted folder gets GLM-4's format as this project writes it
            tokenizer.chat_template = BUILTIN_TEMPLATE
        template = ChatTemplate.from_tokenizer(tokenizer)
        placement = template.tools_placement  # a template that does not parse fails here, before the export
        exported = staging / ".export" if recipe.weight_format != "fp16" else staging
        report("export")
        weights = source
        if lora is not None:  # the adapter merged into a copy of the checkpoint, which is exported instead
            weights = replace(source, path=str(staging / ".merged"), local=True)
            merge_lora(source.path, lora, lora_scale, Path(weights.path), trust_remote_code)
        export_ir(weights, exported, trust_remote_code, "fp16" if recipe.weight_format == "fp16" else None)
        if exported != staging:
            report("compress")
            calibration = calibration_texts(tokenizer, conversations) if conversations else None
            compress_ir(exported, staging, recipe, weights, calibration, trust_remote_code=trust_remote_code)
            shutil.rmtree(exported)
        if weights is not source:
            shutil.rmtree(weights.path)
        report("tokenizer")
        tokenizer.save_pretrained(staging)
        save_tokenizer_ir(tokenizer, staging, genai_template(template.source, placement))
        write_generation_config(staging, tokenizer)
        report("template check")
        found = check_templates(tokenizer, template, staging)
        if found.mismatches and not allow_template_mismatch:
            more = f" (and {len(found.mismatches) - 1} more)" if len(found.mismatches) > 1 else ""
            raise TemplateCheckError(f"prompts would differ from the checkpoint's chat template: "
                                     f"{found.mismatches[0]}{more}; --allow-template-mismatch converts anyway")
        checks: dict[str, Any] = {"chat_template": {"source": "checkpoint" if own_template else "built-in (the "
                                                    "checkpoint has none)", **found.as_dict()}}
        if lora is not None:
            checks["lora_merged"] = adapter_record(lora, lora_scale)
        if verify:
            report("verify")
            checks["verify"] = verify_output(staging, Path(source.path) if source.local else None)
        if ovms_device:
            write_graph(staging, ovms_device)
        report("manifest")
        manifest = write_manifest(staging, source, recipe, checks, time.time() - started, memory)
    return manifest


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a GLM-4-9B-Chat checkpoint (glm-4-9b-chat, -hf or 0414) to OpenVINO IR with "
                    "NNCF weight compression and an OpenVINO tokenizer, ready for openvino-genai.")
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id (e.g. THUDM/glm-4-9b-chat-hf)")
    parser.add_argument("--output", required=True, help="folder to write (created atomically)")
    parser.add_argument("--profile", choices=sorted(PROFILES),
                        help="device defaults: cpu (INT4 sym g32, data-free AWQ), gpu (INT4 sym g128, data-free "
                             "AWQ), npu (INT4 sym channel-wise), xeon (INT4 sym g128 with a fifth of the layers INT8, "
                             "data-free AWQ; for CPUs with AMX) (default: xeon on a CPU with AMX, cpu "
                             "elsewhere)")
    parser.add_argument("--weight-format", choices=WEIGHT_FORMATS, help="weight precision (default: the profile's, int4)")
    parser.add_argument("--group-size", type=int, help="INT4 group size; -1 means channel-wise")
    parser.add_argument("--ratio", type=float, help="share of layers in INT4, the rest INT8 (0-1]")
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_const", const=True, help="symmetric quantization")
    sym.add_argument("--asym", dest="sym", action="store_const", const=False, help="asymmetric quantization")
    parser.add_argument("--all-layers", action="store_const", const=True,
                        help="INT4 for embeddings and the LM head too (default: INT8 there)")
    awq = parser.add_mutually_exclusive_group()
    awq.add_argument("--awq", dest="awq", action="store_const", const=True,
                     help="AWQ weight rescaling: activation-aware with --dataset, else data-free from the weights' "
                          "magnitudes (default: on for INT4 in the cpu, gpu and xeon profiles)")
    awq.add_argument("--no-awq", dest="awq", action="store_const", const=False, help="no AWQ rescaling")
    parser.add_argument("--scale-estimation", action="store_const", const=True, help="scale estimation (needs --dataset)")
    parser.add_argument("--gptq", action="store_const", const=True, help="GPTQ (needs --dataset)")
    parser.add_argument("--dataset", help=f"calibration data: {BUILTIN!r} (built in, English and Chinese chats) or a JSONL file")
    parser.add_argument("--num-samples", type=int, help="calibration samples to use")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the checkpoint's own Python code (needed by the original glm-4-9b-chat)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip loading the result with openvino-genai")
    parser.add_argument("--compare", action="store_true",
                        help="afterwards, score the result against the source: eval exact match (when the source "
                             "has eval.jsonl), top-1 token agreement and KL divergence")
    parser.add_argument("--ovms", metavar="DEVICE", choices=("CPU", "GPU", "NPU"),
                        help="also write graph.pbtxt so OpenVINO Model Server can serve the folder on DEVICE")
    parser.add_argument("--allow-template-mismatch", action="store_true",
                        help="convert even when a prompt rendered by the runtime or openvino-genai would differ from "
                             "the checkpoint's own chat template (recorded in manifest.json)")
    parser.add_argument("--lora", metavar="ADAPTER_DIR",
                        help="merge this PEFT LoRA adapter into the weights before converting (glm-4-9b-chat-hf and "
                             "GLM-4-9B-0414 projection names; needs RAM for the checkpoint in its own precision)")
    parser.add_argument("--lora-scale", type=float, default=1.0,
                        help="scale of the merged adapter (default 1: as trained, lora_alpha / r)")
    parser.add_argument("--quiet", action="store_true", help="print only errors and the final line")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        profile = args.profile or default_profile(args.weight_format)
        recipe = make_recipe(profile, weight_format=args.weight_format, group_size=args.group_size,
                             ratio=args.ratio, sym=args.sym, all_layers=args.all_layers, awq=args.awq,
                             scale_estimation=args.scale_estimation, gptq=args.gptq, dataset=args.dataset,
                             num_samples=args.num_samples)
        if args.dataset:
            load_conversations(args.dataset)
        resolve(args.model, args.trust_remote_code)
        remove_stale_staging(check_output(args.output, args.overwrite))  # before --quiet hides its note
        if args.lora is not None:
            check_adapter_folder(args.lora)
            if args.compare:
                raise ValueError("--compare scores against the source as given; it cannot be combined with --lora")
    except (RecipeError, SourceError, OutputError, TemplateError, LoraError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if profile == "xeon" and not args.profile and not args.quiet:
        print("note: profile xeon, the default on a CPU with AMX (--profile cpu for an IR meant for laptops)",
              file=sys.stderr)
    progress = nullcontext() if args.quiet else stage_bar()
    exit_on_interrupt()
    try:
        with quiet_output(args.quiet), progress as bar:
            manifest = convert(args.model, args.output, recipe, args.trust_remote_code, args.overwrite,
                               args.verify, args.quiet, on_stage=bar.stage if bar else None,
                               ovms_device=args.ovms, allow_template_mismatch=args.allow_template_mismatch,
                               lora=args.lora, lora_scale=args.lora_scale)
    except (OutputError, LoraError) as error:  # the output is held open (Windows), or the adapter does not fit
        print(f"error: nothing was written: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # any library failure: one line, never a traceback
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        print(f"error: conversion failed, nothing was written: {lines[0].strip()}", file=sys.stderr)
        return 1
    shares = ", ".join(f"{k} {v:.0%}" for k, v in manifest["weights"]["share"].items())
    for note in template_notes(manifest["checks"]["chat_template"]):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.output}: {manifest['weights']['total_bytes'] / 2**20:.1f} MiB ({shares}), "
          f"peak RSS {manifest['peak_memory']['rss_bytes'] / 2**30:.2f} GiB, {manifest['duration_s']:.0f}s")
    if args.compare:
        from convert.compare import compare, format_table

        with quiet_output(args.quiet):
            result = compare(args.model, Path(args.output), args.trust_remote_code)
        print(format_table(result))
    return 0


def template_notes(check: dict[str, Any]) -> list[str]:
    """What users should know about the converted model's chat template."""
    notes = []
    if check["source"] != "checkpoint":
        notes.append("the checkpoint carries no chat template: GLM-4's format as this project writes it was used")
    if check["tools_placement"] is None:
        notes.append("the chat template declares no tools (neither top-level nor on a message): the converted "
                     "model cannot be given tools")
    notes += [f"template mismatch kept: {problem}" for problem in check["mismatches"]]
    return notes


def exit_on_interrupt() -> None:
    """End the conversion at once on Ctrl-C, SIGTERM or Ctrl-Break: staging folders removed, exit status 130.

    Raising KeyboardInterrupt instead can abort the process inside a library's native code (seen:
    SIGABRT in the PyTorch frontend), which leaves the staging folder behind. While the finished
    folder is being renamed into place, the interrupt waits for that moment to pass.
    """
    def handler(signum: int, frame: Any) -> None:
        if abandon_staging():
            os.write(2, b"interrupted: nothing was written\n")  # the real stderr, even while --quiet hides sys.stderr
            os._exit(130)

    signal.signal(signal.SIGINT, handler)
    for name in ("SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)


@contextmanager
def quiet_output(quiet: bool) -> Iterator[None]:
    """Hide the libraries' developer warnings (tracer, deprecation); with ``quiet``, all their output."""
    import io
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warning from the HF tokenizers
    for name in ("transformers", "optimum", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not quiet:
            yield
            return
        logging.disable(logging.WARNING)
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            yield


class stage_bar:
    """A progress bar over the conversion's named stages."""

    def __enter__(self) -> "stage_bar":
        from tqdm import tqdm

        self.bar = tqdm(total=len(STAGES), unit="stage", bar_format="{desc:<16} {bar} {n_fmt}/{total_fmt} [{elapsed}]")
        return self

    def stage(self, name: str) -> None:
        if self.bar.desc:
            self.bar.update(1)
        self.bar.set_description_str(name)

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.bar.n = self.bar.total
            self.bar.set_description_str("done")
        self.bar.close()
