"""Identify a GLM-4 source checkpoint and check that this environment can export it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version

# model_type -> (checkpoint family, transformers window optimum-intel 2.2.0 accepts for its export)
FAMILIES = {
    "chatglm": ("glm-4-9b-chat (original, remote code)", Version("4.51.0"), Version("4.55.4")),
    "glm": ("glm-4-9b-chat-hf", Version("4.57.0"), Version("5.0.99")),
    "glm4": ("GLM-4-9B-0414", Version("4.57.0"), None),
}
SUPPORTED = "glm-4-9b-chat (model_type chatglm, needs --trust-remote-code), glm-4-9b-chat-hf (glm), GLM-4-9B-0414 (glm4)"


class SourceError(Exception):
    """The source is missing, not a supported GLM-4 checkpoint, or needs another environment."""


@dataclass
class Source:
    """A checkpoint to convert: where it is, what it is, and its revision when known."""

    path: str
    model_type: str
    family: str
    local: bool
    revision: str | None
    config: dict


def read_config(path: str, trust_remote_code: bool) -> tuple[dict, bool]:
    """The checkpoint's config.json as a dict, from a local folder or the hub; and whether it is local."""
    folder = Path(path)
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise SourceError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
        try:
            return json.loads(config_file.read_text(encoding="utf-8")), True
        except ValueError as error:
            raise SourceError(f"{config_file} is not valid JSON ({error})") from None
    if folder.exists() or path.startswith((".", "/", "\\")) or path.count("/") != 1:
        raise SourceError(f"{path} is not a checkpoint folder (and not a hub id like THUDM/glm-4-9b-chat-hf)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).to_dict(), False
    except Exception as error:  # hub, network and remote-code failures all land here
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SourceError(f"cannot fetch {path} from the hub: {first_line}") from None


def resolve(path: str, trust_remote_code: bool = False, transformers_version: str | None = None) -> Source:
    """Check ``path`` is a supported GLM-4 checkpoint that this environment can export."""
    config, local = read_config(path, trust_remote_code)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise SourceError(f"{path} is model_type {model_type!r}, not a GLM-4 checkpoint; supported: {SUPPORTED}")
    family, low, high = FAMILIES[model_type]
    if model_type == "chatglm" and not trust_remote_code:
        raise SourceError(f"{path} is {family}: its code ships with the checkpoint; pass --trust-remote-code "
                          "if you trust it, or convert glm-4-9b-chat-hf (same weights, no remote code)")
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    installed = Version(transformers_version)
    if installed < low or (high is not None and installed > high):
        window = f">={low}" + (f",<={high}" if high else "")
        hint = ("create the chatglm environment (make venv-chatglm, requirements-chatglm.txt)"
                if model_type == "chatglm" else "use the main environment (requirements.txt)")
        raise SourceError(f"{family} exports with transformers{window} under optimum-intel 2.2.0, "
                          f"but {transformers_version} is installed: {hint}")
    return Source(path=path, model_type=model_type, family=family, local=local,
                  revision=git_revision(Path(path)) if local else config.get("_commit_hash"), config=config)


def git_revision(folder: Path) -> str | None:
    """The commit a hub snapshot folder was downloaded at, when the folder says so."""
    parts = folder.resolve().parts
    if "snapshots" in parts[:-1]:
        return parts[parts.index("snapshots") + 1]
    return None
