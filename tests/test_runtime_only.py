"""The runtime-only environment (requirements-runtime.txt, `make venv-runtime`): no torch, transformers,
optimum or NNCF in it, and the chat, the server and the browser demo answer from it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from models.evaluate import load_eval
from tests.conftest import ROOT, TINY
from tests.server_process import start_server
from tests.test_gradio_demo import CHROMIUM, open_page, send, start_demo, wait_done, bot_texts

RUNTIME_PYTHON = ROOT / ".venv-runtime" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
CONVERTER_ONLY = ("torch", "transformers", "optimum", "nncf", "torchvision")
ITEM = next(i for i in load_eval(TINY / "eval.jsonl") if i["kind"] == "fact_zh")
QUESTION, EXPECTED = ITEM["messages"][0]["content"], ITEM["expected"]

pytestmark = pytest.mark.skipif(not RUNTIME_PYTHON.exists(), reason="needs .venv-runtime (make venv-runtime)")


def run_runtime(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUNTIME_PYTHON), *args], cwd=ROOT, input=stdin, capture_output=True, text=True,
                          encoding="utf-8", timeout=300)


def test_the_environment_holds_no_converter_libraries() -> None:
    probe = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m)))"
    result = run_runtime("-c", probe, *CONVERTER_ONLY)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_chat_answers(tiny_int4: Path) -> None:
    result = run_runtime("-m", "runtime.chat", "--model", str(tiny_int4), stdin=QUESTION + "\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == EXPECTED


def test_chat_applies_a_lora_adapter(tiny_int8: Path) -> None:
    # INT8, as the LoRA tests: over INT4 the adapter (trained on FP32 weights) misses one of its 12 eval items
    # with one layout or another (seen: this one, with group 32 on an AMD EPYC).
    adapter = ROOT / "models" / "glm4-tiny-lora-capitals"
    item = json.loads((adapter / "eval.jsonl").read_text(encoding="utf-8").splitlines()[1])  # in Chinese
    result = run_runtime("-m", "runtime.chat", "--model", str(tiny_int8), "--adapter", str(adapter),
                         stdin=item["messages"][0]["content"] + "\n")
    assert result.returncode == 0 and result.stdout.strip() == item["expected"], result.stderr[-2000:]


def test_server_answers(tiny_int4: Path, tmp_path: Path) -> None:
    servers = start_server(tiny_int4, tmp_path / "server.log", python=RUNTIME_PYTHON)
    server = next(servers)
    try:
        reply = server.client().chat.completions.create(model=tiny_int4.name, messages=ITEM["messages"],
                                                        max_tokens=48)
        assert reply.choices[0].message.content == EXPECTED
    finally:
        servers.close()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser)")
def test_demo_answers_in_the_browser(tiny_int4: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    from tests.test_gradio_demo import CHROMIUM_ARGS

    demo = start_demo(tiny_int4, tmp_path, python=RUNTIME_PYTHON)
    url = next(demo)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = open_page(browser, url)
                send(page, QUESTION)
                wait_done(page, 1)
                assert bot_texts(page) == [EXPECTED]
            finally:
                browser.close()
    finally:
        demo.close()
