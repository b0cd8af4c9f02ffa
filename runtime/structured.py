"""Structured output for the server: JSON-schema answers and forced GLM-4 tool calls, as
openvino_genai.StructuredOutputConfig, each grammar compiled first on a stand-in pipeline.

openvino-genai compiles a grammar inside ``ContinuousBatchingPipeline.step()``. A schema that its
grammar engine (xgrammar) rejects (``{"enum": []}``, ``minimum`` above ``maximum``, a regex
dialect it lacks...) raises there, and seen here, that pipeline then fails every later step for
every request. So :class:`GrammarChecker` compiles each new grammar first on a pipeline of its
own: a synthetic one-attention-layer model (width 8, so about 10 MB even for GLM-4's 151,552-token
vocabulary) with the served model's tokenizer and vocabulary size. A check costs milliseconds;
a failed one rebuilds the stand-in.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from chat_format import function_of, tool_call_prefix
from runtime.openvino_engine import error_summary


class GrammarError(ValueError):
    """The grammar engine rejected a schema (the message says why)."""


def json_schema_config(schema: Any) -> tuple[str, Any]:
    """A grammar key and the config that constrains a reply to JSON matching ``schema``."""
    import openvino_genai

    text = json.dumps(schema, sort_keys=True)
    return "json:" + text, openvino_genai.StructuredOutputConfig(json_schema=text)


def tool_call_config(tools: Sequence[dict[str, Any]]) -> tuple[str, Any]:
    """A grammar key and the config that forces a GLM-4 call to one of ``tools``
    (its name, a newline, then arguments matching its parameters schema)."""
    import openvino_genai

    S = openvino_genai.StructuredOutputConfig
    tags, keys = [], []
    for tool in tools:
        function = function_of(tool)
        parameters = json.dumps(function.get("parameters") or {"type": "object"}, sort_keys=True)
        tags.append(S.Concat(S.ConstString(tool_call_prefix(function["name"])), S.JSONSchema(parameters)))
        keys.append(f"{function['name']}:{parameters}")
    tag = tags[0] if len(tags) == 1 else S.Union(*tags)
    return "call:" + "|".join(keys), S(structural_tags_config=tag)


def vocab_size(model_dir: Path, tokenizer: Any) -> int:
    """The served model's logits width: config.json's (padded) vocabulary size, else the tokenizer's."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    size = config.get("padded_vocab_size") or config.get("vocab_size")
    return int(size) if size else max(int(i) for i in tokenizer.get_vocab().values()) + 1


def write_stand_in_model(folder: Path, vocab: int, width: int = 8) -> None:
    """A stateful one-layer attention model that ContinuousBatchingPipeline accepts: embeddings,
    one K/V cache (ReadValue, Gather by beam_idx, Concat, Assign), SDPA and logits over ``vocab``."""
    import numpy as np
    import openvino as ov
    from openvino import opset13 as op
    from openvino.op.util import Variable, VariableInfo

    rng = np.random.default_rng(0)

    def parameter(name: str, shape: list[int], kind: Any) -> Any:
        node = op.parameter(shape, kind, name=name)
        node.output(0).set_names({name})
        return node

    def weights(*shape: int) -> Any:
        return op.constant(rng.standard_normal(shape).astype(np.float32))

    def i64(*values: int) -> Any:
        return op.constant(np.array(values, dtype=np.int64))

    ids = parameter("input_ids", [-1, -1], ov.Type.i64)
    inputs = [ids, parameter("attention_mask", [-1, -1], ov.Type.i64),
              parameter("position_ids", [-1, -1], ov.Type.i64), parameter("beam_idx", [-1], ov.Type.i32)]
    hidden = op.gather(weights(vocab, width), ids, 0)

    def heads(node: Any) -> Any:  # [batch, tokens, width] -> [batch, 1 head, tokens, width]
        return op.transpose(op.reshape(node, i64(0, 0, 1, width), True), i64(0, 2, 1, 3))

    def cached(current: Any, name: str) -> tuple[Any, Any]:
        info = VariableInfo()
        info.data_shape, info.data_type, info.variable_id = ov.PartialShape([-1, 1, -1, width]), ov.Type.f32, name
        batch = op.gather(op.shape_of(ids), i64(0), 0)
        empty = op.broadcast(op.constant(np.float32(0)), op.concat([batch, i64(1, 0, width)], 0))
        variable = Variable(info)
        full = op.concat([op.gather(op.read_value(empty, variable), inputs[3], 0), current], 2)
        return full, op.assign(full, variable)

    query, (key, key_sink), (value, value_sink) = (
        heads(op.matmul(hidden, weights(width, width), False, False)),
        cached(heads(op.matmul(hidden, weights(width, width), False, False)), "past_key_values.0.key"),
        cached(heads(op.matmul(hidden, weights(width, width), False, False)), "past_key_values.0.value"))
    mask = op.constant(np.zeros((1, 1, 1, 1), dtype=np.float32))
    attended = op.scaled_dot_product_attention(query, key, value, mask, causal=True)
    flat = op.reshape(op.transpose(attended, i64(0, 2, 1, 3)), i64(0, 0, width), True)
    logits = op.result(op.matmul(flat, weights(width, vocab), False, False))
    logits.output(0).set_names({"logits"})
    ov.save_model(ov.Model([logits], [key_sink, value_sink], inputs, "grammar-stand-in"), folder / "openvino_model.xml")


class GrammarChecker:
    """Compiles grammars on a stand-in pipeline before they reach the shared one (thread-safe)."""

    def __init__(self, model_dir: Path, tokenizer: Any, remember: int = 512) -> None:
        self._tokenizer = tokenizer
        self._folder = tempfile.TemporaryDirectory(prefix="glm4-grammar-", ignore_cleanup_errors=True)
        write_stand_in_model(Path(self._folder.name), vocab_size(model_dir, tokenizer))
        self._lock = threading.Lock()
        self._good: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._pipeline = self._build()

    def _build(self) -> Any:
        import openvino_genai

        scheduler = openvino_genai.SchedulerConfig()
        scheduler.cache_size, scheduler.num_kv_blocks = 0, 16
        return openvino_genai.ContinuousBatchingPipeline(self._folder.name, self._tokenizer, scheduler, "CPU")

    def check(self, key: str, structured: Any) -> None:
        """Raise GrammarError unless ``structured`` compiles; grammars that did are remembered by ``key``."""
        import numpy as np
        import openvino as ov
        import openvino_genai

        with self._lock:
            if key in self._good:
                self._good.move_to_end(key)
                return
            config = self._pipeline.get_config()
            config.max_new_tokens, config.do_sample, config.structured_output_config = 1, False, structured
            try:
                # Keep the handle: a dropped GenerationHandle takes its request out of the pipeline.
                handle = self._pipeline.add_request(0, ov.Tensor(np.array([[0]], dtype=np.int64)), config)
                while handle.get_status() == openvino_genai.GenerationStatus.RUNNING:
                    self._pipeline.step()
            except Exception as error:  # the grammar engine's message is the useful part
                self._pipeline = self._build()
                raise GrammarError(grammar_message(error)) from None
            self._good[key] = None
            if len(self._good) > self._remember:
                self._good.popitem(last=False)


def grammar_message(error: BaseException) -> str:
    """xgrammar's reason without the C++ source location in front of it."""
    line = error_summary(error)
    for marker in (".cc:", ".h:", ".hpp:"):
        if marker in line:
            line = line.split(marker, 1)[1].split(":", 1)[-1].strip()
    line = line.split(" is false: ", 1)[-1]  # "Check failed: (condition) is false: reason"
    return line.strip() or "the grammar engine rejected the schema"
