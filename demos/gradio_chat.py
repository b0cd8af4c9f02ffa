"""Chat with a converted GLM-4 model in the browser: streamed replies, Stop, tools and statistics.

    python -m demos.gradio_chat --model build/glm4-tiny-int4 [--device CPU] [--port 7860] [--share]

Every browser tab keeps its own conversation (one runtime.ChatSession per Gradio session); the
tabs share one engine and their replies are generated one at a time. The page binds 127.0.0.1
unless --host says otherwise, and a public share link is opened only with --share.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

import runtime
from runtime.chat import one_line
from runtime.engine import ChatSession, Engine, EngineError, GenerationOptions, PromptLookup, ReplyStats
from runtime.adapters import LoraAdapter
from runtime.cli import (adapters_of, add_adapter_arguments, add_memory_arguments, add_model_arguments,
                         add_prompt_lookup_arguments, memory_options, prompt_lookup_of)
from runtime.tools import ToolCallRecord, ToolStepsExceeded, observation_text, stream_tool_loop

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 20_000
MAX_NEW_TOKENS_LIMIT = 8192
MAX_TOOL_STEPS = 5
STREAM_INTERVAL_S = 0.05  # at most ~20 page updates a second, however fast the model is
EXAMPLES = ["What is the capital of France?", "法国的首都是哪里？", "What is the weather in Paris?",
            "东京现在几点？", "Who are you?"]
CONDITIONS = [("sunny", "晴"), ("cloudy", "多云"), ("rainy", "有雨"), ("snowy", "有雪"), ("windy", "有风")]
CITY_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
DEMO_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.",
                                      "parameters": CITY_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "获取某个城市的当前时间。",
                                      "parameters": CITY_PARAMETERS}},
]
GENERATING = "Generating…"
NO_ADAPTER = "none (the base model)"


def _is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def get_weather(city: str) -> dict[str, Any]:
    """A fake, deterministic weather report for ``city`` (condition in Chinese for a Chinese name)."""
    digest = zlib.crc32(city.encode("utf-8"))
    english, chinese = CONDITIONS[digest % len(CONDITIONS)]
    return {"city": city, "temperature": digest % 49 - 9, "condition": chinese if _is_chinese(city) else english}


def get_time(city: str) -> dict[str, Any]:
    """A fake, deterministic local time for ``city``."""
    digest = zlib.crc32(city.encode("utf-8"))
    return {"city": city, "time": f"{digest % 24:02d}:{digest // 24 % 60:02d}"}


DEMO_FUNCTIONS = {"get_weather": get_weather, "get_time": get_time}


def precision(model_dir: Path) -> str:
    """The weight format the converter recorded in manifest.json (e.g. INT4), or "unknown"."""
    try:
        settings = json.loads((model_dir / "manifest.json").read_text(encoding="utf-8"))["settings"]
        return str(settings["weight_format"]).upper()
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def supports_sampling(device: str) -> bool:
    """Whether the sampling controls apply on ``device`` (the NPU pipeline decodes greedily)."""
    return not device.upper().startswith("NPU")


def stats_line(stats: ReplyStats | None, calls: int) -> str:
    """One reply's statistics as shown under the chat."""
    if stats is None:
        return ""
    finish = {"cancelled": "stopped", "length": "hit the max new tokens limit"}.get(stats.finish_reason,
                                                                                  stats.finish_reason)
    parts = [f"first token {stats.ttft_s * 1000:.0f} ms", f"{stats.tokens_per_s:.1f} tokens/s",
             f"{stats.generated_tokens} tokens", finish]
    if stats.tokens_per_step > 1:  # prompt lookup accepted drafts
        parts.insert(2, f"{stats.tokens_per_step:.2f} tokens/step")
    if calls:
        parts.append(f"after {calls} tool call{'s' if calls > 1 else ''}")
    return " · ".join(parts)


def tool_message(record: ToolCallRecord) -> dict[str, Any]:
    """A chat message that shows one tool call, its arguments and its result."""
    arguments = json.dumps(record.arguments, ensure_ascii=False) if record.arguments is not None else "(not JSON)"
    content = f"arguments: `{arguments}`\n\nresult: `{observation_text(record.result)}`"
    return {"role": "assistant", "content": content, "metadata": {"title": f"Tool call: {record.name}"}}


@dataclass
class Tab:
    """One browser session: its conversation and the state of its reply."""

    session: ChatSession
    busy: bool = False
    stop_requested: bool = False


