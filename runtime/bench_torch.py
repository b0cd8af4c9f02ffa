"""The PyTorch runners of ``python -m runtime.bench``: plain transformers and the IPEX engine.

Both are timed through ``generate()`` (IPEX's traced graph runs only there), greedy, exactly
``new_tokens`` tokens, first-token and per-token times taken from a streamer.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from runtime.bench import best_of

BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def measure_transformers(folder: str, threads: int, lengths: list[int], new_tokens: int, runs: int,
                         bf16: bool = False, trust_remote_code: bool = False) -> list[dict[str, Any]]:
    """Plain transformers on CPU, FP32 (or bf16), for comparison (run inside a child process)."""
    import torch

    from runtime.ipex_engine import load_checkpoint  # the IPEX engine's loader, without IPEX

    torch.set_num_threads(threads)
    dtype = "bf16" if bf16 else "fp32"
    start = time.perf_counter()
    tokenizer, model = load_checkpoint(Path(folder), dtype, trust_remote_code)
    load = time.perf_counter() - start
    weights = weight_elements(folder) * BYTES_PER_WEIGHT[dtype]
    return time_torch_model(model, tokenizer, load, lengths, new_tokens, runs, weights)


def measure_ipex(folder: str, runner: str, threads: int, lengths: list[int], new_tokens: int,
                 runs: int, trust_remote_code: bool = False) -> list[dict[str, Any]]:
    """The IPEX engine's model (``ipex.llm.optimize``, weight-only quantized for ipex-int8/int4), timed like
    plain transformers (in a child process)."""
    from runtime.ipex_engine import IPEXEngine

    suffix = runner.partition("-")[2]
    start = time.perf_counter()
    engine = IPEXEngine(folder, dtype=suffix if suffix in ("fp32", "bf16") else "auto", threads=threads,
                        quantize=suffix if suffix in ("int8", "int4") else None, trust_remote_code=trust_remote_code)
    load = time.perf_counter() - start
    weights = weight_elements(folder) * BYTES_PER_WEIGHT[engine.quantization or engine.dtype]
    rows = time_torch_model(engine.model, engine.tokenizer, load, lengths, new_tokens, runs, weights)
    label = "-".join(["ipex", engine.dtype] + ([engine.quantization] if engine.quantization else []))
    return [dict(row, runner=label) for row in rows]


class TokenClock:
    """A transformers streamer that notes when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def weight_elements(folder: str) -> int:
    """Weights a token reads: every tensor of the checkpoint but the embedding table (from the file headers)."""
    from safetensors import safe_open

    total = 0
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                if "embed_tokens" not in name and "word_embeddings" not in name:
                    total += math.prod(handle.get_slice(name).get_shape())
    return total


def time_torch_model(model: Any, tokenizer: Any, load_s: float, lengths: list[int], new_tokens: int,
                     runs: int, weight_bytes: float) -> list[dict[str, Any]]:
    """Greedy generate() of exactly ``new_tokens`` for each prompt length (IPEX's traced graph runs inside
    generate); first token and per-token times from a streamer."""
    import torch

    text = "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。"
    rows = []
    for length in lengths:
        ttfts, tpots = [], []
        for run in range(runs + 1):  # the first run warms up
            ids = tokenizer(text * (length // 8 + 8), return_tensors="pt", add_special_tokens=False).input_ids
            ids = ids[:, run % 7:][:, :length]  # a different prompt each run
            clock = TokenClock()
            with torch.inference_mode():
                start = time.perf_counter()
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                               pad_token_id=tokenizer.pad_token_id or 0)
            if run:
                ttfts.append(clock.times[0] - start)
                tpots.append((clock.times[-1] - clock.times[0]) / max(len(clock.times) - 1, 1))
        rows.append({"prompt_tokens": length, **best_of(ttfts, tpots)})
    return [dict(row, load_cold_s=load_s, load_warm_s=None, weight_bytes_per_token=weight_bytes) for row in rows]
