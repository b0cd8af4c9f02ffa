"""Many requests on one model: continuous batching on CPU and GPU, one at a time on NPU.

A :class:`Job` holds prompt ids, options and two callbacks that run on the scheduler's side:
``on_text(chunk)`` gets each piece of reply text and returns True to stop, ``on_done(result)``
runs once at the end. Jobs wait in a bounded queue (:class:`QueueFull` when it is full);
``Job.cancel()`` takes a waiting job out of the queue, or stops a running one before the
pipeline's next step (its GenerationHandle is cancelled, and the pipeline drops it).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from chat_format import ChatTemplate
from chat_format.genai import GenAIEncoder
from hostcpu import openvino_amx
from runtime.adapters import LoraAdapter
from runtime.engine import EngineError, GenerationOptions, PromptLookup
from runtime.openvino_engine import (OpenVINOEngine, apply_options, check_device, check_model_dir, context_length,
                                     device_properties, error_summary, layout_notes, load_pipeline,
                                     resolve_cache_dir, special_token_id)
from runtime.streaming import TextDecoder

RESERVED_FOR_REPLY = 128  # prompts must leave this much of the context for the reply


class QueueFull(EngineError):
    """Every running slot and every queue place is taken."""


@dataclass
class JobResult:
    """How a job ended: stop, length, cancelled (the client left) or error."""

    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    error: str | None = None


@dataclass
class Job:
    """One request for the scheduler."""

    prompt_ids: list[int]
    options: GenerationOptions
    on_text: Callable[[str], bool]
    on_done: Callable[[JobResult], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    scheduler: Scheduler | None = None

    def cancel(self) -> None:
        """Stop this job (safe from any thread, any number of times)."""
        self.cancelled.set()
        if self.scheduler is not None:
            self.scheduler.withdraw(self)


@dataclass
class Counters:
    """What /health shows. ``tokens_after_cancel``: tokens the engine generated for cancelled jobs
    after the scheduler acted on the cancel, as the engine itself counts them (None when unknown)."""

    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0
    errors: int = 0
    tokens_generated: int = 0
    tokens_after_cancel: int | None = 0
    running: int = 0
    waiting: int = 0
    engine_busy: bool = False


class Scheduler:
    """The bounded queue and counters both schedulers share; subclasses run ``_loop`` on a thread."""

    kind = ""

    def __init__(self, name: str, device: str, max_running: int, max_waiting: int) -> None:
        self.name, self.device = name, device
        self.max_running, self.max_waiting = max_running, max_waiting
        self.counters = Counters()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"{self.kind}-scheduler", daemon=True)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raise QueueFull when the running slots and the queue are all taken."""
        with self._cond:
            if self.counters.running + len(self._waiting) >= self.max_running + self.max_waiting:
                self.counters.rejected += 1
                raise QueueFull(f"{self.counters.running} requests running and {len(self._waiting)} waiting; "
                                "retry later")
            job.scheduler = self
            self.counters.requests += 1
            self._waiting.append(job)
            self.counters.waiting = len(self._waiting)
            self._cond.notify_all()

    def withdraw(self, job: Job) -> None:
        """Take a cancelled job out of the queue at once; a running one stops at the next step."""
        with self._cond:
            if job not in self._waiting:
                self._cond.notify_all()
                return
            self._waiting.remove(job)
            self.counters.waiting = len(self._waiting)
            self.counters.cancelled += 1
        job.on_done(JobResult("cancelled", len(job.prompt_ids), 0))

    def status(self) -> dict[str, Any]:
        return dict(asdict(self.counters), scheduler=self.kind, max_running=self.max_running,
                    max_waiting=self.max_waiting)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def _next_jobs(self, free: int) -> list[Job]:
        """Up to ``free`` queued jobs (called with the lock held)."""
        jobs = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        self.counters.waiting = len(self._waiting)
        self.counters.running += len(jobs)
        return jobs

    def _ended(self, job: Job, result: JobResult) -> None:
        with self._cond:
            self.counters.running -= 1
            self.counters.tokens_generated += result.generated_tokens
            if result.finish_reason == "cancelled":
                self.counters.cancelled += 1
            elif result.finish_reason == "error":
                self.counters.errors += 1
            else:
                self.counters.completed += 1
        job.on_done(result)

    def _loop(self) -> None:
        raise NotImplementedError


@dataclass
class _Running:
    job: Job
    handle: Any
    decoder: TextDecoder
    generated: int = 0
    finish: str = ""
    stop: bool = False


