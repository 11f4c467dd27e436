"""Hybrid local/cloud routing. Off (the default): not one outbound connection, checked with an audit hook
on socket.connect while every route is used. On: a local fake remote records what it receives, so the
test sees the alias and size rules, the masking of secrets, and the key handling."""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from devstral.engine.sampling import SamplingParams
from devstral.errors import DevstralError
from devstral.server.remote import RemoteConfig, RoutePolicy
from test_server_harness import _free_port, _start, live, reference_llm

_CONNECTS: list[tuple[str, object]] = []
_AUDITING = threading.Event()


def _audit(event: str, args: tuple) -> None:
    if _AUDITING.is_set() and event in ("socket.connect", "socket.getaddrinfo"):
        _CONNECTS.append((event, args[1] if event == "socket.connect" else args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; the event gates it to the test's window


def test_with_routing_off_no_byte_leaves_the_machine():
    server = live()
    port = int(server.url.rsplit(":", 1)[1])
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    _CONNECTS.clear()
    _AUDITING.set()
    try:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        c.completions.create(model="tiny", prompt="hi", max_tokens=2)
        c.embeddings.create(model="tiny", input="hi")
        c.responses.create(model="tiny", input="hi", max_output_tokens=2)
        for path, body in [("/v1/fim/completions", {"prompt": "a", "suffix": "b", "max_tokens": 2}),
                           ("/infill", {"input_prefix": "a", "n_predict": 2}),
                           ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                          "stream": False, "options": {"num_predict": 2}}),
                           ("/api/generate", {"model": "tiny", "prompt": "hi", "stream": False,
                                              "options": {"num_predict": 2}}),
                           ("/api/embed", {"model": "tiny", "input": "hi"}),
                           ("/api/show", {"model": "tiny"})]:
            assert httpx.post(server.url + path, json=body, timeout=60).status_code == 200, path
        # a name that would be a remote alias if routing were on is simply unknown
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="cloud", messages=[{"role": "user", "content": "hi"}])
        httpx.get(server.url + "/api/tags")
        httpx.get(server.url + "/api/ps")
    finally:
        _AUDITING.clear()
    outbound = [(e, a) for e, a in _CONNECTS
                if not (e == "socket.connect" and isinstance(a, tuple) and a[:2] == ("127.0.0.1", port))
                and not (e == "socket.getaddrinfo" and a in ("127.0.0.1", b"127.0.0.1"))]
    assert _CONNECTS and outbound == []


# ---------------------------------------------------------------- routing on
class FakeRemote:
    """An OpenAI-compatible endpoint on 127.0.0.1 that records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append({"path": "/v1/chat/completions", "body": body, "headers": dict(request.headers)})
            head = {"id": "remote-1", "created": 1, "model": body["model"]}
            if body.get("stream"):
                def events():
                    for piece in ("from ", "the ", "cloud"):
                        yield "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [
                            {"index": 0, "delta": {"content": piece}, "finish_reason": None}]}) + "\n\n"
                    yield "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": {}, "finish_reason": "stop"}]}) + "\n\n"
                    yield "data: [DONE]\n\n"
                return StreamingResponse(events(), media_type="text/event-stream")
            return {**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "from the cloud"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    import os

    fake = FakeRemote()
    os.environ["DEVSTRAL_TEST_SERVICE_TOKEN"] = "tok-local-secret-123"  # a secret this machine holds
    remote = RemoteConfig.from_cli(fake.url, "alias=cloud:devstral-medium-latest,prompt>60", "DEVSTRAL_TEST_RKEY",
                                   env={"DEVSTRAL_TEST_RKEY": "sk-remote-key-abcdefghijklmnopqrstu"})
    server = _start(parallel=2, max_queue=8, api_key="local-key-xyz", remote=remote)
    yield fake, server
    server.server.should_exit = True
    fake.server.should_exit = True
    del os.environ["DEVSTRAL_TEST_SERVICE_TOKEN"]


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="local-key-xyz", max_retries=0)


def test_alias_goes_to_the_remote_with_secrets_masked(routed):
    fake, server = routed
    fake.requests.clear()
    secret_text = ("deploy with tok-local-secret-123 and sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX, "
                   "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----")
    r = _client(server).chat.completions.create(model="cloud", messages=[{"role": "user", "content": secret_text}])
    assert r.choices[0].message.content == "from the cloud"
    (sent,) = fake.requests
    assert sent["body"]["model"] == "devstral-medium-latest"
    forwarded = json.dumps(sent["body"])
    for secret in ("tok-local-secret-123", "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX", "MIIE"):
        assert secret not in forwarded
    assert forwarded.count("<secret-hidden>") == 3
    assert sent["headers"]["authorization"] == "Bearer sk-remote-key-abcdefghijklmnopqrstu"  # never the client's
    assert "local-key-xyz" not in json.dumps(sent["headers"])


def test_streams_come_back_from_the_remote(routed):
    fake, server = routed
    chunks = list(_client(server).chat.completions.create(model="cloud", stream=True,
                                                          messages=[{"role": "user", "content": "hi"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "from the cloud"


def test_long_prompts_go_out_and_short_ones_stay_local(routed):
    fake, server = routed
    fake.requests.clear()
    long_ask = [{"role": "user", "content": "word " * 100}]
    r = _client(server).chat.completions.create(model="tiny", messages=long_ask)
    assert r.choices[0].message.content == "from the cloud" and len(fake.requests) == 1
    short = [{"role": "user", "content": "hi"}]
    ref = reference_llm().chat(short, sampling=SamplingParams(temperature=0, max_tokens=5))
    r = _client(server).chat.completions.create(model="tiny", messages=short, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == ref.message["content"] and len(fake.requests) == 1
    assert [m.id for m in _client(server).models.list().data] == ["tiny", "cloud"]


def test_the_api_key_is_checked_before_anything_is_forwarded(routed):
    fake, server = routed
    fake.requests.clear()
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "cloud", "messages": []})
    assert r.status_code == 401 and fake.requests == []


def test_an_unreachable_remote_is_a_502():
    remote = RemoteConfig.from_cli(f"http://127.0.0.1:{_free_port()}/v1", "alias=cloud", None)
    server = _start(parallel=1, max_queue=2, remote=remote)
    try:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": "cloud", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 502 and "remote endpoint" in r.json()["error"]["message"]
    finally:
        server.server.should_exit = True


def test_policy_and_flags_are_checked():
    policy = RoutePolicy.parse("alias=cloud:devstral-medium-latest, alias=big, prompt>32000")
    assert policy.aliases == {"cloud": "devstral-medium-latest", "big": "big"} and policy.max_local_prompt == 32000
    for bad in ("alias=", "prompt>many", "prompt>10", "sometimes"):
        with pytest.raises(DevstralError, match="--route"):
            RoutePolicy.parse(bad)
    assert RemoteConfig.from_cli(None, None, None) is None
    with pytest.raises(DevstralError, match="--remote"):
        RemoteConfig.from_cli(None, "alias=x", None)
    with pytest.raises(DevstralError, match="NOPE"):
        RemoteConfig.from_cli("https://example.invalid/v1", "alias=x", "NOPE", env={})


def test_serve_refuses_routing_flags_without_a_remote(capsys):
    from devstral.cli import main

    assert main(["serve", "--route", "alias=cloud"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--remote" in err and "\n" not in err
