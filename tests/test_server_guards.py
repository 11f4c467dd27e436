"""Server hardening: Host/Origin allowlist (DNS rebinding), JSON bodies whatever their Content-Type,
a body read timeout, NaN logits as a clean error, and a busy port reported before the model loads."""

from __future__ import annotations

import functools
import json
import socket

import httpx
import pytest

from devstral.server.guards import HostPolicy, split_host
from test_server_harness import _free_port, _start, live, load_llm

ASK = [{"role": "user", "content": "hi"}]


def chat(url: str, headers: dict[str, str] | None = None, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **kw},
                      headers=headers or {}, timeout=60)


@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}",
                                  "app.localhost:{port}", "127.0.0.2"])
def test_local_host_names_are_served(host):
    url = live().url
    port = url.rsplit(":", 1)[1]
    assert chat(url, {"Host": host.format(port=port)}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example", "10.1.2.3",
                                  "[2001:db8::1]:{port}"])
def test_other_host_names_are_refused(host):
    """What a DNS-rebinding page makes the browser send: the attacker's own name, pointed at us."""
    url = live().url
    host = host.format(port=url.rsplit(":", 1)[1])
    r = chat(url, {"Host": host})
    assert r.status_code == 403
    assert "--allowed-host" in r.json()["error"]["message"] and split_host(host) in r.json()["error"]["message"]
    r = httpx.post(url + "/api/chat", json={"model": "tiny", "messages": ASK}, headers={"Host": host})
    assert r.status_code == 403 and "DNS rebinding" in r.json()["error"]  # Ollama's error shape


@pytest.mark.parametrize(("origin", "status"), [
    ("http://localhost:3000", 200), ("http://127.0.0.1:5173", 200), ("vscode-webview://abc123", 200),
    ("https://evil.example", 403), ("http://evil.example:8080", 403), ("null", 403), ("not a url", 403),
])
def test_origins_of_other_sites_are_refused(origin, status):
    assert chat(live().url, {"Origin": origin}).status_code == status


def test_a_cross_site_simple_request_does_not_generate():
    """A page may POST text/plain to any address without a CORS preflight; its Origin gives it away."""
    before = httpx.get(live().url + "/metrics").text.count("\n")
    r = httpx.post(live().url + "/v1/completions", content=json.dumps({"prompt": "x", "max_tokens": 2}),
                   headers={"Content-Type": "text/plain", "Origin": "https://evil.example"})
    assert r.status_code == 403
    assert httpx.get(live().url + "/metrics").text.count("\n") >= before  # still serving


def test_host_policy_for_all_interfaces_and_allowed_hosts():
    any_address = HostPolicy("0.0.0.0")
    assert any_address.allows("192.168.1.20") and any_address.allows(socket.gethostname())
    assert not any_address.allows("evil.example")
    policy = HostPolicy("127.0.0.1", ["devbox.lan", "*.corp.example", "[fd00::1]"])
    assert policy.allows("devbox.lan") and policy.allows("ci.corp.example") and policy.allows("fd00::1")
    assert not policy.allows("corp.example.evil") and not policy.allows("192.168.1.20")
    assert HostPolicy("127.0.0.1", ["*"]).allows("anything.example")
    assert HostPolicy("10.0.0.5").allows("10.0.0.5") and not HostPolicy("10.0.0.5").allows("10.0.0.6")


def post_routes() -> list[str]:
    spec = httpx.get(live().url + "/openapi.json").json()
    return sorted(path for path, ops in spec["paths"].items() if "post" in ops)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/octet-stream"])
def test_json_bodies_are_parsed_whatever_their_content_type_on_every_route(content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    for path in post_routes():
        r = httpx.post(live().url + path, content=b"{}", headers=headers, timeout=60)
        body = r.text
        assert "valid dictionary" not in body and "JSON" not in body, (path, body)  # parsed, then judged
    r = httpx.post(live().url + "/v1/chat/completions", headers=headers, timeout=60,
                   content=json.dumps({"messages": ASK, "max_tokens": 2}))
    assert r.status_code == 200
    r = httpx.post(live().url + "/api/chat", headers=headers, timeout=60,
                   content=json.dumps({"model": "tiny", "messages": ASK, "stream": False, "options": {"num_predict": 2}}))
    assert r.status_code == 200 and r.json()["done"] is True
    r = httpx.post(live().url + "/api/generate", headers=headers, content=b'{"model": "tiny", "prompt": ')
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]


@functools.cache
def slow_body_server():
    return _start(parallel=1, max_queue=4, body_timeout_s=1.0)


def test_a_half_sent_body_gets_408_and_the_connection_is_closed():
    server = slow_body_server()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # 30 s: a guard, not a measurement
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"messages\": [")
        answer = b""
        while chunk := s.recv(4096):  # until the server closes the connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"did not arrive within 1 s" in answer
    assert chat(server.url).status_code == 200  # and it keeps serving


@functools.cache
def nan_server():
    return _start(llm=load_llm(), parallel=1, max_queue=4)


def test_nan_logits_are_a_clear_json_error_and_the_server_keeps_serving():
    server = nan_server()
    weight = server.llm.model.lm_head.weight
    saved = weight.detach().clone()
    weight.data.fill_(float("nan"))  # what broken weights or an fp16 overflow do to every logit
    try:
        r = chat(server.url)
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["code"] == "nan_logits" and "NaN" in err["message"] and "--dtype" in err["message"]
        r = chat(server.url, stream=True)
        assert r.status_code == 500 and r.json()["error"]["code"] == "nan_logits"
        r = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False},
                       timeout=60)
        assert r.status_code == 500 and "NaN" in r.json()["error"]
    finally:
        weight.data.copy_(saved)
    assert chat(server.url).status_code == 200


def test_a_busy_port_is_reported_in_one_line_before_the_model_loads(monkeypatch, capsys):
    import devstral
    from devstral.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(devstral, "load", never)
    port = _free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot listen on 127.0.0.1:") and str(port) in err and "\n" not in err
    assert "--port" in err
