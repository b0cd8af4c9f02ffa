"""Compress the two vocabulary-sized weights (embedding table, LM head) in row chunks.

NNCF quantizes a weight in one piece, in float32: GLM-4's 151552 x 4096 embedding table alone
takes ~5 GB of transient memory that way, more than the rest of a 4-layer model's compression.
Both weights are quantized per vocabulary row (INT8 channel-wise, or with ``--all-layers`` the
recipe's INT4, channel-wise or in groups along the row), so quantizing them a block of rows at a
time with NNCF's own ``compress_weight`` gives the same bits (the tests check this against NNCF's
whole-model result) at a fraction of the memory. The decompression subgraph is the one NNCF
builds: integer constant -> Convert(f16) -> [- zero point] -> * scale [-> Reshape for groups].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ROWS_PER_CHUNK = 8192


@dataclass
class VocabWeight:
    """A [vocab, hidden] weight: its constant, the output its consumer reads, and the consumer."""

    constant: Any
    source: Any  # the output feeding the consumer (the constant's, or a Convert's after it)
    consumer: Any
    port: int


def find_vocab_weights(model: Any, vocab_size: int) -> list[VocabWeight]:
    """The embedding Gather's table and the LM head MatMul's weight, when shaped [vocab, hidden].

    The LM head is the graph's last MatMul: a layer whose width merely equals the vocabulary size (a model with
    vocab_size == hidden_size) is not a vocabulary weight and stays with the recipe.
    """
    ops = model.get_ordered_ops()
    head = next((op for op in reversed(ops) if op.get_type_name() == "MatMul"), None)
    found = []
    for op in ops:
        kind = op.get_type_name()
        if kind != "Gather" and op is not head:
            continue
        port = 0 if kind == "Gather" else 1
        source = op.input_value(port)
        node = source.get_node()
        if node.get_type_name() == "Convert":
            node = node.input_value(0).get_node()
        if node.get_type_name() != "Constant" or node.get_output_partial_shape(0).rank.get_length() != 2:
            continue
        rows, _ = node.get_output_shape(0)
        transposed = kind == "Gather" or op.get_attributes().get("transpose_b", False)
        if rows == vocab_size and transposed:
            found.append(VocabWeight(node, source, op, port))
    return found


def rows_as_float32(constant: Any, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a (possibly memory-mapped, possibly bf16) constant as float32."""
    raw = constant.get_tensor_view().data[start:stop]
    if constant.get_output_element_type(0).get_type_name() == "bf16":
        return (np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(raw, dtype=np.float32)


def int8_mode(symmetric: bool) -> Any:
    """NNCF's INT8 channel-wise configuration, what the vocabulary weights get beside INT4 layers."""
    import nncf
    from nncf.quantization.algorithms.weight_compression.config import WeightCompressionConfig

    return WeightCompressionConfig(mode=nncf.CompressWeightsMode.INT8_SYM if symmetric else
                                   nncf.CompressWeightsMode.INT8_ASYM)


def int4_mode(symmetric: bool, group_size: int) -> Any:
    """NNCF's INT4 configuration of a recipe (group_size -1: channel-wise)."""
    import nncf
    from nncf.quantization.algorithms.weight_compression.config import WeightCompressionConfig

    return WeightCompressionConfig(mode=nncf.CompressWeightsMode.INT4_SYM if symmetric else
                                   nncf.CompressWeightsMode.INT4_ASYM, group_size=group_size)


def compress_rows(weight: VocabWeight, config: Any, rows_per_chunk: int = ROWS_PER_CHUNK) -> dict[str, np.ndarray]:
    """The weight compressed with NNCF's ``config`` (a WeightCompressionConfig), ``rows_per_chunk`` rows at a time:
    integer codes, scales and, when asymmetric, zero points, grouped as NNCF groups them."""
    from nncf.common.utils.caching import disable_results_caching
    from nncf.openvino.optimized_functions.models import OV_MODEL_CACHE
    from nncf.quantization.algorithms.weight_compression.weight_lowering import compress_weight
    from nncf.tensor import Tensor

    rows, _ = weight.constant.get_output_shape(0)
    parts: dict[str, list[np.ndarray]] = {"tensor": [], "scale": [], "zero_point": []}
    for start in range(0, rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, rows)
        with disable_results_caching(OV_MODEL_CACHE):  # as NNCF compresses: its compiled quantizer keeps no results
            part = compress_weight(Tensor(rows_as_float32(weight.constant, start, stop)), (1,), config)
        # copies: NNCF's compiled quantizer may hand back views of buffers that its next call overwrites
        parts["tensor"].append(np.array(part.tensor.as_numpy_tensor().data))
        parts["scale"].append(np.array(part.scale.as_numpy_tensor().data, dtype=np.float16))
        if part.zero_point is not None:
            parts["zero_point"].append(np.array(part.zero_point.as_numpy_tensor().data))
    return {key: np.concatenate(chunks) for key, chunks in parts.items() if chunks}


def decompression_subgraph(parts: dict[str, np.ndarray], config: Any, name: str, shape: list[int],
                           output_type: Any) -> Any:
    """NNCF's decompression pattern for the compressed weight, ending in ``output_type``."""
    import openvino as ov
    from nncf.openvino.graph.node_utils import create_ov_const_from_tensor
    from nncf.tensor import Tensor
    from nncf.tensor.functions.openvino_numeric import DTYPE_MAP
    from openvino import opset13 as ops

    dtype = DTYPE_MAP[config.compression_dtype]
    weight = ops.convert(create_ov_const_from_tensor(Tensor(parts["tensor"]), dtype, f"{name}_compressed"),
                         ov.Type.f16)
    if "zero_point" in parts:
        zero_point = create_ov_const_from_tensor(Tensor(parts["zero_point"]), dtype, f"{name}_compressed/zero_point")
        weight = ops.subtract(weight, ops.convert(zero_point, ov.Type.f16),
                              name=f"{name}_compressed/zero_point/subtract")
    scale = ops.constant(parts["scale"], name=f"{name}_compressed/scale")
    weight = ops.multiply(weight, scale, name=f"{name}_compressed/fq_weights")
    if config.group_size != -1:
        weight = ops.reshape(weight, output_shape=shape, special_zero=False)
    return ops.convert(weight, output_type, name=name) if output_type != ov.Type.f16 else weight


def compress_vocab_weights(model: Any, vocab_size: int, config: Any, rows_per_chunk: int = ROWS_PER_CHUNK) -> list[str]:
    """Replace the vocabulary-sized weights of ``model`` with ones compressed by NNCF's ``config``, in place.

    A table shared by the embedding and the LM head is compressed once. Returns the names of
    the consumers (Gather, MatMul), for NNCF's ignored scope afterwards.
    """
    names: list[str] = []
    done: dict[str, Any] = {}
    for weight in find_vocab_weights(model, vocab_size):
        name = weight.constant.get_friendly_name()
        key = f"{name}/{weight.source.get_element_type()}"
        if key not in done:
            done[key] = decompression_subgraph(compress_rows(weight, config, rows_per_chunk), config, name,
                                               list(weight.constant.get_output_shape(0)),
                                               weight.source.get_element_type())
        weight.consumer.input(weight.port).replace_source_output(done[key].output(0))
        names.append(weight.consumer.get_friendly_name())
    return names
