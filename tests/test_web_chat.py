"""The web chat at `/`, driven in a real browser (Playwright on the system's Chromium) against the live
test servers: the `nano` model for chat, the strict server for the API key.

Oracles: openai's own SSE decoder and stream accumulator for the page's SSE and tool-call parsing (fed
the very bytes our server streamed), the tokenizer's decoding of the forced output ids for what the
page ends with, `devstral finetune`'s reader for the export, Chromium's Trusted Types for "no HTML
from strings", and properties (no element or attribute outside the safe set, nothing lost by the
highlighter) for the Markdown renderer.

Without a browser (no chromium on PATH, no Playwright browser, no $DEVSTRAL_TEST_BROWSER) the browser
tests skip saying so; `.ci/run` installs Debian's chromium.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_server_harness import ALIAS, API_KEY, forced_output, nano, strict, wait_idle

SHOTS = os.environ.get("DEVSTRAL_SCREENSHOTS")  # a folder: the tests save screenshots there (README's)
SAFE_TAGS = {"P", "STRONG", "EM", "DEL", "CODE", "PRE", "BR", "A", "H3", "H4", "H5", "H6", "HR", "UL", "OL",
             "LI", "BLOCKQUOTE", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD", "DIV", "FIGURE", "FIGCAPTION",
             "SPAN", "BUTTON", "INPUT"}


# ---------------------------------------------------------------- the browser
def browser_path() -> str | None:
    given_path = os.environ.get("DEVSTRAL_TEST_BROWSER")
    if given_path:
        return given_path
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None  # then Playwright's own download, if `playwright install chromium` was run


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    with sync_api.sync_playwright() as p:
        path = browser_path()
        if path is None and not Path(p.chromium.executable_path).exists():
            pytest.skip("no browser: install Debian's `chromium` (apt-get install chromium, as .ci/run does), "
                        "run `playwright install chromium`, or set DEVSTRAL_TEST_BROWSER to a Chromium binary")
        b = p.chromium.launch(executable_path=path, headless=True)
        yield b
        b.close()


class Page:
    """A fresh browser profile (empty localStorage) on a server's page; records every request the page
    makes and every script error, both checked when the test ends."""

    def __init__(self, browser: Any, url: str):
        self.url = url
        self.context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 800})
        self.page = self.context.new_page()
        self.requests: list[Any] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))

    def open(self) -> Any:
        self.page.goto(self.url + "/")
        self.page.wait_for_selector("html[data-ready=true]")
        return self.page

    def settings(self, **fields: str) -> None:
        pg = self.page
        if pg.get_attribute("#toggle-settings", "aria-expanded") != "true":
            pg.click("#toggle-settings")
        for name, value in fields.items():
            target = "#" + name if name in ("tools", "system", "api-key") else "#s-" + name
            pg.fill(target, value)
            pg.dispatch_event(target, "change")

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def wait_answer(self, n: int = 1) -> Any:
        """The n-th assistant answer, once it has finished (its stats line is shown)."""
        self.page.wait_for_selector(f".msg.assistant >> nth={n - 1} >> .meta", timeout=60_000)
        return self.page.locator(".msg.assistant").nth(n - 1)

    def stored(self) -> list[dict[str, Any]]:
        return json.loads(self.page.evaluate("localStorage.getItem('devstral.conversations')") or "[]")

    def shot(self, name: str) -> None:
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(SHOTS) / name))

    def close(self) -> None:
        self.context.close()
        foreign = [r.url for r in self.requests if not (r.url.startswith(self.url + "/") or r.url.startswith("blob:"))]
        assert not foreign, f"the page reached beyond its own origin: {foreign}"
        assert not self.errors, f"script errors: {self.errors}"


@pytest.fixture
def chat(browser):
    page = Page(browser, nano().url)
    yield page
    page.close()


def nano_ids(text: str) -> list[int]:
    """Token ids of `text`, with [THINK]/[/THINK] as the control tokens the model emits."""
    tok = nano().llm.tokenizer
    ids: list[int] = []
    for piece in text.replace("[/THINK]", "\0[/THINK]\0").replace("[THINK]", "\0[THINK]\0").split("\0"):
        if piece in ("[THINK]", "[/THINK]"):
            ids.append(tok.special_id(piece))
        elif piece:
            ids += tok.encode(piece)
    return ids


def call_ids(name: str, arguments: str, content: str = "") -> list[int]:
    tok = nano().llm.tokenizer
    return [*(tok.encode(content) if content else []), tok.special_id("[TOOL_CALLS]"), *tok.encode(name),
            tok.special_id("[ARGS]"), *tok.encode(arguments)]


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


# ---------------------------------------------------------------- serving the page (no browser)
def test_root_is_the_page_for_browsers_and_text_for_probes():
    url = nano().url
    page = httpx.get(url + "/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = {d.split()[0]: d.split()[1:] for d in page.headers["content-security-policy"].split("; ")}
    assert csp["default-src"] == ["'none'"] and csp["script-src"] == ["'self'"] and csp["connect-src"] == ["'self'"]
    assert csp["require-trusted-types-for"] == ["'script'"] and csp["frame-ancestors"] == ["'none'"]
    assert page.headers["x-content-type-options"] == "nosniff"
    probe = httpx.get(url + "/")  # curl, liveness probes, Ollama tools: the one line as before
    assert probe.text == "devstral is running"
    js = httpx.get(url + "/web/main.js")
    assert js.headers["content-type"].startswith("text/javascript")
    again = httpx.get(url + "/web/main.js", headers={"If-None-Match": js.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    for bad in ("/web/nope.js", "/web/..%2Fweb_routes.py", "/web/%2e%2e%2fapp.py"):
        assert httpx.get(url + bad).status_code == 404, bad


def test_the_page_needs_no_key_but_the_api_behind_it_does():
    url = strict().url
    assert httpx.get(url + "/", headers={"Accept": "text/html"}).status_code == 200
    assert httpx.get(url + "/web/sse.js").status_code == 200
    assert httpx.get(url + "/props").status_code == 401
    assert httpx.get(url + "/props", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    # the Host/Origin guard covers the page too (DNS rebinding)
    assert httpx.get(url + "/", headers={"Host": "evil.example", "Accept": "text/html"}).status_code == 403


def test_props_reports_devstrals_recommended_sampling_and_the_context():
    props = httpx.get(nano().url + "/props").json()
    params = props["default_generation_settings"]["params"]
    # Mistral's recommended sampling for Devstral (the model card), which the README promises
    assert (params["temperature"], params["top_k"], params["top_p"], params["min_p"]) == (0.15, 64, 0.95, 0.01)
    assert props["default_generation_settings"]["n_ctx"] == 1024 and props["total_slots"] == 4
    assert props["modalities"]["vision"] is False  # nano has no vision encoder: images are refused


# ---------------------------------------------------------------- chatting
def test_answer_streams_in_as_markdown_and_html_in_it_stays_text(chat):
    pg = chat.open()
    answer = ("Hello **world** <img src=x onerror=window.__pwned=1><script>window.__pwned=2</script>\n\n"
              "[click](javascript:window.__pwned=3) and [docs](https://example.com/a?b=1)\n\n"
              "```python\ndef f(x):\n    return '<b>' # done\n```\n")
    ids = nano_ids(answer)
    chat.settings(max_tokens=str(len(ids) + 5))
    # count the renders of the answer while it streams: more than one means it streamed in
    pg.evaluate("""() => { window.__renders = 0; new MutationObserver(() => window.__renders++)
        .observe(document.getElementById('messages'), {childList: true, subtree: true}); }""")
    with forced_output(ids):
        chat.send("Show me some markdown")
        msg = chat.wait_answer()
    assert pg.evaluate("window.__renders") > 3
    tok = nano().llm.tokenizer
    assert chat.stored()[0]["messages"][1]["content"] == tok.decode(ids)  # every delta arrived, in order
    body = msg.locator(".body")
    assert body.locator("strong").inner_text() == "world"
    assert "<img src=x onerror=window.__pwned=1><script>" in body.inner_text()
    assert body.locator("img, script").count() == 0 and pg.evaluate("window.__pwned") is None
    links = body.locator("a")
    assert [links.nth(i).get_attribute("href") for i in range(links.count())] == ["https://example.com/a?b=1"]
    assert "[click](javascript:window.__pwned=3)" in body.inner_text()
    code = body.locator("pre code")
    assert code.inner_text() == "def f(x):\n    return '<b>' # done"
    assert body.locator(".tok-keyword").first.inner_text() == "def"
    assert body.locator(".tok-comment").inner_text() == "# done"
    pg.click("#toggle-settings")  # closed for the picture
    chat.shot("web_chat.png")
    meta = msg.locator(".meta").inner_text()
    # usage counts the end-of-sequence token that ended the answer too
    assert f"{len(ids) + 1} tokens" in meta and "tok/s" in meta and "context" in meta
    # Trusted Types are enforced: no string can become HTML on this page, whatever a script does
    assert "TrustedHTML" in pg.evaluate("() => { try { document.body.innerHTML = '<b>x</b>'; return 'set' } "
                                        "catch (e) { return String(e) } }")
    assert chat.errors == ["This document requires 'TrustedHTML' assignment. The action has been blocked."]
    chat.errors.clear()  # that one was provoked


def test_reasoning_is_folded_and_the_answer_shown(chat):
    chat.open()
    ids = nano_ids("[THINK]The user wants a number.[/THINK]It is **42**.")
    with forced_output(ids):
        chat.send("Think, then answer")
        msg = chat.wait_answer()
    think = msg.locator("details.think")
    assert think.get_attribute("open") is None  # folded
    assert think.locator("summary").inner_text() == "Thought"
    assert "The user wants a number." in think.text_content()
    assert msg.locator(".body > p strong").inner_text() == "42"
    assert "[THINK]" not in msg.inner_text()


def test_a_tool_call_is_shown_and_its_result_goes_back_to_the_model(chat):
    pg = chat.open()
    chat.settings(tools=json.dumps(WEATHER))
    posted: list[dict[str, Any]] = []
    pg.on("request", lambda r: r.url.endswith("/v1/chat/completions") and posted.append(json.loads(r.post_data)))
    with forced_output(call_ids("get_weather", '{"city": "Paris"}', content="Let me check.")):
        chat.send("Weather in Paris?")
        msg = chat.wait_answer()
    call = msg.locator("details.tool-call")
    assert call.locator("summary").inner_text() == "Tool call: get_weather"
    assert json.loads(call.locator("pre").inner_text()) == {"city": "Paris"}
    assert "tool_calls" in msg.locator(".meta").inner_text()  # the finish reason
    assert posted[0]["tools"] == WEATHER
    chat.shot("web_chat_tool_call.png")
    call.locator("textarea").fill('{"temp_c": 18}')
    with forced_output(nano_ids("It is 18 °C in Paris.")):
        call.locator("button[type=submit]").click()
        chat.wait_answer(2)
    stored_call = chat.stored()[0]["messages"][1]["tool_calls"][0]
    assert posted[1]["messages"][-2]["tool_calls"][0]["id"] == stored_call["id"] and stored_call["id"]
    assert posted[1]["messages"][-1] == {"role": "tool", "tool_call_id": stored_call["id"], "content": '{"temp_c": 18}'}
    result = pg.locator(".msg.tool details.tool-result")
    assert result.locator("summary").inner_text() == "Result of get_weather"
    assert "18 °C" in pg.locator(".msg.assistant").nth(1).inner_text()


def test_stop_ends_the_answer_and_frees_the_slot(chat):
    pg = chat.open()
    ids = nano_ids(" word") * 900  # far longer than the wait below
    chat.settings(max_tokens="950")
    server = nano()
    with forced_output(ids):
        chat.send("Talk for a long time")
        pg.wait_for_function("() => (document.querySelector('.msg.assistant .body')?.textContent || '').length > 20",
                             timeout=60_000)
        assert httpx.get(server.url + "/health").json()["slots_processing"] >= 1
        pg.click("#stop")
        msg = chat.wait_answer()
        health = wait_idle(server)
    assert health["slots_processing"] == 0 and health["queue_depth"] == 0
    assert "stopped" in msg.locator(".meta").inner_text()
    assert pg.locator("#stop").is_hidden() and pg.locator("#send").is_enabled()
    kept = chat.stored()[0]["messages"][1]["content"]
    assert 0 < len(kept) < len(" word") * 900 and " word word" in kept


def test_the_conversation_survives_a_reload_and_exports_as_finetune_data(chat, tmp_path):
    from devstral.train.data import load_examples

    pg = chat.open()
    chat.settings(system="You answer briefly.")
    with forced_output(nano_ids("Paris is the capital of France.")):
        chat.send("What is the capital of France?")
        chat.wait_answer()
    pg.reload()
    pg.wait_for_selector("html[data-ready=true]")
    assert pg.locator("#conversations .conv").first.inner_text() == "What is the capital of France?"
    assert pg.locator(".msg.user").inner_text().endswith("What is the capital of France?")
    assert "Paris is the capital of France." in pg.locator(".msg.assistant").inner_text()
    assert pg.input_value("#system") == "You answer briefly."
    with pg.expect_download() as download:
        pg.click("#export")
    path = tmp_path / "chats.jsonl"
    download.value.save_as(path)
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["messages"] == [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."}]
    examples, stats = load_examples(path, nano().llm.tokenizer, max_seq_len=1024)
    assert stats.examples == 1 and examples[0].n_labels > 0


def test_fill_in_the_middle_streams_the_middle_and_stays_out_of_the_chat(chat, tmp_path):
    pg = chat.open()
    posted: list[tuple[str, dict[str, Any]]] = []
    pg.on("request", lambda r: r.method == "POST" and posted.append((r.url, json.loads(r.post_data))))
    pg.select_option("#mode", "fim")
    assert pg.locator("#suffix").is_visible()
    pg.fill("#prompt", "def add(a, b):\n    return ")
    pg.press("#prompt", "Enter")  # a new line in code, not a send
    assert pg.locator(".msg").count() == 0
    pg.fill("#prompt", "def add(a, b):\n    return ")
    pg.fill("#suffix", "\n\nprint(add(1, 2))\n")
    with forced_output(nano_ids("a + b")):
        pg.press("#prompt", "Control+Enter")
        msg = chat.wait_answer()
    assert posted[-1][0].endswith("/v1/fim/completions")
    assert posted[-1][1]["prompt"] == "def add(a, b):\n    return " and posted[-1][1]["suffix"] == "\n\nprint(add(1, 2))\n"
    assert msg.locator("figure.middle pre code").inner_text() == "a + b"
    assert pg.locator(".msg.user .who").inner_text() == "You: fill in the middle"
    # then a chat turn in the same conversation: the FIM turn is not sent as history, nor exported
    pg.select_option("#mode", "chat")
    with forced_output(nano_ids("Hi.")):
        chat.send("hello")
        chat.wait_answer(2)
    assert posted[-1][1]["messages"] == [{"role": "user", "content": "hello"}]
    with pg.expect_download() as download:
        pg.click("#export")
    path = tmp_path / "chats.jsonl"
    download.value.save_as(path)
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["messages"] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi."}]


def test_a_server_with_an_api_key_asks_for_it_and_gets_it(browser):
    chat = Page(browser, strict().url)
    pg = chat.open()
    pg.wait_for_selector("#error:not([hidden])")
    assert "API key" in pg.inner_text("#error")
    assert pg.locator("#api-key").is_visible()  # settings opened on the key
    chat.settings(**{"api-key": API_KEY})
    pg.wait_for_function("() => document.querySelector('#model').value !== ''")
    assert pg.input_value("#model") == ALIAS and pg.locator("#error").is_hidden()
    chat.settings(max_tokens="4")
    chat.send("hello")
    chat.wait_answer()
    sent = [r for r in chat.requests if r.url.endswith("/v1/chat/completions")]
    assert sent and sent[0].headers["authorization"] == f"Bearer {API_KEY}"
    chat.errors = [e for e in chat.errors if "401" not in e]  # the first, keyless calls: the expected 401s
    chat.close()


def test_metrics_view_plots_what_the_server_reports(chat):
    pg = chat.open()
    pg.click("#tab-metrics")
    assert pg.locator("#chat-view").is_hidden()
    server = nano()
    # a request runs while the view polls: the plots show it running, then the speed it generates at
    body = {"model": "nano", "messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 950}
    with forced_output(nano_ids(" word") * 900), httpx.Client(base_url=server.url, timeout=60) as client, \
            client.stream("POST", "/v1/chat/completions", json=body) as running:
        lines = running.iter_lines()
        next(lines)  # generating now
        pg.wait_for_function("() => document.querySelector('[data-series=active] output').textContent === '1'",
                             timeout=30_000)
        pg.wait_for_function("() => parseFloat(document.querySelector('[data-series=tps] output').textContent) > 0",
                             timeout=30_000)
        chat.shot("web_chat_metrics.png")
    wait_idle(server)
    pg.wait_for_function("() => document.querySelector('[data-series=active] output').textContent === '0'",
                         timeout=30_000)
    metrics = httpx.get(server.url + "/metrics").text
    expected = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                if line and not line.startswith("#") and "{" not in line}
    assert pg.inner_text("[data-series=queue] output") == str(int(expected["devstral_queue_depth"]))
    assert pg.inner_text("[data-metrics-status]").startswith(f"slots 0/{int(expected['devstral_slots_total'])}")
    hit = pg.inner_text("[data-series=hit] output")
    assert hit == f"{100 * expected['devstral_prefix_cache_hit_rate']:.1f} %"
    points = pg.get_attribute("[data-series=active] polyline", "points").split()
    assert len(points) >= 3 and {p.split(",")[1] for p in points} != {points[0].split(",")[1]}  # it moved
    pg.click("#tab-chat")
    assert pg.locator("#metrics-view").is_hidden()


def test_every_control_has_an_accessible_name(chat):
    pg = chat.open()
    chat.settings()
    unnamed = pg.evaluate("""() => [...document.querySelectorAll('button, input, select, textarea')]
        .filter((el) => el.checkVisibility())
        .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
        .map((el) => el.outerHTML.slice(0, 80))""")
    assert unnamed == []


# ---------------------------------------------------------------- the page's JS, against oracles
def test_sse_and_tool_call_deltas_parse_as_openais_client_parses_them(chat):
    """Our server's SSE bytes for a streamed tool call (with multi-byte text), cut at random points and
    with CRLF or CR line ends, read by the page's parser and accumulator; openai's SSE decoder and
    ChatCompletionStreamState read the same bytes."""
    from openai._streaming import SSEDecoder
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    pg = chat.open()
    body = {"model": "nano", "stream": True, "stream_options": {"include_usage": True}, "tools": WEATHER,
            "messages": [{"role": "user", "content": "weather?"}], "max_tokens": 60}
    with forced_output(call_ids("get_weather", '{"city": "Zürich 🌧"}', content="Héllo — 東京 ✓")):
        raw = httpx.post(nano().url + "/v1/chat/completions", json=body, timeout=60).content
    variants = [raw, raw.replace(b"\n", b"\r\n"), raw.replace(b"\n", b"\r")]
    rng = random.Random(7)
    cases = []
    for data in variants:
        for _ in range(6):
            cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 40)))
            cases.append([list(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)])
    cases.append([[byte] for byte in raw])  # one byte at a time: every UTF-8 character split
    got = pg.evaluate("""async (cases) => {
        const { SSEParser, ChatAccumulator } = await import('/web/sse.js');
        return cases.map((chunks) => {
            const parser = new SSEParser(), acc = new ChatAccumulator(), events = [];
            for (const c of chunks) events.push(...parser.feed(new Uint8Array(c)));
            events.push(...parser.end());
            for (const e of events) if (e.data !== '[DONE]') acc.apply(JSON.parse(e.data));
            return { data: events.map((e) => e.data), message: acc.message, finish: acc.finishReason,
                     usage: acc.usage };
        });
    }""", cases)
    expected_data = [e.data for e in SSEDecoder().iter_bytes(iter([raw]))]
    state = ChatCompletionStreamState()
    for data in expected_data[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate_json(data))
    final = state.get_final_completion()
    ref = final.choices[0].message
    assert ref.tool_calls and ref.content == "Héllo — 東京 ✓"  # the oracle saw a call: the case is real
    for result in got:
        assert result["data"] == expected_data
        assert result["message"]["content"] == ref.content
        assert [(c["id"], c["type"], c["function"]["name"], c["function"]["arguments"])
                for c in result["message"]["tool_calls"]] == \
               [(c.id, c.type, c.function.name, c.function.arguments) for c in ref.tool_calls]
        assert result["finish"] == final.choices[0].finish_reason == "tool_calls"
        assert result["usage"]["completion_tokens"] == final.usage.completion_tokens


def test_sse_parser_reads_every_line_form_as_openais_decoder_does(chat):
    """Multi-line data, comments, named events, "data" without a colon or a space, at every split point
    and with every line end: the JS parser and openai's SSEDecoder agree event by event."""
    from openai._streaming import SSEDecoder

    pg = chat.open()
    raw = (": keep-alive\ndata: first\ndata:second line\n\nevent: update\nid: 7\ndata: {\"a\": \"ü\"}\n\n"
           "data\n\ndata:  two spaces\n\nretry: 100\ndata: é🌍\n\n").encode()
    streams = [raw, raw.replace(b"\n", b"\r\n"), raw.replace(b"\n", b"\r")]
    cases = [(k, [list(data[:i]), list(data[i:])]) for k, data in enumerate(streams) for i in range(len(data) + 1)]
    got = pg.evaluate("""async (cases) => {
        const { SSEParser } = await import('/web/sse.js');
        return cases.map(([k, chunks]) => {
            const parser = new SSEParser(), events = [];
            for (const c of chunks) events.push(...parser.feed(new Uint8Array(c)));
            events.push(...parser.end());
            return events.map((e) => [e.event, e.data]);
        });
    }""", cases)
    for (k, _), events in zip(cases, got, strict=True):
        expected = [[e.event or "message", e.data] for e in SSEDecoder().iter_bytes(iter([streams[k]]))]
        assert len(expected) == 5 and events == expected


