"""Write a GLM-4 checkpoint as a GGUF file, the format llama.cpp runs: the peer runtime.bench measures against.

    python -m models.gguf_export --model build/glm4-shape-4l --output build/glm4-shape-4l-bf16.gguf
    python -m models.gguf_export --model models/glm4-tiny --output build/glm4-tiny-q8_0.gguf --outtype q8_0

glm-4-9b-chat-hf (``glm``) and the original glm-4-9b-chat (``chatglm``) are both written as llama.cpp's
``chatglm`` architecture: fused q/k/v with bias, gate and up fused (gate first), RMSNorm, rotary on
half of each head over interleaved pairs (llama.cpp's "normal" rope). q/k/v are fused whatever the
source layout (one matmul: the peer at its best). One- dimensional tensors stay float32, as llama.cpp
keeps them. ``q4_0``/``q8_0`` quantize every matrix alike; llama.cpp's own ``llama-quantize`` (built by
``make peer``) gives the mixes its users run (Q4_0 with a Q6_K head, Q4_K_M) from the bf16 file.
The file is written beside the target under a hidden name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convert.atomic import OutputError, staged_file

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ARCHITECTURE = "chatglm"  # llama.cpp's name for GLM-4-9B-Chat in both published layouts


class ExportError(ValueError):
    """The checkpoint cannot be written as GGUF (unknown architecture, missing tensor or tokenizer)."""


class Checkpoint:
    """A safetensors checkpoint folder: its config and its tensors by name, read one at a time."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        config = self.folder / "config.json"
        if not config.is_file():
            raise ExportError(f"no config.json in {self.folder}")
        self.config: dict[str, Any] = json.loads(config.read_text(encoding="utf-8"))
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ExportError(f"no *.safetensors weights in {self.folder}")
        from safetensors import safe_open

        self._files = {}
        for file in files:
            with safe_open(file, framework="pt") as handle:
                self._files.update(dict.fromkeys(handle.keys(), file))

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> list[int]:
        """A tensor's shape, read from the file's header."""
        from safetensors import safe_open

        with safe_open(self._files[name], framework="pt") as handle:
            return list(handle.get_slice(name).get_shape())

    def get(self, name: str) -> Any:
        """One tensor (a torch tensor in its stored precision)."""
        from safetensors import safe_open

        if name not in self._files:
            raise ExportError(f"the checkpoint has no tensor {name}")
        with safe_open(self._files[name], framework="pt") as handle:
            return handle.get_tensor(name)


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The GGUF header values of a ``glm`` or ``chatglm`` config."""
    kind = config.get("model_type")
    if kind == "glm":
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return {"layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
                "ffn": config["intermediate_size"], "heads": heads, "kv_heads": config["num_key_value_heads"],
                "head_dim": head_dim, "rotary_dim": int(head_dim * config.get("partial_rotary_factor", 0.5)),
                "eps": config["rms_norm_eps"], "rope_base": config.get("rope_theta", 10000.0),
                "context": config.get("max_position_embeddings", 8192), "vocab": config["vocab_size"]}
    if kind == "chatglm":
        heads = config["num_attention_heads"]
        head_dim = config.get("kv_channels") or config["hidden_size"] // heads
        return {"layers": config["num_layers"], "hidden": config["hidden_size"], "ffn": config["ffn_hidden_size"],
                "heads": heads, "kv_heads": config["multi_query_group_num"], "head_dim": head_dim,
                "rotary_dim": head_dim // 2, "eps": config["layernorm_epsilon"],
                "rope_base": 10000.0 * config.get("rope_ratio", 1.0), "context": config.get("seq_length", 8192),
                "vocab": config["padded_vocab_size"]}
    raise ExportError(f"model_type {kind!r} is not supported (glm: glm-4-9b-chat-hf; chatglm: glm-4-9b-chat)")


Loader = Callable[[], Any]


def tensor_plan(checkpoint: Checkpoint, layers: int) -> list[tuple[str, list[int], Loader]]:
    """(GGUF name, shape, loader of the torch tensor) for every tensor, in llama.cpp's order."""
    if checkpoint.config["model_type"] == "glm":
        names = {"token_embd": ["model.embed_tokens.weight"], "output_norm": ["model.norm.weight"],
                 "output": ["lm_head.weight" if "lm_head.weight" in checkpoint else "model.embed_tokens.weight"]}
        layer = {"attn_norm.weight": ["input_layernorm.weight"],
                 "attn_qkv.weight": [f"self_attn.{p}_proj.weight" for p in "qkv"],
                 "attn_qkv.bias": [f"self_attn.{p}_proj.bias" for p in "qkv"],
                 "attn_output.weight": ["self_attn.o_proj.weight"],
                 "ffn_norm.weight": ["post_attention_layernorm.weight"],
                 "ffn_up.weight": ["mlp.gate_up_proj.weight"], "ffn_down.weight": ["mlp.down_proj.weight"]}
        prefix = "model.layers.{}."
    else:
        names = {"token_embd": ["transformer.embedding.word_embeddings.weight"],
                 "output_norm": ["transformer.encoder.final_layernorm.weight"],
                 "output": ["transformer.output_layer.weight"]}
        layer = {"attn_norm.weight": ["input_layernorm.weight"],
                 "attn_qkv.weight": ["self_attention.query_key_value.weight"],
                 "attn_qkv.bias": ["self_attention.query_key_value.bias"],
                 "attn_output.weight": ["self_attention.dense.weight"],
                 "ffn_norm.weight": ["post_attention_layernorm.weight"],
                 "ffn_up.weight": ["mlp.dense_h_to_4h.weight"], "ffn_down.weight": ["mlp.dense_4h_to_h.weight"]}
        prefix = "transformer.encoder.layers.{}."
    wanted = [("token_embd.weight", names["token_embd"])]
    for i in range(layers):
        wanted += [(f"blk.{i}.{key}", [prefix.format(i) + source for source in sources])
                   for key, sources in layer.items()]
    wanted += [("output_norm.weight", names["output_norm"]), ("output.weight", names["output"])]
    plan = []
    for name, sources in wanted:
        missing = [source for source in sources if source not in checkpoint]
        if missing and name.endswith(".bias"):
            continue  # a checkpoint without q/k/v bias
        if missing:
            raise ExportError(f"the checkpoint has no tensor {missing[0]}")
        shapes = [checkpoint.shape(source) for source in sources]
        shape = [sum(s[0] for s in shapes), *shapes[0][1:]]  # q/k/v stacked along the output rows
        plan.append((name, shape, lambda sources=sources: stacked([checkpoint.get(s) for s in sources])))
    return plan


