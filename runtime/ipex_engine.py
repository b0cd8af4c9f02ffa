"""The Xeon engine: a Hugging Face GLM-4 checkpoint in PyTorch, optimized by intel-extension-for-pytorch.

It runs in its own environment (``make venv-xeon``, then ``.venv-xeon/bin/python``): IPEX 2.8.0,
its last release, refuses any torch but 2.8.x. The model folder is the checkpoint itself
(glm-4-9b-chat-hf, GLM-4-9B-0414, or the original glm-4-9b-chat with ``trust_remote_code``), not a
converted OpenVINO folder. Precision: bf16 where the CPU has AVX-512 BF16 or AMX (Sapphire Rapids
and later), fp32 elsewhere. IPEX fuses and weight-only quantizes (``quantize``: INT8/INT4) the
original glm-4-9b-chat (``ChatGLMModel``, after :func:`adapt_chatglm`); for the -hf and 0414
architectures it has no GLM-specific path, runs them as plain PyTorch at the chosen precision, and
``notes`` says in one line that the quantization was not applied.

Threads and cores: one process per socket, pinned to that socket's cores and memory, with one
thread per physical core, e.g. on socket 0 of a 2 x 32-core Xeon::

    OMP_NUM_THREADS=32 numactl --cpunodebind=0 --membind=0 .venv-xeon/bin/python -m runtime.chat \\
        --model glm-4-9b-chat-hf --backend ipex --threads 32

torch uses GNU OpenMP, which ``OMP_PROC_BIND=close OMP_PLACES=cores`` pins; ``KMP_AFFINITY``
applies only when Intel's OpenMP (libiomp5) is preloaded. Never let threads cross sockets:
decode is memory-bandwidth bound, and remote memory halves it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from chat_format import SPECIAL_TOKENS, STOP_TOKENS, ChatTemplate
from hostcpu import onednn_cpu_flags
from runtime.engine import DeviceError, EngineError, Generation, GenerationOptions, ModelLoadError, ReplyStats

TORCH_SERIES = "2.8"  # IPEX 2.8.0 checks torch's major.minor at import and exits on a mismatch
SETUP_HINT = "run make venv-xeon and use .venv-xeon/bin/python"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
DTYPES = ("auto", "bf16", "fp32")
QUANTIZE = ("int8", "int4")


class IPEXUnavailableError(EngineError):
    """torch or IPEX is missing or mismatched, or this CPU cannot run the requested precision."""


def pick_dtype(requested: str, flags: set[str]) -> str:
    """bf16 where the CPU computes it natively (AVX-512 BF16 or AMX), else fp32; "auto" picks."""
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {requested!r}")
    native = any(flag in flags for flag in BF16_FLAGS)
    if requested == "bf16" and flags and not native:
        raise IPEXUnavailableError("this CPU has neither AVX-512 BF16 nor AMX, so IPEX cannot run bf16 here: "
                                   "use dtype fp32 (--dtype fp32)")
    if requested == "auto":
        return "bf16" if native else "fp32"
    return requested


def check_environment(flags: set[str]) -> None:
    """Raise IPEXUnavailableError unless torch 2.8.x and IPEX 2.8 are installed and the CPU has AVX2."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    try:
        ipex_version = metadata.version("intel-extension-for-pytorch")
    except metadata.PackageNotFoundError:
        ipex_version = None
    if torch_version is None or not torch_version.startswith(TORCH_SERIES + "."):
        found = f"torch {torch_version}" if torch_version else "no torch"
        raise IPEXUnavailableError(f"the ipex backend needs torch {TORCH_SERIES}.x with intel-extension-for-pytorch "
                                   f"{TORCH_SERIES} ({sys.executable} has {found}): {SETUP_HINT}")
    if ipex_version is None or not ipex_version.startswith(TORCH_SERIES + "."):
        found = f"version {ipex_version}" if ipex_version else "not installed"
        raise IPEXUnavailableError(f"intel-extension-for-pytorch {TORCH_SERIES} is {found} in {sys.executable}: "
                                   f"{SETUP_HINT}")
    if flags and "avx2" not in flags and "avx512f" not in flags:
        raise IPEXUnavailableError("IPEX needs a CPU with AVX2 or AVX-512; use the OpenVINO runtime on this one "
                                   "(python -m convert, then python -m runtime.chat)")


