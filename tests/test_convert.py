"""python -m convert on glm4-tiny: recipes, accuracy through openvino-genai, checks, atomic output, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import runtime
from convert.compare import exact_match, load_eval
from hostcpu import openvino_amx
from runtime.openvino_engine import check_model_dir, layout_notes
from tests.conftest import ROOT, TINY, run_module


def genai_accuracy(folder: Path) -> float:
    import openvino_genai

    from convert.verify import genai_replies

    pipeline = openvino_genai.LLMPipeline(str(folder), "CPU")
    items = load_eval(TINY / "eval.jsonl")
    return exact_match(items, genai_replies(pipeline, folder, items))


def one_line_error(result: subprocess.CompletedProcess) -> str:
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message, message
    return message


def test_int8_within_half_a_point_of_fp32(tiny_int8, fp32_accuracy) -> None:
    accuracy = genai_accuracy(tiny_int8)
    print(f"FP32 {fp32_accuracy:.1%}  INT8 {accuracy:.1%}")
    assert accuracy >= fp32_accuracy - 0.005


def test_cpu_profile_int4_within_two_points_of_fp32(tiny_int4, fp32_accuracy) -> None:
    manifest = json.loads((tiny_int4 / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["settings"] | {"profile": "cpu"} == manifest["settings"]
    assert (manifest["settings"]["sym"], manifest["settings"]["group_size"], manifest["settings"]["ratio"]) == (True, 32, 1.0)
    assert manifest["settings"]["awq"] and not manifest["settings"]["dataset"]
    assert awq_multiplies(tiny_int4) == json.loads((TINY / "config.json").read_text())["num_hidden_layers"]
    assert check_model_dir(tiny_int4) == {32}  # group-32 weights keep the plugin's activation group (32)
    engine = runtime.load(tiny_int4, "CPU", cache_dir=None)
    assert "DYNAMIC_QUANTIZATION_GROUP_SIZE" not in engine.properties
    # On a CPU with AMX the engine says that group 128 (--profile xeon) decodes about twice as fast there
    assert [note for note in engine.notes if "--profile xeon" in note] == layout_notes("CPU", {32}, openvino_amx())
    accuracy = genai_accuracy(tiny_int4)
    print(f"FP32 {fp32_accuracy:.1%}  INT4 cpu profile {accuracy:.1%}")
    assert accuracy >= fp32_accuracy - 0.02


def awq_multiplies(folder: Path) -> int:
    """How many of NNCF's AWQ scale multiplies (one per MLP, before its down projection) an IR holds."""
    import openvino as ov

    model = ov.Core().read_model(folder / "openvino_model.xml")
    return sum(op.get_type_name() == "Multiply" and op.get_friendly_name().endswith("/awq_mul") for op in model.get_ops())


@pytest.mark.parametrize(("profile", "overrides", "awq"), [
    ("cpu", {}, True), ("gpu", {}, True), ("xeon", {}, True), ("npu", {}, False), (None, {}, True),
    ("cpu", {"awq": False}, False),
    ("cpu", {"weight_format": "int8"}, False), ("cpu", {"weight_format": "fp16"}, False),
    ("cpu", {"gptq": True, "dataset": "glm4-chat"}, False), ("npu", {"awq": True}, True)])
def test_profiles_use_data_free_awq_where_int4_allows(profile, overrides, awq) -> None:
    from convert.recipes import make_recipe

    recipe = make_recipe(profile, **overrides)
    assert recipe.awq is awq and recipe.data_aware is ("dataset" in overrides)


@pytest.mark.parametrize("overrides", [{"weight_format": "int8", "awq": True},
                                       {"gptq": True, "awq": True, "dataset": "glm4-chat"}, {"gptq": True}])
def test_explicit_awq_conflicts_are_refused(overrides) -> None:
    from convert.recipes import RecipeError, make_recipe

    with pytest.raises(RecipeError):
        make_recipe("cpu", **overrides)


