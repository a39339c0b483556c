"""The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright): enter the API key, type
a message, watch the answer stream in, follow up with the history sent along, and keep a screenshot."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nanoseek import NanoSeek, preset
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import Engine, load_for_inference
from nanoseek.serve.app import create_app
from tests.test_serve import live_server

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "web-key"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; "
                                       ".ci/run installs it)")


@pytest.fixture(scope="module")
def engine(data_dir: Path, tmp_path_factory) -> Iterator[Engine]:
    tok = Tokenizer.load(data_dir.parent / "tok")
    folder = tmp_path_factory.mktemp("web") / "tiny-web"
    torch.manual_seed(0)
    NanoSeek(preset("tiny", vocab_size=tok.vocab_size)).save_pretrained(str(folder))
    tok.save(folder)
    model, tok = load_for_inference(folder, device="cpu")
    eng = Engine(model, tok, max_batch=4)
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def test_chat_page_streams_an_answer(engine, browser, tmp_path):
    with live_server(create_app(engine, engine.tokenizer, api_key=KEY)) as url:
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        chat_bodies = []
        page.on("request", lambda r: chat_bodies.append(json.loads(r.post_data))
                if r.url.endswith("/v1/chat/completions") else None)
        page.goto(url)
        page.wait_for_selector("#key-box.needed")  # the server wants a key: the page asks for it
        page.fill("#api-key", KEY)
        page.click("#key-save")
        page.wait_for_function("document.getElementById('status').textContent.includes('tiny-web')")
        page.fill("#max-tokens", "24")
        page.fill("#temperature", "0")  # greedy: the same answer whatever random state earlier tests left behind

        page.fill("#prompt", "Hello! What can you do?")
        page.press("#prompt", "Enter")
        first = page.locator(".msg.assistant").nth(0)
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
        answer = first.evaluate("el => el.firstChild.textContent")  # the text, without the '(cut at…)' note
        assert answer.strip(), "no answer text"
        assert int(first.get_attribute("data-chunks")) > 1, "the answer arrived in one piece, not streamed"
        assert page.locator(".msg.user").first.inner_text() == "Hello! What can you do?"
        assert page.locator(".msg.error").count() == 0

        page.fill("#prompt", "مرحبا، أخبرني المزيد")  # Arabic: the message reads right to left
        page.click("#send")
        page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='true']\").length == 2",
                               timeout=60_000)
        direction = "el => getComputedStyle(el).direction"
        assert [m.evaluate(direction) for m in page.locator(".msg.user").all()] == ["ltr", "rtl"]
        follow_up = chat_bodies[-1]
        assert follow_up["stream"] is True and follow_up["max_tokens"] == 24
        assert [m["role"] for m in follow_up["messages"]] == ["user", "assistant", "user"]
        assert follow_up["messages"][1]["content"] == answer

        shot = tmp_path / "chat.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5_000

        page.click("#reset")
        assert page.locator(".msg").count() == 0
        page.close()


def test_a_failed_turn_is_undone_on_screen_and_in_the_history(engine, browser):
    """An error before any token (here: max tokens beyond the context) leaves no half turn: the message goes back
    to the box, the error shows, and the next request does not carry the failed message."""
    with live_server(create_app(engine, engine.tokenizer)) as url:
        page = browser.new_page()
        chat_bodies = []
        page.on("request", lambda r: chat_bodies.append(json.loads(r.post_data))
                if r.url.endswith("/v1/chat/completions") else None)
        page.goto(url)
        page.wait_for_function("!document.getElementById('send').disabled")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "100000")
        page.fill("#prompt", "first try")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".msg.error")
        assert "context" in page.locator(".msg.error").inner_text()
        assert page.locator(".msg.user").count() == 0 and page.locator(".msg.assistant").count() == 0
        assert page.input_value("#prompt") == "first try"
        page.fill("#max-tokens", "6")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
        assert [m["content"] for m in chat_bodies[-1]["messages"]] == ["first try"]
        assert page.locator(".msg.user").count() == 1
        page.close()


def test_key_field_hidden_without_a_key(engine, browser):
    with live_server(create_app(engine, engine.tokenizer)) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("!document.getElementById('send').disabled")
        assert not page.is_visible("#api-key")
        page.close()
