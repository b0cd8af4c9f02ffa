"""The OpenVINO engine: openvino-genai's LLMPipeline on CPU, GPU, NPU or AUTO."""

from __future__ import annotations

import json
import math
import os
import weakref
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

from chat_format import ChatTemplate
from chat_format.genai import GenAIEncoder
from hostcpu import openvino_amx
from runtime.adapters import LoraAdapter, adapter_config, genai_adapters
from runtime.engine import (DeviceError, EngineError, Generation, GenerationOptions, ModelLoadError, PromptLookup,
                            ReplyStats)
from runtime.streaming import step_counting_streamer
from runtime.weight_pages import WeightPages

REQUIRED_FILES = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml")
IR_FILES = ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml")
INSTALL_HINTS = {
    "GPU": "install Intel's GPU driver (compute runtime / Level Zero; on Windows the Arc/Iris Xe graphics driver)",
    "NPU": "install Intel's NPU driver (Core Ultra only; on Windows the Intel NPU driver, on Linux linux-npu-driver)",
}


def default_cache_dir() -> Path | None:
    """Folder for compiled-model blobs, so the second load of a model is fast: GLM4_INTEL_CACHE_DIR when set
    (empty: no cache), else a per-user folder."""
    configured = os.environ.get("GLM4_INTEL_CACHE_DIR")
    if configured is not None:
        return Path(configured) if configured.strip() else None
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "glm4-intel" / "ov-cache"


# On CPU the plugin quantizes activations to int8 in groups of 32 channels. With INT4 weights in groups of 64 or
# 128 a group as wide as the weights' prefills 1.2-1.4x faster, channel-wise weights take 128; decode and accuracy
# do not move. A group wider than the weights' is slower (docs/benchmarks.md, "Activations' dynamic quantization").
ACTIVATION_GROUPS = (64, 128)


def activation_group(int4_groups: Collection[int]) -> int | None:
    """The CPU's activation quantization group for 4-bit weights in ``int4_groups`` (-1: channel-wise), or None
    to keep the plugin's."""
    widest = ACTIVATION_GROUPS[-1]
    group = min((widest if size == -1 else min(size, widest) for size in int4_groups), default=None)
    return group if group in ACTIVATION_GROUPS else None


def cpu_precision(int4_groups: Collection[int], amx: bool) -> str | None:
    """The CPU's inference precision for 4-bit weights in ``int4_groups`` on a CPU with or without AMX, or None
    to keep the plugin's.

    With AMX the plugin computes in bf16 on its tiles and quantizes no activations; in f32 the activations are
    quantized to int8, and 4-bit weights decode faster: against llama.cpp Q4_0, group 128 and channel-wise 1.3-1.8x
    (bf16: 0.9-1.1x), group 64 1.2-1.6x (0.8-0.95x), group 32 0.83-1.05x (0.7-0.85x), with prefill at 0.9-3.4x
    either way (docs/benchmarks.md, "Intel Xeon with AMX")."""
    return "f32" if amx and int4_groups else None


def layout_notes(device: str, int4_groups: Collection[int], amx: bool) -> list[str]:
    """A one-line hint when ``device`` runs the IR's 4-bit layout far slower than another layout would: INT4
    groups narrower than 64 on a CPU with AMX (``amx``), where group 128 decodes about twice as fast."""
    narrow = [size for size in int4_groups if 0 < size < 64]
    if device.split(".")[0] != "CPU" or not amx or not narrow:
        return []
    return [f"INT4 groups of {min(narrow)} decode about half as fast as groups of 128 on this CPU with AMX; "
            "`python -m convert --profile xeon` (its default on such a CPU) writes those (docs/benchmarks.md, "
            "\"Intel Xeon with AMX\")"]


