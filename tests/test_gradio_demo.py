"""The browser chat (python -m demos.gradio_chat) for real: the server as a subprocess on glm4-tiny
INT4, driven in Debian's headless Chromium through Playwright."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from models.evaluate import load_eval
from tests.conftest import ROOT, TINY, free_port, run_module, stop_process

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
BOT = "#chat [data-testid='bot']"
USER = "#chat [data-testid='user']"
SAMPLING_IDS = ["temperature", "top-p", "top-k", "repetition-penalty"]

pytestmark = [pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser)"),
              pytest.mark.filterwarnings(r"ignore:.*Gradio 6\.0:DeprecationWarning")]


def eval_question(kind: str) -> tuple[str, str]:
    item = next(i for i in load_eval(TINY / "eval.jsonl") if i["kind"] == kind)
    return item["messages"][0]["content"], item["expected"]


@pytest.fixture(scope="module")
def server(tiny_int4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo serving glm4-tiny INT4 on a free port; its URL."""
    yield from start_demo(tiny_int4, tmp_path_factory.mktemp("gradio-server"))


def start_demo(model: Path, logs: Path, python: str | Path = sys.executable) -> Iterator[str]:
    """``python -m demos.gradio_chat`` on ``model``; yields its URL, and always terminates it afterwards."""
    stdout, stderr = logs / "stdout.txt", logs / "stderr.txt"
    with open(stdout, "w", encoding="utf-8") as out, open(stderr, "w", encoding="utf-8") as err:
        process = subprocess.Popen([str(python), "-m", "demos.gradio_chat", "--model", str(model),
                                    "--port", str(free_port())], cwd=ROOT, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 90
        while not (match := re.search(r"running on (http://\S+)", stdout.read_text(encoding="utf-8"))):
            assert process.poll() is None, stderr.read_text(encoding="utf-8")[-2000:]
            assert time.monotonic() < deadline, "the demo did not print its URL within 90 s"
            time.sleep(0.2)
        assert match.group(1).startswith("http://127.0.0.1:")  # binds this machine only by default
        yield match.group(1)
    finally:
        stop_process(process)
    assert "Traceback" not in stderr.read_text(encoding="utf-8"), stderr.read_text(encoding="utf-8")[-3000:]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser: Browser, url: str) -> Page:
    """A page in a fresh browser context (its own Gradio session), ready for input."""
    page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
    page.set_default_timeout(30_000)
    page.goto(url, wait_until="domcontentloaded")  # Gradio never reaches networkidle
    page.wait_for_selector("#message textarea")
    return page


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    page = open_page(browser, server)
    try:
        yield page
    finally:
        page.context.close()


def send(page: Page, text: str) -> None:
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")


def wait_done(page: Page, bot_messages: int, finished: str = "tokens/s") -> None:
    """Wait for the reply that makes ``bot_messages`` bot bubbles to finish (its status line shows ``finished``).

    The status turns to "Generating…" before a reply's first bubble appears, so an older status never matches.
    """
    page.wait_for_function("([bot, n, done]) => document.querySelectorAll(bot).length === n && "
                           "document.querySelector('#status').innerText.includes(done)",
                           arg=[BOT, bot_messages, finished])


def clear(page: Page) -> None:
    """Press Clear and wait until the page shows the empty conversation.

    A message sent before Clear's answer arrives would bring the old conversation back: the browser sends
    the chat it shows along with every message.
    """
    page.click("#clear")
    page.wait_for_function("([bot]) => document.querySelectorAll(bot).length === 0", arg=[BOT])


def bot_texts(page: Page) -> list[str]:
    return [text.strip() for text in page.locator(BOT).all_inner_texts()]


def run_to_limit(page: Page, max_new_tokens: int) -> None:
    """Make the next replies exactly ``max_new_tokens`` long, whatever the model would say (the page's own option)."""
    box = page.locator("#max-new-tokens input[type=number]")
    box.fill(str(max_new_tokens))
    box.press("Enter")
    page.check("#ignore-eos input")


def test_streams_answers_in_chinese_and_english(page: Page, tmp_path: Path) -> None:
    info = page.inner_text("#model-info")
    assert "glm4-tiny-int4" in info and "INT4" in info and "CPU" in info
    for number, kind in enumerate(("fact_zh", "fact_en"), start=1):
        question, expected = eval_question(kind)
        send(page, question)
        wait_done(page, number)
        assert bot_texts(page)[-1] == expected
        assert page.locator(USER).all_inner_texts()[-1].strip() == question
        status = page.inner_text("#status")
        assert "first token" in status and "tokens/s" in status and status.endswith("· stop")
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 10_000


