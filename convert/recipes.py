"""Weight-compression recipes: per-device profiles and the NNCF settings they map to.

Profiles (see docs/benchmarks.md for the measurements behind them):

* ``cpu``: the default on CPUs without AMX (laptops). INT4 symmetric, group 32, ratio 1.0 (embedding and LM
  head INT8), the grain of llama.cpp's Q4_0, with NNCF's data-free AWQ (each MLP's down projection rescaled by
  its columns' magnitudes, one elementwise multiply a layer). On real weights (SmolLM2-135M as a GLM-4, GPL-3
  text) channel-wise INT4 raised perplexity from 28.0 to 52.3 and agreed with FP32 on 50% of next tokens;
  group 32 gave 35.3 and 66%, with data-free AWQ 33.2 and 70% (KL 0.374 -> 0.300) at the same speed. On the
  4-layer GLM-4-9B-shaped model group 32 decodes about 10-15% slower than channel-wise on an AMD EPYC with
  AVX-512 (two runs of three): the CPU profile pays that for accuracy.
* ``gpu``: INT4 symmetric, group 128, ratio 1.0, data-free AWQ (grouped scales keep accuracy; the
  iGPU kernels are tuned for group 128).
* ``npu``: INT4 symmetric, channel-wise, ratio 1.0, as the NPU plugin requires (group 128 is
  also accepted; asymmetric INT4 is not).
* ``xeon``: the default on CPUs with AMX (Xeon servers). INT4 symmetric, group 128, ratio 0.8 (NNCF keeps the
  fifth of the layers its data-free sensitivity ranks highest in INT8), data-free AWQ. There the runtime
  computes INT4 in f32 with int8 activations, and this recipe decoded 1.16-1.30x llama.cpp Q4_0 and prefilled
  2.1-2.7x (three runs) where the group-32 CPU profile decoded 0.99-1.11x (the plugin's group-32 kernel streams
  at about half group 128's rate there). On the SmolLM2 proxy it is closer to FP32 than the CPU profile by KL
  (0.254 against 0.297) and top-1 agreement (73.7% against 70.3%), farther by perplexity (34.9 against 33.1);
  the same eval score as FP32 on glm4-tiny.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from hostcpu import openvino_amx

PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {"weight_format": "int4", "sym": True, "group_size": 32, "ratio": 1.0, "awq": True},
    "gpu": {"weight_format": "int4", "sym": True, "group_size": 128, "ratio": 1.0, "awq": True},
    "npu": {"weight_format": "int4", "sym": True, "group_size": -1, "ratio": 1.0},
    "xeon": {"weight_format": "int4", "sym": True, "group_size": 128, "ratio": 0.8, "awq": True},
}
WEIGHT_FORMATS = ("int4", "int8", "fp16")


class RecipeError(ValueError):
    """A combination of compression settings that cannot work."""


@dataclass
class Recipe:
    """Every setting that decides how weights are stored."""

    weight_format: str = "int4"
    sym: bool = True
    group_size: int = -1
    ratio: float = 1.0
    all_layers: bool = False
    awq: bool = False
    scale_estimation: bool = False
    gptq: bool = False
    dataset: str | None = None
    num_samples: int | None = None
    profile: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def data_aware(self) -> bool:
        """Whether NNCF runs calibration data through the model (AWQ without data rescales by weight magnitudes)."""
        return bool(self.dataset) and (self.awq or self.scale_estimation or self.gptq)


def default_profile(weight_format: str | None = None, flags: set[str] | None = None) -> str | None:
    """The profile ``--profile`` defaults to for ``weight_format`` (INT4 when None) on this CPU (``flags``,
    default this machine's): ``xeon`` where OpenVINO computes on AMX tiles, ``cpu`` elsewhere; None for INT8
    and FP16, which no profile shapes."""
    if weight_format not in (None, "int4"):
        return None
    return "xeon" if openvino_amx(flags) else "cpu"


def make_recipe(profile: str | None = None, **overrides: Any) -> Recipe:
    """A profile's defaults (the ``cpu`` profile's when none, whatever the CPU) with every explicit (non-None)
    override applied."""
    if profile is not None and profile not in PROFILES:
        raise RecipeError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    settings = dict(PROFILES[profile or "cpu"], profile=profile)
    if overrides.get("weight_format") not in (None, "int4") or overrides.get("gptq"):
        settings.pop("awq", None)  # the profile's INT4 method gives way; an explicit --awq there is still refused
    settings.update({k: v for k, v in overrides.items() if v is not None})
    recipe = Recipe(**settings)
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    """Refuse settings that NNCF would reject or that silently mean something else."""
    if recipe.weight_format not in WEIGHT_FORMATS:
        raise RecipeError(f"--weight-format must be one of {', '.join(WEIGHT_FORMATS)}")
    if recipe.weight_format != "int4":
        int4_only = [flag for flag, on in (("--awq", recipe.awq), ("--scale-estimation", recipe.scale_estimation),
                                          ("--gptq", recipe.gptq), ("--all-layers", recipe.all_layers)) if on]
        if int4_only:
            raise RecipeError(f"{', '.join(int4_only)} only apply to --weight-format int4")
    if (recipe.scale_estimation or recipe.gptq) and not recipe.dataset:
        raise RecipeError("--scale-estimation and --gptq need calibration data: add --dataset glm4-chat "
                          "(built in) or --dataset FILE.jsonl")
    if recipe.awq and recipe.gptq:
        raise RecipeError("--awq and --gptq cannot be combined; pick one")
    if not 0.0 < recipe.ratio <= 1.0:
        raise RecipeError(f"--ratio must be in (0, 1], got {recipe.ratio}")
    if recipe.group_size == 0 or recipe.group_size < -1:
        raise RecipeError(f"--group-size must be -1 (channel-wise) or a positive size, got {recipe.group_size}")
    if recipe.profile == "npu" and recipe.weight_format == "int4" and (not recipe.sym or recipe.ratio < 1.0):
        raise RecipeError("the NPU needs symmetric INT4 on every layer: drop --asym/--ratio or pick another --profile")
    if recipe.num_samples is not None and recipe.num_samples < 1:
        raise RecipeError(f"--num-samples must be positive, got {recipe.num_samples}")


def quantization_config(recipe: Recipe, tokenizer_path: str, calibration: list[str] | None,
                        ignored: list[str] | None = None, lm_head_done: bool = False) -> Any:
    """The optimum-intel configuration for ``recipe`` (None for fp16, which only casts).

    ``ignored`` names layers already compressed (the vocabulary-sized weights); when the LM head
    is among them, every remaining MatMul is ratio-defining, as the LM head alone was excluded.
    """
    from optimum.intel import OVWeightQuantizationConfig

    scope = {"names": ignored, "validate": False} if ignored else None
    if recipe.weight_format == "fp16":
        return None
    if recipe.weight_format == "int8":
        return OVWeightQuantizationConfig(bits=8, sym=recipe.sym, tokenizer=tokenizer_path, ignored_scope=scope)
    return OVWeightQuantizationConfig(
        bits=4, sym=recipe.sym, group_size=recipe.group_size, ratio=recipe.ratio,
        all_layers=(recipe.all_layers or lm_head_done) or None, tokenizer=tokenizer_path,
        dataset=calibration, num_samples=recipe.num_samples if calibration else None,
        quant_method="awq" if recipe.awq else "default",
        scale_estimation=recipe.scale_estimation or None, gptq=recipe.gptq or None,
        group_size_fallback="adjust", ignored_scope=scope,
    )