MARKUP = st.lists(st.sampled_from([
    "<script>window.__pwned=1</script>", "<img src=x onerror=window.__pwned=1>", "<a href='javascript:x'>",
    "[x](javascript:window.__pwned=1)", "![i](https://example.com/t.png)", "[ok](https://example.com)",
    "<https://a.example>", "**", "*", "_", "`", "```", "```js\n", "~~", "# ", "> ", "- ", "1. ", "| a | b |\n|---|---|\n",
    "\n", "\n\n", "    ", "&amp;", "&lt;b&gt;", '"', "'", "\\", "[", "]", "(", ")", "<", ">", "text", "x y", "é🌍",
    "<svg onload=window.__pwned=1>", "<iframe src=//evil>", "- [x] ", "---\n", "http://x.example/p?q=<b>"]),
    max_size=25).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(MARKUP, min_size=5, max_size=5))
def test_markdown_never_makes_unsafe_elements(chat_page, texts):
    found = chat_page.evaluate("""async (texts) => {
        const { renderMarkdown } = await import('/web/markdown.js');
        const out = [];
        for (const text of texts) {
            const box = document.createElement('div');
            box.append(renderMarkdown(text));
            document.body.append(box);  // attached, so anything that could load or run would
            const els = [...box.querySelectorAll('*')];
            out.push({ tags: [...new Set(els.map((e) => e.tagName))],
                       attrs: [...new Set(els.flatMap((e) => [...e.attributes].map((a) => a.name)))],
                       hrefs: els.filter((e) => e.tagName === 'A').map((e) => e.getAttribute('href')) });
            box.remove();
        }
        return { out, pwned: window.__pwned ?? null };
    }""", texts)
    assert found["pwned"] is None
    for text, r in zip(texts, found["out"], strict=True):
        assert set(r["tags"]) <= SAFE_TAGS, (text, r)
        assert set(r["attrs"]) <= {"href", "rel", "target", "class", "title", "type", "aria-label", "data-lang",
                                   "start", "style", "disabled", "checked"}, (text, r)
        assert all(h.startswith(("https://", "http://", "mailto:")) for h in r["hrefs"]), (text, r)


