"""The web chat at `/` (server/web/): served under a strict CSP, and driven in a real browser.

The browser tests run Playwright against Debian's `chromium` (or Playwright's own browser) and a live
server with the tiny test model whose output is forced (test_server_harness.forced_output): the page
streams an answer and renders its markdown, renders a tool call, stops an answer mid-stream (the slot
is freed), finds the conversation again after a reload, and fills in the middle of code. They skip, saying why, without a browser.
Screenshots go to docs/web_chat*.png.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from test_server_harness import _start, forced_output, reference_llm, tool_call_ids, wait_idle

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def server():
    return _start(parallel=1, max_queue=8)


def test_a_browser_gets_the_page_under_a_strict_csp_and_probes_still_get_text(server):
    page = httpx.get(server.url + "/", headers={"accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert '<script src="/web/app.js"' in page.text and "<script>" not in page.text  # no inline code
    assert httpx.get(server.url + "/").text == "devstral is running"  # probes and curl
    js = httpx.get(server.url + "/web/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert httpx.get(server.url + "/web/../state.py").status_code == 404
    assert httpx.get(server.url + "/web/nope.js").status_code == 404


def test_the_page_is_open_but_the_api_needs_the_key():
    keyed = _start(parallel=1, max_queue=0, api_key="k3y")
    assert httpx.get(keyed.url + "/", headers={"accept": "text/html"}).status_code == 200
    assert httpx.get(keyed.url + "/web/app.css").status_code == 200
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    card = httpx.get(keyed.url + "/v1/models", headers={"authorization": "Bearer k3y"}).json()["data"][0]
    assert card["default_sampling"]["temperature"] == keyed.llm.default_sampling.temperature


@contextmanager
def slow_output(token_ids: list[int], delay_s: float):
    """The model writes `token_ids` (then EOS), one every `delay_s` seconds: an answer to stop."""
    from devstral.testing import patched_sampler

    ids, eos = iter(token_ids), reference_llm().tokenizer.eos_id

    def pick(logits, params, history):
        time.sleep(delay_s)
        return next(ids, eos)

    with patched_sampler(pick):
        yield


def _browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    pw = sync_api.sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"]) if exe else pw.chromium.launch()
    except Exception as e:  # no browser at all
        pw.stop()
        pytest.skip(f"no Chromium to drive (apt-get install chromium): {str(e).splitlines()[0]}")
    return pw, browser


@pytest.fixture(scope="module")
def browser():
    pw, browser = _browser()
    yield browser
    browser.close()
    pw.stop()


def test_chat_streams_markdown_renders_tool_calls_stops_and_survives_a_reload(server, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(server.url + "/")
    page.wait_for_selector("#model:has-text('tiny')")

    # 1. a streamed answer, rendered as markdown; model text is never HTML
    answer = server.llm.tokenizer.encode("Hello **world** <img src=x onerror=alert(1)> and `code`.")
    with forced_output(answer):
        page.fill("#input", "Say hello")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant .stats")
    body = page.locator(".msg.assistant .body").last
    assert body.locator("strong").inner_text() == "world" and body.locator("code").inner_text() == "code"
    assert body.locator("img").count() == 0 and "<img src=x" in body.inner_text()
    assert "tokens" in page.locator(".msg.assistant .stats").last.inner_text()
    page.screenshot(path=str(DOCS / "web_chat.png"))

    # 2. a tool call, with tools declared in the settings
    page.click("#settings summary")
    page.fill("#tools", '[{"type": "function", "function": {"name": "read_file", "parameters": '
                        '{"type": "object", "properties": {"path": {"type": "string"}}}}}]')
    page.dispatch_event("#tools", "change")
    with forced_output(tool_call_ids([("read_file", '{"path": "a.py"}')])):
        page.fill("#input", "Read a.py")
        page.press("#input", "Enter")
        page.wait_for_selector('details.tool[data-name="read_file"]')
        page.locator(".msg.assistant .stats").nth(1).wait_for()  # the answer is complete
    assert '"path": "a.py"' in page.locator('details.tool[data-name="read_file"]').inner_text()

    # 3. stop mid-stream: the answer keeps what came, and the server frees the slot
    page.click("#new")  # (the last answer's tool call has no result yet: the model would be asked to wait)
    with slow_output(server.llm.tokenizer.encode(" word" * 60), delay_s=0.1):  # about 6 s if not stopped
        page.fill("#input", "Talk a lot")
        page.press("#input", "Enter")
        page.wait_for_selector("#stop:not([disabled])", timeout=5000)  # (the CSP forbids eval: no wait_for_function)
        page.locator(".msg.assistant").filter(has_text="word").wait_for()
        page.click("#stop")
        page.wait_for_selector(".msg.assistant:nth-last-child(1) .stats:has-text('stopped')")
    health = wait_idle(server)
    assert health["slots_processing"] == 0 and health["slots_idle"] == 1

    # 4. a reload finds the conversation in the browser's storage
    page.reload()
    page.wait_for_selector(".msg.user")
    assert page.locator("#convs li").count() == 2  # the newest first, and shown
    assert page.locator(".msg.user").inner_text().endswith("Talk a lot")
    assert "stopped" in page.locator(".msg.assistant .stats").inner_text()
    page.locator("#convs li").nth(1).click()
    assert page.locator(".msg.user").count() == 2 and page.locator("details.tool").count() == 1
    page.click("#metrics summary")
    page.wait_for_selector(".plot[data-name='requests active']", timeout=10000)
    page.screenshot(path=str(DOCS / "web_chat_metrics.png"))

    # 5. fill in the middle: the code before and after the cursor, the middle streamed back as code
    page.click("#new")
    page.select_option("#mode", "fim")
    with forced_output(server.llm.tokenizer.encode("a + b")):
        page.fill("#input", "def add(a, b):\n    return ")
        page.fill("#suffix", "\n\nprint(add(1, 2))\n")
        page.click("#send")
        page.wait_for_selector(".msg.assistant .stats")
    assert page.locator(".msg.assistant pre.middle").inner_text() == "a + b"
    assert "fill in the middle" in page.locator(".msg.user .who").inner_text()

    # 6. the export is what `devstral finetune` reads: every line loads (the chats, not the FIM turn)
    from devstral.train.data import load_examples

    with page.expect_download() as download:
        page.click("#export")
    examples, stats = load_examples(Path(download.value.path()), server.llm.tokenizer, max_seq_len=256)
    assert len(examples) == 2
    assert not errors, errors