@contextmanager
def native_output_captured() -> Iterator[list[str]]:
    """Hold back what native code writes to stdout/stderr (IPEX's kernel-registration warnings).

    The captured text is put in the yielded list, for error messages.
    """
    captured: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


# Warnings IPEX 2.8's own generation code raises on every reply (not the user's to act on).
IPEX_CHATTER = ("To copy construct from a tensor", "JIT pass will be deprecated")


def import_ipex() -> Any:
    """Import intel_extension_for_pytorch quietly; a failure becomes a one-line IPEXUnavailableError."""
    # IPEX imports torch's compiler, which would start a pool of compile workers that this engine never uses.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    try:
        with native_output_captured() as captured:
            import intel_extension_for_pytorch as ipex
    except (ImportError, OSError, RuntimeError, SystemExit) as error:
        lines = [line for line in "".join(captured).splitlines() if line.strip()] or [str(error)]
        raise IPEXUnavailableError(f"intel-extension-for-pytorch does not import ({lines[-1].strip()}): "
                                   f"{SETUP_HINT}") from None
    for message in IPEX_CHATTER:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    return ipex


def dtype_keyword() -> str:
    """from_pretrained's precision argument: ``dtype`` from transformers 4.56, ``torch_dtype`` before."""
    from packaging.version import Version

    return "dtype" if Version(metadata.version("transformers")) >= Version("4.56") else "torch_dtype"


def check_checkpoint(folder: Path) -> None:
    """Raise ModelLoadError unless ``folder`` is a Hugging Face checkpoint with weights."""
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} " + ("is not a folder" if folder.exists() else "does not exist"))
    if not (folder / "config.json").is_file():
        converted = (folder / "openvino_model.xml").is_file()
        raise ModelLoadError(f"{folder} is not a Hugging Face checkpoint (no config.json)"
                             + ("; it is a converted OpenVINO model: use --backend openvino, or give the ipex "
                                "backend the checkpoint folder" if converted else ""))
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")


def quantization_config(ipex: Any, quantize: str, compute: str) -> Any:
    """IPEX's weight-only quantization recipe: INT8 or INT4 weights, computed in ``compute`` (bf16 or fp32)."""
    weight = {"int8": ipex.quantization.WoqWeightDtype.INT8, "int4": ipex.quantization.WoqWeightDtype.INT4}[quantize]
    lowp = ipex.quantization.WoqLowpMode.BF16 if compute == "bf16" else ipex.quantization.WoqLowpMode.NONE
    return ipex.quantization.get_weight_only_quant_qconfig_mapping(weight_dtype=weight, lowp_mode=lowp)


def woq_compute(ipex: Any, quantize: str, dtype: str) -> tuple[str, list[str]]:
    """The precision weight-only layers compute in, and a note where it is not ``dtype``.

    IPEX 2.8's INT8 weight-only kernels computing in fp32 answered wrong at the AVX512_FP16 ISA level
    (Sapphire Rapids and later): 71% against 97.5% on the chatglm twin's eval, while every lower level
    (AMX, AVX512_BF16, AVX512_VNNI, AVX512, AVX2, set with ATEN_CPU_CAPABILITY) and bf16 compute were
    exact. Such CPUs compute bf16 natively, so INT8 is computed in bf16 there.
    """
    if quantize == "int8" and dtype == "fp32" and ipex._C._get_current_isa_level() == "AVX512_FP16":
        return "bf16", ["IPEX's weight-only INT8 kernels answer wrong in fp32 at this CPU's AVX512_FP16 level: "
                        "computing them in bf16"]
    return dtype, []


