"""The GLM-4-9B-shaped benchmark model generator."""

from __future__ import annotations

import json

from safetensors import safe_open

from models.shape_model import setup_arg_parser
from tests.conftest import run_module


def test_writes_real_glm4_9b_widths(tmp_path) -> None:
    """GLM-4-9B's widths; written here with a 4096-token vocabulary (0.5 GB on disk, not the 2.9 GB of the
    default 151552, which the command line keeps)."""
    assert setup_arg_parser().parse_args(["--layers", "1", "--output", "x"]).vocab_size == 151552
    output = tmp_path / "shape"
    result = run_module("models.shape_model", "--layers", "1", "--vocab-size", "4096", "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((output / "config.json").read_text(encoding="utf-8"))
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"], config["vocab_size"], config["num_hidden_layers"]) == \
        (4096, 13696, 32, 2, 128, 4096, 1)
    shapes = {}
    for shard in output.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            shapes.update({name: handle.get_slice(name).get_shape() for name in handle.keys()})
    assert shapes["model.embed_tokens.weight"] == [4096, 4096]
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == [2 * 13696, 4096]
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == [2 * 128, 4096]
    assert (output / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refuses_zero_layers_and_non_empty_output(tmp_path) -> None:
    result = run_module("models.shape_model", "--layers", "0", "--output", str(tmp_path / "x"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "layers" in result.stderr
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = run_module("models.shape_model", "--layers", "2", "--output", str(tmp_path / "full"))
    assert result.returncode == 2 and "not empty" in result.stderr and result.stderr.strip().count("\n") == 0
    assert (tmp_path / "full" / "keep.txt").read_text(encoding="utf-8") == "mine"
