"""End to end over a real HTTP stack: a scripted OpenAI-compatible server (FastAPI + uvicorn on
127.0.0.1) drives `devstral agent` to create a file, run it, fix it and finish."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import mistral_common
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from devstral.agent.endpoint_model import EndpointChatModel
from devstral.agent.sandbox import detect
from devstral.cli import main
from devstral.errors import DevstralError

# --mode auto runs in the sandbox where there is one; these tests are about HTTP, not confinement.
# The scripted commands run this interpreter: show its environment to the sandbox, as a user shows a
# virtualenv that lives outside the workspace (a clone under /tmp would otherwise be hidden).
SANDBOX = (["--allow-read", sys.prefix, "--allow-read", sys.base_prefix] if detect().available
           else ["--no-sandbox"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScriptedServer:
    """An OpenAI-compatible server whose n-th answer is the n-th scripted step; each step may look at
    the request (the observations so far) to decide, like a model would."""

    def __init__(self, steps, fail_first: int = 0):
        self.steps, self.fail_first = steps, fail_first
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        app = FastAPI()
        app.get("/v1/models")(self.models)
        app.post("/v1/chat/completions")(self.completions)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def models(self):
        return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}

    async def completions(self, request: Request):
        body = await request.json()
        self.headers.append(dict(request.headers))
        if self.fail_first > 0:
            self.fail_first -= 1
            return JSONResponse({"error": {"message": "busy"}}, status_code=429, headers={"retry-after": "0"})
        self.requests.append(body)
        n = sum(m["role"] == "assistant" for m in body["messages"])
        name, args = self.steps[n](body["messages"])
        call = {"id": f"call{n:05d}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        return {"id": f"cmpl-{n}", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                             "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "test server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def last_observation(messages) -> str:
    return messages[-1]["content"]


def test_agent_creates_runs_fixes_and_finishes_over_http(tmp_path: Path, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    script = ws / "greet.py"

    def fix(messages):
        assert "NameError" in last_observation(messages)  # the model saw the failure
        return "str_replace_editor", {"command": "str_replace", "path": str(script),
                                      "old_str": "print(greting)", "new_str": "print(greeting)"}

    def finish(messages):
        assert "hello, world" in last_observation(messages)
        return "finish", {"message": "greet.py prints the greeting"}

    steps = [
        lambda m: ("str_replace_editor", {"command": "create", "path": str(script),
                                          "file_text": 'greeting = "hello, world"\nprint(greting)\n'}),
        lambda m: ("execute_bash", {"command": f"{sys.executable} greet.py"}),
        fix,
        lambda m: ("execute_bash", {"command": f"{sys.executable} greet.py"}),
        finish,
    ]
    traj = tmp_path / "run.jsonl"
    with ScriptedServer(steps, fail_first=1) as server:
        code = main(["agent", "write greet.py and make it work", "--workspace", str(ws), "--base-url", server.url,
                     "--api-key", "test-key-123456", "--mode", "auto", "--trajectory", str(traj), "--quiet",
                     *SANDBOX])
    assert code == 0, capsys.readouterr().err
    assert script.read_text() == 'greeting = "hello, world"\nprint(greeting)\n'
    assert len(server.requests) == 5  # plus one 429 that was retried
    assert all(h["authorization"] == "Bearer test-key-123456" for h in server.headers)
    first = server.requests[0]
    assert first["model"] == "scripted"  # taken from /v1/models
    assert [t["function"]["name"] for t in first["tools"]] == ["execute_bash", "str_replace_editor", "think", "finish"]
    # The trajectory is fine-tuning data that a Mistral tokenizer encodes as is.
    record = json.loads(traj.read_text())
    assert [m["role"] for m in record["messages"]] == ["system", "user"] + ["assistant", "tool"] * 4 + ["assistant"]
    tekken = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    tokenizer = MistralTokenizer.from_file(str(tekken), mode=ValidationMode.finetuning)
    request = ChatCompletionRequest.from_openai(record["messages"], tools=record["tools"])
    assert len(tokenizer.encode_chat_completion(request).tokens) > 100
    # ... and it passes `devstral finetune`'s own data validation, every assistant turn learned.
    from devstral.prompt.tokenizer import MistralCommonTokenizer
    from devstral.testing import write_tekken
    from devstral.train.data import load_examples

    write_tekken(tmp_path / "tekken.json", version="v13")
    examples, stats = load_examples(traj, MistralCommonTokenizer(tmp_path / "tekken.json"), max_seq_len=65536)
    assert stats.examples == 1 and stats.truncated == 0 and examples[0].n_labels > 0


def test_limit_reached_exits_1(tmp_path: Path):
    steps = [lambda m: ("think", {"thought": f"step {len(m)}"})] * 5
    with ScriptedServer(steps) as server:
        code = main(["agent", "t", "-w", str(tmp_path), "--base-url", server.url, "--mode", "auto", *SANDBOX,
                     "--max-steps", "2", "-q"])
    assert code == 1


def test_unreachable_base_url_is_a_clear_error_before_any_step(tmp_path: Path, capsys):
    traj = tmp_path / "t.jsonl"
    code = main(["agent", "t", "-w", str(tmp_path), "--base-url", f"http://127.0.0.1:{free_port()}",
                 "--mode", "auto", "--trajectory", str(traj), *SANDBOX])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the model endpoint" in err and len(err.strip().splitlines()) == 1
    assert not traj.exists()


@pytest.mark.parametrize("argv,message", [
    (["--base-url", "http://127.0.0.1:1", "-w", "/no/such/dir"], "does not exist"),
    (["--model", "m", "--base-url", "http://127.0.0.1:1"], "not both"),  # neither: the embedded model
    (["--base-url", "http://127.0.0.1:1", "--mode", "yolo"], "--mode"),
    (["--base-url", "ftp://x"], "http"),
])
def test_usage_errors_exit_2(tmp_path: Path, capsys, argv, message):
    argv = argv if "-w" in argv else argv + ["-w", str(tmp_path)]
    assert main(["agent", "t", "--mode", "auto", *argv] if "--mode" not in argv else ["agent", "t", *argv]) == 2
    assert message in capsys.readouterr().err


def test_endpoint_retries_then_gives_a_clear_error():
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        return httpx.Response(503, json={"error": {"message": "overloaded"}})

    model = EndpointChatModel("http://x/v1", "m", transport=httpx.MockTransport(handler), max_retries=3, backoff_s=0.001)
    with pytest.raises(DevstralError, match="HTTP 503: overloaded"):
        model.chat([{"role": "user", "content": "hi"}], [])
    assert len(attempts) == 4
    model = EndpointChatModel("http://x/v1", "m", transport=httpx.MockTransport(
        lambda r: httpx.Response(400, json={"error": {"message": "bad model"}})), backoff_s=0.001)
    with pytest.raises(DevstralError, match="HTTP 400: bad model"):
        model.chat([{"role": "user", "content": "hi"}], [])


def test_in_process_model_prefers_the_folders_system_prompt(tmp_path: Path, monkeypatch):
    """No torch needed: devstral.load is replaced by a stand-in that records its arguments."""
    import devstral
    from devstral.agent.inprocess_model import InProcessChatModel

    class FakeLLM:
        def chat(self, messages, tools=None, sampling=None):
            self.seen = (messages, tools, sampling)
            return type("R", (), {"message": {"role": "assistant", "content": "hi", "tool_calls": None},
                                  "finish_reason": "stop", "usage": {"prompt_tokens": 1}})()

    monkeypatch.setattr(devstral, "load", lambda model, device="auto", **kw: FakeLLM())
    (tmp_path / "SYSTEM_PROMPT.txt").write_text("x")
    m = InProcessChatModel(str(tmp_path), temperature=0.2, max_tokens=7)
    assert m.provides_system_prompt
    reply = m.chat([{"role": "user", "content": "q"}], [])
    assert reply.message["content"] == "hi" and m.llm.seen[2].temperature == 0.2
    os.remove(tmp_path / "SYSTEM_PROMPT.txt")
    assert not InProcessChatModel(str(tmp_path)).provides_system_prompt