class ChatApp:
    """The page's event handlers: one ChatSession per Gradio session, over one shared engine."""

    def __init__(self, engine: Engine, max_message_chars: int = MAX_MESSAGE_CHARS) -> None:
        self.engine, self.max_message_chars = engine, max_message_chars
        self._tabs: dict[str, Tab] = {}
        self._lock = threading.Lock()

    def tab(self, request: gr.Request) -> Tab:
        """The calling browser session's state, created on its first event."""
        key = request.session_hash or ""
        with self._lock:
            if key not in self._tabs:
                self._tabs[key] = Tab(ChatSession(self.engine))
            return self._tabs[key]

    def problem(self, message: str, tab: Tab) -> str | None:
        """Why ``message`` cannot be sent now, or None."""
        if tab.busy:
            return "A reply is still being generated: wait for it or press Stop."
        if not message.strip():
            return "The message is empty: type a question first."
        if len(message) > self.max_message_chars:
            return f"The message is too long ({len(message):,} characters; the limit is {self.max_message_chars:,})."
        return None

    def accept(self, message: str, history: list[dict[str, Any]],
               request: gr.Request) -> tuple[Any, Any, str, str | None]:
        """Check a new message; if it is fine, move it from the text box into the chat."""
        tab = self.tab(request)
        problem = self.problem(message, tab)
        if problem:
            return gr.skip(), gr.skip(), f"**Error:** {problem}", None
        tab.busy, tab.stop_requested = True, False
        return "", history + [{"role": "user", "content": message}], GENERATING, message

    def respond(self, message: str | None, history: list[dict[str, Any]], system: str, tools_on: bool,
                adapter: str | None, max_new_tokens: float, ignore_eos: bool, temperature: float, top_p: float,
                top_k: float, repetition_penalty: float, request: gr.Request) -> Iterator[tuple[Any, Any]]:
        """Stream the reply to an accepted message; errors end up in the status line, never as a trace."""
        if message is None:
            yield gr.skip(), gr.skip()
            return
        tab = self.tab(request)
        session, history = tab.session, list(history)
        status = "stopped"
        try:
            if not tab.stop_requested:
                session.system = system.strip() or None
                session.tools = DEMO_TOOLS if tools_on else None
                session.options = GenerationOptions(int(max_new_tokens), float(temperature), float(top_p),
                                                    int(top_k), float(repetition_penalty),
                                                    ignore_eos=bool(ignore_eos),
                                                    adapters=() if adapter in (None, NO_ADAPTER) else (adapter,))
                stats, calls = yield from self._converse(tab, session, message, history)
                status = stats_line(stats, calls)
        except ToolStepsExceeded as error:
            status = f"**Error:** the model still called {error.pending.name} after {MAX_TOOL_STEPS} tool calls"
        except (EngineError, ValueError) as error:
            status = "**Error:** " + " ".join(str(error).split())
        except Exception as error:  # shown as one line; the trace goes to the server's log
            log.exception("reply failed")
            status = f"**Error:** internal error ({type(error).__name__}); see the server log"
        finally:
            if tab.session is session:
                tab.busy = False
        if history and history[-1]["role"] == "assistant" and not history[-1]["content"]:
            history.pop()  # a reply that produced nothing: stopped at once, or failed
        if tab.session is session:
            yield history, status

    def _converse(self, tab: Tab, session: ChatSession, message: str, history: list[dict[str, Any]]
                  ) -> Generator[tuple[Any, Any], None, tuple[ReplyStats | None, int]]:
        """Stream the replies into ``history``, running the demo tools while the model calls them (each call
        shown with its result); return the last reply's statistics and the number of calls."""
        answer: dict[str, Any] = {"role": "assistant", "content": ""}
        history.append(answer)
        stats, calls, shown_at = None, 0, 0.0
        for item in stream_tool_loop(session, message, DEMO_FUNCTIONS, MAX_TOOL_STEPS):
            if tab.stop_requested:  # Stop pressed before the reply began
                session.cancel()
            if isinstance(item, ToolCallRecord):
                calls += 1
                history[-1] = tool_message(item)
                answer = {"role": "assistant", "content": ""}
                history.append(answer)
                shown_at = 0.0
            else:
                answer["content"] += item.text
                stats = item.stats or stats
            if tab.session is session and time.monotonic() - shown_at >= STREAM_INTERVAL_S:
                shown_at = time.monotonic()  # at most ~20 page updates a second
                yield history, GENERATING
        return stats, calls

    def stop(self, request: gr.Request) -> None:
        """Stop this browser session's reply (never another's)."""
        tab = self.tab(request)
        if tab.busy:
            tab.stop_requested = True
            tab.session.cancel()

    def clear(self, request: gr.Request) -> tuple[list[dict[str, Any]], str]:
        """Stop any reply and start this browser session's conversation afresh."""
        tab = self.tab(request)
        tab.session.cancel()
        tab.session, tab.busy, tab.stop_requested = ChatSession(self.engine), False, False
        return [], ""

    def forget(self, request: gr.Request) -> None:
        """Drop a closed browser session's conversation."""
        with self._lock:
            tab = self._tabs.pop(request.session_hash or "", None)
        if tab is not None:
            tab.session.cancel()


