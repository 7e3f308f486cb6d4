"""The built-in chat page (``/``, ``/ui``) in a real browser: Debian's Chromium, driven by Playwright,
against a real nkat-server (the bundled Gemma 3 270M) started with --password.

One server and one browser page for the module: the page loads without console errors, a message
without the key gets the 401's message, with the key a reply streams (its text seen growing) and
ends with a tokens/s figure, Stop ends a long reply at once and leaves the server idle, raw mode
continues a text, model output stays text (never HTML), and the model picker sends the chosen model;
the server's errors (before or inside a stream) are shown. The screenshots go to test-artifacts/
(chat-page.png, chat-page-phone.png). Without chromium or playwright the module is skipped (under CI,
tests/conftest.py turns that skip into a failure).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from paths import REPO
from serverproc import Server

KEY = "chat-page-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM = os.environ.get("NKAT_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"
GENERATING = "document.body.dataset.state === 'generating'"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("chat-page"), "--password", KEY, "--parallel", "1")
    yield srv
    srv.stop()


class Console:
    """The page's console errors and uncaught exceptions, less the failed loads a step expects."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        self.expected: tuple[int, ...] = ()
        page.on("console", self._message)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))

    def _message(self, msg) -> None:
        if msg.type == "error" and not any(f"status of {code}" in msg.text for code in self.expected):
            self.errors.append(msg.text)


@pytest.fixture(scope="module")
def page(browser, server):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    pg = context.new_page()
    pg.console = Console(pg)
    pg.goto(server.url + "/", wait_until="load")
    yield pg
    context.close()


def wait_until(page, expression: str, timeout: float) -> float:
    """Poll ``expression`` in the page until it is true; the seconds it took. (Playwright's own
    wait_for_function evaluates strings, which the page's Content-Security-Policy forbids.)"""
    t0 = time.time()
    while not page.evaluate(expression):
        assert time.time() - t0 < timeout, f"still not true after {timeout} s: {expression}"
        time.sleep(0.02)
    return time.time() - t0


def idle(page) -> None:
    wait_until(page, f"!({GENERATING})", 300)


def test_page_is_served_self_contained(server):
    for path in ("/", "/ui", "/ui/"):
        r = server.get(path)
        assert r.status == 200 and r.headers["Content-Type"] == "text/html; charset=utf-8", (path, r.status)
        assert b"http://" not in r.body and b"https://" not in r.body and b"//cdn" not in r.body  # nothing from outside
        assert "connect-src 'self'" in r.headers["Content-Security-Policy"]
    doc = server.get("/openapi.json").json()
    assert "text/html" in doc["paths"]["/ui"]["get"]["responses"]["200"]["content"]


def test_loads_without_console_errors(page):
    wait_until(page, "document.getElementById('model-name').textContent.length > 0", 30)
    assert page.title() == "NKAT chat"
    assert page.is_hidden("#model-picker")  # one model: no picker
    assert not page.console.errors, page.console.errors


def test_no_key_shows_the_401_message(page):
    page.console.expected = (401,)
    page.fill("#input", "Hello")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    message = page.inner_text("#error")
    assert "401" in message and "API key" in message, message
    assert page.input_value("#input") == "Hello" and page.locator(".msg").count() == 0  # the turn is taken back
    page.console.expected = ()


def test_streams_a_reply_and_shows_tokens_per_second(page):
    page.fill("#api-key", KEY)
    page.fill("#max_tokens", "64")  # enough pieces to see the text grow, few enough for the fast tier
    page.fill("#input", "Write a long story about a dragon who learns to fly.")
    page.click("#send")
    assert page.is_hidden("#error")
    lengths: list[int] = []
    deadline = time.time() + 300
    while page.evaluate(GENERATING) and time.time() < deadline:
        lengths.append(page.evaluate("(document.querySelector('.msg.assistant .text') || {}).textContent?.length"))
        time.sleep(0.03)
    idle(page)
    reply = page.inner_text(".msg.assistant .text")
    partial = {n for n in lengths if n and 0 < n < len(reply)}
    assert len(partial) >= 2, (lengths, reply)  # seen growing while it streamed
    status = page.inner_text("#status")
    assert "tok/s" in status and "tokens" in status, status
    assert page.inner_text(".msg.assistant .stats") == status
    assert page.inner_text(".msg.user .text") == "Write a long story about a dragon who learns to fly."


