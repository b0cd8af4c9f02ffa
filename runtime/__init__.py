"""glm4-intel runtime: GLM-4 chat over openvino-genai (and IPEX on Xeon) behind one Engine protocol.

    import runtime
    engine = runtime.load("build/glm4-tiny-int4", device="CPU")
    session = runtime.ChatSession(engine, system="Answer briefly.")
    for chunk in session.send("What is the capital of France?"):
        print(chunk.text, end="", flush=True)  # the last chunk also has finish_reason, stats, reply
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.engine import (ChatSession, DeviceError, Engine, EngineError, GenerationOptions, ModelLoadError,
                            PromptTooLongError, ReplyChunk, ReplyStats)
from runtime.tools import ToolCallRecord, ToolLoopResult, ToolStepsExceeded, run_tool_loop, stream_tool_loop

__all__ = ["BACKENDS", "ChatSession", "DeviceError", "Engine", "EngineError", "GenerationOptions", "ModelLoadError",
           "PromptTooLongError", "ReplyChunk", "ReplyStats", "ToolCallRecord", "ToolLoopResult", "ToolStepsExceeded",
           "load", "run_tool_loop", "stream_tool_loop"]


BACKENDS = ("openvino", "ipex")


def load(model_dir: str | Path, device: str = "CPU", backend: str = "openvino", **options: Any) -> Engine:
    """Load a model on ``device`` and return its engine.

    ``openvino``: a folder written by ``python -m convert``. ``ipex``: a Hugging Face checkpoint
    folder, run by intel-extension-for-pytorch on the CPU (options: dtype, quantize, threads,
    trust_remote_code); it needs the Xeon environment (``make venv-xeon``).
    """
    if backend == "ipex":
        from runtime.ipex_engine import IPEXEngine

        return IPEXEngine(model_dir, device, **options)
    if backend != "openvino":
        raise EngineError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    from runtime.openvino_engine import OpenVINOEngine

    return OpenVINOEngine(model_dir, device, **options)