def adapt_chatglm(model: Any) -> None:
    """Make a GLM-4 ``ChatGLMModel`` checkpoint fit IPEX's ChatGLM fusions, which were written for ChatGLM2/3.

    IPEX replaces every forward but the embedding's and assumes [tokens, batch, hidden] hidden states;
    GLM-4's remote code is batch first (IPEX then dies of a floating-point exception), so its embedding
    output is transposed here. IPEX also builds its rotary table from ``rope_theta`` (default 10000) and
    ``max_position_embeddings`` (default 2048), while ChatGLM configs give ``rope_ratio`` (base 10000 x
    ratio; 500 in glm-4-9b-chat) and ``seq_length``: both are copied over.
    """
    import types

    import torch

    config = model.config
    config.rope_theta = 10000.0 * float(getattr(config, "rope_ratio", 1.0) or 1.0)
    config.max_position_embeddings = int(config.seq_length)
    embedding = model.transformer.embedding
    with torch.inference_mode():
        probe = embedding(torch.zeros((1, 2), dtype=torch.long))
    if tuple(probe.shape[:2]) == (1, 2):  # batch first: GLM-4's code, not ChatGLM2/3's
        batch_first = embedding.forward
        embedding.forward = types.MethodType(lambda self, ids: batch_first(ids).transpose(0, 1).contiguous(),
                                             embedding)


class QuantizationFailed(EngineError):
    """IPEX raised while applying weight-only quantization (the model may be half converted)."""


def optimize(ipex: Any, model: Any, dtype: str, quantize: str | None) -> tuple[Any, str | None, list[str]]:
    """Apply ``ipex.llm.optimize``; returns the model, the weight quantization IPEX really applied,
    and one-line notes on what it did not. Raises QuantizationFailed when IPEX fails while quantizing."""
    import torch

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    name = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if name == "ChatGLMModel":
        adapt_chatglm(model)
    failure = QuantizationFailed if quantize else EngineError
    try:
        with native_output_captured():
            if quantize:
                compute, notes = woq_compute(ipex, quantize, dtype)
                model = ipex.llm.optimize(model, dtype=torch_dtype, inplace=True, deployment_mode=True,
                                          quantization_config=quantization_config(ipex, quantize, compute))
                if any(type(m).__name__ == "WeightOnlyQuantizedLinear" for m in model.modules()):
                    return model, quantize, notes
                failure = EngineError
            model = ipex.llm.optimize(model, dtype=torch_dtype, inplace=True, deployment_mode=True)
    except (AttributeError, RuntimeError, TypeError, ValueError) as error:
        raise failure(f"ipex.llm.optimize failed on {name}: {str(error).splitlines()[0]}") from error
    notes = [(f"IPEX has no weight-only {quantize} for {name} (it quantizes only the architectures it knows); "
              f"running {dtype} weights instead")] if quantize else []
    return model, None, notes


def load_checkpoint(folder: Path, dtype: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """The tokenizer and the eval-mode model of a checkpoint folder, in ``dtype``; ModelLoadError if it cannot."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=trust_remote_code,
            **{dtype_keyword(): torch.bfloat16 if dtype == "bf16" else torch.float32})
    except (OSError, ValueError, KeyError) as error:
        hint = "" if trust_remote_code or "trust_remote_code" not in str(error) else \
            " (it holds remote code: pass --trust-remote-code if you trust it)"
        raise ModelLoadError(f"cannot load {folder}: {str(error).splitlines()[0]}{hint}") from error
    return tokenizer, model.eval()


class ChunkStreamer:
    """A transformers streamer (put/end) and stopping criterion (called) in one: hands whole
    characters to ``on_text`` as tokens arrive, and stops generation at the step where
    ``on_text`` returns True."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], bool]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.prompt_seen, self.cancelled = False, False
        self.pending: list[int] = []
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.pending += [int(i) for i in value.reshape(-1).tolist()]
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):
            return  # a character split across tokens: wait for the rest of it
        self.pending = []
        if text and not self.cancelled:
            self.cancelled = bool(self.on_text(text))

    def end(self) -> None:
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text and not self.cancelled:
            self.on_text(text)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.cancelled, dtype=torch.bool, device=input_ids.device)


