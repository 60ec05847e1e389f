"""The web chat page at `/` of `deepsail serve`, driven in a real headless Chromium (Debian's, installed by
scripts/install.sh; playwright's Python package drives it through `executable_path`, nothing is downloaded).

One live server with an API key, on the tiny random model: the page asks for the key, lists the model, streams a
reply, stops it (the server cancels the request and frees its KV blocks), sends a second turn with the whole
conversation, and renders hostile model output as text. A screenshot is saved for the record. Another server is
stopped under the page and started again on the same address: the page says so, reconnects, keeps the conversation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect
from test_serve import Live, _serve, _wait_for

from deepsail.serve import ServerConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "s3cret"
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (bash scripts/install.sh test installs it)"
)


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> Live:
    live = _serve(tiny_model_dir, ServerConfig(api_key=KEY, model_name="tiny"), max_batch_size=4, max_model_len=512)
    yield live
    live.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


def test_page_is_served_without_a_key_with_a_strict_csp(server):
    """The page holds no data, so it loads without the key (the API it calls needs it). Its CSP allows only its own
    inline script and style (by hash) and calls to this origin; model output never goes through innerHTML."""
    r = httpx.get(f"{server.url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    assert (
        not any(sink in r.text for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"))
        and "https://" not in r.text
    )  # no HTML sinks, nothing from a CDN
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_chat_in_chromium_key_stream_stop_second_turn(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    sent: list[dict] = []
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and sent.append(r.post_data_json))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url)

    # the key: asked for, a wrong one refused, the right one lists the model
    page.wait_for_selector("#key-form:not([hidden])", timeout=5000)
    page.fill("#key", "wrong")
    page.press("#key", "Enter")
    expect(page.locator("#status")).to_contain_text("refused", timeout=5000)
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    expect(page.locator("#model")).to_have_value("tiny", timeout=5000)
    assert page.is_hidden("#key-form")

    # turn 1: streamed tokens appear while the request runs; Stop cancels it in the engine
    engine = server.engine
    real_step = engine.step

    def slow_step() -> bool:  # 400 tokens take ~0.8 s here: slowed to ~20 ms a token, the test can click mid-stream
        busy = real_step()
        if busy:
            time.sleep(0.02)
        return busy

    engine.step = slow_step
    try:
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "400")
        aborted = engine.stats()["requests_aborted"]
        page.fill("#input", "Write a function that adds two numbers")
        page.press("#input", "Enter")
        expect(page.locator(".msg.assistant.streaming .body")).to_have_text(re.compile(r"\S{3}"), timeout=10000)
        assert page.is_enabled("#stop") and page.is_disabled("#send")
        page.click("#stop")
        page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=5000)
        # the server saw the disconnect, cancelled the request and freed its blocks
        _wait_for(lambda: engine.stats()["requests_aborted"] == aborted + 1, 3)
        _wait_for(lambda: engine.stats()["kv_blocks_used"] == 0, 3)
    finally:
        engine.step = real_step
    first = page.text_content(".msg.assistant .body")
    assert "stopped" in page.text_content(".msg.assistant .meta")
    assert sent[0]["temperature"] == 0 and sent[0]["max_tokens"] == 400 and sent[0]["model"] == "tiny"

    # turn 2: the whole conversation goes with it, the partial reply included
    page.fill("#max-tokens", "6")
    page.fill("#input", "And now in one line?")
    page.click("#send")
    expect(page.locator(".msg.assistant:not(.streaming)")).to_have_count(2, timeout=10000)
    roles = [m["role"] for m in sent[1]["messages"]]
    assert roles == ["user", "assistant", "user"], sent[1]
    assert sent[1]["messages"][0]["content"] == "Write a function that adds two numbers"
    assert sent[1]["messages"][1]["content"].strip() and sent[1]["messages"][2]["content"] == "And now in one line?"
    meta = page.text_content(".msg.assistant:last-child .meta")
    assert "tiny" in meta and "6 tokens" in meta and "length" in meta, meta
    assert page.locator(".msg.user").count() == 2 and first
    assert not errors, errors

    # the conversation survives a reload (sessionStorage), the key too
    page.reload()
    expect(page.locator("#status")).to_have_text("ready", timeout=5000)
    assert page.locator(".msg").count() == 4

    shots = Path(os.environ.get("DEEPSAIL_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "chat_page.png"), full_page=True)
    assert (shots / "chat_page.png").stat().st_size > 10_000
    page.close()


def test_hostile_model_output_is_rendered_as_text(server, browser):
    """Whatever the model writes (here a stream the browser is handed instead of the server's) becomes text in
    elements the page builds itself: markdown and code blocks render, HTML does not."""
    hostile = (
        '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>\n'
        "## Title\n"
        "**bold** and `inline` and *it*\n"
        "- one\n- two\n"
        "```python\nprint('<b>not bold</b>')\n```\n"
        "[link](javascript:alert(1))"
    )
    pieces = [hostile[i : i + 7] for i in range(0, len(hostile), 7)]
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "model": "tiny"}]
    events += [{"choices": [{"index": 0, "delta": {"content": p}}], "model": "tiny"} for p in pieces]
    events += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "model": "tiny"}]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    page = browser.new_page()
    page.add_init_script(f"sessionStorage.setItem('deepsail.key', {json.dumps(KEY)})")
    page.goto(server.url)
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, body=sse, headers={"content-type": "text/event-stream"}),
    )
    expect(page.locator("#model")).to_have_value("tiny", timeout=5000)
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=5000)
    body = page.locator(".msg.assistant .body")
    assert page.evaluate("window.pwned") is None
    assert body.locator("img, script, a").count() == 0
    assert "<img src=x" in body.text_content()  # shown, as text
    assert body.locator("pre code").text_content() == "print('<b>not bold</b>')"
    assert body.locator("pre code").get_attribute("data-lang") == "python"
    assert body.locator("strong").text_content() == "bold" and body.locator("p code").text_content() == "inline"
    assert body.locator("em").text_content() == "it" and body.locator("ul li").count() == 2
    assert body.locator("h4").text_content() == "Title"
    page.close()


def test_page_survives_a_server_restart(tiny_model_dir, browser):
    """A message, then the server goes away: the next send fails, the status says the connection is lost and the
    page is reconnecting, and the unsent text goes back to the input; the server comes back on the same address,
    the page finds it by itself (polling /health) and says so, and the resent message gets a reply with the whole
    conversation in the request."""
    config = ServerConfig(api_key=KEY, model_name="tiny")
    live = _serve(tiny_model_dir, config, max_batch_size=4, max_model_len=512)
    port = int(live.url.rsplit(":", 1)[1])
    page = browser.new_page()
    sent: list[dict] = []
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and sent.append(r.post_data_json))
    page.add_init_script(f"sessionStorage.setItem('deepsail.key', {json.dumps(KEY)})")
    try:
        page.goto(live.url)
        expect(page.locator("#model")).to_have_value("tiny", timeout=5000)
        page.fill("#max-tokens", "4")
        page.fill("#input", "hello")
        page.press("#input", "Enter")
        expect(page.locator(".msg.assistant:not(.streaming)")).to_have_count(1, timeout=10000)

        live.close()  # the server stops; the page does not know yet
        page.fill("#input", "are you there?")
        page.press("#input", "Enter")
        expect(page.locator("#status")).to_contain_text("lost; reconnecting", timeout=10000)
        # nothing came back: the turn is taken back, its text returned to the input to send again
        expect(page.locator("#input")).to_have_value("are you there?", timeout=5000)
        assert page.locator(".msg").count() == 2 and page.is_enabled("#send")

        live = _serve(tiny_model_dir, config, port=port, max_batch_size=4, max_model_len=512)
        expect(page.locator("#status")).to_contain_text("reconnected", timeout=15000)
        page.press("#input", "Enter")
        expect(page.locator(".msg.assistant:not(.streaming)")).to_have_count(2, timeout=10000)
        assert "tokens" in page.text_content(".msg.assistant:last-child .meta")
        users = [m["content"] for m in sent[-1]["messages"] if m["role"] == "user"]
        assert users == ["hello", "are you there?"] and len(sent[-1]["messages"]) == 3, sent[-1]
    finally:
        page.close()
        live.close()
