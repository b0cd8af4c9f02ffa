"""Benchmark converted GLM-4 models: load time, first token, decode speed, memory, roofline.

    python -m runtime.bench --model build/glm4-shape-int4 --prompt-lengths 32,256,1024 --max-new-tokens 128
    python -m runtime.bench --model build/shape-int8 transformers:build/glm4-shape-4l ipex:build/glm4-shape-4l

    python -m runtime.bench --model build/shape-cpu --peer-gguf build/shape-q4_0.gguf   # llama.cpp in the same run

A folder may name its runner (``openvino:``, ``transformers:``, ``transformers-bf16:``, ``ipex:``,
``ipex-fp32:``, ``ipex-bf16:``, and IPEX weight-only ``ipex-int8:``, ``ipex-int4:``); ``--runner`` is the default. Each model folder is measured in a child process of
its own, so its peak RSS and its cold load are its own; IPEX children run under the Xeon
environment's Python (``--ipex-python``, default .venv-xeon/bin/python). Decode speed is set
against the machine's memory read bandwidth, measured in the same run: at batch 1 every generated
token reads all weights once (the embedding table aside), so bandwidth / weight bytes is the
ceiling no CPU recipe can pass. ``--peer-gguf`` adds llama.cpp (``make peer``; runtime/peer.py), measured
before and after our models (best of both passes), and prints our ratios to it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chat_format import encode_prompt
from hostcpu import cpu_description
from runtime.cli import ov_config_of
from runtime.peer import DEFAULT_LLAMA_BENCH, PeerNotFound, check_peer, measure_peer, ratio_lines

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ("openvino", "transformers", "transformers-bf16", "ipex", "ipex-fp32", "ipex-bf16", "ipex-int8", "ipex-int4")

FIELDS = ("model", "runner", "device", "cpu", "threads", "prompt_tokens", "new_tokens", "load_cold_s", "load_warm_s",
          "ttft_s", "tpot_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes",
          "weight_bytes_per_token", "bandwidth_bytes_per_s", "bandwidth_worst_fraction", "decode_ceiling_tokens_per_s",
          "ceiling_fraction", "spread")


def memory_bandwidth(size_mb: int = 512, repeats: int = 7, threads: int = 2) -> tuple[float, float]:
    """Read bandwidth in bytes/s, what decode needs: a full read of a buffer far larger than the caches, one slice
    per thread, by the fastest of two numpy reads on this CPU (count_nonzero over bytes: 1.3-1.5x float sums on an
    AMD EPYC with AVX-512; a sum over 8-byte words: 1.9x count_nonzero on one with AVX2 only, where count_nonzero is
    bound by its arithmetic). Returns the best of ``repeats`` runs and the worst as a fraction of it."""
    import numpy as np

    chunks = [np.ones(size_mb * 2**20 // threads, dtype=np.uint8) for _ in range(threads)]
    reads = ((np.count_nonzero, chunks), (np.add.reduce, [chunk.view(np.uint64) for chunk in chunks]))
    speeds = [max(size_mb * 2**20 / parallel_seconds(read, views) for read, views in reads) for _ in range(repeats)]
    return max(speeds), min(speeds) / max(speeds)


def parallel_seconds(function: Any, arguments: list[Any]) -> float:
    """Wall time of ``function`` called on each of ``arguments`` at once, one thread each."""
    workers = [threading.Thread(target=function, args=(argument,)) for argument in arguments]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start


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
                     runs: int, ov_config: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """All measurements of one OpenVINO model folder (run inside a child process), ``ov_config`` on top of
    the runtime's own plugin settings."""
    from runtime.openvino_engine import OpenVINOEngine

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as cache:
        start = time.perf_counter()
        engine = OpenVINOEngine(folder, device, cache_dir=cache, threads=threads, extra_properties=ov_config)
        cold = time.perf_counter() - start
        del engine
        start = time.perf_counter()
        engine = OpenVINOEngine(folder, device, cache_dir=cache, threads=threads, extra_properties=ov_config)
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
            rows.append({"prompt_tokens": len(ids), **best_of(ttfts, tpots)})
        del engine
    weights = weight_bytes_per_token(Path(folder) / "openvino_model.xml")
    return [dict(row, load_cold_s=cold, load_warm_s=warm, weight_bytes_per_token=weights) for row in rows]


