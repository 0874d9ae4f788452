"""The chat page in a real headless browser (Debian's Chromium driven by Playwright) against a live
`lmfoundry serve` app: type a message and watch tokens stream in, stop a generation (the server
cancels the sequence), carry the conversation into a second turn, copy, tokens/s, and the API key.
Skipped, with the reason, where Chromium or Playwright is missing (scripts/setup.sh --test installs
Chromium with apt-get when it runs as root)."""
import os
import re
import shutil
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
CHROMIUM = os.environ.get("LMFOUNDRY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)

from lmfoundry.checkpoint import load_model  # noqa: E402
from lmfoundry.serve.api import create_app  # noqa: E402
from lmfoundry.serve.engine import Engine  # noqa: E402
from lmfoundry.tokenizer import load_tokenizer  # noqa: E402

from test_serve import KEY, ThreadServer  # noqa: E402

pytestmark = pytest.mark.slow
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def slow_model(demo_dir, seconds_per_step=0.02):
    """The demo model, slowed down and never ending a turn by itself, so a stop can land mid-stream."""
    model = load_model(demo_dir)
    eos = model.config.eos_token_id if isinstance(model.config.eos_token_id, list) else [model.config.eos_token_id]

    def hook(module, args, logits):
        time.sleep(seconds_per_step)
        logits[..., eos] = float("-inf")
        return logits
    model.register_forward_hook(hook)
    return model


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def live(demo_dir):
    tok = load_tokenizer(demo_dir)
    engine = Engine(slow_model(demo_dir), tok, max_batch=2)
    srv = ThreadServer(create_app(engine, tok, "demo"))
    yield srv, engine
    srv.stop()


def watch_text(page):
    """Record every length the last assistant bubble's text takes, as the DOM changes."""
    page.evaluate("""() => { window.__lengths = [];
        new MutationObserver(() => { const t = document.querySelectorAll('.msg.assistant .text');
            if (t.length) window.__lengths.push(t[t.length - 1].textContent.length); })
        .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")


def test_chat_streams_stops_and_carries_history(browser, live):
    srv, engine = live
    context = browser.new_context()
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=f"http://127.0.0.1:{srv.port}")
    page = context.new_page()
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    page.goto(f"http://127.0.0.1:{srv.port}/")
    sync_api.expect(page.locator("#model")).to_contain_text("demo")
    page.locator("#settings summary").click()
    page.fill("#system", "Answer briefly.")
    page.fill("#max-tokens", "200")
    watch_text(page)

    # turn 1: tokens arrive one event at a time; stop it halfway
    page.fill("#input", "Tell me about depth up-scaling.")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#stop")).to_be_enabled()
    deadline = time.time() + 20
    while not page.evaluate("window.__lengths.length > 0 && window.__lengths[window.__lengths.length - 1] > 10"):
        assert time.time() < deadline, "no tokens arrived"
        time.sleep(0.05)
    aborted = engine.stats.finished["abort"]
    page.click("#stop")
    meta = page.locator(".msg.assistant .meta").first
    sync_api.expect(meta).to_contain_text("stopped")
    assert re.fullmatch(r"\d+ tokens · [\d.]+ tok/s · stopped", meta.inner_text())
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 3, lengths                       # streamed, not delivered at once
    deadline = time.time() + 10
    while engine.stats.finished["abort"] == aborted:            # the server cancelled the sequence
        assert time.time() < deadline, "the stopped sequence was not cancelled on the server"
        time.sleep(0.05)
    first = page.locator(".msg.assistant .text").first.inner_text()
    assert 0 < int(meta.inner_text().split()[0]) < 200 and first
    time.sleep(0.3)
    assert page.locator(".msg.assistant .text").first.inner_text() == first    # nothing arrives after a stop

    # copy puts the message on the clipboard
    page.locator(".msg.assistant .copy").first.click()
    assert page.evaluate("navigator.clipboard.readText()") == first

    # turn 2 carries the system prompt, turn 1 (with the stopped answer) and the new message
    page.fill("#max-tokens", "5")
    page.fill("#input", "And then?")
    page.click("#send")
    sync_api.expect(page.locator(".msg.assistant .meta").nth(1)).to_contain_text("tok/s · length")
    assert bodies[-1]["messages"] == [{"role": "system", "content": "Answer briefly."},
                                      {"role": "user", "content": "Tell me about depth up-scaling."},
                                      {"role": "assistant", "content": first},
                                      {"role": "user", "content": "And then?"}]
    assert bodies[-1]["stream"] is True and bodies[-1]["max_tokens"] == 5 and bodies[-1]["temperature"] == 0.7
    assert page.locator(".msg").count() == 4
    context.close()


def test_page_with_api_key_logs_in_and_sends_the_key(browser, demo_dir):
    tok = load_tokenizer(demo_dir)
    srv = ThreadServer(create_app(Engine(load_model(demo_dir), tok, max_batch=2), tok, "demo", api_key=KEY))
    try:
        url = f"http://127.0.0.1:{srv.port}/"
        anonymous = browser.new_context()
        assert anonymous.request.get(url).status == 401               # the page itself is guarded
        anonymous.close()
        # the browser's login prompt (any user, the key as password) opens the page, and the browser
        # repeats that login on the page's own requests
        context = browser.new_context(http_credentials={"username": "me", "password": KEY})
        page = context.new_page()
        assert page.goto(url).status == 200
        sync_api.expect(page.locator("#model")).to_contain_text("demo")
        assert not page.locator("#key-panel").is_visible()
        html = context.request.get(url).text()
        context.close()
        # a page without that login (here: its HTML handed over directly) asks for the key and sends it
        # as a bearer token
        context = browser.new_context()
        page = context.new_page()
        page.route(url, lambda route: route.fulfill(status=200, content_type="text/html", body=html))
        auth = []
        page.on("request", lambda r: auth.append(r.headers.get("authorization")) if "/v1/" in r.url else None)
        page.goto(url)
        sync_api.expect(page.locator("#key-panel")).to_be_visible()
        page.fill("#key", KEY)
        page.click("#key-save")
        sync_api.expect(page.locator("#model")).to_contain_text("demo")
        sync_api.expect(page.locator("#key-panel")).to_be_hidden()
        page.fill("#input", "hi")
        page.click("#send")
        sync_api.expect(page.locator(".msg.assistant .meta")).to_contain_text("tok/s")
        assert auth[0] is None and auth[-1] == f"Bearer {KEY}"
        assert "error" not in page.locator(".msg.assistant").get_attribute("class")
        context.close()
    finally:
        srv.stop()
