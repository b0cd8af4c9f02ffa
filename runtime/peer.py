"""llama.cpp measured as runtime.bench measures our models: its ``llama-bench`` on a GGUF of the same checkpoint.

``make peer`` builds llama-bench; ``python -m models.gguf_export`` writes the GGUF (then llama.cpp's own
``llama-quantize`` makes the Q4_0 / Q4_K_M mixes its users run). Prefill is llama-bench's ``-p L`` test,
decode its ``-n N`` test after ``L`` tokens of context (``-d L``), as our decode follows a prompt of ``L``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LLAMA_BENCH = ROOT / "build" / "peer" / "cmake" / "bin" / ("llama-bench.exe" if sys.platform == "win32" else "llama-bench")


class PeerError(RuntimeError):
    """llama-bench failed."""


class PeerNotFound(PeerError):
    """llama-bench or a GGUF file is not where it was said to be."""


def gguf_weight_bytes(path: str | Path) -> int:
    """Bytes of weights one decode step reads in a GGUF: every tensor but the embedding table."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if t.name != "token_embd.weight")


# Runs a command and, after it, prints its peak resident memory (the kernel's count for the finished child) on
# stderr. A small launcher, because a child's count starts from what its parent held when it was forked.
LAUNCHER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('peak-rss-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(code)")


def run_with_peak_rss(command: list[str]) -> tuple[str, int]:
    """Run ``command``; its standard output and its peak resident memory in bytes (on Windows the peak working
    set, polled while it runs)."""
    posix = sys.platform != "win32"
    try:
        process = subprocess.Popen([sys.executable, "-c", LAUNCHER, *command] if posix else command,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                   errors="replace")
    except OSError as error:
        raise PeerError(f"cannot run {command[0]}: {error.strerror or error}") from None
    peak, done = [0], threading.Event()
    if not posix:
        import psutil

        def poll() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], psutil.Process(process.pid).memory_info().peak_wset)
                except psutil.Error:
                    pass
                done.wait(0.05)

        threading.Thread(target=poll, daemon=True).start()
    stdout, stderr = process.communicate()
    done.set()
    lines = [line for line in stderr.splitlines() if line.strip()]
    if posix and lines and lines[-1].startswith("peak-rss-kib "):
        peak[0] = int(lines.pop().split()[1]) * (1 if sys.platform == "darwin" else 1024)  # macOS counts bytes
    if process.returncode:
        raise PeerError(f"{Path(command[0]).name} failed: {(lines or [f'exit code {process.returncode}'])[-1].strip()}")
    return stdout, peak[0]


def llama_bench_tests(binary: str | Path, gguf: str | Path, threads: int, lengths: list[int], new_tokens: int,
                      runs: int) -> tuple[dict[tuple[str, int], list[float]], int]:
    """llama-bench's samples (tokens/s of each repetition) by ("prefill" | "decode", prompt length), and the
    peak RSS of the two invocations."""
    common = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", str(runs), "-o", "json"]
    csv = ",".join(str(n) for n in lengths)
    prefill, peak_a = run_with_peak_rss(common + ["-p", csv, "-n", "0"])
    decode, peak_b = run_with_peak_rss(common + ["-p", "0", "-n", str(new_tokens), "-d", csv])
    samples: dict[tuple[str, int], list[float]] = {}
    for entry in json.loads(prefill) + json.loads(decode):
        kind, length = ("prefill", entry["n_prompt"]) if entry["n_prompt"] else ("decode", entry.get("n_depth", 0))
        samples[(kind, length)] = [float(x) for x in entry.get("samples_ts") or [entry["avg_ts"]]]
    return samples, max(peak_a, peak_b)


def measure_peer(binary: str | Path, gguf: str | Path, threads: int, lengths: list[int], new_tokens: int,
                 runs: int, passes: list[dict[tuple[str, int], list[float]]]) -> tuple[list[dict[str, Any]], int]:
    """One more llama-bench pass over ``gguf`` appended to ``passes``; rows with the best of every pass so far
    (and the worst as a fraction of it), in runtime.bench's row format."""
    samples, rss = llama_bench_tests(binary, gguf, threads, lengths, new_tokens, runs)
    passes.append(samples)
    weights = gguf_weight_bytes(gguf)
    rows = []
    for length in lengths:
        prefill = [x for p in passes for x in p.get(("prefill", length), [])]
        decode = [x for p in passes for x in p.get(("decode", length), [])]
        if not prefill or not decode:
            raise PeerError(f"llama-bench reported no {length}-token test for {gguf}")
        rows.append({"prompt_tokens": length, "ttft_s": length / max(prefill), "tpot_s": 1 / max(decode),
                     "load_cold_s": None, "load_warm_s": None, "weight_bytes_per_token": weights,
                     "spread": min(min(prefill) / max(prefill), min(decode) / max(decode))})
    return rows, rss


def check_peer(binary: str | Path, ggufs: list[str]) -> None:
    """Raise PeerNotFound unless llama-bench and every GGUF exist."""
    if not Path(binary).is_file():
        raise PeerNotFound(f"no llama-bench at {binary}: run make peer, or pass --llama-bench PATH")
    missing = [g for g in ggufs if not Path(g).is_file()]
    if missing:
        raise PeerNotFound(f"no such GGUF file: {', '.join(missing)} (python -m models.gguf_export writes one)")


def ratio_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Ours against the peer, per model and prompt length: prefill and decode tokens/s as a ratio."""
    peers = [r for r in rows if r["runner"] == "llama.cpp"]
    lines = []
    for peer in dict.fromkeys(r["model"] for r in peers):
        for row in rows:
            if row["runner"] == "llama.cpp":
                continue
            match = next((p for p in peers if p["model"] == peer and p["prompt_tokens"] == row["prompt_tokens"]), None)
            if match:
                lines.append(f"{row['model']} ({row['runner']}) / {peer} at {row['prompt_tokens']} tokens: "
                             f"prefill {row['prefill_tokens_per_s'] / match['prefill_tokens_per_s']:.2f}x, "
                             f"decode {row['decode_tokens_per_s'] / match['decode_tokens_per_s']:.2f}x, "
                             f"peak RSS {row['peak_rss_bytes'] / max(match['peak_rss_bytes'], 1):.2f}x")
    return lines