class BatchScheduler(Scheduler):
    """openvino-genai's ContinuousBatchingPipeline: every running job advances one token per step."""

    kind = "continuous_batching"

    def __init__(self, folder: Path, device: str, properties: dict[str, Any], max_running: int, max_waiting: int,
                 kv_cache_gb: int, prompt_lookup: PromptLookup | None = None, max_context: int | None = None,
                 prefill_chunk: int | None = None) -> None:
        super().__init__(folder.name, device, max_running, max_waiting)
        self.prompt_lookup, self.adapters = prompt_lookup, {}
        if prompt_lookup is not None:
            properties = {**properties, "prompt_lookup": True}
        self._folder, self._properties, self._kv_cache_gb = folder, properties, kv_cache_gb
        self._prefill_chunk = prefill_chunk
        self.pipeline = self._build()
        self.tokenizer = self.pipeline.get_tokenizer()
        self.encoder = GenAIEncoder(self.tokenizer)
        self.template = ChatTemplate.from_folder(folder)
        self.max_prompt_tokens = max(min(context_length(folder), max_context or context_length(folder))
                                     - RESERVED_FOR_REPLY, 1)
        self._running: list[_Running] = []
        self._dropping: list[_Running] = []
        self._ids = itertools.count()

    def _build(self) -> Any:
        import openvino_genai

        config = openvino_genai.SchedulerConfig()
        config.cache_size, config.max_num_seqs = self._kv_cache_gb, self.max_running
        if self._prefill_chunk:
            config.max_num_batched_tokens = self._prefill_chunk
        pipeline, self.notes = load_pipeline(
            lambda p: openvino_genai.ContinuousBatchingPipeline(str(self._folder), config, self.device, p),
            self._properties, f"{self._folder} on {self.device}")
        return pipeline

    def encode(self, text: str) -> list[int]:
        return self.encoder.encode(text)

    def token_id(self, token: str) -> int:
        return special_token_id(self.encoder, token)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._waiting or self._running
                                    or self.counters.engine_busy)
                if self._closed:
                    return
                new = self._next_jobs(self.max_running - len(self._running))
            for job in new:
                self._add(job)
            for run in [r for r in self._running if r.job.cancelled.is_set()]:
                self._drop(run)
            if self.pipeline.has_non_finished_requests():
                try:
                    self.pipeline.step()
                except Exception as error:  # the pipeline is unusable now: fail its jobs and rebuild it
                    self._fail_all(error)
                    continue
            self._account_dropped()
            for run in list(self._running):
                try:
                    self._collect(run)
                except Exception as error:  # this job's text could not be handled: it fails, the others go on
                    run.handle.cancel()
                    if run in self._running:
                        self._finish(run, "error", unstreamable(error))
            self.counters.engine_busy = self.pipeline.has_non_finished_requests()

    def _add(self, job: Job) -> None:
        import numpy as np
        import openvino as ov

        run = _Running(job, None, TextDecoder(self.tokenizer))
        try:
            config = apply_options(self.pipeline.get_config(), job.options, self.prompt_lookup)
            run.handle = self.pipeline.add_request(next(self._ids), ov.Tensor(np.array([job.prompt_ids], np.int64)),
                                                   config)
        except Exception as error:  # a config the pipeline refuses
            self._ended(job, JobResult("error", len(job.prompt_ids), 0, error_summary(error)))
            return
        self._running.append(run)

    def _collect(self, run: _Running) -> None:
        import openvino_genai

        reasons = openvino_genai.GenerationFinishReason
        while run.handle.can_read():
            for output in run.handle.read().values():
                ids = [int(i) for i in output.generated_ids]
                run.generated += len(ids)
                if ids and (text := run.decoder.write(ids)):
                    run.stop = run.stop or run.job.on_text(text)
                if output.finish_reason != reasons.NONE:
                    run.finish = "stop" if output.finish_reason == reasons.STOP else "length"
        if run.stop:  # the job's own stop (a stop string): no more steps for it
            run.handle.cancel()
            self._finish(run, "stop")
        elif run.finish or run.handle.get_status() != openvino_genai.GenerationStatus.RUNNING:
            if text := run.decoder.end():
                run.job.on_text(text)
            self._finish(run, run.finish or "stop")

    def _drop(self, run: _Running) -> None:
        """Cancel a job whose client left; the pipeline forgets it at the next step."""
        run.handle.cancel()
        self._dropping.append(run)
        self._finish(run, "cancelled")

    def _account_dropped(self) -> None:
        """After a step, count what the engine generated for dropped jobs past their cancel."""
        for run in self._dropping:
            engine_count = run.handle.get_perf_metrics().get_num_generated_tokens()
            self.counters.tokens_after_cancel += max(engine_count - run.generated, 0)
        self._dropping.clear()

    def _finish(self, run: _Running, reason: str, error: str | None = None) -> None:
        self._running.remove(run)
        self._ended(run.job, JobResult(reason, len(run.job.prompt_ids), run.generated, error))

    def _fail_all(self, error: BaseException) -> None:
        message = f"the engine failed ({error_summary(error)}) and was restarted; retry the request"
        for run in list(self._running):
            self._running.remove(run)
            self._ended(run.job, JobResult("error", len(run.job.prompt_ids), run.generated, message))
        self._dropping.clear()
        self.pipeline = self._build()


