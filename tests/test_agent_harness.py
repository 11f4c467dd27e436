"""A hostile model endpoint for the agent tests: an OpenAI-compatible server on 127.0.0.1 whose n-th
reply is whatever the n-th scripted step returns: tool calls, a malformed message, a 50 MB text, or a
raw HTTP response (an endless trickle). Steps see the conversation so far, like a model would.

Also: running `devstral agent` as a separate process (for signals and memory), and finding processes
by a marker in their command line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response

from devstral.agent.sandbox import detect

Step = Callable[[list[dict]], Any]

needs_sandbox = pytest.mark.skipif(not detect().available, reason=f"no bubblewrap sandbox here: {detect().reason}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def calls(*pairs: tuple[str, dict]) -> dict:
    """An assistant message calling these tools."""
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"c{i:08d}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        for i, (name, args) in enumerate(pairs)]}


def bash(command: str, **extra) -> dict:
    return calls(("execute_bash", {"command": command, **extra}))


def edit(**args) -> dict:
    return calls(("str_replace_editor", args))


def finish(message: str = "done") -> dict:
    return calls(("finish", {"message": message}))


def observations(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m.get("role") == "tool"]


class HostileEndpoint:
    def __init__(self, steps: list[Step | dict]):
        self.steps = steps
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        app = FastAPI()
        app.get("/v1/models")(self.models)
        app.post("/v1/chat/completions")(self.completions)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def models(self):
        return {"object": "list", "data": [{"id": "hostile", "object": "model"}]}

    async def completions(self, request: Request):
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        n = len(self.requests) - 1
        step = self.steps[min(n, len(self.steps) - 1)]
        message = step(body["messages"]) if callable(step) else step
        if isinstance(message, Response):
            return message
        return {"id": f"cmpl-{n}", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}

    def __enter__(self) -> HostileEndpoint:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "test server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def all_observations(self) -> list[str]:
        return observations(self.requests[-1]["messages"]) if self.requests else []


def agent_argv(task: str, ws: Path, url: str, *extra: str) -> list[str]:
    return ["agent", task, "-w", str(ws), "--base-url", url, "--mode", "auto", "-q", *extra]


def spawn_agent(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`devstral agent` as its own process (the package from this checkout)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen([sys.executable, "-m", "devstral", *argv], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def marked(marker: str) -> list[psutil.Process]:
    """Live (not zombie) processes with `marker` as an argument."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if marker in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def wait_until(condition: Callable[[], bool], within_s: float = 20.0) -> bool:
    """Poll `condition` until it holds (True) or `within_s` passes (False). A bound against hanging,
    not a speed requirement."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def kill_marked(marker: str) -> None:
    """Clean up after a failed test: only the processes this test started, found by their marker."""
    for p in marked(marker):
        p.kill()