class IPEXEngine:
    """A GLM-4 checkpoint optimized by ``ipex.llm.optimize`` behind the :class:`runtime.engine.Engine` protocol."""

    def __init__(self, model_dir: str | Path, device: str = "CPU", dtype: str = "auto", quantize: str | None = None,
                 threads: int | None = None, trust_remote_code: bool = False, min_response_len: int = 128) -> None:
        if device.upper() != "CPU":
            raise DeviceError(f"the ipex backend runs on the CPU only, not {device}; use --backend openvino for "
                              "GPU and NPU")
        if quantize is not None and quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")
        folder = Path(model_dir)
        check_checkpoint(folder)
        flags = onednn_cpu_flags()
        check_environment(flags)
        self.dtype = pick_dtype(dtype, flags)
        ipex = import_ipex()
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.tokenizer, model = load_checkpoint(folder, self.dtype, trust_remote_code)
        try:
            self.model, self.quantization, self.notes = optimize(ipex, model, self.dtype, quantize)
        except QuantizationFailed as error:  # e.g. kernels this CPU lacks: the unquantized model, reloaded
            del model
            _, model = load_checkpoint(folder, self.dtype, trust_remote_code)
            self.model, self.quantization, _ = optimize(ipex, model, self.dtype, None)
            self.notes = [f"{error}; running {self.dtype} weights instead of weight-only {quantize}"]
        self.name, self.device = folder.name, "CPU"
        self.template = ChatTemplate.from_folder(folder)
        ids = {token: self.tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
        self._special_ids = {token: i for token, i in ids.items()
                             if isinstance(i, int) and i != self.tokenizer.unk_token_id}
        missing = [token for token in STOP_TOKENS if token not in self._special_ids]
        if missing:
            raise ModelLoadError(f"the tokenizer of {folder} has no {', '.join(missing)}: not a GLM-4 model")
        self._stops = [self._special_ids[token] for token in STOP_TOKENS]
        config = self.model.config
        # transformers falls back to the checkpoint's stop ids when none are given: ignore_eos stops on an id
        # past the vocabulary instead, which is never generated.
        self._never = int(getattr(config, "vocab_size", None) or config.padded_vocab_size)
        self.context = int(getattr(config, "max_position_embeddings", None) or getattr(config, "seq_length", 8192))
        self.max_prompt_tokens = max(self.context - min_response_len, 1)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def token_id(self, token: str) -> int:
        if token not in self._special_ids:
            raise ModelLoadError(f"the tokenizer has no {token} token: not a GLM-4 model")
        return self._special_ids[token]

    def generation_config(self, options: GenerationOptions, prompt_tokens: int) -> Any:
        """A complete GenerationConfig, so that the checkpoint's sampling defaults never leak in."""
        from transformers import GenerationConfig

        settings: dict[str, Any] = {"temperature": options.temperature, "top_p": options.top_p,
                                    "top_k": options.top_k} if options.temperature > 0 else {}
        limit = max(min(options.max_new_tokens, self.context - prompt_tokens), 1)
        return GenerationConfig(max_new_tokens=limit, min_new_tokens=0 if options.ignore_eos else min(options.min_new_tokens, limit),
                                do_sample=options.temperature > 0, repetition_penalty=options.repetition_penalty,
                                eos_token_id=[self._never] if options.ignore_eos else self._stops,
                                pad_token_id=self._stops[0],
                                **settings)

    def generate(self, prompt_ids: Sequence[int], options: GenerationOptions,
                 on_text: Callable[[str], bool]) -> Generation:
        import torch
        from transformers import StoppingCriteriaList

        if getattr(options, "structured_output", None) is not None:
            raise EngineError("structured output (JSON schema, grammar) needs the openvino backend")
        streamer = ChunkStreamer(self.tokenizer, on_text)
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        if options.seed is not None:
            torch.manual_seed(options.seed)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                             generation_config=self.generation_config(options, len(prompt_ids)),
                                             use_model_defaults=False, streamer=streamer,
                                             stopping_criteria=StoppingCriteriaList([streamer]))
        except RuntimeError as error:
            raise EngineError(f"generation failed: {str(error).splitlines()[0]}") from error
        end = time.perf_counter()
        tokens = [int(i) for i in output[0, len(prompt_ids):].tolist()]
        first = streamer.first_token_at or end
        stopped = bool(tokens) and tokens[-1] in self._stops and not options.ignore_eos
        stats = ReplyStats(finish_reason="stop" if stopped else "length",
                           prompt_tokens=len(prompt_ids), generated_tokens=len(tokens), ttft_s=first - start,
                           tokens_per_s=(len(tokens) - 1) / (end - first) if len(tokens) > 1 and end > first else 0.0)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return Generation(text=text, stats=stats)
