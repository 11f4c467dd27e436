"""The embedded default model (issue 14's targets): a fresh install's `devstral run` answers with Python, and
`devstral agent` drives the real tools in Devstral's v13 format. The oracles are Python's own parser and the
agent's trajectory (what the tools really ran)."""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from devstral.agent.sandbox import detect
from devstral.cli import main

SANDBOX = (["--allow-read", sys.prefix, "--allow-read", sys.base_prefix] if detect().available
           else ["--no-sandbox"])

PROMPTS = [
    "Write a Python function that reverses a string.",
    "Write a Python function that returns the maximum of a list of numbers.",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that computes the factorial of n.",
]


def _defines_a_function(answer: str) -> bool:
    block = re.search(r"```(?:python|py)\n(.*?)```", answer, re.S)
    if block is None:
        return False
    try:
        tree = ast.parse(block.group(1))
    except SyntaxError:
        return False
    return any(isinstance(node, ast.FunctionDef) for node in ast.walk(tree))


def test_devstral_run_answers_with_a_python_function(capsys):
    good = []
    for prompt in PROMPTS:
        assert main(["run", prompt, "--temperature", "0", "--max-tokens", "200", "--device", "cpu"]) == 0
        answer = capsys.readouterr().out
        good.append(_defines_a_function(answer))
    assert sum(good) >= 3, good


@pytest.fixture
def short_workspace():
    # The workspace path is in the prompt. Greedy decoding is deterministic, but a 24M model's answer
    # depends on the prompt's tokens: pytest's long per-run tmp paths (.../pytest-NNN/test_.../repo) made
    # it loop on the path once. A fixed short path makes the test the same on every machine.
    ws = Path(tempfile.gettempdir()) / "devstral-nano-agent"
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir()
    yield ws
    shutil.rmtree(ws, ignore_errors=True)


def test_the_agent_lists_and_reads_with_well_formed_tool_calls_and_finishes(short_workspace, tmp_path, capsys):
    ws = short_workspace
    (ws / "README.md").write_text("# demo\n\nA tiny demo project.\n")
    (ws / "util.py").write_text('def add(a, b):\n    """Add two numbers."""\n    return a + b\n')
    traj = tmp_path / "t.jsonl"
    code = main(["agent", "list the files and read README.md", "--workspace", str(ws), "--mode", "auto",
                 "--max-steps", "5", "--temperature", "0", "--trajectory", str(traj), "--device", "cpu", *SANDBOX])
    assert code == 0, capsys.readouterr()
    messages = json.loads(traj.read_text().splitlines()[-1])["messages"]
    calls = [c["function"] for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    assert 1 < len(calls) <= 5 and calls[-1]["name"] == "finish"
    for call in calls:
        assert call["name"] in {"execute_bash", "str_replace_editor", "finish"}
        assert isinstance(json.loads(call["arguments"]), dict)  # arguments the parser read as a JSON object
    outputs = "\n".join(m["content"] for m in messages if m["role"] == "tool" and isinstance(m.get("content"), str))
    assert "README.md" in outputs and "util.py" in outputs, calls  # it really ran the listing
    assert any("README.md" in c["arguments"] for c in calls), calls  # and asked for the README


def test_the_flappy_bird_smoke_example_runs_and_reports_speed(capsys):
    prompt = (Path(__file__).parents[1] / "docs" / "examples" / "flappy_bird_prompt.txt").read_text()
    assert main(["run", "--json", "--max-tokens", "24", "--device", "cpu", prompt]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["usage"]["completion_tokens"] == 24 and result["text"]
    assert result["timings"]["prefill_tok_s"] > 0 and result["timings"]["decode_tok_s"] > 0