def stacked(parts: list[Any]) -> Any:
    import torch

    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def tensor_type(ndim: int, outtype: str) -> Any:
    """The GGML type a tensor is stored in: vectors always float32, matrices ``outtype``."""
    from gguf import GGMLQuantizationType as Q

    return Q.F32 if ndim == 1 else {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[outtype]


def encode_tensor(tensor: Any, outtype: str) -> np.ndarray:
    """A torch tensor as the array GGUF stores (see tensor_type)."""
    import torch
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    qtype = tensor_type(tensor.ndim, outtype)
    if qtype == Q.F32:
        return tensor.float().numpy()
    if qtype == Q.BF16:
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if qtype == Q.F16:
        return tensor.to(torch.float16).numpy()
    return quantize(tensor.float().numpy(), qtype)


def file_type(outtype: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[outtype]


def add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> None:
    """The checkpoint's byte-level BPE (tokenizer.json) padded to the embedding rows, GLM-4's stop tokens
    and its chat template."""
    from gguf import TokenType

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"no tokenizer.json in {folder} (a tiktoken-only tokenizer is not supported)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    if spec["model"]["type"] != "BPE":
        raise ExportError(f"{path}: a {spec['model']['type']} tokenizer, not byte-level BPE")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TokenType.UNUSED] * vocab_size
    for text, index in spec["model"]["vocab"].items():
        tokens[index], types[index] = text, TokenType.NORMAL
    added = {item["content"]: item["id"] for item in spec.get("added_tokens", [])}
    for item in spec.get("added_tokens", []):
        tokens[item["id"]] = item["content"]
        types[item["id"]] = TokenType.CONTROL if item.get("special") else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer") or {}))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(added["<|endoftext|>"])
    writer.add_eot_token_id(added["<|user|>"])
    writer.add_eom_token_id(added["<|observation|>"])  # with eos and eot: GLM-4's three stop tokens
    writer.add_pad_token_id(added["<|endoftext|>"])
    writer.add_add_bos_token(False)  # the chat template writes [gMASK]<sop> itself
    template = chat_template(folder)
    if template:
        writer.add_chat_template(template)


def pre_tokenizer_name(pre: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer: GPT-2's for a plain ByteLevel one, GLM-4's for a regex split."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence" and any(p.get("type") == "Split" for p in pre.get("pretokenizers", [])):
        return "glm4"
    raise ExportError(f"unknown pre-tokenizer {pre.get('type')!r} (expected ByteLevel or a GLM-4 regex split)")


def chat_template(folder: Path) -> str | None:
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None


def gguf_export(model: str | Path, output: str | Path, outtype: str = "bf16", overwrite: bool = False,
                progress: Callable[[str], None] | None = None) -> Path:
    """Write ``model`` (a ``glm`` or ``chatglm`` safetensors checkpoint) to the GGUF file ``output``.

    Tensors are read, converted and written one at a time (memory: the largest tensor, not the model).
    Raises ExportError for a checkpoint it cannot write and OutputError for an output it must not replace.
    """
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype}")
    checkpoint = Checkpoint(model)
    shape = hyperparameters(checkpoint.config)
    if outtype in ("q8_0", "q4_0") and (shape["hidden"] % 32 or shape["ffn"] % 32):
        raise ExportError(f"{outtype} needs rows that are a multiple of 32 wide")
    if shape["heads"] * shape["head_dim"] != shape["hidden"]:  # llama.cpp's chatglm sizes attn_output so
        raise ExportError(f"{shape['heads']} heads x {shape['head_dim']} != hidden {shape['hidden']}: llama.cpp's "
                          "chatglm architecture needs heads x head width = hidden size")
    plan = tensor_plan(checkpoint, shape["layers"])
    with staged_file(output, overwrite) as staging:
        writer = gguf.GGUFWriter(staging, ARCHITECTURE)
        writer.add_name(Path(model).absolute().name)
        writer.add_context_length(shape["context"])
        writer.add_embedding_length(shape["hidden"])
        writer.add_feed_forward_length(shape["ffn"])
        writer.add_block_count(shape["layers"])
        writer.add_head_count(shape["heads"])
        writer.add_head_count_kv(shape["kv_heads"])
        writer.add_key_length(shape["head_dim"])
        writer.add_value_length(shape["head_dim"])
        writer.add_layer_norm_rms_eps(shape["eps"])
        writer.add_rope_dimension_count(shape["rotary_dim"])
        writer.add_rope_freq_base(shape["rope_base"])
        writer.add_file_type(file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, Path(model), shape["vocab"])
        for name, shape, _ in plan:  # shapes and types first: the header precedes the data
            qtype = tensor_type(len(shape), outtype)
            writer.add_tensor_info(name, quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8),
                                   int(np.prod(quant_shape_to_byte_shape(shape, qtype))), qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for count, (name, _, load) in enumerate(plan, start=1):
            data = encode_tensor(load(), outtype)
            writer.write_tensor_data(data)
            if progress:
                progress(f"[{count}/{len(plan)}] {name} {tuple(data.shape)}")
        writer.close()
    return Path(output)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.gguf_export",
                                     description="Write a GLM-4 checkpoint (glm-4-9b-chat-hf or glm-4-9b-chat layout) "
                                                 "as a GGUF file for llama.cpp, the benchmark's peer.")
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--output", required=True, help="GGUF file to write")
    parser.add_argument("--outtype", choices=OUTTYPES, default="bf16",
                        help="precision of the matrices (default: %(default)s; vectors stay f32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--quiet", action="store_true", help="no line per tensor")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        path = gguf_export(args.model, args.output, args.outtype, args.overwrite,
                           None if args.quiet else lambda line: print(line, flush=True))
    except (ExportError, OutputError, KeyError) as error:
        detail = f"config.json lacks {error}" if isinstance(error, KeyError) else str(error)
        print(f"error: {detail}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot write {args.output}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.outtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