def best_of(ttfts: list[float], tpots: list[float]) -> dict[str, float]:
    """The fastest of the measured runs (noise on a shared machine only ever slows a run down) and the spread:
    the slowest run's speed as a fraction of the fastest's, the worse of prefill and decode."""
    return {"ttft_s": min(ttfts), "tpot_s": min(tpots),
            "spread": min(min(ttfts) / max(ttfts), min(tpots) / max(tpots))}


def tensor(ids: list[int]) -> Any:
    import numpy as np
    import openvino as ov

    return ov.Tensor(np.array([ids], dtype=np.int64))


def measure(runner: str, folder: str, device: str, threads: int, lengths: list[int], new_tokens: int,
            runs: int, trust_remote_code: bool = False, ov_config: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """All measurements of one model folder with one runner (inside the child process)."""
    from runtime.bench_torch import measure_ipex, measure_transformers

    if runner.startswith("transformers"):
        return measure_transformers(folder, threads, lengths, new_tokens, runs, runner.endswith("bf16"),
                                    trust_remote_code)
    if runner.startswith("ipex"):
        return measure_ipex(folder, runner, threads, lengths, new_tokens, runs, trust_remote_code)
    return measure_openvino(folder, device, threads, lengths, new_tokens, runs, ov_config)


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
          ipex_python: str | None = None, trust_remote_code: bool = False,
          on_rows: Callable[[list[dict[str, Any]]], None] | None = None, peer_ggufs: tuple[str, ...] = (),
          llama_bench: str | Path = DEFAULT_LLAMA_BENCH, ov_config: dict[str, str] | None = None
          ) -> list[dict[str, Any]]:
    """Measure every model folder (``RUNNER:FOLDER`` picks its runner); one row per (model, prompt length).

    Each GGUF of ``peer_ggufs`` is measured with ``llama_bench`` before and after the models (its rows: the best
    of both passes). ``on_rows`` gets the bandwidth-only row first (``model`` None), then each measurement's
    rows as they finish.
    """
    threads = threads or os.cpu_count() or 1
    if peer_ggufs:
        check_peer(llama_bench, list(peer_ggufs))
    bandwidth, worst = memory_bandwidth(threads=threads)
    machine = {"cpu": cpu_description(), "threads": threads, "device": device, "new_tokens": new_tokens,
               "bandwidth_bytes_per_s": bandwidth, "bandwidth_worst_fraction": worst}
    if on_rows:
        on_rows([dict(machine, model=None)])
    passes: dict[str, list[Any]] = {gguf: [] for gguf in peer_ggufs}
    jobs = [("llama.cpp", gguf) for gguf in peer_ggufs] + [split_model(spec, runner) for spec in models] + \
        [("llama.cpp", gguf) for gguf in peer_ggufs]  # peer, ours, peer
    results: list[dict[str, Any]] = []
    for model_runner, folder in jobs:
        if model_runner == "llama.cpp":
            rows, rss = measure_peer(llama_bench, folder, threads, list(lengths), new_tokens, runs, passes[folder])
            results = [r for r in results if not (r["runner"] == "llama.cpp" and r["model"] == Path(folder).name)]
        else:
            python = (ipex_python or default_ipex_python()) if model_runner.startswith("ipex") else sys.executable
            rows, rss = run_child(python, {"runner": model_runner, "folder": folder, "device": device,
                                           "threads": threads, "lengths": list(lengths), "new_tokens": new_tokens,
                                           "runs": runs, "trust_remote_code": trust_remote_code,
                                           "ov_config": ov_config})
        finished = []
        for row in rows:
            decode = 1.0 / row["tpot_s"] if row["tpot_s"] else 0.0
            ceiling = bandwidth / row["weight_bytes_per_token"]
            finished.append({key: value for key, value in {
                **machine, "model": Path(folder).name, "runner": model_runner, "peak_rss_bytes": rss,
                "prefill_tokens_per_s": row["prompt_tokens"] / row["ttft_s"], "decode_tokens_per_s": decode,
                "decode_ceiling_tokens_per_s": ceiling, "ceiling_fraction": decode / ceiling, **row}.items()
                if key in FIELDS})
        if on_rows:
            on_rows(finished)
        results += finished
    return results


HEADER = ("model", "runner", "prompt", "load cold/warm s", "TTFT ms", "TPOT ms", "prefill tok/s", "decode tok/s",
          "spread", "ceiling tok/s", "of ceiling", "peak RSS GiB")


