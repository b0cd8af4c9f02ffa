"""Benchmark converted GLM-4 models: load time, first token, decode speed, memory, roofline.

    python -m runtime.bench --model build/glm4-shape-int4 --prompt-lengths 32,256,1024 --max-new-tokens 128
    python -m runtime.bench --model build/shape-int8 transformers:build/glm4-shape-4l ipex:build/glm4-shape-4l

A folder may name its runner (``openvino:``, ``transformers:``, ``transformers-bf16:``, ``ipex:``,
``ipex-fp32:``, ``ipex-bf16:``); ``--runner`` is the default. Each model folder is measured in a child process of
its own, so its peak RSS and its cold load are its own; IPEX children run under the Xeon
environment's Python (``--ipex-python``, default .venv-xeon/bin/python). Decode speed is set
against the machine's memory bandwidth, measured in the same run: at batch 1 every generated
token reads all weights once (the embedding table aside), so bandwidth / weight bytes is the
ceiling no CPU recipe can pass.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from chat_format import encode_prompt

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ("openvino", "transformers", "transformers-bf16", "ipex", "ipex-fp32", "ipex-bf16")

FIELDS = ("model", "runner", "device", "cpu", "threads", "prompt_tokens", "new_tokens", "load_cold_s", "load_warm_s",
          "ttft_s", "tpot_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes",
          "weight_bytes_per_token", "bandwidth_bytes_per_s", "decode_ceiling_tokens_per_s", "ceiling_fraction")


def memory_bandwidth(size_mb: int = 512, repeats: int = 5, threads: int = 2) -> float:
    """Copy bandwidth in bytes/s (read + write), best of ``repeats``, using ``threads`` threads."""
    import numpy as np

    chunks = [(np.ones(size_mb * 2**20 // 8 // threads), np.empty(size_mb * 2**20 // 8 // threads))
              for _ in range(threads)]
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.copyto, args=(dst, src)) for src, dst in chunks]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, 2 * size_mb * 2**20 / (time.perf_counter() - start))
    return best


def cpu_description() -> str:
    """The CPU's name and the instruction-set extensions that decide CPU speed (AVX2, AVX-512, AMX)."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
    found = " ".join(f for f in wanted if f in flags)
    if not found:  # no /proc/cpuinfo (Windows, macOS): the precisions OpenVINO's CPU plugin can run
        import openvino as ov

        found = "OpenVINO: " + " ".join(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return f"{name} ({found})"


def weight_bytes_per_token(model_xml: Path) -> int:
    """Bytes of weight constants one decode step reads: all of them except the embedding table."""
    import openvino as ov

    model = ov.Core().read_model(model_xml)
    embedding = set()
    for op in model.get_ops():
        if op.get_type_name() == "Gather" and op.get_output_partial_shape(0).rank.get_length() == 3:
            stack = [op.input_value(0).get_node()]
            while stack:  # the table and its decompression constants
                node = stack.pop()
                embedding.add(node.get_friendly_name())
                stack += [value.get_node() for value in node.input_values()]
    total = 0
    for op in model.get_ops():
        if op.get_type_name() == "Constant" and op.get_friendly_name() not in embedding:
            count = 1
            for dim in op.get_output_shape(0):
                count *= dim
            total += count * op.get_output_element_type(0).bitwidth // 8
    return total


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes.

    Linux: VmHWM, the peak of this program alone (getrusage's ru_maxrss carries the parent's
    peak over into a child started with vfork and exec, as subprocess does).
    """
    if sys.platform == "win32":
        import psutil

        return psutil.Process().memory_info().peak_wset
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def prompt_of_length(engine: Any, length: int, variant: int = 0) -> list[int]:
    """A GLM-4 user prompt of exactly ``length`` tokens; each ``variant`` differs from its first token.

    openvino-genai reuses the KV cache of a repeated prompt prefix across calls, so a benchmark
    that sent the same prompt twice would time a cache hit, not a prefill.
    """
    slot = "\ue000"
    parts = engine.template.parts([{"role": "user", "content": slot}])
    at = next(i for i, (text, _) in enumerate(parts) if slot in text)
    head, tail = parts[at][0].split(slot)
    prefix = encode_prompt(parts[:at] + [(head, False)], engine.encode, engine.token_id)
    suffix = encode_prompt([(tail, False)] + parts[at + 1:], engine.encode, engine.token_id)
    filler = engine.encode("The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。" * (length // 8 + 8))
    body = filler[variant % 7:] + filler  # a different first token for each of 7 variants
    return prefix + body[: max(length - len(prefix) - len(suffix), 1)] + suffix  # a user message of ``length`` tokens


def measure_openvino(folder: str, device: str, threads: int, lengths: list[int], new_tokens: int,
                     runs: int) -> list[dict[str, Any]]:
    """All measurements of one OpenVINO model folder (run inside a child process)."""
    from runtime.openvino_engine import OpenVINOEngine

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as cache:
        start = time.perf_counter()
        engine = OpenVINOEngine(folder, device, cache_dir=cache, threads=threads)
        cold = time.perf_counter() - start
        del engine
        start = time.perf_counter()
        engine = OpenVINOEngine(folder, device, cache_dir=cache, threads=threads)
        warm = time.perf_counter() - start
        config = engine.pipeline.get_generation_config()
        config.max_new_tokens, config.min_new_tokens, config.ignore_eos, config.do_sample = new_tokens, new_tokens, True, False
        rows = []
        for length in lengths:
            ttfts, tpots = [], []
            for run in range(runs + 1):  # the first run warms up
                ids = prompt_of_length(engine, length, variant=run)
                metrics = engine.pipeline.generate(tensor(ids), config).perf_metrics
                if run:
                    ttfts.append(metrics.get_ttft().mean / 1000)
                    tpots.append(metrics.get_tpot().mean / 1000)
            rows.append({"prompt_tokens": len(ids), "ttft_s": statistics.median(ttfts),
                         "tpot_s": statistics.median(tpots)})
        del engine
    weights = weight_bytes_per_token(Path(folder) / "openvino_model.xml")
    return [dict(row, load_cold_s=cold, load_warm_s=warm, weight_bytes_per_token=weights) for row in rows]


def tensor(ids: list[int]) -> Any:
    import numpy as np
    import openvino as ov

    return ov.Tensor(np.array([ids], dtype=np.int64))


def measure_transformers(folder: str, threads: int, lengths: list[int], new_tokens: int, runs: int,
                         bf16: bool = False) -> list[dict[str, Any]]:
    """Plain transformers on CPU, FP32 (or bf16), for comparison (run inside a child process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16 if bf16 else torch.float32).eval()
    load = time.perf_counter() - start
    return time_torch_model(model, AutoTokenizer.from_pretrained(folder), load, lengths, new_tokens, runs)


def measure_ipex(folder: str, dtype: str, threads: int, lengths: list[int], new_tokens: int,
                 runs: int) -> list[dict[str, Any]]:
    """The IPEX engine's model (``ipex.llm.optimize``), timed like plain transformers (in a child process)."""
    from runtime.ipex_engine import IPEXEngine

    start = time.perf_counter()
    engine = IPEXEngine(folder, dtype=dtype, threads=threads)
    load = time.perf_counter() - start
    rows = time_torch_model(engine.model, engine.tokenizer, load, lengths, new_tokens, runs)
    return [dict(row, runner=f"ipex-{engine.dtype}") for row in rows]


def time_torch_model(model: Any, tokenizer: Any, load_s: float, lengths: list[int], new_tokens: int,
                     runs: int) -> list[dict[str, Any]]:
    """Prefill and greedy decode with the KV cache, step by step, for each prompt length."""
    import torch

    text = "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。"
    rows = []
    for length in lengths:
        ids = tokenizer(text * (length // 8 + 8), return_tensors="pt", add_special_tokens=False).input_ids[:, :length]
        ttfts, tpots = [], []
        with torch.inference_mode():
            for run in range(runs + 1):
                start = time.perf_counter()
                out = model(ids, use_cache=True)
                ttft = time.perf_counter() - start
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                start = time.perf_counter()
                for _ in range(new_tokens - 1):
                    out = model(token, past_key_values=past, use_cache=True)
                    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                if run:
                    ttfts.append(ttft)
                    tpots.append((time.perf_counter() - start) / max(new_tokens - 1, 1))
        rows.append({"prompt_tokens": length, "ttft_s": statistics.median(ttfts), "tpot_s": statistics.median(tpots)})
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return [dict(row, load_cold_s=load_s, load_warm_s=None, weight_bytes_per_token=weights) for row in rows]


def measure(runner: str, folder: str, device: str, threads: int, lengths: list[int], new_tokens: int,
            runs: int) -> list[dict[str, Any]]:
    """All measurements of one model folder with one runner (inside the child process)."""
    if runner.startswith("transformers"):
        return measure_transformers(folder, threads, lengths, new_tokens, runs, bf16=runner.endswith("bf16"))
    if runner.startswith("ipex"):
        return measure_ipex(folder, runner.partition("-")[2] or "auto", threads, lengths, new_tokens, runs)
    return measure_openvino(folder, device, threads, lengths, new_tokens, runs)


def child_main() -> None:
    """The child process: measure() arguments as JSON on stdin; rows, peak RSS or the error as JSON in a file."""
    request = json.loads(sys.stdin.buffer.read().decode("utf-8"))  # sent as UTF-8, whatever the locale
    try:
        result: dict[str, Any] = {"rows": measure(**request["measure"]), "peak_rss": peak_rss()}
    except Exception as error:  # reported by the parent in one line
        result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    Path(request["output"]).write_text(json.dumps(result), encoding="utf-8")


def run_child(python: str, arguments: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Run measure(**arguments) under ``python`` in a fresh process; returns its rows and peak RSS."""
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as folder:
        output = Path(folder) / "result.json"
        request = json.dumps({"measure": arguments, "output": str(output)})
        try:
            process = subprocess.run([python, "-c", "from runtime.bench import child_main; child_main()"], cwd=ROOT,
                                     input=request, text=True, encoding="utf-8", errors="replace",
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        except OSError as error:
            raise RuntimeError(f"cannot run {python} ({error.strerror}); for ipex models run make venv-xeon or pass "
                               "--ipex-python") from None
        if not output.is_file():
            lines = [line for line in process.stderr.splitlines() if line.strip()]
            lines = lines or [f"exit code {process.returncode}"]
            raise RuntimeError(f"{arguments['folder']}: the child process under {python} failed: {lines[-1].strip()}")
        result = json.loads(output.read_text(encoding="utf-8"))
    if "error" in result:
        raise RuntimeError(f"{arguments['folder']}: {result['error']}")
    return result["rows"], result["peak_rss"]


def split_model(spec: str, default_runner: str) -> tuple[str, str]:
    """``RUNNER:FOLDER`` or a plain folder (measured with ``default_runner``)."""
    runner, colon, folder = spec.partition(":")
    return (runner, folder) if colon and runner in RUNNERS else (default_runner, spec)


def default_ipex_python() -> str:
    """The Xeon environment's interpreter (make venv-xeon)."""
    return str(ROOT / ".venv-xeon" / "bin" / "python")


def bench(models: list[str], runner: str = "openvino", device: str = "CPU", threads: int | None = None,
          lengths: tuple[int, ...] = (32, 256, 1024), new_tokens: int = 128, runs: int = 3,
          ipex_python: str | None = None) -> list[dict[str, Any]]:
    """Measure every model folder (``RUNNER:FOLDER`` picks its runner); one row per (model, prompt length)."""
    threads = threads or os.cpu_count() or 1
    bandwidth = memory_bandwidth(threads=threads)
    results = []
    for spec in models:
        model_runner, folder = split_model(spec, runner)
        python = (ipex_python or default_ipex_python()) if model_runner.startswith("ipex") else sys.executable
        rows, rss = run_child(python, {"runner": model_runner, "folder": folder, "device": device, "threads": threads,
                                       "lengths": list(lengths), "new_tokens": new_tokens, "runs": runs})
        for row in rows:
            decode = 1.0 / row["tpot_s"] if row["tpot_s"] else 0.0
            ceiling = bandwidth / row["weight_bytes_per_token"]
            results.append({"model": Path(folder).name, "runner": model_runner, "device": device,
                            "cpu": cpu_description(), "threads": threads,
                            "new_tokens": new_tokens, "peak_rss_bytes": rss, "bandwidth_bytes_per_s": bandwidth,
                            "prefill_tokens_per_s": row["prompt_tokens"] / row["ttft_s"],
                            "decode_tokens_per_s": decode, "decode_ceiling_tokens_per_s": ceiling,
                            "ceiling_fraction": decode / ceiling, **row})
    return [{key: row.get(key) for key in FIELDS} for row in results]


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("model", "runner", "prompt", "load cold/warm s", "TTFT ms", "TPOT ms", "prefill tok/s",
              "decode tok/s", "ceiling tok/s", "of ceiling", "peak RSS GiB")
    lines = [header]
    for r in rows:
        warm = f"{r['load_warm_s']:.2f}" if r["load_warm_s"] is not None else "-"
        lines.append((r["model"], r["runner"], str(r["prompt_tokens"]), f"{r['load_cold_s']:.2f}/{warm}",
                      f"{r['ttft_s'] * 1000:.1f}", f"{r['tpot_s'] * 1000:.1f}", f"{r['prefill_tokens_per_s']:.0f}",
                      f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_ceiling_tokens_per_s']:.1f}",
                      f"{r['ceiling_fraction']:.0%}", f"{r['peak_rss_bytes'] / 2**30:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Decode and prefill tokens/s against prompt length, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(f"{r['model']} ({r['runner']})" for r in rows):
        mine = [r for r in rows if f"{r['model']} ({r['runner']})" == name]
        lengths = [r["prompt_tokens"] for r in mine]
        left.plot(lengths, [r["decode_tokens_per_s"] for r in mine], marker="o", label=name)
        right.plot(lengths, [r["prefill_tokens_per_s"] for r in mine], marker="o", label=name)
    for axis, title in ((left, "decode tokens/s"), (right, "prefill tokens/s")):
        axis.set_xscale("log")
        axis.set_xlabel("prompt tokens")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", required=True, help="[RUNNER:]FOLDER ...: converted folders (openvino), "
                        "HF checkpoints (transformers, transformers-bf16, ipex, ipex-fp32, ipex-bf16)")
    parser.add_argument("--runner", choices=RUNNERS, default="openvino",
                        help="runner of folders given without one (ipex: bf16 where the CPU has AMX or AVX-512 BF16)")
    parser.add_argument("--ipex-python", help="Python of the Xeon environment for ipex models "
                        "(default .venv-xeon/bin/python)")
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--prompt-lengths", default="32,256,1024", help="comma-separated prompt lengths in tokens")
    parser.add_argument("--max-new-tokens", dest="new_tokens", type=int, default=128,
                        help="tokens generated per run, exactly: the stop tokens are passed over (default 128)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per length (median), after one warm-up")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--plot", help="write a PNG plot of tokens/s against prompt length here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        lengths = tuple(int(x) for x in args.prompt_lengths.split(","))
        if min(lengths) < 4 or args.new_tokens < 2 or args.runs < 1:
            raise ValueError
    except ValueError:
        print("error: --prompt-lengths must be integers >= 4, --max-new-tokens >= 2, --runs >= 1", file=sys.stderr)
        return 2
    missing = [m for m in args.model if not Path(split_model(m, args.runner)[1]).is_dir()]
    if missing:
        print(f"error: no such model folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        rows = bench(args.model, args.runner, args.device, args.threads, lengths, args.new_tokens, args.runs,
                     args.ipex_python)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{rows[0]['cpu']}; memory bandwidth {rows[0]['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
          f"(copy, {rows[0]['threads']} threads)")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