def device_properties(device: str, cache_dir: Path | None, threads: int | None = None,
                      kv_cache_precision: str | None = None, max_prompt_len: int = 1024,
                      min_response_len: int = 128, int4_groups: Collection[int] = ()) -> dict[str, Any]:
    """The plugin configuration passed to LLMPipeline for ``device``; ``int4_groups`` are the group sizes of the
    model's 4-bit weights (-1: channel-wise), as :func:`check_model_dir` returns them."""
    properties: dict[str, Any] = {}
    if cache_dir is not None:
        properties["CACHE_DIR"] = str(cache_dir)
    kind = device.split(".")[0]
    if kind == "CPU" and threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    if kind == "CPU" and (group := activation_group(int4_groups)):
        properties["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = group
    if kind == "CPU" and (precision := cpu_precision(int4_groups, openvino_amx())):
        properties["INFERENCE_PRECISION_HINT"] = precision
    if kind in ("CPU", "GPU") and kv_cache_precision:
        properties["KV_CACHE_PRECISION"] = kv_cache_precision
    if kind == "NPU":
        properties.update(MAX_PROMPT_LEN=max_prompt_len, MIN_RESPONSE_LEN=min_response_len,
                          GENERATE_HINT="BEST_PERF", PREFILL_HINT="DYNAMIC")
    return properties


CACHE_DIR_HELP = ("folder for compiled models, so a second load is fast (default: GLM4_INTEL_CACHE_DIR, else the "
                  "user's cache folder; an empty value: no cache)")


def resolve_cache_dir(cache_dir: Path | None | str) -> Path | None:
    """The cache folder for ``cache_dir`` ("default", a path, or None/"" for none), created."""
    cache = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    if cache is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # the plugin then fails to use it, and load_pipeline loads without a cache
    return cache


def load_pipeline(build: Callable[[dict[str, Any]], Any], properties: dict[str, Any],
                  what: str) -> tuple[Any, list[str]]:
    """``build(properties)``; when that fails with a model cache, once more without it (a cache on a path
    the plugin cannot use, or a stale blob). Returns the pipeline and notes for the user."""
    try:
        return build(properties), []
    except Exception as error:
        if "CACHE_DIR" not in properties:
            raise ModelLoadError(f"cannot load {what}: {error_summary(error)}") from error
        first = error_summary(error)
    without = {key: value for key, value in properties.items() if key != "CACHE_DIR"}
    try:
        pipeline = build(without)
    except Exception as error:
        raise ModelLoadError(f"cannot load {what}: {error_summary(error)}") from error
    return pipeline, [f"loading with the model cache in {properties['CACHE_DIR']} failed ({first}); loaded without "
                      "it (--cache-dir or GLM4_INTEL_CACHE_DIR picks another folder, an empty value none)"]


def chunked_prefill(folder: Path, context: int, chunk: int, kv_cache_precision: str | None) -> Any:
    """A SchedulerConfig that runs the pipeline on openvino-genai's paged-attention backend: prompts
    are processed ``chunk`` tokens at a time (so the prefill workspace stays that of ``chunk`` tokens),
    with a KV cache sized for ``context`` tokens."""
    import openvino_genai

    from runtime.plan import Shape, kv_bytes_per_token

    shape = Shape.of(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    per_token = kv_bytes_per_token(shape, kv_cache_precision or "f16")
    config = openvino_genai.SchedulerConfig()
    config.max_num_batched_tokens, config.dynamic_split_fuse = chunk, True
    config.cache_size = max(math.ceil(per_token * context / 2**30), 1)  # GB
    return config


def check_device(device: str, available: Sequence[str]) -> None:
    """Raise DeviceError unless ``device`` (CPU, GPU, GPU.1, NPU, AUTO...) is present."""
    kind = device.split(":")[0].split(".")[0]
    if kind in ("AUTO", "HETERO", "MULTI"):
        return
    if kind not in ("CPU", "GPU", "NPU"):
        raise DeviceError(f"unknown device {device!r}; use CPU, GPU, GPU.0, GPU.1, NPU or AUTO")
    if device in available or (device == kind and any(d.split(".")[0] == kind for d in available)):
        return
    hint = INSTALL_HINTS.get(kind, "")
    raise DeviceError(f"device {device} is not present (available: {', '.join(available) or 'none'})"
                      + (f"; {hint}" if hint else ""))


def check_model_dir(folder: Path) -> set[int]:
    """Raise ModelLoadError unless ``folder`` holds a complete, readable, untruncated model; return the group
    sizes of the model's 4-bit weights (-1: channel-wise; empty when none is 4-bit)."""
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} " + ("is not a folder" if folder.exists() else "does not exist"))
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        hint = " (convert the checkpoint with python -m convert)" if "openvino_model.xml" in missing else \
            " (the tokenizer IR is missing: reconvert with python -m convert)"
        raise ModelLoadError(f"{folder} is not a converted model: missing {', '.join(missing)}{hint}")
    groups = check_ir(folder / IR_FILES[0])
    for name in IR_FILES[1:]:
        check_ir(folder / name)
    return groups


def check_ir(xml_path: Path) -> set[int]:
    """Check that an IR's XML parses and that its .bin holds every constant the XML points to; return the group
    sizes of its 4-bit weights (-1 for channel-wise ones: [rows, columns] against grouped [rows, groups, size]).

    OpenVINO reports these as a bare "Incorrect weights in bin file!" (or tries every frontend,
    logging to stderr), without naming the file.
    """
    return set(int4_layout(xml_path))


def int4_layout(xml_path: Path) -> dict[int, int]:
    """:func:`check_ir`'s checks; each group size of the IR's 4-bit weights with how many scales it has (one per
    group, or per row when channel-wise)."""
    import xml.etree.ElementTree as ElementTree

    needed, first, groups = 0, True, {}
    try:
        for event, element in ElementTree.iterparse(xml_path, events=("start", "end")):
            if first and element.tag != "net":
                raise ModelLoadError(f"{xml_path} is not an OpenVINO IR (root element <{element.tag}>); "
                                     "reconvert the model")
            first = False
            if event == "start" and element.tag == "data" and element.get("offset") is not None:
                needed = max(needed, int(element.get("offset", 0)) + int(element.get("size", 0)))
                if element.get("element_type") in ("i4", "u4"):
                    dims = [int(dim) for dim in (element.get("shape") or "1").split(",")]
                    size, scales = (dims[2], dims[0] * dims[1]) if len(dims) == 3 else (-1, dims[0])
                    groups[size] = groups.get(size, 0) + scales
            elif event == "end" and element.tag == "layer":
                element.clear()  # keeps memory flat on a multi-gigabyte model's IR
    except (OSError, ValueError, ElementTree.ParseError) as error:  # ParseError is a SyntaxError
        raise ModelLoadError(f"{xml_path} is not a readable OpenVINO IR ({error}); reconvert the model") from None
    bin_path = xml_path.with_suffix(".bin")
    size = bin_path.stat().st_size if bin_path.is_file() else 0
    if size < needed:
        raise ModelLoadError(f"{bin_path} is truncated or missing ({size} bytes, the IR needs {needed}); "
                             "copy or reconvert the model again")
    return groups


def error_summary(error: BaseException) -> str:
    """The informative line of an OpenVINO error (its first lines only name C++ source files)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return (useful or lines or [type(error).__name__])[-1]


def context_length(folder: Path) -> int:
    """The model's context window from config.json (GLM-4: 128K), 8192 when unknown."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 8192
    return int(config.get("max_position_embeddings") or config.get("seq_length") or 8192)


def special_token_id(encoder: GenAIEncoder, token: str) -> int:
    """Id of one of GLM-4's special tokens; ModelLoadError when the tokenizer lacks it."""
    try:
        return encoder.token_id(token)
    except KeyError:
        raise ModelLoadError(f"the tokenizer has no {token} token: not a GLM-4 model") from None


def apply_options(config: Any, options: GenerationOptions, lookup: PromptLookup | None = None,
                  adapters: dict[str, tuple[Any, float]] | None = None) -> Any:
    """Set ``options`` (and the prompt-lookup and adapter settings) on an openvino_genai.GenerationConfig."""
    if adapters:
        config.adapters = adapter_config(adapters, options.adapters)
    elif options.adapters:
        raise ValueError(f"unknown adapter {', '.join(options.adapters)}: this model was loaded without adapters")
    if lookup is not None:
        config.num_assistant_tokens, config.max_ngram_size = lookup.num_assistant_tokens, lookup.max_ngram_size
    config.max_new_tokens = options.max_new_tokens
    config.min_new_tokens, config.ignore_eos = options.min_new_tokens, options.ignore_eos
    config.do_sample = options.temperature > 0
    if config.do_sample:
        config.temperature, config.top_p = options.temperature, options.top_p
        config.top_k = options.top_k or 0
        if options.seed is not None:
            config.rng_seed = options.seed
    config.repetition_penalty = options.repetition_penalty
    if options.structured_output is not None:
        config.structured_output_config = options.structured_output
    return config


class OpenVINOEngine:
    """openvino-genai LLMPipeline behind the :class:`runtime.engine.Engine` protocol."""

    def __init__(self, model_dir: str | Path, device: str = "CPU", cache_dir: Path | None | str = "default",
                 threads: int | None = None, kv_cache_precision: str | None = None,
                 max_prompt_len: int = 1024, min_response_len: int = 128,
                 prompt_lookup: PromptLookup | None = None, adapters: Sequence[LoraAdapter] = (),
                 max_context: int | None = None, prefill_chunk: int | None = None,
                 trim_weight_pages: bool = True, extra_properties: dict[str, Any] | None = None) -> None:
        import openvino as ov
        import openvino_genai

        folder = Path(model_dir)
        int4_groups = check_model_dir(folder)
        device = device.upper()
        if prompt_lookup is not None:
            prompt_lookup.validate()
        if (prompt_lookup is not None or adapters or prefill_chunk) and device.startswith("NPU"):
            raise DeviceError("prompt lookup, LoRA adapters and chunked prefill run on CPU and GPU, not on the NPU's "
                              "static pipeline")
        context = min(context_length(folder), max_context or context_length(folder))
        if context <= min_response_len or (prefill_chunk is not None and prefill_chunk < 1):
            raise ValueError(f"--max-context must be over {min_response_len} tokens and --prefill-chunk at least 1")
        self.adapters = genai_adapters(list(adapters), folder)
        check_device(device, ov.Core().available_devices)
        properties = device_properties(device, resolve_cache_dir(cache_dir), threads, kv_cache_precision,
                                       max_prompt_len, min_response_len, int4_groups)
        properties.update(extra_properties or {})
        if prompt_lookup is not None:
            properties["prompt_lookup"] = True
        if self.adapters:
            properties["adapters"] = adapter_config(self.adapters, None)
        if prefill_chunk:
            properties["scheduler_config"] = chunked_prefill(folder, context, prefill_chunk, kv_cache_precision)
        self.prompt_lookup = prompt_lookup
        # The mapped IR's pages are given back while the model loads and answers its first request (when the CPU
        # plugin copies the weights it computes with), see runtime/weight_pages.py.
        self._pages = WeightPages(folder, properties.get("CACHE_DIR")) if trim_weight_pages else None
        if self._pages:
            self._pages.start()
            weakref.finalize(self, self._pages.stop)  # an engine dropped before its first request
        try:
            self.pipeline, self.notes = load_pipeline(lambda p: openvino_genai.LLMPipeline(str(folder), device, **p),
                                                      properties, f"{folder} on {device}")
        except BaseException:
            if self._pages:
                self._pages.stop()
            raise
        self.notes += layout_notes(device, int4_groups, openvino_amx())
        self.tokenizer = self.pipeline.get_tokenizer()
        self.name, self.device, self.properties = folder.name, device, properties
        self.template = ChatTemplate.from_folder(folder)
        # NPU compiles for MAX_PROMPT_LEN; elsewhere keep MIN_RESPONSE_LEN of the context for the reply.
        self.max_prompt_tokens = max_prompt_len if device.startswith("NPU") else context - min_response_len
        self.encoder = GenAIEncoder(self.tokenizer)
        self._stops = set(self.pipeline.get_generation_config().stop_token_ids)

    def encode(self, text: str) -> list[int]:
        return self.encoder.encode(text)

    def token_id(self, token: str) -> int:
        return special_token_id(self.encoder, token)

    def generation_config(self, options: GenerationOptions) -> Any:
        return apply_options(self.pipeline.get_generation_config(), options, self.prompt_lookup, self.adapters)

    def generate(self, prompt_ids: Sequence[int], options: GenerationOptions,
                 on_text: Callable[[str], bool]) -> Generation:
        import numpy as np
        import openvino as ov
        import openvino_genai

        def on_chunk(chunk: str) -> Any:
            return openvino_genai.StreamingStatus.CANCEL if on_text(chunk) else openvino_genai.StreamingStatus.RUNNING

        streamer = step_counting_streamer(self.tokenizer, on_chunk)
        tensor = ov.Tensor(np.array([list(prompt_ids)], dtype=np.int64))
        try:
            result = self.pipeline.generate(tensor, self.generation_config(options), streamer)
        except RuntimeError as error:
            raise EngineError(f"generation failed on {self.device}: {error_summary(error)}") from error
        finally:
            pages, self._pages = self._pages, None
            if pages:
                pages.stop()
        if streamer.error is not None:
            raise streamer.error
        tokens = list(result.tokens[0])
        metrics = result.perf_metrics
        generated = metrics.get_num_generated_tokens()
        finish = "stop" if tokens and tokens[-1] in self._stops and not options.ignore_eos else "length"
        stats = ReplyStats(finish_reason=finish, prompt_tokens=len(prompt_ids), generated_tokens=generated,
                           ttft_s=metrics.get_ttft().mean / 1000.0,
                           tokens_per_s=metrics.get_throughput().mean if generated > 1 else 0.0,
                           tokens_per_step=generated / streamer.steps if streamer.steps else 0.0)
        return Generation(text=self.tokenizer.decode(tokens), stats=stats)
