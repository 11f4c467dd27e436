"""Shared by the llama.cpp backend's tests: tiny *trained* models exported to F32 GGUF, and live servers.

The tiny models are trained for a few seconds (a plain torch loop) on repetitive text and on one chat
whose answer is a tool call, so their logits are peaked: greedy and seeded outputs are then a
meaningful comparison between backends, and the models really call the tool. F32 files and an fp32
KV cache leave only float rounding between the two engines (logits agree to ~1e-6).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

TEXT = ("The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
        "Lists: [1, 2, 3] and dicts {'k': 'v'}.\n")
TOOLS = [{"type": "function", "function": {
    "name": "list_files", "description": "List the files in a folder.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]
ASK = [{"role": "user", "content": "Which files are in /tmp?"}]
CALL = ("list_files", {"path": "/tmp"})
CTX = 256


def call_ids(tokenizer, name: str, arguments: dict) -> list[int]:
    """`[TOOL_CALLS]name[ARGS]{json}` in the v13 format of the tiny models' tokenizer."""
    return [tokenizer.special_id("[TOOL_CALLS]"), *tokenizer.encode(name), tokenizer.special_id("[ARGS]"),
            *tokenizer.encode(json.dumps(arguments))]


def _train(folder: Path, steps: int = 60) -> None:
    from safetensors.torch import load_file, save_file

    from devstral.config import ModelConfig
    from devstral.model.transformer import Transformer
    from devstral.prompt.tokenizer import load_tokenizer

    cfg = ModelConfig.from_dir(folder)
    tok = load_tokenizer(folder)
    chat = tok.encode_chat(ASK, TOOLS) + call_ids(tok, *CALL) + [tok.eos_id]
    text = tok.encode(TEXT * 4, bos=True)
    torch.manual_seed(0)
    net = Transformer(cfg)
    net.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    rows = [torch.tensor(chat), torch.tensor(text)]
    for _ in range(steps):
        loss = 0
        for x in rows:
            logits = net(x[None, :-1])
            loss = loss + torch.nn.functional.cross_entropy(logits[0], x[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="devstral-llamacpp-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def trained(arch: str = "mistral") -> Path:
    """A trained tiny checkpoint folder: Devstral Small 1.x ("mistral") or 2 ("ministral3") architecture."""
    from devstral.testing import make_tiny_checkpoint

    folder = make_tiny_checkpoint(_root() / arch, arch=arch, seed=3)
    _train(folder)
    return folder


@functools.cache
def f32_gguf(arch: str = "mistral") -> Path:
    from devstral.formats.gguf import export_gguf

    return export_gguf(trained(arch), _root() / f"{arch}-F32.gguf", "F32")


def load(path: Path, backend: str, **kw: Any):
    import devstral

    kw.setdefault("kv_cache_dtype", "fp32")
    kw.setdefault("max_context", CTX)
    return devstral.load(str(path), backend=backend, device="cpu", **kw)


# ---------------------------------------------------------------- live servers
@dataclass
class Live:
    url: str
    llm: Any
    server: Any
    thread: threading.Thread


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(llm: Any, **config: Any) -> Live:
    """A server for `llm` on a free port (stopped at exit, or by `stop_server`)."""
    import uvicorn

    from devstral.server import ServerConfig, create_app

    config.setdefault("store_dir", _root() / "store")
    app = create_app(llm, ServerConfig(model_id="tiny", **config))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    live = Live(f"http://127.0.0.1:{port}", llm, server, thread)
    atexit.register(stop_server, live)
    return live


def stop_server(live: Live) -> None:
    live.server.should_exit = True
    live.thread.join(10)


@functools.cache
def live(backend: str) -> Live:
    """A server over the mistral F32 GGUF on `backend`, 4 slots."""
    return start_server(load(f32_gguf(), backend, parallel=4), parallel=4, max_queue=64)


@functools.cache
def reference(backend: str):
    """A separate LLM on the same file and backend, for expected outputs (never touched by a server)."""
    return load(f32_gguf(), backend)


# ---------------------------------------------------------------- the harness's own check
def test_the_trained_model_calls_the_tool_and_continues_the_text_on_the_torch_engine():
    from devstral.engine.sampling import SamplingParams

    llm = load(trained(), "torch")
    result = llm.chat(ASK, tools=TOOLS, sampling=SamplingParams(temperature=0, max_tokens=32))
    assert result.finish_reason == "tool_calls"
    call = result.message["tool_calls"][0]["function"]
    assert (call["name"], json.loads(call["arguments"])) == CALL
    ids = llm.tokenizer.encode(TEXT * 2, bos=True)
    assert llm.generate(ids[:12], SamplingParams(temperature=0, max_tokens=8)).token_ids == ids[12:20]
