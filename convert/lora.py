"""Merge a PEFT LoRA adapter into a checkpoint before it is exported (``python -m convert --lora``).

The merged weights are W + scale x (lora_alpha / r) x B @ A for every adapted projection, as PEFT's
``merge_and_unload`` computes them, written as a checkpoint beside the export, in the checkpoint's
own precision. glm-4-9b-chat-hf and GLM-4-9B-0414 adapters name the same projections (q/k/v/o_proj,
gate_up_proj, down_proj); any adapter PEFT can load onto the checkpoint merges.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path
from typing import Any


class LoraError(Exception):
    """The adapter cannot be read, or does not fit the checkpoint."""


def check_adapter_folder(adapter: str | Path) -> Path:
    """The adapter folder, if it holds PEFT's two files (else LoraError)."""
    folder = Path(adapter)
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors") if not (folder / name).is_file()]
    if missing:
        raise LoraError(f"--lora {adapter}: not a PEFT adapter folder (missing {', '.join(missing)})")
    return folder


def merge_lora(checkpoint: str, adapter: str | Path, scale: float, output: Path, trust_remote_code: bool) -> None:
    """Write ``checkpoint`` with ``adapter`` merged (scaled by ``scale``) into ``output``, tokenizer included."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = check_adapter_folder(adapter)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto", trust_remote_code=trust_remote_code)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            adapted = PeftModel.from_pretrained(model, folder)
        except Exception as error:  # PEFT's ValueError, RuntimeError (size mismatch), KeyError...
            first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise LoraError(f"the adapter {adapter} does not fit {checkpoint}: {first}") from None
    unplaced = [str(w.message).splitlines()[0] for w in caught if "keys" in str(w.message).lower()]
    if unplaced:
        raise LoraError(f"the adapter {adapter} does not fit {checkpoint}: {unplaced[0]}")
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if ".lora_B." in name:
                parameter.mul_(scale)
    adapted.merge_and_unload().save_pretrained(output, safe_serialization=True)
    AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code).save_pretrained(output)
    source = Path(checkpoint)
    for name in ("generation_config.json", "eval.jsonl"):
        if (source / name).is_file():
            shutil.copy2(source / name, output / name)


def adapter_record(adapter: str | Path, scale: float) -> dict[str, Any]:
    """What the manifest says of a merged adapter."""
    weights = Path(adapter) / "adapter_model.safetensors"
    return {"path": str(Path(adapter).resolve()), "scale": scale,
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