def build_demo(engine: Engine, model_dir: str | Path, max_message_chars: int = MAX_MESSAGE_CHARS) -> gr.Blocks:
    """The chat page for ``engine`` (loaded from ``model_dir``), not yet launched."""
    app = ChatApp(engine, max_message_chars)
    sampling = supports_sampling(engine.device)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts: offline
    with gr.Blocks(title="GLM-4 chat", theme=theme, analytics_enabled=False) as demo:
        lookup = " · **prompt lookup** on" if getattr(engine, "prompt_lookup", None) else ""
        gr.Markdown(f"## GLM-4 chat\n**model** {engine.name} · **precision** {precision(Path(model_dir))} · "
                    f"**device** {engine.device}{lookup}", elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(type="messages", label="Conversation", height=460, allow_tags=True,
                                     elem_id="chat")
                message = gr.Textbox(placeholder="Ask something (Enter sends)", show_label=False, max_lines=6,
                                     elem_id="message")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                status = gr.Markdown(elem_id="status")
                gr.Examples(EXAMPLES, inputs=message, label="Examples")
            with gr.Column(scale=1):
                system = gr.Textbox(label="System prompt", lines=3, elem_id="system")
                tools_on = gr.Checkbox(label="Tools: get_weather, get_time (demo functions)", elem_id="tools")
                adapters = list(getattr(engine, "adapters", None) or {})
                adapter = gr.Dropdown([NO_ADAPTER, *adapters], value=adapters[0] if adapters else NO_ADAPTER,
                                      label="LoRA adapter", visible=bool(adapters), elem_id="adapter")
                with gr.Accordion("Sampling", open=True):
                    max_new = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=512, step=1, label="Max new tokens",
                                        elem_id="max-new-tokens")
                    ignore_eos = gr.Checkbox(label="Run to max new tokens (ignore end of reply)", elem_id="ignore-eos")
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)",
                                            visible=sampling, elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p", visible=sampling, elem_id="top-p")
                    top_k = gr.Slider(0, 100, value=0, step=1, label="Top-k (0 = off)", visible=sampling,
                                      elem_id="top-k")
                    repetition = gr.Slider(1, 2, value=1, step=0.05, label="Repetition penalty", visible=sampling,
                                           elem_id="repetition-penalty")
                    if not sampling:
                        gr.Markdown(f"{engine.device} decodes greedily: the sampling controls are hidden.")
        pending = gr.State(None)
        settings = [system, tools_on, adapter, max_new, ignore_eos, temperature, top_p, top_k, repetition]
        for trigger in (message.submit, send.click):
            trigger(app.accept, [message, chatbot], [message, chatbot, status, pending], concurrency_limit=None,
                    show_progress="hidden") \
                .then(app.respond, [pending, chatbot, *settings], [chatbot, status], concurrency_id="generate",
                      concurrency_limit=1, show_progress="hidden")
        stop.click(app.stop, None, None, concurrency_limit=None, show_progress="hidden")
        clear.click(app.clear, None, [chatbot, status], concurrency_limit=None, show_progress="hidden")
        # The chat's own trash button clears the conversation as Clear does.
        chatbot.clear(app.clear, None, [chatbot, status], concurrency_limit=None, show_progress="hidden")
        demo.unload(app.forget)
    return demo


def gradio_chat(model_dir: str | Path, device: str = "CPU", backend: str = "openvino", host: str = "127.0.0.1",
                port: int | None = None, share: bool = False, cache_dir: str = "default",
                prompt_lookup: PromptLookup | None = None, adapters: Sequence[LoraAdapter] = (),
                memory: dict[str, Any] | None = None) -> None:
    """Load the model, serve the chat page, print its URL and block until interrupted.

    Raises EngineError when the model cannot be loaded and OSError when the port is taken.
    """
    openvino_only = {"cache_dir": cache_dir, "prompt_lookup": prompt_lookup, "adapters": adapters, **(memory or {})} \
        if backend == "openvino" else {}
    engine = runtime.load(model_dir, device, backend, **openvino_only)
    for note in getattr(engine, "notes", []):
        print(f"note: {note}", file=sys.stderr, flush=True)
    demo = build_demo(engine, model_dir)
    _, local_url, share_url = demo.launch(server_name=host, server_port=port, share=share, quiet=True,
                                          prevent_thread_lock=True, show_api=False)
    print(f"GLM-4 chat ({engine.name} on {engine.device}) running on {local_url}", flush=True)
    if share_url:
        print(f"public share link: {share_url}", flush=True)
    demo.block_thread()


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demos.gradio_chat",
                                     description="Chat with a converted GLM-4 model in the browser.")
    add_model_arguments(parser)
    add_prompt_lookup_arguments(parser)
    add_adapter_arguments(parser)
    add_memory_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=r".*Gradio 6\.0", category=DeprecationWarning)  # 5.x -> 6 notices
    try:
        gradio_chat(args.model, args.device, args.backend, args.host, args.port, args.share,
                    "default" if args.cache_dir is None else args.cache_dir, prompt_lookup_of(args), adapters_of(args),
                    memory_options(args))
    except (EngineError, OSError, ValueError) as error:
        print(one_line(error), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