def test_stop_ends_a_long_reply_and_the_server_goes_idle(page, server):
    page.fill("#max_tokens", "2000")
    page.fill("#input", "Now tell it again, much longer, with many more dragons.")
    page.click("#send")
    wait_until(page, "document.querySelectorAll('.msg.assistant .text')[1]?.textContent.length > 12", 300)
    assert page.is_visible("#stop") and page.is_disabled("#send")
    clicked = time.time()
    page.click("#stop")
    wait_until(page, f"!({GENERATING})", 3)
    assert time.time() - clicked < 3
    assert page.is_hidden("#stop") and page.is_enabled("#send")
    assert page.inner_text("#status").startswith("Stopped after"), page.inner_text("#status")
    deadline = time.time() + 10
    while any(s["is_processing"] for s in server.get("/slots", headers=AUTH).json()):
        assert time.time() < deadline, "the server went on generating after Stop"
        time.sleep(0.1)
    t0 = time.time()
    r = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2}, headers=AUTH, timeout=30)
    assert r.status == 200 and time.time() - t0 < 10
    assert page.locator(".msg.assistant").count() == 2  # the partial reply stays in the conversation
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page.png"))
    assert not page.console.errors, page.console.errors


def test_raw_mode_continues_the_text(page):
    page.check("input[name=mode][value=raw]")
    assert page.is_visible("#raw-text") and page.is_hidden("#log")
    page.fill("#max_tokens", "6")
    page.fill("#raw-text", "The capital of France is")
    page.click("#send")
    idle(page)
    text = page.input_value("#raw-text")
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is"), text
    assert "tok/s" in page.inner_text("#status") or "1 token" in page.inner_text("#status")
    page.check("input[name=mode][value=chat]")


def test_model_output_is_text_enter_sends_and_new_chat_clears(page):
    evil = "<img src=x onerror=\"document.title='pwned'\"><b>bold?</b>"
    frames = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"index": 0, "delta": {"content": evil}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"completion_tokens": 2}}]
    body = "".join(f"data: {json.dumps(f)}\n\n" for f in frames) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(content_type="text/event-stream", body=body))
    page.fill("#input", "Say something odd")
    page.press("#input", "Enter")
    idle(page)
    page.unroute("**/v1/chat/completions")
    assert page.locator(".msg.assistant .text").last.text_content() == evil
    assert page.locator("#log img, #log b").count() == 0 and page.title() == "NKAT chat"
    assert page.inner_text("#status").startswith("2 tokens")
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.is_visible("#empty-hint")


def test_model_picker_and_error_messages(page):
    real = page.evaluate("fetch('/v1/models').then((r) => r.json())")["data"][0]
    fake = {"data": [real, {"id": "other-model", "status": {"value": "unloaded"}}]}
    page.route("**/v1/models", lambda route: route.fulfill(json=fake))
    sent: list[dict] = []
    page.on("request", lambda req: sent.append(req.post_data_json) if req.url.endswith("/chat/completions") else None)
    page.reload(wait_until="load")  # the key and settings come back from localStorage
    page.wait_for_selector("#model-picker:not([hidden])")
    assert page.locator("#model option").all_inner_texts() == [real["id"], "other-model (unloaded)"]
    page.select_option("#model", "other-model")  # a one-model server answers any name with its model
    page.fill("#input", "Hi")
    page.click("#send")
    idle(page)
    assert sent[-1]["model"] == "other-model" and sent[-1]["max_tokens"] == 6 and sent[-1]["stream"] is True
    assert page.is_hidden("#error") and "token" in page.inner_text("#status")

    # the server's error, before the stream or inside it, is shown: never a blank failure
    page.console.expected = (503,)
    busy = {"error": {"message": "Server is busy; please try again later.", "type": "unavailable_error"}}
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=503, json=busy))
    page.fill("#input", "Hello again")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert page.inner_text("#error") == "Error 503: Server is busy; please try again later."
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body='data: {"error": {"message": "went wrong mid-stream"}}\n\n'))
    page.click("#send")
    idle(page)
    assert page.inner_text("#error") == "went wrong mid-stream"
    page.set_viewport_size({"width": 390, "height": 780})  # a phone, settings folded
    page.click("#settings summary")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
    page.screenshot(path=str(ARTIFACTS / "chat-page-phone.png"))
    assert not page.console.errors, page.console.errors