def table_line(row: dict[str, Any] | None, widths: list[int]) -> str:
    """One line of the results table (the header for ``row`` None), columns right-aligned to ``widths``."""
    if row is None:
        cells: tuple[str, ...] = HEADER
    else:
        cold, warm = (f"{row[key]:.2f}" if row[key] is not None else "-" for key in ("load_cold_s", "load_warm_s"))
        cells = (row["model"], row["runner"], str(row["prompt_tokens"]), f"{cold}/{warm}",
                 f"{row['ttft_s'] * 1000:.1f}", f"{row['tpot_s'] * 1000:.1f}", f"{row['prefill_tokens_per_s']:.0f}",
                 f"{row['decode_tokens_per_s']:.1f}", f"{row['spread']:.0%}", f"{row['decode_ceiling_tokens_per_s']:.1f}",
                 f"{row['ceiling_fraction']:.0%}", f"{row['peak_rss_bytes'] / 2**30:.2f}")
    return "  ".join(cell.rjust(width) for cell, width in zip(cells, widths))


def table_widths(models: list[str]) -> list[int]:
    """Column widths known before any measurement, so that rows can be printed as they finish."""
    widths = [len(title) for title in HEADER]
    widths[0] = max(widths[0], *(len(Path(spec.partition(":")[2] or spec).name) for spec in models))
    widths[1] = max(widths[1], len("transformers-bf16"))
    return widths


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
                        "HF checkpoints (transformers, transformers-bf16, ipex, ipex-fp32, ipex-bf16, ipex-int8, "
                        "ipex-int4)")
    parser.add_argument("--runner", choices=RUNNERS, default="openvino",
                        help="runner of folders given without one (ipex: bf16 where the CPU has AMX or AVX-512 BF16; "
                             "default: %(default)s)")
    parser.add_argument("--ipex-python", default=default_ipex_python(),
                        help="Python of the Xeon environment for ipex models (default: %(default)s)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run checkpoints' own model code (the original glm-4-9b-chat; torch runners)")
    parser.add_argument("--device", default="CPU", help="OpenVINO device of openvino folders (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: all cores, %(default)s here)")
    parser.add_argument("--prompt-lengths", default="32,256,1024", help="comma-separated prompt lengths in tokens (default: %(default)s)")
    parser.add_argument("--max-new-tokens", dest="new_tokens", type=int, default=128,
                        help="tokens generated per run, exactly: the stop tokens are passed over (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per length (the best counts, the spread is printed), after one warm-up "
                        "(default: %(default)s)")
    parser.add_argument("--peer-gguf", nargs="+", default=[], metavar="FILE",
                        help="GGUF files of the same checkpoint for llama.cpp, measured before and after the models "
                             "(python -m models.gguf_export writes one)")
    parser.add_argument("--llama-bench", default=str(DEFAULT_LLAMA_BENCH),
                        help="llama.cpp's llama-bench for --peer-gguf (default: %(default)s, built by make peer)")
    parser.add_argument("--ov-config", nargs="+", default=[], metavar="KEY=VALUE",
                        help="OpenVINO plugin settings for the openvino folders, on top of the runtime's own "
                             "(e.g. DYNAMIC_QUANTIZATION_GROUP_SIZE=32)")
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
    try:
        ov_config = ov_config_of(args.ov_config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    missing = [m for m in args.model if not Path(split_model(m, args.runner)[1]).is_dir()]
    if missing:
        print(f"error: no such model folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    widths = table_widths(args.model + args.peer_gguf)

    def show(rows: list[dict[str, Any]]) -> None:
        if rows[0]["model"] is None:  # the machine, measured first
            machine = rows[0]
            print(f"{machine['cpu']}; memory read bandwidth {machine['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
                  f"(best of 7, worst {machine['bandwidth_worst_fraction']:.0%} of it; {machine['threads']} threads)")
            print(table_line(None, widths))
        else:
            print("\n".join(table_line(row, widths) for row in rows))
        sys.stdout.flush()

    try:
        rows = bench(args.model, args.runner, args.device, args.threads, lengths, args.new_tokens, args.runs,
                     args.ipex_python, args.trust_remote_code, on_rows=show, peer_ggufs=tuple(args.peer_gguf),
                     llama_bench=args.llama_bench, ov_config=ov_config)
    except PeerNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for line in ratio_lines(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
