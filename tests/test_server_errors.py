"""Every row of the bad-input table: the answer's status and shape, and the server keeps serving."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest

from test_server_harness import ALIAS, API_KEY, BODY_LIMIT, CTX, live, strict, wait_idle

ASK = [{"role": "user", "content": "hi"}]


def post(path: str, body=None, *, server=None, content: bytes | None = None, headers=None) -> httpx.Response:
    server = server or live()
    with server.client(headers=headers or {}) as c:
        if content is not None:
            return c.post(path, content=content, headers={"content-type": "application/json"})
        return c.post(path, json=body)


def assert_openai_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and isinstance(err["message"], str)
    for word in words:
        assert word in err["message"], err["message"]
    return err


@pytest.fixture(autouse=True)
def still_serving():
    yield
    r = post("/v1/completions", {"prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert wait_idle(live())["slots_processing"] == 0


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2", b'{"messages": [}'])
def test_malformed_json_is_400(content):
    err = assert_openai_error(post("/v1/chat/completions", content=content), 400)
    assert "JSON" in err["message"] or "body" in err["message"]


@pytest.mark.parametrize(("body", "field"), [
    ({"model": "tiny"}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": ASK, "temperature": "hot"}, "temperature"),
    ({"messages": ASK, "top_p": 0}, "top_p"),
    ({"messages": ASK, "max_tokens": 0}, "max_tokens"),
    ({"messages": ASK, "n": 17}, "n"),
    ({"messages": ASK, "top_logprobs": 99, "logprobs": True}, "top_logprobs"),
    ({"messages": ASK, "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": ASK, "stop": ["x"] * 17}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages.0.content.0"),  # the model is text-only
])
def test_missing_or_invalid_fields_name_the_field(body, field):
    err = assert_openai_error(post("/v1/chat/completions", body), 400, field)
    assert err["param"] == field


def test_openai_client_raises_bad_request_naming_the_field():
    c = openai.OpenAI(base_url=live().url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="hi", temperature=-1)
    assert "temperature" in str(e.value)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_context_overflow_is_400_with_both_token_counts(path):
    body = {"messages": ASK} if path.endswith("chat/completions") else {"prompt": "hi"}
    r = post(path, {**body, "max_tokens": CTX})
    err = assert_openai_error(r, 400, f"max_tokens is {CTX}", f"context size of {CTX}")
    assert err["code"] == "context_length_exceeded"
    assert any(ch.isdigit() for ch in err["message"].split("tokens")[0])  # the prompt's count comes first
    long_prompt = "word " * (CTX * 2)
    r = post("/v1/completions", {"prompt": long_prompt})
    assert_openai_error(r, 400, f"context size of {CTX}")


def test_ollama_context_overflow_is_400_in_ollama_shape():
    r = post("/api/generate", {"model": "tiny", "prompt": "hi", "raw": True, "options": {"num_predict": CTX}})
    assert r.status_code == 400 and f"context size of {CTX}" in r.json()["error"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"])
def test_unknown_model_is_404(path):
    body = {"model": "gpt-17", "messages": ASK, "prompt": "hi"}
    r = post(path, body)
    assert r.status_code == 404
    msg = r.json()["error"] if path.startswith("/api/") else r.json()["error"]["message"]
    assert "gpt-17" in str(msg)
    assert httpx.get(live().url + "/v1/models/gpt-17").status_code == 404


def test_api_key_is_required_when_set():
    server = strict()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = post("/v1/completions", {"prompt": "hi", "max_tokens": 1}, server=server, headers=headers)
        assert_openai_error(r, 401, "API key")
    r = post("/api/tags", server=server)
    assert r.status_code == 401 or r.status_code == 405
    assert httpx.get(server.url + "/api/tags").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert ok.completions.create(model=ALIAS, prompt="hi", max_tokens=1).model == ALIAS
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_oversized_body_is_413():
    auth = {"Authorization": f"Bearer {API_KEY}"}
    big = {"model": ALIAS, "prompt": "x" * (BODY_LIMIT + 10), "max_tokens": 1}
    assert_openai_error(post("/v1/completions", big, server=strict(), headers=auth), 413, str(BODY_LIMIT))

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b"y" * 1024
        yield b'"}'

    with strict().client(headers=auth) as c:
        r = c.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413)
    r = post("/api/generate", {"model": ALIAS, "prompt": "x" * (BODY_LIMIT + 10)}, server=strict(), headers=auth)
    assert r.status_code == 413 and "limit" in r.json()["error"]


@pytest.mark.parametrize(("tools", "tool_choice", "words"), [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 5}}}], None,
     ["tools.0.function.parameters", "invalid JSON Schema"]),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "strng"}}}], None, ["tools.0"]),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None, ["object"]),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, ["tools.0.function.name"]),
    ([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}], None,
     ["duplicate"]),
    ([{"type": "retrieval", "function": {"name": "f"}}], None, ["tools.0.type"]),
    ([{"type": "function", "function": {"name": "f"}}], {"type": "function", "function": {"name": "g"}},
     ["tool_choice", "'g'"]),
    (None, "required", ["tool_choice"]),
])
def test_invalid_tool_schemas_are_400(tools, tool_choice, words):
    body = {"messages": ASK, "tools": tools, "max_tokens": 1}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    assert_openai_error(post("/v1/chat/completions", body), 400, *words)


def test_ollama_validation_errors_use_ollama_shape():
    r = post("/api/chat", {"messages": ASK})
    assert r.status_code == 400 and "model" in r.json()["error"]
    r = post("/api/chat", {"model": "tiny", "messages": ASK, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "x"}}}]})
    assert r.status_code == 400 and "invalid JSON Schema" in r.json()["error"]


@contextmanager
def held_generation():
    """Samplers that block until released: a request holds its slot for as long as the test wants."""
    from devstral.testing import patched_sampler

    release = threading.Event()

    def held(logits, params, history):
        release.wait(30)
        return 1100

    try:
        with patched_sampler(held):
            yield
    finally:
        release.set()


def test_full_queue_is_503_with_retry_after():
    server, auth = strict(), {"Authorization": f"Bearer {API_KEY}"}
    answers: list[int] = []

    def hold() -> None:
        with server.client(headers=auth) as c:
            answers.append(c.post("/v1/completions", json={"prompt": "hold the slot", "max_tokens": 4}).status_code)

    holder = threading.Thread(target=hold)
    with held_generation(), server.client(headers=auth) as c:
        holder.start()
        deadline = time.monotonic() + 10
        while c.get("/health").json()["slots_processing"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert_openai_error(r, 503, "busy")
        assert int(r.headers["Retry-After"]) > 0
    holder.join(30)
    assert answers == [200]  # the request holding the slot was served normally
    assert wait_idle(server)["slots_processing"] == 0
    with server.client(headers=auth) as c:
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_unsupported_features_are_refused_not_ignored():
    assert_openai_error(post("/v1/completions", {"prompt": [1, 2], "suffix": "b"}), 400, "suffix")


def test_unknown_route_and_method_keep_the_error_shape():
    assert_openai_error(httpx.get(live().url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(live().url + "/v1/chat/completions"), 405)


def test_detokenize_out_of_range_and_tokenize_round_trip():
    assert_openai_error(post("/detokenize", {"tokens": [10**9]}), 400, "out of range")
    ids = post("/tokenize", {"content": "hello world"}).json()["tokens"]
    assert post("/detokenize", {"tokens": ids}).json()["content"] == "hello world"
    pieces = post("/tokenize", {"content": "hello", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "hello"
    prompt = post("/apply-template", {"messages": ASK}).json()
    assert prompt["tokens"] == live().llm.tokenizer.encode_chat(ASK) and "[INST]" in prompt["prompt"]
