"""An OpenAI-compatible server for converted GLM-4 models.

    python -m runtime.server --model build/glm4-9b-int4 [--device CPU] [--port 8000] [--api-key KEY]

``GET /v1/models``, ``GET /health`` and ``POST /v1/chat/completions`` (streamed or not, with tools,
stop strings, JSON-schema answers and usage). CPU and GPU serve many requests at once through
openvino-genai's continuous batching; NPU serves one at a time. Requests past the running slots
wait in a bounded queue (429 when it is full). A client that disconnects cancels its generation.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from chat_format import TemplateError
from runtime.adapters import LoraAdapter
from runtime.engine import EngineError, PromptLookup, conversation_ids
from runtime.cli import (adapters_of, add_adapter_arguments, add_max_new_tokens, add_memory_arguments,
                         add_model_arguments, add_prompt_lookup_arguments, memory_options, prompt_lookup_of)
from runtime.openai_api import ApiError, ChatRequest, parse_chat_request
from runtime.openai_reply import ReplyAssembler, chunk, completion, new_id, usage
from runtime.serving import RESERVED_FOR_REPLY, Job, JobResult, QueueFull, Scheduler, load_scheduler
from runtime.structured import GrammarChecker, GrammarError, json_schema_config, tool_call_config

MAX_BODY_BYTES = 8 * 2**20
log = logging.getLogger("runtime.server")


class ChatService:
    """The OpenAI API over one scheduler: requests checked and encoded, run as jobs, answered in OpenAI's shapes."""

    def __init__(self, scheduler: Scheduler, checker: GrammarChecker, api_key: str | None = None,
                 max_new_tokens: int = 1024) -> None:
        self.scheduler, self.checker, self.api_key = scheduler, checker, api_key
        self.max_new_tokens, self.model = max_new_tokens, scheduler.name
        # the model itself, and the model with each LoRA adapter: "NAME:ADAPTER"
        self.served = {self.model: (), **{f"{self.model}:{name}": (name,) for name in scheduler.adapters}}

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or incorrect API key; send Authorization: Bearer KEY", None,
                           "invalid_api_key")

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model, "device": self.scheduler.device, **self.scheduler.status()}

    async def models(self, request: Request) -> dict[str, Any]:
        self.authorize(request)
        return {"object": "list",
                "data": [{"id": name, "object": "model", "created": 0, "owned_by": "glm4-intel"}
                         for name in self.served]}

    async def chat_completions(self, request: Request) -> Any:
        self.authorize(request)
        chat = parse_chat_request(await read_json(request), self.served)
        job, events, reply_id = await self.prepare(chat)
        try:
            self.scheduler.submit(job)
        except QueueFull as error:
            raise ApiError(429, str(error), None, "rate_limit_exceeded") from None
        if chat.stream:
            return JobStream(job, self.stream(events, chat, reply_id))
        return await self.collect(request, job, events, reply_id, chat.model)

    async def prepare(self, chat: ChatRequest) -> tuple[Job, asyncio.Queue, str]:
        """Encode the prompt, check its length and grammar, and build the job that reports to a queue."""
        scheduler = self.scheduler
        try:
            ids = await asyncio.to_thread(conversation_ids, scheduler, chat.messages, chat.tools)
        except TemplateError as error:  # e.g. tools for a model whose template declares none
            raise ApiError(400, str(error), "tools" if chat.tools else "messages") from None
        if len(ids) > scheduler.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(ids)} tokens but this server takes at most "
                           f"{scheduler.max_prompt_tokens}; shorten the messages", "messages",
                           "context_length_exceeded")
        room = scheduler.max_prompt_tokens + RESERVED_FOR_REPLY - len(ids)
        chat.options.max_new_tokens = min(chat.max_tokens or self.max_new_tokens, room)
        chat.options.min_new_tokens = min(chat.options.min_new_tokens, chat.options.max_new_tokens)
        if chat.json_schema is not None or chat.forced:
            chat.options.structured_output = await self.grammar(chat)
        assembler = ReplyAssembler(chat.tool_names(), chat.stop, keep_newline=chat.json_schema is not None)
        reply_id = new_id()
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def post(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop has closed (shutdown)
                pass

        def on_text(text: str) -> bool:
            deltas = assembler.feed(text)
            if deltas and chat.stream:  # a whole reply is read from the assembler at the end
                post(("deltas", deltas))
            return assembler.stopped

        def on_done(result: JobResult) -> None:
            deltas = assembler.finish() if result.finish_reason not in ("cancelled", "error") else []
            if deltas and chat.stream:
                post(("deltas", deltas))
            finish = result.finish_reason if result.finish_reason in ("cancelled", "error") \
                else assembler.finish_reason(result.finish_reason)
            log.info("%s %s prompt=%d generated=%d%s", reply_id, finish, result.prompt_tokens,
                     result.generated_tokens, f" error={result.error}" if result.error else "")
            post(("done", (result, assembler)))

        return Job(ids, chat.options, on_text, on_done), events, reply_id

    async def grammar(self, chat: ChatRequest) -> Any:
        """The structured-output config of a JSON schema or a forced tool call, compiled on the stand-in first."""
        param = "response_format" if chat.json_schema is not None else "tool_choice"
        key, config = json_schema_config(chat.json_schema) if chat.json_schema is not None \
            else tool_call_config(chat.forced or [])
        try:
            await asyncio.to_thread(self.checker.check, key, config)
        except GrammarError as error:
            raise ApiError(400, f"{param}: the schema cannot be used: {error}", param) from None
        return config

    async def stream(self, events: asyncio.Queue, chat: ChatRequest, reply_id: str) -> AsyncIterator[str]:
        """The reply as server-sent events; deltas that queued up meanwhile go out as one."""
        yield sse(chunk(reply_id, chat.model, {"role": "assistant", "content": ""}))
        while True:
            items = [await events.get()]
            while not events.empty():
                items.append(events.get_nowait())
            for delta in merge([d for kind, value in items if kind == "deltas" for d in value]):
                yield sse(chunk(reply_id, chat.model, delta))
            if items[-1][0] == "done":  # always the last item a job posts
                break
        result, assembler = items[-1][1]
        if result.finish_reason == "error":
            yield sse(ApiError(503, result.error or "generation failed").body())
        else:
            yield sse(chunk(reply_id, chat.model, {}, assembler.finish_reason(result.finish_reason)))
            if chat.include_usage:
                yield sse(chunk(reply_id, chat.model, None,
                                usage_of=usage(result.prompt_tokens, result.generated_tokens)))
        yield "data: [DONE]\n\n"

    async def collect(self, request: Request, job: Job, events: asyncio.Queue, reply_id: str, model: str) -> Any:
        """Wait for the whole reply (the job posts only "done"), cancelling it if the client leaves."""
        try:
            while True:
                try:
                    _, (result, assembler) = await asyncio.wait_for(events.get(), timeout=0.25)
                    break
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
            if result.finish_reason == "error":
                raise ApiError(503, result.error or "generation failed")
            if result.finish_reason == "cancelled":
                raise ApiError(400, "the client disconnected")
            return completion(reply_id, model, assembler, assembler.finish_reason(result.finish_reason),
                              result.prompt_tokens, result.generated_tokens)
        finally:
            job.cancel()


def create_app(scheduler: Scheduler, checker: GrammarChecker, api_key: str | None = None,
               max_new_tokens: int = 1024) -> Any:
    """The FastAPI application serving ``scheduler``'s model under its folder name."""
    service = ChatService(scheduler, checker, api_key, max_new_tokens)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="glm4-intel", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/v1/models", service.models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", service.chat_completions, methods=["POST"])
    return app


