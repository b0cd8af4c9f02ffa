"""How much memory a converted model needs at a given context, before loading it.

    python -m runtime.plan --model build/glm4-9b-int4 --context 32768 [--device CPU]

Printed per KV-cache precision the device offers: the weights (the compiled model keeps its own copy of
openvino_model.bin, and on CPU an f32 copy of the INT4 scales; the file's pages come on top but the OS can
drop them), the runtime itself, the KV cache for the whole context, and the prefill workspace (the widest
prompt is processed in one pass, whose intermediate tensors are kept; ``--prefill-chunk`` bounds it), against
this machine's memory; then the longest context that fits what is available now.

The KV cache is exact arithmetic: 2 (K and V) x layers x KV heads x (head_dim x element size +
the per-token scale and zero point of quantized caches). The workspace is measured, not derived:
bytes per prompt token = a factor x (4 hidden + q/k/v widths + 3 FFN), the factor measured per CPU kind
and inference precision (OpenVINO 2026.4, 1-8-layer GLM-4-9B-wide INT4 models, linear up to 4096 tokens,
below the line at 8192): 5.0 on a Xeon with AMX in bf16 (and in f32 under OV_CPU_MAX_ISA=AVX2), 6.4 there in
f32 with AMX in reach (group-128 INT4, which the runtime computes in f32 on such CPUs; 2 layers, 1024 and 3072
tokens), 3.4 in bf16 and 6.2 in f32 (OV_CPU_MAX_ISA=AVX2) on an AMD EPYC with AVX-512 BF16 and no AMX. An
AVX2-only CPU computes in f32 and gets that last factor (measured only under the imitation).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from hostcpu import cpu_kind, openvino_amx
from runtime.engine import EngineError, ModelLoadError
from runtime.openvino_engine import cpu_precision, int4_layout

GIB = 2**30
RUNTIME_BYTES = 64 * 2**20  # OpenVINO, the tokenizer and Python, anonymous memory past the weights (measured ~50 MiB)
# the CPU plugin's f32 copy of each INT4 scale, past the IR's own: 48 MiB on a 2-layer GLM-4-9B-wide group-32 IR,
# 4 bytes for each of its 12.6M groups
SCALE_COPY_BYTES = 4
# prefill workspace bytes per prompt token and unit of width, by (CPU kind, inference precision); see above
WORKSPACE_FACTORS = {("amx", "bf16"): 5.0, ("amx", "f32"): 6.4, ("amx capped", "f32"): 5.0, ("avx512", "bf16"): 3.4,
                     ("avx512", "f32"): 6.2, ("avx2", "f32"): 6.2}
# bytes per KV element, and per token and head the quantization parameters (f32 scale and zero point)
KV_PRECISIONS = {"f32": (4.0, 0), "f16": (2.0, 0), "u8": (1.0, 8), "u4": (0.5, 8), "i8": (1.0, 4)}
DEVICE_KV = {"CPU": ("f16", "u8", "u4"), "GPU": ("f16", "i8"), "NPU": ("f16",)}


@dataclass
class Shape:
    """What the plan needs of a model's config.json (GLM-4 -hf, 0414 or the original naming)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> Shape:
        def first(*keys: str) -> int:
            return next(int(config[k]) for k in keys if config.get(k) is not None)

        hidden, heads = first("hidden_size"), first("num_attention_heads")
        return cls(layers=first("num_hidden_layers", "num_layers"), hidden=hidden,
                   ffn=first("intermediate_size", "ffn_hidden_size"), heads=heads,
                   kv_heads=first("num_key_value_heads", "multi_query_group_num", "num_attention_heads"),
                   head_dim=int(config.get("head_dim") or config.get("kv_channels") or hidden // heads),
                   context=first("max_position_embeddings", "seq_length"))


def kv_bytes_per_token(shape: Shape, precision: str) -> float:
    """KV-cache bytes one token takes in every layer."""
    element, extra = KV_PRECISIONS[precision]
    return 2 * shape.layers * shape.kv_heads * (shape.head_dim * element + extra)


def workspace_bytes_per_token(shape: Shape, factor: float) -> float:
    """Prefill workspace per prompt token (``factor`` from WORKSPACE_FACTORS, see the module's docstring)."""
    return factor * (4 * shape.hidden + (shape.heads + 2 * shape.kv_heads) * shape.head_dim + 3 * shape.ffn)


def workspace_factor(device: str, int4_groups: Collection[int] = ()) -> float:
    """The workspace factor of this machine's CPU at the precision the runtime computes a model whose 4-bit
    weights are in ``int4_groups`` in; the largest measured one where nothing was measured (GPU, NPU, another
    CPU kind and precision)."""
    if device != "CPU":
        return max(WORKSPACE_FACTORS.values())
    import openvino as ov

    amx, kind = openvino_amx(), cpu_kind()
    precision = cpu_precision(int4_groups, amx) or (
        "bf16" if ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT") == ov.Type.bf16 else "f32")
    kind = "amx capped" if kind == "amx" and not amx else kind  # OV_CPU_MAX_ISA below AMX
    return WORKSPACE_FACTORS.get((kind, precision), max(WORKSPACE_FACTORS.values()))


def memory_now() -> tuple[int, int]:
    """(total, available) bytes of this machine's memory."""
    import psutil

    memory = psutil.virtual_memory()
    return memory.total, memory.available


def plan(model: str | Path, context: int, device: str = "CPU", prompt: int | None = None,
         prefill_chunk: int | None = None) -> dict[str, Any]:
    """The memory figures of ``model`` at ``context`` tokens on ``device``, per KV-cache precision: the longest
    prompt processed in one go is ``prompt`` tokens (default: the whole context), ``prefill_chunk`` at most."""
    folder = Path(model)
    config_file, weights_file = folder / "config.json", folder / "openvino_model.bin"
    if not config_file.is_file() or not weights_file.is_file():
        raise ModelLoadError(f"{folder} is not a converted model (no config.json or openvino_model.bin)")
    shape = Shape.of(json.loads(config_file.read_text(encoding="utf-8")))
    kind = device.upper().split(".")[0]
    if kind not in DEVICE_KV:
        raise ValueError(f"unknown device {device!r}; use CPU, GPU or NPU")
    if not 1 <= context <= shape.context:
        raise ValueError(f"--context must be from 1 to the model's {shape.context} tokens, got {context}")
    if (prompt is not None and not 1 <= prompt <= context) or (prefill_chunk is not None and prefill_chunk < 1):
        raise ValueError("--prompt must be from 1 to --context, and --prefill-chunk at least 1")
    one_pass = min(prompt or context, prefill_chunk or context)
    layout = int4_layout(folder / "openvino_model.xml")
    weights = weights_file.stat().st_size + (SCALE_COPY_BYTES * sum(layout.values()) if kind == "CPU" else 0)
    total, available = memory_now()
    fixed = weights + RUNTIME_BYTES
    rows = {}
    workspace = workspace_bytes_per_token(shape, workspace_factor(kind, set(layout)))
    for precision in DEVICE_KV[kind]:
        kv = kv_bytes_per_token(shape, precision)
        if prefill_chunk:  # the workspace stays that of one chunk however long the context grows
            longest = int(max(available - fixed - workspace * prefill_chunk, 0) // kv)
        else:
            longest = int(max(available - fixed, 0) // (kv + workspace))
        rows[precision] = {"kv_cache": kv * context, "workspace": workspace * one_pass,
                           "total": fixed + kv * context + workspace * one_pass,
                           "longest_context": min(longest, shape.context)}
    return {"shape": shape, "weights": weights, "runtime": RUNTIME_BYTES, "memory_total": total,
            "memory_available": available, "context": context, "one_pass": one_pass, "device": kind, "rows": rows}


def format_plan(result: dict[str, Any], model: str) -> str:
    shape, rows = result["shape"], result["rows"]
    lines = [f"{model}: {shape.layers} layers, {shape.kv_heads} KV heads x {shape.head_dim}, context up to "
             f"{shape.context:,}; on {result['device']} with {result['memory_total'] / GIB:.1f} GiB "
             f"({result['memory_available'] / GIB:.1f} GiB available)",
             f"at {result['context']:,} tokens, {result['one_pass']:,} of them prefilled in one pass, GiB:"]
    table = [("KV-cache precision", *rows)]
    table.append(("weights", *(f"{result['weights'] / GIB:.2f}" for _ in rows)))
    table.append(("runtime", *(f"{result['runtime'] / GIB:.2f}" for _ in rows)))
    for key, label in (("kv_cache", "KV cache"), ("workspace", "prefill workspace"), ("total", "total")):
        table.append((label, *(f"{row[key] / GIB:.2f}" for row in rows.values())))
    table.append(("fits now", *("yes" if row["total"] <= result["memory_available"] else "no"
                                for row in rows.values())))
    table.append(("longest that fits", *(f"{row['longest_context']:,}" for row in rows.values())))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines += ["  " + "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
              for line in table]
    return "\n".join(lines)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder written by python -m convert")
    parser.add_argument("--context", type=int, required=True, help="tokens of prompt and history to hold")
    parser.add_argument("--device", default="CPU", help="CPU, GPU or NPU (default CPU; iGPU and NPU share RAM)")
    parser.add_argument("--prompt", type=int, help="the longest single prompt (default: the whole context at once)")
    parser.add_argument("--prefill-chunk", type=int, metavar="TOKENS",
                        help="the runtime's --prefill-chunk: prompts are processed TOKENS at a time")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        result = plan(args.model, args.context, args.device, args.prompt, args.prefill_chunk)
    except (EngineError, ValueError, OSError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    print(format_plan(result, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
