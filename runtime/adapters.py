"""LoRA adapters (PEFT's format) applied at run time by openvino-genai, on top of a converted model.

    --adapter models/glm4-tiny-lora-capitals            # PEFT folder: its own scale, lora_alpha / r
    --adapter models/glm4-tiny-lora-capitals:0.5        # half of it
    --adapter path/to/adapter_model.safetensors:2       # a bare file: the scale given (default 1)

An adapter is checked against the model before it is used: every tensor must belong to a GLM-4
projection (q/k/v/o_proj, gate_up_proj, down_proj of a layer the model has) with the shapes the
model's config gives. openvino-genai would otherwise skip names it cannot place, silently.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.engine import ModelLoadError

WEIGHTS = "adapter_model.safetensors"
TENSOR_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\."
                         r"(q_proj|k_proj|v_proj|o_proj|gate_up_proj|down_proj)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class LoraAdapter:
    """An adapter to apply: its name (the folder's or file's), its safetensors file and its alpha."""

    name: str
    path: Path
    alpha: float


def parse_adapter(spec: str) -> LoraAdapter:
    """``PATH[:SCALE]`` as an adapter; a folder's alpha is SCALE x its PEFT scaling (lora_alpha / r)."""
    path, scale = spec, 1.0
    head, colon, tail = spec.rpartition(":")
    if colon and head and not tail.startswith(("\\", "/")):
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass  # a colon that belongs to the path
    folder = Path(path)
    weights = folder / WEIGHTS if folder.is_dir() else folder
    if not weights.is_file():
        raise ModelLoadError(f"adapter {path}: no {WEIGHTS} there (a PEFT LoRA folder or a .safetensors file)")
    name = (folder if folder.is_dir() else folder.parent if folder.name == WEIGHTS else folder.with_suffix("")).name
    return LoraAdapter(name, weights, scale * peft_scaling(weights.parent / "adapter_config.json"))


def peft_scaling(config_file: Path) -> float:
    """The factor PEFT multiplies B @ A by: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; 1 without a config."""
    if not config_file.is_file():
        return 1.0
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        rank, alpha = float(config["r"]), float(config["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(f"{config_file} is not a PEFT LoRA config ({error})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{config_file} is a {config['peft_type']} adapter; only LoRA is supported")
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def projection_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(out, in) of each GLM-4 projection, from a checkpoint's config.json."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    ffn = int(config["intermediate_size"])
    return {"q_proj": (heads * head_dim, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
            "o_proj": (hidden, heads * head_dim), "gate_up_proj": (2 * ffn, hidden), "down_proj": (hidden, ffn)}


def check_adapter(adapter: LoraAdapter, model_dir: Path) -> None:
    """Raise ModelLoadError unless every tensor of ``adapter`` fits a projection of the model in ``model_dir``."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    shapes, layers = projection_shapes(config), int(config["num_hidden_layers"])
    try:
        with safe_open(str(adapter.path), "np") as tensors:
            found = {name: tuple(tensors.get_slice(name).get_shape()) for name in tensors.keys()}
    except Exception as error:  # not a safetensors file
        raise ModelLoadError(f"adapter {adapter.path} cannot be read ({error})") from None
    if not found:
        raise ModelLoadError(f"adapter {adapter.path} holds no tensors")
    for name, shape in found.items():
        match = TENSOR_NAME.search(name)
        if match is None or int(match.group(1)) >= layers:
            raise ModelLoadError(f"adapter {adapter.name} does not fit {model_dir.name}: {name} is no LoRA weight of "
                                 f"its {layers} layers' projections")
        out_size, in_size = shapes[match.group(2)]
        fits = shape[1] == in_size if match.group(3) == "A" else shape[0] == out_size
        if len(shape) != 2 or not fits:
            raise ModelLoadError(f"adapter {adapter.name} does not fit {model_dir.name}: {name} is {list(shape)}, "
                                 f"the projection is {out_size}x{in_size}")


def genai_adapters(adapters: list[LoraAdapter], model_dir: Path) -> dict[str, tuple[Any, float]]:
    """Checked adapters as openvino_genai.Adapter objects with their alphas, by name."""
    import openvino_genai

    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ModelLoadError(f"two adapters are named alike ({', '.join(names)}); give them folders of their own")
    loaded = {}
    for adapter in adapters:
        check_adapter(adapter, model_dir)
        loaded[adapter.name] = (openvino_genai.Adapter(str(adapter.path)), adapter.alpha)
    return loaded


def adapter_config(loaded: dict[str, tuple[Any, float]], active: tuple[str, ...] | None) -> Any:
    """The openvino_genai.AdapterConfig that applies ``active`` (None: all of ``loaded``; (): none)."""
    import openvino_genai

    names = tuple(loaded) if active is None else active
    unknown = [name for name in names if name not in loaded]
    if unknown:
        raise ValueError(f"unknown adapter {', '.join(unknown)}; loaded: {', '.join(loaded) or 'none'}")
    return openvino_genai.AdapterConfig([loaded[name] for name in names])