async def api_error(_: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    message = {404: f"no route {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, error.detail)
    return JSONResponse(ApiError(error.status_code, message).body(), status_code=error.status_code)


async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    return JSONResponse(ApiError(400, f"invalid request: {error.errors()}").body(), status_code=400)


async def server_error(_: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error")
    return JSONResponse(ApiError(500, "internal server error; see the server log").body(), status_code=500)


class JobStream(StreamingResponse):
    """A server-sent-event response that cancels its job however it ends (a client that leaves,
    even before the first byte, included)."""

    def __init__(self, job: Job, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def merge(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``deltas`` with neighbouring content joined into one delta."""
    merged: list[dict[str, Any]] = []
    for delta in deltas:
        if merged and "content" in delta and "content" in merged[-1]:
            merged[-1] = {"content": merged[-1]["content"] + delta["content"]}
        else:
            merged.append(delta)
    return merged


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def read_json(request: Request) -> Any:
    """The request body as JSON: 413 past MAX_BODY_BYTES, 400 when it does not parse."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {MAX_BODY_BYTES}", None,
                       "request_too_large")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes", None,
                           "request_too_large")
    try:
        return json.loads(data)
    except ValueError as error:
        raise ApiError(400, f"the request body is not valid JSON ({error})", None, "invalid_json") from None


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.server", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, backends=("openvino",))
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("GLM4_INTEL_API_KEY"),
                        help="require Authorization: Bearer KEY (default: $GLM4_INTEL_API_KEY, else none)")
    parser.add_argument("--max-concurrency", type=int, default=16, help="requests generated at once (NPU: 1)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429")
    parser.add_argument("--scheduler", choices=("auto", "batch", "serial"), default="auto",
                        help="auto: continuous batching on CPU/GPU, serial on NPU")
    parser.add_argument("--kv-cache-gb", type=int, default=2, help="KV-cache memory for continuous batching")
    add_max_new_tokens(parser, 1024, "reply limit when a request sets no max_tokens")
    add_prompt_lookup_arguments(parser)
    add_adapter_arguments(parser)
    add_memory_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.max_concurrency < 1 or args.max_queue < 0 or args.kv_cache_gb < 1 or args.max_new_tokens < 1:
        print("error: --max-concurrency >= 1, --max-queue >= 0, --kv-cache-gb >= 1 and --max-new-tokens >= 1 "
              "are required", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(args.model, args.device, args.host, args.port, args.api_key, args.max_concurrency,
                     args.max_queue, args.scheduler, args.kv_cache_gb, args.max_new_tokens,
                     "default" if args.cache_dir is None else args.cache_dir, prompt_lookup_of(args),
                     adapters_of(args), memory_options(args))
    except (EngineError, ValueError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 1


def serve(model_dir: str, device: str = "CPU", host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_concurrency: int = 16, max_queue: int = 64, scheduler: str = "auto", kv_cache_gb: int = 2,
          max_new_tokens: int = 1024, cache_dir: str | None = "default",
          prompt_lookup: PromptLookup | None = None, adapters: Sequence[LoraAdapter] = (),
          memory: dict[str, Any] | None = None) -> int:
    """Load the model and serve it until interrupted."""
    import uvicorn

    engine = load_scheduler(model_dir, device, scheduler, max_concurrency, max_queue, kv_cache_gb, cache_dir,
                            prompt_lookup, adapters, memory)
    for note in engine.notes:
        log.warning("%s", note)
    checker = GrammarChecker(Path(model_dir), engine.tokenizer)
    app = create_app(engine, checker, api_key, max_new_tokens)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can use it", host)
    log.info("serving %s on %s (%s, %d at once, queue %d) at http://%s:%d/v1", engine.name, engine.device,
             engine.kind, engine.max_running, engine.max_waiting, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
