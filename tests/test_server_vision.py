"""Images over HTTP: the real `openai` client (image_url data URLs) and `ollama` client (`images`)
against a server running a tiny Mistral 3 (vision) checkpoint; bad images are 400s naming the field
and the server keeps serving; remote URLs only with --allow-remote-images."""

from __future__ import annotations

import atexit
import base64
import functools
import http.server
import shutil
import tempfile
import threading
from pathlib import Path

import httpx
import ollama
import openai
import pytest

import devstral
from devstral.engine.sampling import SamplingParams
from test_server_harness import _start, live
from test_vision import ask, png


@functools.cache
def vision_server():
    from devstral.testing import make_tiny_checkpoint

    root = Path(tempfile.mkdtemp(prefix="devstral-vision-"))
    atexit.register(shutil.rmtree, root, True)
    ckpt = make_tiny_checkpoint(root / "m3", arch="ministral3", wrap_mistral3=True, seed=3)
    server = _start(llm=devstral.load(ckpt, max_context=512, backend="torch"), model_id="m3", parallel=2)
    reference = devstral.load(ckpt, max_context=512, backend="torch")
    return server, reference


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_image_url_equals_llm_chat():
    server, reference = vision_server()
    messages = ask(png(37, 53, 1))
    ref = reference.chat(messages, sampling=SamplingParams(temperature=0, max_tokens=8))
    r = client(server.url).chat.completions.create(model="m3", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == ref.message["content"]
    assert r.usage.prompt_tokens == ref.usage["prompt_tokens"] > 40  # the image's tokens are in the prompt
    # streamed, the same text
    chunks = client(server.url).chat.completions.create(model="m3", messages=messages, max_tokens=8, temperature=0,
                                                         stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.message["content"]


def test_responses_api_input_image_equals_llm_chat():
    """The Responses API (what Codex-style agents send screenshots through): input_image parts with the
    real openai client give the answer of the same image as a chat image_url part; a follow-up turn by
    previous_response_id still has the image; bad parts are 400s naming input.I.content.J."""
    from test_vision import data_url

    server, reference = vision_server()
    image = png(37, 53, 1)
    ref = reference.chat(ask(image), sampling=SamplingParams(temperature=0, max_tokens=8))
    r = client(server.url).responses.create(model="m3", temperature=0, max_output_tokens=8, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": data_url(image), "detail": "auto"},
                                     {"type": "input_text", "text": ask(image)[0]["content"][-1]["text"]}]}])
    assert r.output_text == ref.message["content"]
    assert r.usage.input_tokens == ref.usage["prompt_tokens"] > 40
    follow = client(server.url).responses.create(model="m3", temperature=0, max_output_tokens=2,
                                                 previous_response_id=r.id, input="And the colours?")
    assert follow.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens
    for part, message in (({"type": "input_image", "file_id": "file-1"}, "file_id is not supported"),
                          ({"type": "input_image", "image_url": "https://example.com/a.png"}, "--allow-remote-images"),
                          ({"type": "input_image", "image_url": data_url(b"nope")}, "not an image")):
        r = httpx.post(server.url + "/v1/responses", timeout=60, json={
            "model": "m3", "input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}, part]}]})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        assert r.json()["error"]["message"].startswith("input.0.content.1")
    r = httpx.post(live().url + "/v1/responses", timeout=60, json={"model": "tiny", "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": data_url(png(8, 8))}]}]})
    assert r.status_code == 400 and "text-only" in r.json()["error"]["message"]


def test_ollama_client_images_equal_the_openai_request():
    server, reference = vision_server()
    data = png(30, 20, 2)
    ref = reference.chat(ask(data, text="Describe it."), sampling=SamplingParams(temperature=0, max_tokens=8))
    r = ollama.Client(host=server.url).chat(model="m3", messages=[{"role": "user", "content": "Describe it.",
                                                                   "images": [data]}],
                                            options={"temperature": 0, "num_predict": 8}, stream=False)
    assert r.message.content == ref.message["content"] and r.prompt_eval_count == ref.usage["prompt_tokens"]
    g = ollama.Client(host=server.url).generate(model="m3", prompt="Describe it.", images=[data],
                                                options={"temperature": 0, "num_predict": 8})
    assert g.response == ref.message["content"]