def test_stop_ends_a_long_answer_and_the_next_question_works(page: Page) -> None:
    run_to_limit(page, 8192)
    question, expected = eval_question("fact_en")
    send(page, question)
    page.wait_for_function("([bot, n]) => (document.querySelector(bot)?.innerText || '').length > n",
                           arg=[BOT, len(expected) + 200])
    first = len(bot_texts(page)[0])
    page.wait_for_function("([bot, n]) => document.querySelector(bot).innerText.length > n", arg=[BOT, first])
    page.click("#stop")  # streamed: the answer was seen growing, and is stopped while it still grows
    wait_done(page, 1, "stopped")
    status = page.inner_text("#status")
    generated = re.search(r"(\d+) tokens ·", status)
    assert generated and int(generated.group(1)) < 8192, status
    stopped = bot_texts(page)[0]
    time.sleep(1.0)
    assert bot_texts(page)[0] == stopped, "the answer kept growing after Stop"
    assert stopped.startswith(expected)  # the answer, then whatever follows it when the end is passed over
    # Clear starts the conversation afresh, and without the option the model stops by itself again.
    clear(page)
    page.uncheck("#ignore-eos input")
    send(page, question)
    wait_done(page, 1)
    assert bot_texts(page) == [expected]
    assert "· stop" in page.inner_text("#status")


def test_browser_contexts_keep_separate_conversations(browser: Browser, server: str) -> None:
    first, second = open_page(browser, server), open_page(browser, server)
    try:
        for page, color in ((first, "green"), (second, "red")):
            send(page, f"My favorite color is {color}.")
            wait_done(page, 1)
        for page, color in ((first, "green"), (second, "red")):
            send(page, "What is my favorite color?")
            wait_done(page, 2)
            assert bot_texts(page) == ["Got it, I will remember that.", f"Your favorite color is {color}."]
        assert "red" not in first.inner_text("#chat") and "green" not in second.inner_text("#chat")
        # One tab's Stop never stops another's reply: the second tab's message waits behind the first
        # tab's long answer, the second tab stops it, and the first answer runs to its token limit.
        clear(first)
        run_to_limit(first, 4000)
        send(first, "What is the capital of Japan?")
        first.wait_for_function("([bot]) => document.querySelectorAll(bot).length === 1", arg=[BOT])
        send(second, "What is the capital of Japan?")
        second.wait_for_function("([user]) => document.querySelectorAll(user).length === 3", arg=[USER])
        second.click("#stop")
        second.wait_for_selector("#status :text('stopped')")
        wait_done(first, 1, "max new tokens limit")
        assert "4000 tokens" in first.inner_text("#status")
        send(second, "What is my favorite color?")  # the stopped tab answers its next message, still from memory
        wait_done(second, len(bot_texts(second)) + 1)
        assert bot_texts(second)[-1] == "Your favorite color is red."

    finally:
        first.context.close()
        second.context.close()


def test_system_prompt_and_tools_mode(page: Page) -> None:
    from demos.gradio_chat import get_weather

    page.fill("#system textarea", "You are Zephyr, a helpful assistant.")
    send(page, "Who are you?")
    wait_done(page, 1)
    assert bot_texts(page) == ["My name is Zephyr."]
    clear(page)
    page.fill("#system textarea", "")
    page.check("#tools input")
    send(page, "What is the weather in Paris?")
    wait_done(page, 2)
    weather = get_weather("Paris")
    call, answer = bot_texts(page)
    assert "Tool call: get_weather" in call and '{"city": "Paris"}' in call
    assert json.dumps(weather, ensure_ascii=False) in call
    assert answer == f"It is {weather['condition']} and {weather['temperature']}°C in Paris."
    assert "after 1 tool call" in page.inner_text("#status")


def test_bad_input_gives_a_message_in_the_page(page: Page) -> None:
    send(page, "   ")
    page.wait_for_selector("#status :text('The message is empty')")
    send(page, "x" * 25_000)
    page.wait_for_selector("#status :text('The message is too long')")
    assert page.locator(USER).count() == 0  # neither reached the chat
    send(page, "数据" * 9_000)  # under the character limit, over the model's context
    page.wait_for_selector("#status :text('the prompt needs')")
    assert "Traceback" not in page.content()
    question, expected = eval_question("fact_en")
    send(page, question)
    wait_done(page, 1)
    assert bot_texts(page) == [expected]


def test_sampling_controls_hidden_on_npu(tiny_int4: Path) -> None:
    from demos.gradio_chat import build_demo

    def visible(device: str) -> dict[str, bool | str]:
        engine = SimpleNamespace(name="glm4-tiny-int4", device=device, max_prompt_tokens=1024)
        blocks = build_demo(engine, tiny_int4).blocks.values()
        return {b.elem_id: b.visible for b in blocks if b.elem_id in SAMPLING_IDS + ["max-new-tokens"]}

    assert visible("CPU") == dict.fromkeys(SAMPLING_IDS + ["max-new-tokens"], True)
    assert visible("NPU") == {**dict.fromkeys(SAMPLING_IDS, False), "max-new-tokens": True}


def test_missing_model_folder_is_one_line_error(tmp_path: Path) -> None:
    result = run_module("demos.gradio_chat", "--model", str(tmp_path / "missing"), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "\n" not in result.stderr.strip(), result.stderr
