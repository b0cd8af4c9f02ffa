"""Load benchmark for a running server: aggregate tokens/s at several numbers of concurrent streams.

    python -m runtime.server_bench --url http://127.0.0.1:8000 --concurrency 1,4,8,16

Each of N client threads sends ``--requests`` streamed chat requests one after another; the level's
aggregate rate is every completion token (as the server's usage reports it) over the level's wall
time. Every reply is ``--max-new-tokens`` long (the request sets vLLM's ``ignore_eos``, which this
project's server honours), so levels compare the same work whatever the model would answer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from runtime.cli import add_max_new_tokens

DEFAULT_PROMPT = "Write a long story about a lighthouse keeper and the sea."


@dataclass
class Sample:
    """One streamed request: completion tokens, time to first content, total time."""

    tokens: int
    ttft_s: float
    total_s: float


def one_request(client: Any, model: str, prompt: str, max_tokens: int) -> Sample:
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    return Sample(tokens, first if first is not None else total, total)


def run_level(url: str, api_key: str, model: str, streams: int, requests: int, prompt: str,
              max_tokens: int) -> dict[str, Any]:
    """``streams`` threads, each sending ``requests`` requests in a row; returns the level's figures."""
    import openai

    samples: list[Sample] = []
    failures: list[str] = []
    lock = threading.Lock()
    start_line = threading.Barrier(streams)

    def worker() -> None:
        client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=600)
        start_line.wait()
        for _ in range(requests):
            try:
                sample = one_request(client, model, prompt, max_tokens)
            except openai.OpenAIError as error:
                with lock:
                    failures.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                samples.append(sample)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(streams)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    tokens = sum(s.tokens for s in samples)
    decode = [s.tokens / (s.total_s - s.ttft_s) for s in samples if s.tokens > 1 and s.total_s > s.ttft_s]
    return {"streams": streams, "requests": len(samples), "failed": len(failures), "tokens": tokens,
            "wall_s": wall, "aggregate_tokens_per_s": tokens / wall if wall else 0.0,
            "stream_tokens_per_s": statistics.median(decode) if decode else 0.0,
            "ttft_ms": statistics.median(s.ttft_s for s in samples) * 1000 if samples else 0.0,
            "first_failure": failures[0] if failures else ""}


def served_model(url: str, api_key: str) -> str:
    import openai

    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=30)
    return client.models.list().data[0].id


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("streams", "requests", "tokens", "wall s", "aggregate tok/s", "per stream tok/s", "TTFT ms", "failed")
    lines = [header] + [(str(r["streams"]), str(r["requests"]), str(r["tokens"]), f"{r['wall_s']:.2f}",
                         f"{r['aggregate_tokens_per_s']:.1f}", f"{r['stream_tokens_per_s']:.1f}",
                         f"{r['ttft_ms']:.0f}", str(r["failed"])) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.server_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (python -m runtime.server)")
    parser.add_argument("--api-key", default="none", help="the server's API key, if it has one")
    parser.add_argument("--model-name", help="the served model's name (default: the first the server lists)")
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated numbers of concurrent streams")
    parser.add_argument("--requests", type=int, default=2, help="requests per stream at each level")
    add_max_new_tokens(parser, 128, "tokens in every reply")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        levels = [int(x) for x in args.concurrency.split(",")]
        if min(levels) < 1 or args.requests < 1 or args.max_new_tokens < 1:
            raise ValueError
    except ValueError:
        print("error: --concurrency takes positive integers (1,4,8,16); --requests and --max-new-tokens >= 1",
              file=sys.stderr)
        return 2
    import openai

    try:
        model = args.model_name or served_model(args.url, args.api_key)
        one_request(openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key, max_retries=0),
                    model, args.prompt, 8)  # warm-up
    except openai.OpenAIError as error:
        print(f"error: cannot use the server at {args.url}: {error}", file=sys.stderr)
        return 1
    rows = []
    for streams in levels:
        rows.append(run_level(args.url, args.api_key, model, streams, args.requests, args.prompt, args.max_new_tokens))
        print(f"{streams} streams: {rows[-1]['aggregate_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    print(f"{model} at {args.url}, {args.requests} requests per stream, max_tokens {args.max_new_tokens}")
    print(format_table(rows))
    failures = [r["first_failure"] for r in rows if r["failed"]]
    if failures:
        print(f"some requests failed, e.g. {failures[0]}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