def test_apply_template_shows_image_tokens_as_mistral_common():
    """llama.cpp's /apply-template: an image part is the [IMG]... run the model sees, ids and text equal
    mistral-common's; a remote URL without --allow-remote-images is the chat route's 400."""
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from test_vision import mistral_common_encoding

    server, reference = vision_server()
    messages = [{"role": "system", "content": "Be brief."}, *ask(png(37, 53, 1), png(20, 30, 2))]
    r = httpx.post(server.url + "/apply-template", json={"messages": messages}, timeout=60)
    assert r.status_code == 200, r.text
    ref = mistral_common_encoding(reference.path, messages).tokens
    assert r.json()["tokens"] == ref
    assert r.json()["prompt"] == MistralTokenizer.from_file(str(reference.path / "tekken.json")).decode(
        ref, special_token_policy=SpecialTokenPolicy.KEEP)
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    r = httpx.post(server.url + "/apply-template", json={"messages": remote}, timeout=60)
    assert r.status_code == 400 and "--allow-remote-images" in r.json()["error"]["message"]
    r = httpx.post(live().url + "/apply-template", json={"messages": ask(png(8, 8))}, timeout=60)
    assert r.status_code == 400 and "text-only" in r.json()["error"]["message"]


@pytest.mark.parametrize("url, field, message", [
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "messages.0.content.0",
     "not an image in a supported format"),
    ("data:image/png;base64," + base64.b64encode(png(40, 40)[:-60]).decode(), "messages.0.content.0",
     "corrupt or truncated"),
    ("https://example.com/cat.png", "messages.0.content.0", "--allow-remote-images"),
])
def test_bad_images_are_400_and_the_server_keeps_serving(url, field, message):
    server, _ = vision_server()
    body = {"model": "m3", "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "hi"}]}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and "\n" not in error["message"]
    assert field in error["message"] or error.get("param") == field
    ok = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                    json={"model": "m3", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200


def test_ollama_show_says_vision():
    """Ollama clients look for the "vision" capability before they offer to attach an image."""
    server, _ = vision_server()
    assert "vision" in ollama.Client(host=server.url).show("m3").capabilities
    assert "vision" not in ollama.Client(host=live().url).show("tiny").capabilities


def test_too_many_images_are_400_and_the_server_keeps_serving():
    """More images than one request takes, or more image tokens than the context holds: one 400 each."""
    server, _ = vision_server()
    many = ask(*[png(24, 24, i) for i in range(17)])
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "m3", "max_tokens": 2, "messages": many},
                   timeout=60)
    assert r.status_code == 400 and "more than 16 images" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages.0.content.16"
    big = ask(*[png(200, 200, i) for i in range(12)])  # ~870 tokens of images in a 512-token context
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "m3", "max_tokens": 2, "messages": big},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "exceeds the context size of 512" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/api/chat", timeout=60, json={"model": "m3", "stream": False, "messages": [
        {"role": "user", "content": "x", "images": [base64.b64encode(png(200, 200, i)).decode() for i in range(12)]}]})
    assert r.status_code == 400 and "context" in r.json()["error"]
    ok = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                    json={"model": "m3", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200


def test_ollama_bad_image_names_the_field():
    server, _ = vision_server()
    r = httpx.post(server.url + "/api/chat", timeout=60, json={
        "model": "m3", "stream": False, "messages": [{"role": "user", "content": "x", "images": ["@@@"]}]})
    assert r.status_code == 400 and "messages.0.images.0" in r.json()["error"] and "base64" in r.json()["error"]


def test_text_only_server_refuses_images():
    r = httpx.post(live().url + "/v1/chat/completions", timeout=60, json={"model": "tiny", "messages": ask(png(8, 8))})
    assert r.status_code == 400 and "text-only" in r.json()["error"]["message"]
    r = httpx.post(live().url + "/api/chat", timeout=60, json={
        "model": "tiny", "stream": False,
        "messages": [{"role": "user", "content": "x", "images": [base64.b64encode(png(8, 8)).decode()]}]})
    assert r.status_code == 400 and "text-only" in r.json()["error"]


def test_allow_remote_images_fetches_http_urls():
    """Only with the flag, and here from a server on 127.0.0.1: the fetched image gives the answer the
    same image as a data URL gives."""
    _, reference = vision_server()
    data = png(24, 24, 7)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=images.serve_forever, daemon=True)
    thread.start()
    try:
        server = _start(llm=reference, model_id="m3", allow_remote_images=True)
        url = f"http://127.0.0.1:{images.server_address[1]}/shot.png"
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "What is in this image?"}]}]
        r = client(server.url).chat.completions.create(model="m3", messages=messages, max_tokens=6, temperature=0)
        same = client(server.url).chat.completions.create(model="m3", messages=ask(data), max_tokens=6, temperature=0)
        assert r.choices[0].message.content == same.choices[0].message.content
        assert r.usage.prompt_tokens == same.usage.prompt_tokens
        server.server.should_exit = True
    finally:
        images.shutdown()
