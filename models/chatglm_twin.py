"""Re-lay glm4-tiny as the original glm-4-9b-chat checkpoint (model_type chatglm, remote code).

    python -m models.chatglm_twin --output build/glm4-tiny-chatglm

The twin holds glm4-tiny's trained weights in the ChatGLM layout (fused q/k/v with bias, fused gate and
up, ``transformer.*`` names), the project's own modeling code (models/chatglm/) named in ``auto_map``,
and glm4-tiny's tokenizer, template and eval set, so it answers like glm4-tiny and loads only with
``trust_remote_code``. By default its heads are 128 wide like glm-4-9b-chat's (IPEX's ChatGLM kernels
hard-code 64 rotary channels): each 32-wide head is embedded exactly, its 8 rotary pairs on every
second pair of the wider head, whose base (rope_ratio 10000) makes those pairs turn at the same
speeds; queries are scaled by 2 to keep 1/sqrt(head dim). A runtime that ignores ``rope_ratio`` (the
real checkpoint's is 500) therefore answers wrong on the twin, as it would on the real model.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from convert.atomic import OutputError, staged_output

CODE = Path(__file__).resolve().parent / "chatglm"
CODE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py")
AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
          "generation_config.json", "eval.jsonl")


def chatglm_config(glm: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """The ChatGLM config.json for a GlmForCausalLM config whose heads are widened to ``head_dim``."""
    source_dim = glm.get("head_dim") or glm["hidden_size"] // glm["num_attention_heads"]
    return {
        "architectures": ["ChatGLMModel"], "auto_map": AUTO_MAP, "model_type": "chatglm",
        "num_layers": glm["num_hidden_layers"], "padded_vocab_size": glm["vocab_size"],
        "hidden_size": glm["hidden_size"], "ffn_hidden_size": glm["intermediate_size"], "kv_channels": head_dim,
        "num_attention_heads": glm["num_attention_heads"], "multi_query_attention": True,
        "multi_query_group_num": glm["num_key_value_heads"], "seq_length": glm["max_position_embeddings"],
        "layernorm_epsilon": glm["rms_norm_eps"], "rmsnorm": True, "add_qkv_bias": bool(glm.get("attention_bias")),
        "add_bias_linear": False, "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
        "apply_query_key_layer_scaling": True, "attention_softmax_in_fp32": True, "fp32_residual_connection": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "rope_ratio": rope_ratio(glm.get("rope_theta", 10000.0), source_dim, head_dim),
        "eos_token_id": glm.get("eos_token_id"), "pad_token_id": glm.get("pad_token_id"),
        "tie_word_embeddings": False, "use_cache": True, "torch_dtype": glm.get("torch_dtype") or glm.get("dtype"),
    }


def pair_stride(source_dim: int, head_dim: int) -> int:
    """Where rotary pair i of a ``source_dim`` head lands in a ``head_dim`` head: pair stride x i."""
    return 1 if head_dim == source_dim else 2


def rope_ratio(theta: float, source_dim: int, head_dim: int) -> float:
    """The ChatGLM rope_ratio whose pair stride x i turns as fast as the source's pair i.

    Source pair i turns at theta^(-2i/r) (r = source_dim/2 rotated channels); target pair j at
    (10000 x ratio)^(-2j/R) (R = head_dim/2); with j = stride x i: 10000 x ratio = theta^(R / (stride x r)).
    """
    stride, rotated, target = pair_stride(source_dim, head_dim), source_dim // 2, head_dim // 2
    return float(theta ** (target / (stride * rotated)) / 10000.0)


def channel_map(source_dim: int, head_dim: int) -> list[int]:
    """Target channel of each source channel: rotary pairs spread by the stride, the rest after the rotary half."""
    rotated, target_rotated, stride = source_dim // 2, head_dim // 2, pair_stride(source_dim, head_dim)
    if head_dim < source_dim or stride * (rotated - 2) + 2 > target_rotated:
        raise ValueError(f"cannot embed {source_dim}-wide heads in {head_dim}-wide ones")
    return [stride * (t - t % 2) + t % 2 if t < rotated else target_rotated + t - rotated for t in range(source_dim)]


def widen(weight: torch.Tensor, heads: int, source_dim: int, head_dim: int, channels: list[int]) -> torch.Tensor:
    """Rows of a per-head projection ([heads x source_dim, ...]) moved to their channels of wider heads."""
    rest = weight.shape[1:]
    out = weight.new_zeros((heads, head_dim) + rest)
    out[:, channels] = weight.reshape((heads, source_dim) + rest)
    return out.reshape((heads * head_dim,) + rest)


def chatglm_state_dict(glm_state: dict[str, torch.Tensor], glm: dict[str, Any],
                       head_dim: int) -> dict[str, torch.Tensor]:
    """GlmForCausalLM weights renamed, fused and widened into ChatGLMForConditionalGeneration's."""
    heads, groups = glm["num_attention_heads"], glm["num_key_value_heads"]
    source_dim = glm.get("head_dim") or glm["hidden_size"] // glm["num_attention_heads"]
    if glm.get("partial_rotary_factor", 0.5) != 0.5:
        raise ValueError("ChatGLM rotates half of each head: the source must have partial_rotary_factor 0.5")
    rotary = channel_map(source_dim, head_dim)
    plain = list(range(source_dim))  # values: any channels do, the first ones are used
    scale = math.sqrt(head_dim / source_dim)  # keeps q.k / sqrt(head dim) unchanged
    state = {"transformer.embedding.word_embeddings.weight": glm_state["model.embed_tokens.weight"],
             "transformer.encoder.final_layernorm.weight": glm_state["model.norm.weight"],
             "transformer.output_layer.weight": glm_state.get("lm_head.weight", glm_state["model.embed_tokens.weight"])}
    for i in range(glm["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            if f"{src}self_attn.q_proj.{kind}" in glm_state:
                state[f"{dst}self_attention.query_key_value.{kind}"] = torch.cat([
                    widen(glm_state[f"{src}self_attn.q_proj.{kind}"] * scale, heads, source_dim, head_dim, rotary),
                    widen(glm_state[f"{src}self_attn.k_proj.{kind}"], groups, source_dim, head_dim, rotary),
                    widen(glm_state[f"{src}self_attn.v_proj.{kind}"], groups, source_dim, head_dim, plain)])
        dense = glm_state[f"{src}self_attn.o_proj.weight"]
        state[f"{dst}self_attention.dense.weight"] = widen(dense.T, heads, source_dim, head_dim, plain).T.contiguous()
        state[f"{dst}mlp.dense_h_to_4h.weight"] = glm_state[f"{src}mlp.gate_up_proj.weight"]
        state[f"{dst}mlp.dense_4h_to_h.weight"] = glm_state[f"{src}mlp.down_proj.weight"]
        state[f"{dst}input_layernorm.weight"] = glm_state[f"{src}input_layernorm.weight"]
        state[f"{dst}post_attention_layernorm.weight"] = glm_state[f"{src}post_attention_layernorm.weight"]
    return {name: tensor.contiguous() for name, tensor in state.items()}


def save_chatglm(folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor] | None = None,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
    """Write a ChatGLM checkpoint into ``folder``: ``state`` (or random weights), config.json and the model code."""
    from models.chatglm.configuration_chatglm import ChatGLMConfig
    from models.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration

    fields = {key: value for key, value in config.items() if key not in ("architectures", "auto_map", "model_type")}
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = ChatGLMForConditionalGeneration(ChatGLMConfig(**fields)).eval()
    finally:
        torch.set_default_dtype(previous)
    if state is not None:
        model.load_state_dict(state, strict=True)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="2GB")
    saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    saved.update(architectures=config["architectures"], auto_map=config["auto_map"])
    saved["torch_dtype"] = saved.pop("dtype", None) or saved.get("torch_dtype")  # the key the real checkpoint has
    (folder / "config.json").write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in CODE_FILES:
        shutil.copyfile(CODE / name, folder / name)


def save_tiktoken_tokenizer(source: Path, folder: Path) -> None:
    """Write the source's byte-level BPE as a tiktoken tokenizer in the original checkpoint's manner: ranks
    in tokenizer.model (rank = the source's id, so merge order is kept), the project's tokenizer code
    (models/chatglm/tokenization_chatglm.py) named in tokenizer_config.json's auto_map."""
    from transformers import AutoTokenizer
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    from models.chatglm.tokenization_chatglm import ChatGLM4Tokenizer

    fast = AutoTokenizer.from_pretrained(source)
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    special = {token.content: i for i, token in fast.added_tokens_decoder.items()}
    ranks = {bytes(to_byte[c] for c in token): i for token, i in fast.get_vocab().items() if token not in special}
    model_file = folder / "tokenizer.model"
    model_file.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank
                                    for token, rank in sorted(ranks.items(), key=lambda item: item[1])))
    tokenizer = ChatGLM4Tokenizer(str(model_file), special_ids=special, model_max_length=fast.model_max_length)
    tokenizer.chat_template = fast.chat_template
    tokenizer.save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.copyfile(CODE / "tokenization_chatglm.py", folder / "tokenization_chatglm.py")