def test_no_awq_converts_without_the_rescaling(tmp_path) -> None:
    from convert.recipes import PROFILES, default_profile

    output = tmp_path / "plain"
    result = run_module("convert", "--model", str(TINY), "--output", str(output), "--no-awq", "--no-verify", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["settings"]["awq"] is False and awq_multiplies(output) == 0
    # no --profile: this CPU's default (xeon where OpenVINO computes on AMX, else cpu)
    assert manifest["settings"]["profile"] == default_profile()
    assert max(check_model_dir(output)) == PROFILES[default_profile()]["group_size"]  # NNCF narrows where it must


@pytest.mark.parametrize(("weight_format", "flags", "cap", "profile"), [
    (None, {"avx512f", "amx_bf16", "amx_int8"}, "", "xeon"),
    ("int4", {"avx512f", "amx_bf16"}, "AVX512_CORE_AMX", "xeon"),
    (None, {"avx512f", "avx512_bf16"}, "", "cpu"), (None, {"avx2"}, "", "cpu"),
    (None, {"avx512f", "amx_bf16"}, "AVX512_CORE", "cpu"),  # capped below AMX: the runtime computes as without it
    ("int8", {"amx_bf16"}, "", None), ("fp16", {"avx2"}, "", None)])
def test_default_profile_follows_the_cpu(monkeypatch, weight_format, flags, cap, profile) -> None:
    from convert.recipes import default_profile

    monkeypatch.setenv("OV_CPU_MAX_ISA", cap)
    assert default_profile(weight_format, flags) == profile


def test_xeon_profile_within_two_points_of_fp32(tmp_path, fp32_accuracy) -> None:
    output = tmp_path / "xeon"
    result = run_module("convert", "--model", str(TINY), "--output", str(output), "--profile", "xeon", "--no-verify",
                        "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    settings = manifest["settings"]
    assert (settings["profile"], settings["sym"], settings["group_size"], settings["ratio"]) == ("xeon", True, 128, 0.8)
    assert settings["awq"] and awq_multiplies(output) > 0
    groups = check_model_dir(output)  # 128, and 64 where glm4-tiny's widths are not a multiple of 128
    assert 128 in groups and groups <= {64, 128}
    engine = runtime.load(output, "CPU", cache_dir=None)
    assert engine.properties["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == min(groups) and not engine.notes
    accuracy = genai_accuracy(output)
    print(f"FP32 {fp32_accuracy:.1%}  INT4 xeon profile {accuracy:.1%}")
    assert accuracy >= fp32_accuracy - 0.02


def test_npu_profile_converts_and_loads(tmp_path, fp32_accuracy) -> None:
    output = tmp_path / "npu"
    result = run_module("convert", "--model", str(TINY), "--output", str(output), "--profile", "npu", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["settings"]["sym"] is True and manifest["settings"]["ratio"] == 1.0
    assert "u4" not in manifest["weights"]["share"]  # symmetric INT4 is stored signed
    assert not manifest["settings"]["awq"] and awq_multiplies(output) == 0  # the NPU graph stays as measured
    assert check_model_dir(output) == {-1}  # channel-wise: the CPU quantizes its activations in groups of 128
    engine = runtime.load(output, "CPU", cache_dir=None)
    assert engine.properties["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == 128
    assert runtime.load(output, "CPU", cache_dir=None, extra_properties={"DYNAMIC_QUANTIZATION_GROUP_SIZE": "32"}
                        ).properties["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == "32"
    accuracy = genai_accuracy(output)
    print(f"FP32 {fp32_accuracy:.1%}  INT4 npu profile (run on CPU) {accuracy:.1%}")
    assert accuracy >= fp32_accuracy - 0.05


def test_manifest_describes_the_conversion(tiny_int4) -> None:
    manifest = json.loads((tiny_int4 / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["source"]["model_type"] == "glm" and manifest["source"]["local"] is True
    assert manifest["versions"]["openvino"] and manifest["versions"]["nncf"] and manifest["versions"]["transformers"]
    assert abs(sum(manifest["weights"]["share"].values()) - 1.0) < 1e-6
    assert manifest["duration_s"] > 0 and manifest["peak_memory"]["rss_bytes"] > 0
    assert manifest["checks"]["verify"]["eval_correct"] >= manifest["checks"]["verify"]["eval_items"] - 1
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((tiny_int4 / name).read_bytes()).hexdigest() == entry["sha256"]
    assert "openvino_tokenizer.xml" in manifest["files"] and "openvino_detokenizer.xml" in manifest["files"]


def test_template_check_passes_on_a_good_folder(tiny_int4) -> None:
    check = json.loads((tiny_int4 / "manifest.json").read_text(encoding="utf-8"))["checks"]["chat_template"]
    assert check["source"] == "checkpoint" and check["tools_placement"] == "top-level"
    assert check["conversations"] == check["identical"] == 13 and check["mismatches"] == []


def test_template_check_catches_a_broken_template(tmp_path) -> None:
    source = tmp_path / "broken-template"
    shutil.copytree(TINY, source)
    template = source / "chat_template.jinja"
    text = template.read_text(encoding="utf-8")
    assert "'\\n' + message.content" in text
    # .title() renders differently in GenAI's template engine than in Jinja2 (first letter only)
    template.write_text(text.replace("'\\n' + message.content", "'\\n' + message.content.title()"), encoding="utf-8")
    output = tmp_path / "out"
    result = run_module("convert", "--model", str(source), "--output", str(output), "--quiet", "--no-verify")
    assert result.returncode == 1
    assert "chat template" in result.stderr and "openvino-genai differs from transformers" in result.stderr
    assert not output.exists() and not list(tmp_path.glob(".out*"))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


POSIX_SIGNALS = pytest.mark.skipif(os.name == "nt", reason="POSIX signals (on Windows the converter takes Ctrl-C and "
                                   "Ctrl-Break through the same handler; not run here)")


def test_only_staging_of_processes_that_ended_is_removed(tmp_path, capsys) -> None:
    from convert.atomic import remove_stale_staging

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    names = {"live": f".out.partial-{os.getpid()}-a", "unknown": ".out.partial-b",
             "dead": f".out.partial-{ended.pid}-c", "dead file": f".out.partial-{ended.pid}-d",
             "other target": f".other.partial-{ended.pid}-e"}
    for kind, name in names.items():
        if kind == "dead file":
            (tmp_path / name).write_bytes(b"x")
        else:
            (tmp_path / name).mkdir()
    remove_stale_staging(tmp_path / "out")
    kept = sorted([names["live"], names["unknown"], names["other target"]])
    assert sorted(path.name for path in tmp_path.iterdir()) == kept
    assert capsys.readouterr().err.count("left by an interrupted run") == 2


@POSIX_SIGNALS
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_killed_conversion_leaves_no_valid_folder_and_keeps_the_old_one(tmp_path, tiny_int4, sig) -> None:
    previous = tmp_path / "model"
    shutil.copytree(tiny_int4, previous)
    before = digest(previous)
    fresh = tmp_path / "fresh"
    procs = [subprocess.Popen([sys.executable, "-m", "convert", "--model", str(TINY), "--output", str(target),
                               "--overwrite", "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for target in (previous, fresh)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob(".*.partial-*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert len(list(tmp_path.glob(".*.partial-*"))) == 2, "the conversions never started staging"
    time.sleep(1.0)  # well inside the export
    for proc in procs:
        proc.send_signal(getattr(signal, sig))
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode != 0
        if sig == "SIGINT":  # never an abort inside a library: a clean exit that says so
            assert proc.returncode == 130 and stderr.decode().strip() == "interrupted: nothing was written", stderr
    assert digest(previous) == before
    assert not fresh.exists()
    if sig == "SIGINT":  # an interrupted conversion cleans up its staging folder
        assert not list(tmp_path.glob(".*.partial-*"))
        return
    # a killed one cannot: the next conversion to the same folder removes what it left, and no other's
    (stale,) = tmp_path.glob(".fresh.partial-*")
    again = run_module("convert", "--model", str(TINY), "--output", str(fresh), "--quiet")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"note: removed {stale}, left by an interrupted run" in again.stderr
    assert not stale.exists() and (fresh / "openvino_model.xml").is_file()
    assert [p.name.split(".partial-")[0] for p in tmp_path.glob(".*.partial-*")] == [".model"]


def test_refuses_non_empty_output_without_overwrite(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    result = run_module("convert", "--model", str(TINY), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "--overwrite" in one_line_error(result)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def read_only_dir(tmp_path: Path) -> Path:
    if os.name == "nt":
        pytest.skip("a read-only folder needs an ACL on Windows (chmod 0o555 does not make one)")
    if os.geteuid() == 0:  # root writes through permission bits; /proc/sys refuses even root
        return Path("/proc/sys")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("case", ["missing", "not_glm", "scale_estimation_without_dataset", "read_only", "bad_ratio",
                                  "chatglm_without_trust", "chatglm_wrong_transformers", "npu_asym"])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, case) -> None:
    output = tmp_path / "out"
    model = str(TINY)
    extra: list[str] = []
    if case == "missing":
        model = str(tmp_path / "nowhere")
    elif case == "not_glm":
        (tmp_path / "llama").mkdir()
        (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
        model = str(tmp_path / "llama")
    elif case == "scale_estimation_without_dataset":
        extra = ["--scale-estimation"]
    elif case == "read_only":
        output = read_only_dir(tmp_path) / "out"
    elif case == "bad_ratio":
        extra = ["--ratio", "1.5"]
    elif case.startswith("chatglm"):
        (tmp_path / "chatglm").mkdir()
        (tmp_path / "chatglm" / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
        model = str(tmp_path / "chatglm")
        extra = ["--trust-remote-code"] if case == "chatglm_wrong_transformers" else []
    elif case == "npu_asym":
        extra = ["--profile", "npu", "--asym"]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_module("convert", "--model", model, "--output", str(output), *extra)
    assert result.returncode == 2, result.stderr[-1000:]
    message = one_line_error(result)
    expected_words = {"missing": "not a checkpoint", "not_glm": "supported", "scale_estimation_without_dataset": "--dataset",
                      "read_only": "cannot write", "bad_ratio": "--ratio", "chatglm_without_trust": "--trust-remote-code",
                      "chatglm_wrong_transformers": "transformers", "npu_asym": "symmetric"}
    assert expected_words[case] in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not output.exists()


def test_jsonl_dataset_with_awq_and_scale_estimation(tmp_path) -> None:
    dataset = tmp_path / "chats.jsonl"
    items = load_eval(TINY / "eval.jsonl")[:16]
    dataset.write_text("".join(json.dumps({"messages": i["messages"], "tools": i.get("tools")}, ensure_ascii=False)
                               + "\n" for i in items), encoding="utf-8")
    output = tmp_path / "awq"
    result = run_module("convert", "--model", str(TINY), "--output", str(output), "--weight-format", "int4",
                        "--group-size", "64", "--awq", "--scale-estimation", "--dataset", str(dataset),
                        "--num-samples", "16", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["settings"]["awq"] and manifest["settings"]["scale_estimation"]
    assert manifest["checks"]["verify"]["eval_correct"] >= manifest["checks"]["verify"]["eval_items"] - 1
    assert check_model_dir(output) == {64}  # group-64 weights: the CPU quantizes its activations in groups of 64
    assert runtime.load(output, "CPU", cache_dir=None).properties["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == 64


def constants(folder: Path) -> list[tuple[str, tuple, str]]:
    import openvino as ov

    model = ov.Core().read_model(folder / "openvino_model.xml")
    return sorted((op.get_output_element_type(0).get_type_name(), tuple(op.get_output_shape(0)),
                   hashlib.sha256(op.get_tensor_view().data.tobytes()).hexdigest())
                  for op in model.get_ops() if op.get_type_name() == "Constant")


@pytest.mark.parametrize("recipe", [{"profile": "cpu"}, {"weight_format": "int8"},
                                    {"weight_format": "int4", "sym": False, "group_size": 128, "ratio": 0.8},
                                    {"profile": "cpu", "all_layers": True}, {"profile": "npu", "all_layers": True},
                                    {"weight_format": "int4", "sym": False, "group_size": 64, "ratio": 1.0,
                                     "all_layers": True}])
def test_chunked_vocab_compression_is_bit_identical_to_nncf(tmp_path, recipe) -> None:
    from convert.convert import compress_ir, export_ir
    from convert.recipes import make_recipe
    from convert.source import resolve

    source = resolve(str(TINY))
    export_ir(source, tmp_path / "export", trust_remote_code=False)
    settings = dict(recipe)
    made = make_recipe(settings.pop("profile", None), **settings)
    compress_ir(tmp_path / "export", tmp_path / "chunked", made, source, None, chunk_vocab=True)
    compress_ir(tmp_path / "export", tmp_path / "whole", made, source, None, chunk_vocab=False)
    assert constants(tmp_path / "chunked") == constants(tmp_path / "whole")


def test_vocab_rows_compress_the_same_in_any_chunk_size(tmp_path) -> None:
    import numpy as np
    import openvino as ov

    from convert.convert import export_ir
    from convert.source import resolve
    from convert.vocab import compress_rows, find_vocab_weights, int4_mode, int8_mode

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = tmp_path / "bf16"  # the real GLM-4 checkpoints are bf16: exercise that path
    AutoModelForCausalLM.from_pretrained(TINY, torch_dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(bf16)
    export_ir(resolve(str(bf16)), tmp_path / "export", trust_remote_code=False)
    model = ov.Core().read_model(tmp_path / "export" / "openvino_model.xml")
    config = json.loads((TINY / "config.json").read_text(encoding="utf-8"))
    weights = find_vocab_weights(model, config["vocab_size"])
    assert {w.consumer.get_type_name() for w in weights} == {"Gather", "MatMul"}
    # a layer as wide as a vocabulary would be (o_proj and down_proj output hidden_size) is not taken for one
    assert find_vocab_weights(model, config["hidden_size"]) == []
    from convert.vocab import rows_as_float32

    table = AutoModelForCausalLM.from_pretrained(bf16).model.embed_tokens.weight.float().detach().numpy()
    gather = next(w for w in weights if w.consumer.get_type_name() == "Gather")
    assert np.array_equal(rows_as_float32(gather.constant, 0, len(table)), table)
    for weight in weights:
        assert weight.constant.get_output_element_type(0).get_type_name() == "bf16"
        for config in (int8_mode(symmetric=False), int4_mode(symmetric=False, group_size=32)):
            whole = compress_rows(weight, config, rows_per_chunk=10**6)
            chunked = compress_rows(weight, config, rows_per_chunk=100)
            for key in ("tensor", "scale", "zero_point"):
                assert np.array_equal(whole[key], chunked[key]), key


def test_ovms_flag_writes_a_graph_for_the_device(tmp_path) -> None:
    output = tmp_path / "ovms"
    result = run_module("convert", "--model", str(TINY), "--output", str(output), "--weight-format", "int8",
                        "--ovms", "NPU", "--quiet", "--no-verify")
    assert result.returncode == 0, result.stderr[-2000:]
    graph = (output / "graph.pbtxt").read_text(encoding="utf-8")
    assert 'calculator: "HttpLLMCalculator"' in graph and 'device: "NPU"' in graph and 'models_path: "./"' in graph
    assert graph.count("{") == graph.count("}")
    assert "graph.pbtxt" in json.loads((output / "manifest.json").read_text(encoding="utf-8"))["files"]


def failing_replace(fail_on: str):
    """os.replace that raises PermissionError (as Windows does for a folder in use) on one rename of the
    final swap: "old" moves the existing model aside (the first), "new" moves the finished one in (the second)."""
    real, calls = os.replace, []

    def replace(source, destination) -> None:
        calls.append(source)
        if len(calls) == (1 if fail_on == "old" else 2):
            raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                      "process")
        real(source, destination)
    return replace


@pytest.mark.parametrize("fail_on", ["old", "new"])
def test_a_folder_in_use_stays_intact_when_the_rename_fails(tmp_path, monkeypatch, fail_on) -> None:
    from convert.atomic import FolderInUseError, staged_output

    target = tmp_path / "model"
    target.mkdir()
    (target / "openvino_model.xml").write_text("old", encoding="utf-8")
    monkeypatch.setattr("convert.atomic.os.replace", failing_replace(fail_on))
    with pytest.raises(FolderInUseError, match="in use"):
        with staged_output(target, overwrite=True) as staging:
            (staging / "openvino_model.xml").write_text("new", encoding="utf-8")
    assert (target / "openvino_model.xml").read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or retired folder left


def test_converting_over_a_folder_in_use_is_a_one_line_error(tmp_path, monkeypatch, capsys, tiny_int4) -> None:
    from convert.convert import main

    target = tmp_path / "model"
    shutil.copytree(tiny_int4, target)
    before = digest(target)
    monkeypatch.setattr("convert.atomic.os.replace", failing_replace("old"))
    code = main(["--model", str(TINY), "--output", str(target), "--overwrite", "--quiet", "--no-verify",
                 "--weight-format", "int8"])
    message = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in message and "the folder is in use" in message, message
    assert digest(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