PLAIN = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"),
                              exclude_characters="*_`[]!~#>|-+\\.)(<:/0123456789=&\ufeff"), min_size=1, max_size=60)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(PLAIN.filter(lambda s: s.strip()), min_size=3, max_size=3), code=st.text(max_size=200),
       lang=st.sampled_from(["python", "js", "bash", "json", "rust", "sql", "yaml", "diff", "", "nonsense"]))
def test_text_and_code_come_through_unchanged(chat_page, lines, code, lang):
    """Plain text keeps every character; a fenced block's code, coloured, keeps every character too."""
    code = code.replace("\r", "")
    code = "\n".join(line for line in code.split("\n") if not line.lstrip().startswith(("```", "~~~")))
    r = chat_page.evaluate("""async ([lines, code, lang]) => {
        const { renderMarkdown } = await import('/web/markdown.js');
        const { highlight } = await import('/web/highlight.js');
        const para = lines.map((l) => { const d = document.createElement('div'); d.append(renderMarkdown(l));
                                        return d.textContent; });
        const d = document.createElement('div');
        d.append(renderMarkdown('```' + lang + '\\n' + code + '\\n```'));
        const h = document.createElement('pre');
        h.append(highlight(code, lang));
        return { para, fenced: d.querySelector('pre code').textContent, highlighted: h.textContent };
    }""", [lines, code, lang])
    assert r["para"] == [line.strip() for line in lines]
    assert r["fenced"] == code and r["highlighted"] == code


@pytest.fixture
def chat_page(chat):
    return chat.open()
