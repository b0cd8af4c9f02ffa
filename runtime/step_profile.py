"""Where a decode step's time goes: OpenVINO's own per-node timings of a converted model on CPU, by layer role.

    python -m runtime.step_profile --model build/v16k-cpu
    python -m runtime.step_profile --model build/v16k-cpu --ov-config INFERENCE_PRECISION_HINT=f32

The model's IR is compiled as the runtime compiles it (``runtime.openvino_engine.device_properties``) with the
plugin's performance counters on, a prompt of ``--prompt-length`` tokens is prefilled and ``--steps`` tokens are
decoded greedily, one infer request per token, as openvino-genai runs them. Each decode step's node timings are
summed by role (a matrix such as ``mlp.down_proj`` over every layer; attention; the rest), and each matrix role's
weight bytes (its packed integers, scales and zero points) divided by its time give the rate it streams them at,
against the machine's read bandwidth: the ceiling one token's matmuls meet.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from hostcpu import cpu_description
from runtime.bench import memory_bandwidth, ov_config_of
from runtime.engine import ModelLoadError
from runtime.openvino_engine import check_model_dir, device_properties, error_summary

WEIGHT_PATH = ("Convert", "Multiply", "Subtract", "Reshape", "Transpose")  # NNCF's decompression in front of a MatMul


def role_of(name: str) -> str:
    """A node's role across layers: ``__module.model.layers.3.mlp.down_proj/ov_ext::linear/MatMul`` ->
    ``mlp.down_proj``."""
    module = name.split("/")[0].removeprefix("__module.").removeprefix("model.")
    return re.sub(r"^(layers|encoder\.layers|transformer\.encoder\.layers)\.\d+\.", "", module)


def weight_bytes(model: Any) -> dict[str, int]:
    """The bytes of the constants behind each MatMul's weight input (through its decompression), by node name."""
    def behind(node: Any) -> int:
        if node.get_type_name() == "Constant":
            return node.get_byte_size()
        if node.get_type_name() not in WEIGHT_PATH:
            return 0
        ports = node.inputs()[:1] if node.get_type_name() in ("Reshape", "Transpose") else node.inputs()
        # a Reshape's or Transpose's second input is its target shape, not weights
        return sum(behind(port.get_source_output().get_node()) for port in ports)

    return {op.get_friendly_name(): behind(op.input(1).get_source_output().get_node())
            for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"}


def step_profile(folder: Path, threads: int | None = None, prompt_length: int = 256, steps: int = 32,
                 ov_config: dict[str, str] | None = None) -> dict[str, Any]:
    """Prefill ``prompt_length`` tokens, decode ``steps``; the step times and the per-role node times per step."""
    import openvino as ov

    groups = check_model_dir(folder)
    properties = {**device_properties("CPU", None, threads, int4_groups=groups), **(ov_config or {}),
                  "PERF_COUNT": "YES"}
    core = ov.Core()
    model = core.read_model(folder / "openvino_model.xml")
    sizes = weight_bytes(model)
    request = core.compile_model(model, "CPU", properties).create_infer_request()
    names = {port.get_any_name() for port in model.inputs}
    vocabulary = model.output("logits").get_partial_shape()[-1].get_length()

    def infer(ids: list[int], past: int) -> float:
        feed = {"input_ids": np.array([ids], dtype=np.int64),
                "attention_mask": np.ones((1, past + len(ids)), dtype=np.int64),
                "position_ids": np.arange(past, past + len(ids), dtype=np.int64)[None],
                "beam_idx": np.zeros(1, dtype=np.int32)}
        start = time.perf_counter()
        request.infer({key: value for key, value in feed.items() if key in names})
        return time.perf_counter() - start

    def next_token() -> list[int]:
        return [int(np.argmax(request.get_tensor("logits").data[0, -1]))]

    # The plugin's counters are means over every infer of the compiled model: the means after the prompt and a first
    # (slow) decode step, 2 infers, are taken out of those after all steps. A node that runs in the prompt but
    # not in a decode step would come out negative; it counts as 0.
    infer([(7 + 31 * i) % vocabulary for i in range(prompt_length)], 0)
    infer(next_token(), prompt_length)
    first = {node.node_name: node.real_time.total_seconds() for node in request.profiling_info}
    seconds = [infer(next_token(), prompt_length + step) for step in range(1, steps + 1)]
    modules = {name.split("/")[0] for name in sizes}  # a matmul's node may be named after its fused bias Add
    node_ms, kinds = defaultdict(float), {}
    for node in request.profiling_info:
        kind = f"{node.node_type} {node.exec_type}"
        role = role_of(node.node_name) if node.node_name.split("/")[0] in modules and \
            kind.startswith(("FullyConnected", "MatMul")) else "attention" if "ScaledDotProduct" in kind else "other"
        node_ms[role] += max(node.real_time.total_seconds() * (steps + 2) - 2 * first[node.node_name], 0) * 1e3 / steps
        kinds.setdefault(role, kind if role != "other" else "")
    bandwidth, _ = memory_bandwidth(threads=threads or os.cpu_count() or 1)
    role_bytes: dict[str, int] = defaultdict(int)
    for name, size in sizes.items():
        role_bytes[role_of(name)] += size
    roles = []
    for role, ms in sorted(node_ms.items(), key=lambda item: -item[1]):
        weights = role_bytes.get(role, 0)
        rate = weights / (ms / 1e3) if weights and ms else None
        roles.append({"role": role, "ms": ms, "share": ms / sum(node_ms.values()), "kernel": kinds[role],
                      "weight_bytes": weights, "bytes_per_s": rate,
                      "bandwidth_fraction": rate / bandwidth if rate else None})
    matmul_ms = sum(row["ms"] for row in roles if row["weight_bytes"])
    matmul_bytes = sum(row["weight_bytes"] for row in roles)
    return {"model": str(folder), "cpu": cpu_description(), "threads": threads, "prompt_length": prompt_length,
            "steps": steps, "step_ms_best": min(seconds) * 1e3, "step_ms_median": statistics.median(seconds) * 1e3,
            "nodes_ms": sum(node_ms.values()), "matmul_ms": matmul_ms, "matmul_weight_bytes": matmul_bytes,
            "bandwidth_bytes_per_s": bandwidth, "roles": roles}


def report(result: dict[str, Any]) -> str:
    """The profile as printed lines."""
    steps = (f"decode step {result['step_ms_best']:.2f} ms best, {result['step_ms_median']:.2f} median; node times "
             f"{result['nodes_ms']:.2f} ms (the counters' own overhead included), matmuls {result['matmul_ms']:.2f} ms "
             f"for {result['matmul_weight_bytes'] / 1e6:.0f} MB of weights; read bandwidth "
             f"{result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    lines = [f"{result['cpu']}; {result['model']}, prompt {result['prompt_length']}, {result['steps']} decode steps",
             steps]
    for row in result["roles"]:
        rate = f"{row['bytes_per_s'] / 1e9:6.1f} GB/s {row['bandwidth_fraction']:5.0%} of read bw" \
            if row["bytes_per_s"] else ""
        lines.append(f"  {row['role']:24} {row['ms']:7.3f} ms {row['share']:6.1%}  {row['kernel']:44} {rate}")
    return "\n".join(lines)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.step_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="converted model folder (python -m convert)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the plugin's, all cores)")
    parser.add_argument("--prompt-length", type=int, default=256, help="tokens prefilled first (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps profiled (default: %(default)s)")
    parser.add_argument("--ov-config", nargs="+", default=[], metavar="KEY=VALUE",
                        help="CPU plugin settings over the runtime's (e.g. INFERENCE_PRECISION_HINT=f32)")
    parser.add_argument("--json", help="write the profile as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if min(args.prompt_length, args.steps, args.threads or 1) < 1:
        print("error: --prompt-length, --steps and --threads must be positive", file=sys.stderr)
        return 2
    try:
        result = step_profile(args.model, args.threads, args.prompt_length, args.steps, ov_config_of(args.ov_config))
    except (ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # the plugin refusing a setting or the model
        print(f"error: {error_summary(error)}", file=sys.stderr)
        return 2
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
