"""Time OpenVINO's CPU kernels on one GLM-4-9B weight matrix in each weight layout, and name the kernel it picks.

    python -m runtime.kernel_bench                        # 13696 x 4096 (half the FFN's gate-up), 1 and 256 rows
    python -m runtime.kernel_bench --ov-config DYNAMIC_QUANTIZATION_GROUP_SIZE=0

Each layout is built as NNCF writes it (packed integers, f16 scales and zero points, the multiply in front of the
MatMul), compiled with the plugin settings the runtime gives a model of that layout (its activation group:
``runtime.openvino_engine.device_properties``) as copies with weights of their own until ``--stream-mib`` of
weights pass per round (so that they come from memory, as a model's layers do, not from the cache), and fed 1 row
(a decode step) and a prompt's worth of rows (prefill). The table gives the kernel the plugin chose and the
precision it runs at (``runtimePrecision``: where it is i8/u8 for an f32 input, the activations are quantized and
multiplied as integers, in groups of ``activation_group``), weights per second, GFLOP/s, and for one row the weight
bytes streamed as a share of the machine's read bandwidth, the ceiling decode speed meets on batch 1. ``w8a8``
quantizes the activations statically (a FakeQuantize before the MatMul), the layout of a full INT8 model.
``nf4-*`` and ``mxfp4-g32`` are NNCF's other 4-bit modes (NormalFloat4 codes with f16 scales; FP4 e2m1 codes with
power-of-two e8m0 scales in groups of 32), for comparison with the integer layouts the profiles use. Each
result is checked against the product by the dequantized weights (``error``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hostcpu import cpu_description
from runtime.bench import memory_bandwidth, ov_config_of
from runtime.openvino_engine import device_properties, error_summary

# the NormalFloat4 codebook: the 16 values an ov.Type.nf4 weight stands for (times its group's scale)
NF4_LEVELS = np.array([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0, 0.0795803,
                       0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0], np.float32)
E2M1_LEVELS = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)  # FP4 (e2m1) magnitudes, MXFP4's codes


class Layout(NamedTuple):
    """How a layout stores a weight: ``kind`` "int" (integers, f16 scales, zero points when asymmetric), "nf4"
    (NormalFloat4 codebook, f16 absmax scales) or "e2m1" (MXFP4: FP4 codes, power-of-two e8m0 scales)."""
    bits: int
    group: int | None  # None: one group per output channel
    symmetric: bool
    kind: str = "int"


# as convert.recipes' profiles use them, and NNCF's other 4-bit modes (nf4, mxfp4) for comparison
LAYOUTS: dict[str, Layout] = {
    "f32": Layout(32, None, True),
    "int8-asym": Layout(8, None, False),  # --weight-format int8
    "int4-sym-g32": Layout(4, 32, True),  # --profile cpu
    "int4-sym-g64": Layout(4, 64, True),
    "int4-sym-g128": Layout(4, 128, True),  # --profile gpu
    "int4-sym-cw": Layout(4, None, True),  # --profile npu
    "int4-asym-g128": Layout(4, 128, False),
    "nf4-g32": Layout(4, 32, True, "nf4"),
    "nf4-g64": Layout(4, 64, True, "nf4"),
    "mxfp4-g32": Layout(4, 32, True, "e2m1"),
    "w8a8": Layout(8, None, True),
}
ACTIVATION_RANGE = 4.0  # w8a8's static activation range: the inputs are drawn from N(0, 1)
MAX_COPIES = 64  # compiled copies of one matrix, so that the weights streamed per round outgrow the cache


def nearest(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Each value rounded to the nearest of the sorted ``levels``."""
    return levels[np.searchsorted((levels[1:] + levels[:-1]) / 2, values)]


