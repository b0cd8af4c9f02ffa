"""Shared fixtures: the bundled model, and glm4-tiny converted once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "glm4-tiny"


def run_module(*args: str, stdin: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m ...`` from the repository root, as a user would."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=timeout, encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_int4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """glm4-tiny converted with the CPU profile (INT4 sym channel-wise)."""
    output = tmp_path_factory.mktemp("ir") / "glm4-tiny-int4"
    result = run_module("convert", "--model", str(TINY), "--output", str(output), "--profile", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    return output


@pytest.fixture(scope="session")
def tiny_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """glm4-tiny converted to INT8."""
    output = tmp_path_factory.mktemp("ir") / "glm4-tiny-int8"
    result = run_module("convert", "--model", str(TINY), "--output", str(output), "--weight-format", "int8", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    return output


@pytest.fixture(scope="session")
def fp32_accuracy() -> float:
    """glm4-tiny's exact match with transformers in FP32, greedy: the bar converted models are held to."""
    from models.evaluate import evaluate

    return evaluate(TINY)["accuracy"]
