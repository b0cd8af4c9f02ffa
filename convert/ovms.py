"""The graph.pbtxt that lets OpenVINO Model Server serve a converted folder (written from OVMS's
documentation; not run here, as OVMS is not installed on the machines this project is built on)."""

from __future__ import annotations

from pathlib import Path

GRAPH = """input_stream: "HTTP_REQUEST_PAYLOAD:input"
output_stream: "HTTP_RESPONSE_PAYLOAD:output"
node: {{
  name: "LLMExecutor"
  calculator: "HttpLLMCalculator"
  input_stream: "LOOPBACK:loopback"
  input_stream: "HTTP_REQUEST_PAYLOAD:input"
  input_side_packet: "LLM_NODE_RESOURCES:llm"
  output_stream: "LOOPBACK:loopback"
  output_stream: "HTTP_RESPONSE_PAYLOAD:output"
  input_stream_info: {{ tag_index: "LOOPBACK:0", back_edge: true }}
  node_options: {{
    [type.googleapis.com / mediapipe.LLMCalculatorOptions]: {{
      models_path: "./", device: "{device}", cache_size: {cache_gb}, max_num_seqs: {max_num_seqs}, enable_prefix_caching: {prefix}
    }}
  }}
  input_stream_handler {{
    input_stream_handler: "SyncSetInputStreamHandler",
    options {{ [mediapipe.SyncSetInputStreamHandlerOptions.ext] {{ sync_set {{ tag_index: "LOOPBACK:0" }} }} }}
  }}
}}
"""


def write_graph(folder: Path, device: str, cache_gb: int = 8, max_num_seqs: int = 64) -> Path:
    """Write ``folder/graph.pbtxt`` for OVMS's LLM calculator on ``device`` (CPU, GPU or NPU)."""
    npu = device.upper().startswith("NPU")
    text = GRAPH.format(device=device.upper(), cache_gb=0 if npu else cache_gb, max_num_seqs=1 if npu else max_num_seqs,
                        prefix="false" if npu else "true")
    path = folder / "graph.pbtxt"
    path.write_text(text, encoding="utf-8")
    return path