def quantize(weights: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Codes and scales (and asymmetric zero points) of ``weights`` [N, K] in ``layout``, grouped along K: integer
    codes for "int", the codebook's values (f32) for "nf4" and "e2m1"."""
    n, k = weights.shape
    bits, group, symmetric, kind = layout
    grouped = weights.reshape(n, k // group, group) if group else weights.reshape(n, 1, k)
    if kind == "nf4":
        scale = np.abs(grouped).max(-1, keepdims=True).astype(np.float16)
        return {"codes": nearest(grouped / scale.astype(np.float32), NF4_LEVELS), "scale": scale}
    if kind == "e2m1":  # the shared exponent puts the group's largest magnitude in [4, 8): 6 is e2m1's largest
        top = np.maximum(np.abs(grouped).max(-1, keepdims=True), np.finfo(np.float32).tiny)
        scale = np.exp2(np.floor(np.log2(top)) - 2).astype(np.float32)
        scaled = grouped / scale
        return {"codes": np.sign(scaled) * nearest(np.abs(scaled), E2M1_LEVELS), "scale": scale}
    if symmetric:
        top = 2 ** (bits - 1) - 1
        scale = (np.abs(grouped).max(-1, keepdims=True) / top).astype(np.float16)
        codes = np.clip(np.round(grouped / scale.astype(np.float32)), -top - 1, top).astype(np.int8)
        return {"codes": codes, "scale": scale}
    low, high = grouped.min(-1, keepdims=True), grouped.max(-1, keepdims=True)
    scale = ((high - low) / (2**bits - 1)).astype(np.float16)
    zero = np.clip(np.round(-low / scale.astype(np.float32)), 0, 2**bits - 1).astype(np.uint8)
    codes = np.clip(np.round(grouped / scale.astype(np.float32)) + zero, 0, 2**bits - 1).astype(np.uint8)
    return {"codes": codes, "scale": scale, "zero": zero}


def dequantized(parts: dict[str, np.ndarray]) -> np.ndarray:
    """The f32 weights [N, K] a layout stands for."""
    values = parts["codes"].astype(np.float32) - parts.get("zero", np.zeros(1, np.uint8)).astype(np.float32)
    values *= parts["scale"].astype(np.float32)
    return values.reshape(values.shape[0], -1)


def stored_parts(layout: str, weights: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The stored parts of ``layout`` over ``weights`` [N, K] (as :func:`quantize` gives them; ``weights`` alone
    for f32), and the weights they stand for."""
    if LAYOUTS[layout].bits == 32:
        return {"weights": weights}, weights
    parts = quantize(weights, LAYOUTS[layout])
    return parts, dequantized(parts)


def model_of(layout: str, parts: dict[str, np.ndarray]) -> Any:
    """The one-MatMul OpenVINO model of ``layout`` over its stored parts, with weights of its own (constants copy
    their arrays)."""
    import openvino as ov
    from openvino import opset13 as ops

    bits, _, symmetric, kind = LAYOUTS[layout]
    if bits == 32:
        n, k = parts["weights"].shape
        rows = ops.parameter([-1, k], ov.Type.f32, name="rows")
        return ov.Model([ops.matmul(rows, ops.constant(parts["weights"]), False, True)], [rows], layout)
    n, k = parts["codes"].shape[0], parts["codes"].shape[1] * parts["codes"].shape[2]
    rows = ops.parameter([-1, k], ov.Type.f32, name="rows")
    integer = {(4, True): ov.Type.i4, (4, False): ov.Type.u4, (8, True): ov.Type.i8, (8, False): ov.Type.u8}
    element = {"nf4": ov.Type.nf4, "e2m1": ov.Type.f4e2m1}.get(kind, integer[bits, symmetric])
    decompressed = ops.convert(ops.constant(parts["codes"], dtype=element), ov.Type.f16)
    if "zero" in parts:
        decompressed = ops.subtract(decompressed, ops.convert(ops.constant(parts["zero"], dtype=integer[bits, False]),
                                                              ov.Type.f16))
    if kind == "e2m1":  # powers of two, stored as their exponents
        scale = ops.convert(ops.constant(parts["scale"], dtype=ov.Type.f8e8m0), ov.Type.f16)
    else:
        scale = ops.constant(parts["scale"])
    decompressed = ops.multiply(decompressed, scale)
    matrix = ops.convert(ops.reshape(decompressed, ops.constant(np.array([n, k], np.int64)), False), ov.Type.f32)
    source = rows
    if layout == "w8a8":
        low, high = ops.constant(np.float32(-ACTIVATION_RANGE)), ops.constant(np.float32(ACTIVATION_RANGE))
        source = ops.fake_quantize(rows, low, high, low, high, 256)
    return ov.Model([ops.matmul(source, matrix, False, True)], [rows], layout)


def kernel_of(compiled: Any) -> tuple[str, str]:
    """The kernel (primitiveType) and runtime precision of the compiled model's MatMul, after an inference."""
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("FullyConnected", "MatMul"):
            return info["primitiveType"].astype(str), info["runtimePrecision"].astype(str)
    return "?", "?"


def weight_bytes(layout: str, n: int, k: int) -> int:
    """Bytes a full read of the layout's weights, scales and zero points takes."""
    bits, group, symmetric, kind = LAYOUTS[layout]
    groups = n * (k // group if group else 1)
    scale_bytes = 1 if kind == "e2m1" else 2
    return n * k * bits // 8 + (0 if bits == 32 else groups * scale_bytes + (0 if symmetric else groups * bits // 8))


def kernel_bench(layouts: list[str], n: int = 13696, k: int = 4096, row_counts: tuple[int, ...] = (1, 256),
                 threads: int | None = None, runs: int = 5, ov_config: dict[str, str] | None = None,
                 stream_bytes: int = 1 << 30, on_row: Any = None) -> list[dict[str, Any]]:
    """One row per layout and row count: kernel, precision, best time of ``runs`` (and the worst as a share of it),
    weights/s, GFLOP/s, the share of read bandwidth at one row, and the relative error of the result.

    Each layout is compiled as several copies, each with weights of its own, run in turn so that ``stream_bytes``
    of weights pass per round (at most 64 copies): one matrix alone fits a large last-level cache (an INT4
    13696 x 4096 is 28 MB), where decode streams every layer's weights from memory."""
    import openvino as ov

    threads = threads or os.cpu_count() or 1
    bandwidth, _ = memory_bandwidth(threads=threads)
    generator = np.random.default_rng(0)
    weights = generator.standard_normal((n, k), dtype=np.float32) * 0.02
    core, results = ov.Core(), []
    for layout in layouts:
        parts, reference = stored_parts(layout, weights)
        size = weight_bytes(layout, n, k)
        copies = max(1, min(MAX_COPIES, -(-stream_bytes // size)))
        bits, group = LAYOUTS[layout].bits, LAYOUTS[layout].group
        runtime_default = device_properties("CPU", None, threads, int4_groups={group or -1} if bits == 4 else ())
        config = {**runtime_default, "PERFORMANCE_HINT": "LATENCY", **(ov_config or {})}
        requests = [core.compile_model(model_of(layout, parts), "CPU", config).create_infer_request()
                    for _ in range(copies)]
        for count in row_counts:
            rows = np.clip(generator.standard_normal((count, k), dtype=np.float32), -ACTIVATION_RANGE, ACTIVATION_RANGE)
            expected = rows.astype(np.float64) @ reference.T.astype(np.float64)
            for request in requests:  # each copy warmed up on this shape
                got = request.infer({0: rows})[0]
            compiled = requests[0].get_compiled_model()
            kernel, precision = kernel_of(compiled)
            repeats = max(1, -(-64 // (count * copies)))
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                for _ in range(repeats):
                    for request in requests:
                        request.infer({0: rows})
                times.append((time.perf_counter() - start) / repeats / copies)
            best = min(times)
            row = {"layout": layout, "rows": count, "kernel": kernel, "precision": precision, "threads": threads,
                   "activation_group": int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")),
                   "copies": copies,
                   "ms": best * 1e3, "spread": best / max(times), "weights_per_s": n * k / best,
                   "gflops": 2 * count * n * k / best / 1e9, "weight_bytes": size,
                   "bandwidth_bytes_per_s": bandwidth,
                   "bandwidth_fraction": size / best / bandwidth if count == 1 else None,
                   "error": float(np.linalg.norm(got - expected) / np.linalg.norm(expected))}
            results.append(row)
            if on_row:
                on_row(row)
    return results


def row_line(row: dict[str, Any]) -> str:
    """One printed line of a measurement."""
    share = f"{row['bandwidth_fraction']:5.0%} of read bw" if row["bandwidth_fraction"] is not None else " " * 16
    return (f"{row['layout']:15} x{row['copies']:<3d} {row['rows']:5d} {row['kernel']:22} {row['precision']:6} "
            f"a{row['activation_group']:<4d} {row['ms']:9.2f} ms "
            f"(worst {row['spread']:4.0%}) {row['weights_per_s'] / 1e9:6.1f} G weights/s {row['gflops']:7.1f} GFLOP/s "
            f"{share}  error {row['error']:.1e}")


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.kernel_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"comma-separated layouts among {', '.join(LAYOUTS)} (default: all)")
    parser.add_argument("--shape", default="13696x4096", help="output x input features of the matrix "
                        "(default: %(default)s; GLM-4-9B's attention output is 4096x4096, its FFN down 4096x13696)")
    parser.add_argument("--rows", default="1,256", help="comma-separated row counts: 1 is a decode step, more a "
                        "prompt (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads (default: all cores, %(default)s here)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs; the best counts (default: %(default)s)")
    parser.add_argument("--ov-config", nargs="+", default=[], metavar="KEY=VALUE",
                        help="CPU plugin settings over the runtime's (e.g. DYNAMIC_QUANTIZATION_GROUP_SIZE=0 turns "
                             "off the activations' dynamic quantization where the CPU has it)")
    parser.add_argument("--stream-mib", type=int, default=1024,
                        help="weights run through per round, in MiB: the matrix is compiled as that many MiB of "
                             "copies (at most 64) so that the weights come from memory, not from the cache "
                             "(default: %(default)s; 0 runs one copy)")
    parser.add_argument("--json", help="write the rows as JSON here")
    return parser


def parse(args: argparse.Namespace) -> tuple[list[str], int, int, tuple[int, ...], dict[str, str]]:
    """The layouts, matrix shape, row counts and plugin settings asked for (ValueError with the reason)."""
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown or not layouts:
        raise ValueError(f"unknown layout {', '.join(unknown) or '(none)'}; choose among {', '.join(LAYOUTS)}")
    try:
        n, k = (int(side) for side in args.shape.lower().split("x"))
        counts = tuple(int(count) for count in args.rows.split(","))
    except ValueError:
        raise ValueError("--shape takes NxK (e.g. 13696x4096) and --rows integers (e.g. 1,256)") from None
    if min(n, k, *counts) < 1 or args.threads < 1 or args.runs < 1:
        raise ValueError("--shape, --rows, --threads and --runs must be positive")
    if args.stream_mib < 0:
        raise ValueError("--stream-mib must be 0 or more")
    groups = {LAYOUTS[name].group for name in layouts if LAYOUTS[name].group}
    if any(k % group for group in groups):
        raise ValueError(f"the input features ({k}) must be a multiple of every group size ({sorted(groups)})")
    return layouts, n, k, counts, ov_config_of(args.ov_config)


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        layouts, n, k, counts, ov_config = parse(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{cpu_description()}; {n}x{k} weights, {args.threads} threads, best of {args.runs}", flush=True)
    try:
        rows = kernel_bench(layouts, n, k, counts, args.threads, args.runs, ov_config, args.stream_mib << 20,
                            on_row=lambda row: print(row_line(row), flush=True))
    except RuntimeError as error:  # the plugin refusing a setting
        print(f"error: {error_summary(error)}", file=sys.stderr)
        return 2
    print(f"read bandwidth {rows[0]['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
