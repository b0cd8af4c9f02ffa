"""Long context: python -m runtime.plan against the memory a GLM-4-9B-wide model really takes at two context
lengths (plain and chunked prefill), and the 1M-context variant's config converting."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.plan import plan
from tests.conftest import ROOT, run_module, scratch_folder

MEASURE = """
import json, sys
from convert.manifest import memory_now
from runtime.bench import prompt_of_length
from runtime.engine import GenerationOptions
from runtime.openvino_engine import OpenVINOEngine

folder, length, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) or None
engine = OpenVINOEngine(folder, cache_dir=None, prefill_chunk=chunk)
engine.generate(prompt_of_length(engine, length), GenerationOptions(max_new_tokens=4, ignore_eos=True), lambda _: False)
print(json.dumps(memory_now()[1]))  # anonymous resident bytes
"""

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc (Linux)")


PEAK = """
import json, sys
from convert.manifest import memory_now
from runtime.bench import prompt_of_length
from runtime.engine import GenerationOptions
from runtime.openvino_engine import OpenVINOEngine

engine = OpenVINOEngine(sys.argv[1], cache_dir=None, trim_weight_pages=sys.argv[2] == "trim")
reply = engine.generate(prompt_of_length(engine, 512), GenerationOptions(max_new_tokens=8, ignore_eos=True),
                        lambda _: False).text
_, anonymous, peak = memory_now()
print(json.dumps({"VmHWM": peak, "RssAnon": anonymous, "reply": reply}))
"""


def test_the_million_token_variant_converts(tmp_path: Path) -> None:
    """First in the file: it runs before the wide model below is made, so the two never share the disk."""
    made = run_module("models.shape_model", "--layers", "1", "--vocab-size", "4096", "--variant", "1m",
                      "--output", str(tmp_path / "ckpt"))
    assert made.returncode == 0, made.stderr[-2000:]
    converted = run_module("convert", "--model", str(tmp_path / "ckpt"), "--output", str(tmp_path / "int4"),
                           "--profile", "cpu", "--no-verify", "--quiet")
    assert converted.returncode == 0, converted.stderr[-2000:]
    result = plan(tmp_path / "int4", 1_048_576, "CPU", prefill_chunk=256)
    assert result["shape"].context == 1_048_576
    # a million tokens of u4 KV cache for one layer: 2 x 2 heads x (64 + 8) bytes each
    assert result["rows"]["u4"]["kv_cache"] == 1_048_576 * 2 * 2 * (64 + 8)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two layers with GLM-4-9B's widths (hidden 4096, FFN 13696, 2 KV heads x 128), a small vocabulary, INT4."""
    with scratch_folder(tmp_path_factory, "wide") as root:
        made = run_module("models.shape_model", "--layers", "2", "--vocab-size", "4096", "--output", str(root / "ckpt"))
        assert made.returncode == 0, made.stderr[-2000:]
        converted = run_module("convert", "--model", str(root / "ckpt"), "--output", str(root / "int4"), "--profile",
                               "cpu", "--no-verify", "--quiet")
        assert converted.returncode == 0, converted.stderr[-2000:]
        yield root / "int4"


def test_peak_memory_stays_near_what_the_model_needs(wide_model: Path) -> None:
    """The mapped IR's pages are given back while the CPU plugin copies the weights (runtime/weight_pages.py):
    trimming takes most of the IR off the peak. Compared between the two runs, not against the anonymous memory
    left at the end: the first inference also holds ~100 MiB of short-lived anonymous buffers here, the same in both
    modes and at any trim interval (20, 5, 1 ms), which trimming does not touch."""
    ir = (wide_model / "openvino_model.bin").stat().st_size
    runs = {}
    for mode in ("trim", "keep"):
        result = subprocess.run([sys.executable, "-c", PEAK, str(wide_model), mode], cwd=ROOT, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[mode] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"\n{mode}: peak RSS {runs[mode]['VmHWM'] / 2**20:.0f} MiB, anonymous {runs[mode]['RssAnon'] / 2**20:.0f} "
              f"MiB, IR {ir / 2**20:.0f} MiB")
    assert runs["trim"]["reply"] == runs["keep"]["reply"]  # the same answer either way
    assert runs["keep"]["VmHWM"] > runs["keep"]["RssAnon"] + 0.8 * ir  # without: the IR's pages on top
    assert runs["keep"]["VmHWM"] - runs["trim"]["VmHWM"] > 0.6 * ir  # with: most of the IR off the peak


def measured_anonymous_bytes(model: Path, length: int, chunk: int | None) -> int:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(model), str(length), str(chunk or 0)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("chunk", [None, 256], ids=["one pass", "chunked prefill"])
def test_the_plan_is_within_15_percent_of_real_memory(wide_model: Path, chunk: int | None) -> None:
    for length in (1024, 3072):
        real = measured_anonymous_bytes(wide_model, length, chunk)
        planned = plan(wide_model, length, "CPU", prefill_chunk=chunk)["rows"]["u8"]["total"]  # CPU's default KV
        print(f"\n{length} tokens, prefill chunk {chunk}: planned {planned / 2**20:.0f} MiB, "
              f"measured {real / 2**20:.0f} MiB ({planned / real - 1:+.1%})")
        assert abs(planned / real - 1) < 0.15


def test_the_plan_command_and_bad_input(wide_model: Path) -> None:
    result = run_module("runtime.plan", "--model", str(wide_model), "--context", "32768", "--prefill-chunk", "512")
    assert result.returncode == 0, result.stderr
    assert "512 of them prefilled in one pass" in result.stdout and "longest that fits" in result.stdout
    for args in (["--context", "0"], ["--context", "4096", "--prompt", "8192"], ["--context", "9", "--device", "TPU"]):
        bad = run_module("runtime.plan", "--model", str(wide_model), *args)
        assert bad.returncode == 2 and bad.stderr.startswith("error:") and "\n" not in bad.stderr.strip()