class SerialScheduler(Scheduler):
    """One request at a time on LLMPipeline (NPU, or any device on request), the rest queued."""

    kind = "serial"

    def __init__(self, engine: OpenVINOEngine, max_waiting: int) -> None:
        super().__init__(engine.name, engine.device, 1, max_waiting)
        self.engine, self.tokenizer, self.template = engine, engine.tokenizer, engine.template
        self.notes, self.adapters = list(engine.notes), engine.adapters
        self.max_prompt_tokens = engine.max_prompt_tokens
        self.counters.tokens_after_cancel = None  # LLMPipeline does not say where a cancel landed

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def token_id(self, token: str) -> int:
        return self.engine.token_id(token)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._waiting)
                if self._closed:
                    return
                job = self._next_jobs(1)[0]
                self.counters.engine_busy = True
            self._ended(job, self._run(job))
            self.counters.engine_busy = False

    def _run(self, job: Job) -> JobResult:
        stopped = False

        def on_text(chunk: str) -> bool:
            nonlocal stopped
            stopped = stopped or job.on_text(chunk)
            return stopped or job.cancelled.is_set()

        try:
            generation = self.engine.generate(job.prompt_ids, job.options, on_text)
        except EngineError as error:
            return JobResult("error", len(job.prompt_ids), 0, str(error))
        except Exception as error:  # from the job's own callback: this job fails, the scheduler goes on
            return JobResult("error", len(job.prompt_ids), 0, unstreamable(error))
        reason = "cancelled" if job.cancelled.is_set() else "stop" if stopped else generation.stats.finish_reason
        return JobResult(reason, len(job.prompt_ids), generation.stats.generated_tokens)


def unstreamable(error: BaseException) -> str:
    """The error of a job whose reply text could not be handed on (its own callback failed)."""
    return f"the reply could not be streamed ({error_summary(error)})"


def load_scheduler(model_dir: str | Path, device: str = "CPU", scheduler: str = "auto", max_running: int = 16,
                   max_waiting: int = 64, kv_cache_gb: int = 2, cache_dir: Path | None | str = "default",
                   prompt_lookup: PromptLookup | None = None, adapters: Sequence[LoraAdapter] = (),
                   memory: dict[str, Any] | None = None) -> Scheduler:
    """Load a converted model for serving: continuous batching on CPU/GPU, serial on NPU (or when asked).

    With LoRA adapters the server is serial too: openvino-genai 2026.4's continuous batching keeps
    whatever adapters its last ``generate()`` applied for requests added with ``add_request``, so it
    cannot switch them per request (seen here); LLMPipeline switches them on every call.
    """
    import openvino as ov

    memory = memory or {}
    folder = Path(model_dir)
    int4_groups = check_model_dir(folder)
    device = device.upper()
    check_device(device, ov.Core().available_devices)
    kind = scheduler if scheduler != "auto" else ("batch" if device.split(".")[0] in ("CPU", "GPU") else "serial")
    notes = []
    if adapters and kind == "batch":
        kind = "serial"
        notes.append("with LoRA adapters requests are served one at a time (openvino-genai's continuous batching "
                     "cannot switch adapters per request)")
    if kind == "serial":
        serial = SerialScheduler(OpenVINOEngine(folder, device, cache_dir=cache_dir, prompt_lookup=prompt_lookup,
                                                adapters=adapters, **memory), max_waiting)
        serial.notes += notes
        return serial
    properties = device_properties(device, resolve_cache_dir(cache_dir),
                                   kv_cache_precision=memory.get("kv_cache_precision"), int4_groups=int4_groups)
    properties.update(memory.get("extra_properties") or {})
    batch = BatchScheduler(folder, device, properties, max_running, max_waiting, kv_cache_gb, prompt_lookup,
                           memory.get("max_context"), memory.get("prefill_chunk"))
    batch.notes += layout_notes(device, int4_groups, openvino_amx())
    return batch
