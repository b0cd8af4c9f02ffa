"""Chat with a converted GLM-4 model in the terminal.

    python -m runtime.chat --model build/glm4-tiny-int4 [--device CPU] [--system TEXT] [--tools FILE.json]
    .venv-xeon/bin/python -m runtime.chat --model models/glm4-tiny --backend ipex [--dtype bf16] [--quantize int8]

Interactive: replies stream as they are generated; /reset, /system TEXT, /stats, /quit.
Piped (stdin not a terminal): one message per input line, one reply per output line (newlines
inside a reply are written as \\n). A tool call prints as ``tool_call NAME {json}`` and the next
line is sent back as the tool's result. A turn that fails (a prompt too long for the context)
prints an empty reply line and ``error: ...`` on stderr, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, TextIO

import runtime
from chat_format import function_of
from runtime.engine import ChatSession, EngineError, GenerationOptions, ReplyChunk, ReplyStats
from runtime.cli import (adapters_of, add_adapter_arguments, add_max_new_tokens, add_memory_arguments,
                         add_model_arguments, add_prompt_lookup_arguments, memory_options, prompt_lookup_of)
from runtime.textio import InputLines, use_utf8_output

HELP = "commands: /reset  /system TEXT  /stats  /help  /quit"


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.chat", description="Chat with a converted GLM-4 model.")
    add_model_arguments(parser)
    parser.add_argument("--threads", type=int, help="CPU inference threads (default: the library's choice)")
    ipex = parser.add_argument_group("--backend ipex only")
    ipex.add_argument("--dtype", choices=("auto", "bf16", "fp32"),
                      help="auto (default): bf16 where the CPU has AVX-512 BF16 or AMX, else fp32")
    ipex.add_argument("--quantize", choices=("int8", "int4"), help="IPEX weight-only quantization: applied to the "
                      "original glm-4-9b-chat (chatglm); for -hf and 0414 IPEX has none, says so and runs unquantized")
    ipex.add_argument("--trust-remote-code", action="store_true",
                      help="run the checkpoint's own Python code (the original glm-4-9b-chat needs it)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--tools", help="JSON file with a list of OpenAI-style function tools")
    add_max_new_tokens(parser, 512, "longest reply in tokens")
    parser.add_argument("--min-new-tokens", type=int, default=0,
                        help="shortest reply: the stop tokens cannot be chosen before it (default 0)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="generate exactly --max-new-tokens, passing over the stop tokens (for measurements)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stats", action="store_true", help="print statistics after every reply")
    add_prompt_lookup_arguments(parser)
    add_adapter_arguments(parser)
    add_memory_arguments(parser)
    return parser


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of runtime.load for the chosen backend."""
    options: dict[str, Any] = {"threads": args.threads} if args.threads else {}
    ipex_only = {"dtype": args.dtype, "quantize": args.quantize, "trust_remote_code": args.trust_remote_code}
    if args.backend == "ipex":
        if args.cache_dir is not None or args.prompt_lookup or args.adapter or memory_options(args):
            raise ValueError("--cache-dir, --prompt-lookup, --adapter and the memory options apply to --backend "
                             "openvino only")
        return {**options, **ipex_only, "dtype": args.dtype or "auto"}
    given = [f"--{name.replace('_', '-')}" for name, value in ipex_only.items() if value]
    if given:
        raise ValueError(f"{', '.join(given)} apply to --backend ipex only")
    if args.prompt_lookup:
        options["prompt_lookup"] = prompt_lookup_of(args)
    if args.adapter:
        options["adapters"] = adapters_of(args)
    options.update(memory_options(args))
    return {**options, "cache_dir": args.cache_dir} if args.cache_dir is not None else options


def read_tools(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            tools = json.load(handle)
    except (OSError, ValueError) as error:
        raise EngineError(f"cannot read tools from {path}: {error}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "name" in function_of(t)
                                               for t in tools):
        raise EngineError(f"{path} must hold a JSON list of function tools, each with a name")
    return tools


def format_stats(stats: ReplyStats | None) -> str:
    if stats is None:
        return "no reply yet"
    step = f", {stats.tokens_per_step:.2f} tokens/step" if stats.tokens_per_step > 1 else ""
    return (f"[{stats.finish_reason}; prompt {stats.prompt_tokens} tokens, generated {stats.generated_tokens}, "
            f"first token {stats.ttft_s * 1000:.0f} ms, {stats.tokens_per_s:.1f} tokens/s{step}]")


def stream_reply(session: ChatSession, text: str, role: str, write: Callable[[str], None]) -> ReplyChunk:
    """Write a reply as it streams (a tool call is never written as text); return its last chunk."""
    for chunk in session.send(text, role):
        if chunk.text:
            write(chunk.text)
        if chunk.finish_reason is not None:
            return chunk
    raise EngineError("the reply ended without its last chunk")


def one_line(error: BaseException) -> str:
    """An error as the single line users see."""
    return "error: " + " ".join(str(error).split("\n")).strip()


def chat(session: ChatSession, lines: TextIO | InputLines, out: TextIO, piped: bool, show_stats: bool = False,
         err: TextIO = sys.stderr) -> int:
    """Run the conversation loop over ``lines``; return how many turns failed.

    A failed turn prints one error line (piped: on ``err``, and an empty reply line on ``out``).
    """
    failures, stats = 0, None

    def write(chunk: str) -> None:
        out.write(chunk.replace("\n", "\\n") if piped else chunk)
        out.flush()

    role = "user"
    while True:
        if not piped:
            out.write("> " if role == "user" else "tool result> ")
            out.flush()
        line = lines.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        if not piped and text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command in ("/quit", "/exit"):
                break
            elif command == "/reset":
                session.reset()
                role = "user"
            elif command == "/system":
                session.system = argument or None
                session.reset()
            elif command == "/stats":
                out.write(format_stats(stats) + "\n")
            else:
                out.write(HELP + "\n")
            continue
        if not text.strip():
            continue
        try:
            last = stream_reply(session, text, role, write)
        except (EngineError, ValueError) as error:
            failures += 1
            if piped:
                out.write("\n")
                out.flush()
                err.write(one_line(error) + "\n")
            else:
                out.write("\n" + one_line(error) + "\n")
            continue
        stats = last.stats
        call = last.reply.tool_call if last.reply and not last.reply.malformed else None
        if call is not None:
            out.write(f"tool_call {call.name} {json.dumps(call.arguments, ensure_ascii=False)}")
            role = "observation"
        else:
            role = "user"
        out.write("\n")
        if show_stats:
            out.write(format_stats(stats) + "\n")
        out.flush()
    return failures


def main(argv: list[str] | None = None) -> int:
    use_utf8_output()
    args = setup_arg_parser().parse_args(argv)
    options = GenerationOptions(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                args.repetition_penalty, args.seed, min_new_tokens=args.min_new_tokens,
                                ignore_eos=args.ignore_eos)
    try:
        options.validate()
        tools = read_tools(args.tools) if args.tools else None
        engine = runtime.load(args.model, args.device, args.backend, **engine_options(args))
    except (EngineError, ValueError) as error:
        print(one_line(error), file=sys.stderr)
        return 2
    for note in getattr(engine, "notes", []):
        print(f"note: {note}", file=sys.stderr)
    session = ChatSession(engine, system=args.system, tools=tools, options=options)
    piped = not sys.stdin.isatty()
    if not piped:
        print(f"{engine.name} on {engine.device}. {HELP}")
    try:
        failures = chat(session, InputLines(sys.stdin), sys.stdout, piped, args.stats)
    except KeyboardInterrupt:
        print()
        return 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