def chatglm_twin(output: str | Path, source: str | Path = "models/glm4-tiny", head_dim: int = 128,
                 overwrite: bool = False, tokenizer: str = "fast") -> Path:
    """Write the ChatGLM twin of the GlmForCausalLM checkpoint ``source`` into ``output`` (atomically).

    ``tokenizer``: ``fast`` copies the source's tokenizer.json; ``tiktoken`` writes it the way the
    original glm-4-9b-chat ships its tokenizer (remote code over tiktoken, see save_tiktoken_tokenizer).
    """
    from safetensors.torch import load_file

    source = Path(source)
    try:
        glm = json.loads((source / "config.json").read_text(encoding="utf-8"))
        weights = sorted(source.glob("*.safetensors"))
        if glm.get("model_type") != "glm" or not weights:
            raise ValueError(f"{source} is not a glm-4-9b-chat-hf style checkpoint (model_type glm, safetensors)")
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {source}: {error}") from None
    glm_state: dict[str, torch.Tensor] = {}
    for file in weights:
        glm_state.update(load_file(file))
    config = chatglm_config(glm, head_dim)
    state = chatglm_state_dict(glm_state, glm, head_dim)
    with staged_output(output, overwrite) as staging:
        save_chatglm(staging, config, state, dtype=next(iter(state.values())).dtype)
        for name in COPIED if tokenizer == "fast" else ("generation_config.json", "eval.jsonl"):
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        if tokenizer == "tiktoken":
            save_tiktoken_tokenizer(source, staging)
    return Path(output)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write glm4-tiny (or another glm-4-9b-chat-hf style checkpoint) as an original glm-4-9b-chat "
                    "style checkpoint: model_type chatglm, ChatGLM weight layout, the project's remote code.")
    parser.add_argument("--output", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--source", default="models/glm4-tiny", help="the GlmForCausalLM checkpoint "
                        "(default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=128,
                        help="attention head width of the twin; wider heads embed the source's exactly "
                             "(default: %(default)s, glm-4-9b-chat's)")
    parser.add_argument("--tokenizer", choices=("fast", "tiktoken"), default="fast",
                        help="fast: the source's tokenizer.json (default); tiktoken: the same vocabulary as the "
                             "original checkpoint ships its tokenizer (tokenizer.model and remote code; needs tiktoken)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        folder = chatglm_twin(args.output, args.source, args.head_dim, args.overwrite, args.tokenizer)
    except (OutputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
