"""`devstral agent` on both backends: in process (`--model x.gguf --backend B`) and over HTTP against a
devstral server running backend B. The model's tokens are scripted (a tool call, then `finish`); the
model still runs every forward pass, so the whole path is real: the agent's prompt through our encoder,
the engine, the tool-call parser, the tools, the trajectory."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from devstral.cli import main
from devstral.testing import make_tiny_checkpoint, patched_sampler
from test_llamacpp_harness import _root, call_ids, start_server, stop_server

llama_cpp = pytest.importorskip("llama_cpp")

BACKENDS = ["torch", "llama.cpp"]


@functools.cache
def agent_gguf() -> Path:
    """A tiny model with room for the agent's system prompt and tools (its output is scripted)."""
    from devstral.formats.gguf import export_gguf

    folder = make_tiny_checkpoint(_root() / "agent", seed=4, max_position_embeddings=8192)
    return export_gguf(folder, _root() / "agent-F32.gguf", "F32")


def script_turns(turns: list[tuple[str, dict]]):
    """The n-th sequence the engine samples emits the n-th tool call, then EOS."""
    from devstral.prompt.tokenizer import load_tokenizer

    tok = load_tokenizer(agent_gguf())
    scripts: dict[int, tuple] = {}

    def pick(logits, params, history):
        if id(history) not in scripts:
            scripts[id(history)] = (history, iter(call_ids(tok, *turns[len(scripts)])))
        return next(scripts[id(history)][1], tok.eos_id)

    return patched_sampler(pick), scripts


def check_workspace(ws: Path, trajectory: Path) -> None:
    assert (ws / "hello.txt").read_text() == "hi from the agent\n"
    record = json.loads(trajectory.read_text().splitlines()[-1])
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert record["messages"][2]["tool_calls"][0]["function"]["name"] == "str_replace_editor"


def turns_for(ws: Path) -> list[tuple[str, dict]]:
    return [("str_replace_editor", {"command": "create", "path": str(ws / "hello.txt"),
                                    "file_text": "hi from the agent\n"}),
            ("finish", {"message": "done"})]


@pytest.mark.parametrize("backend", BACKENDS)
def test_agent_in_process_creates_a_file_and_finishes(backend, tmp_path, capsys):
    ws, traj = tmp_path / "ws", tmp_path / "run.jsonl"
    ws.mkdir()
    patch, scripts = script_turns(turns_for(ws))
    with patch:
        code = main(["agent", "create hello.txt", "--workspace", str(ws), "--model", str(agent_gguf()),
                     "--backend", backend, "--device", "cpu", "--mode", "auto", "--trajectory", str(traj),
                     "--quiet", "--max-steps", "4"])
    assert code == 0, capsys.readouterr().err
    assert len(scripts) == 2
    check_workspace(ws, traj)


@pytest.mark.parametrize("backend", BACKENDS)
def test_agent_over_http_against_a_server_on_the_backend(backend, tmp_path, capsys):
    import devstral

    llm = devstral.load(str(agent_gguf()), backend=backend, device="cpu", parallel=2)
    assert llm.backend == backend
    server = start_server(llm, parallel=2)
    ws, traj = tmp_path / "ws", tmp_path / "run.jsonl"
    ws.mkdir()
    patch, scripts = script_turns(turns_for(ws))
    try:
        with patch:
            code = main(["agent", "create hello.txt", "--workspace", str(ws), "--base-url",
                         f"{server.url}/v1", "--mode", "auto", "--trajectory", str(traj), "--quiet",
                         "--max-steps", "4"])
    finally:
        stop_server(server)
    assert code == 0, capsys.readouterr().err
    check_workspace(ws, traj)
    # the second turn repeated the first: the server's prefix cache served it
    assert llm.engine.blocks.stats.hit_tokens > 0
