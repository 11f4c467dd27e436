"""Malformed tool calls and replies become observations and the run goes on; a crash exits 3; a 50 MB
reply and a model that never finishes answering cannot outlast --max-time."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import MistralRequestValidatorV13, ValidationMode
from starlette.responses import StreamingResponse

from devstral.agent import ChatReply, Finished, ToolBox
from devstral.agent.exceptions import DeadlineExceeded
from devstral.cli import main
from test_agent_harness import HostileEndpoint, agent_argv, bash, finish, spawn_agent
from test_agent_loop import call, make_agent


def raw(message) -> ChatReply:
    """A reply whose message is exactly `message` (any JSON value)."""
    return ChatReply(message, "stop")


class Script:
    """A model answering with the next reply: a ChatReply as is, or a list of calls."""

    provides_system_prompt = False

    def __init__(self, replies):
        self.replies = list(replies)

    def check(self):
        pass

    def chat(self, messages, tools, deadline=None):
        reply = self.replies.pop(0)
        if isinstance(reply, ChatReply):
            return reply
        calls = [{"id": f"call{i:05d}", "type": "function", "function": c} for i, c in enumerate(reply)]
        return ChatReply({"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls")


def test_malformed_calls_are_observations_and_the_run_goes_on(tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "file.txt").write_text("text\n")
    traj = tmp_path / "t.jsonl"
    nested = "[" * 100_000 + "]" * 100_000
    replies = [
        [call("str_replace_editor", command="create", path=f"{ws}/file.txt/new.py", file_text="x")],
        [call("str_replace_editor", command="create", path=f"{ws}/{'n' * 300}", file_text="x")],
        [call("str_replace_editor", command="view", path=f"{ws}/a\0b")],
        [call("execute_bash", command="echo a\0b")],
        [{"name": "str_replace_editor", "arguments": '{"command": "view", "path": "' + str(ws) + '/\\ud800"}'}],
        [call("str_replace_editor", command="create", path=f"{ws}/s.txt", file_text="bad \ud83d text")],
        [{"name": "execute_bash", "arguments": '{"command": "echo \\udc80"}'}],
        [{"name": "think", "arguments": nested}],
        [call("str_replace_editor", command="create", path=f"{ws}/u.txt", file_text="one\n")],
        [call("execute_bash", command="echo changed > u.txt")],
        [call("str_replace_editor", command="undo_edit", path=f"{ws}/u.txt")],
        raw("just a string, not a message"),
        raw(["a", "list"]),
        raw({"role": "assistant", "content": 42, "tool_calls": None}),
        raw({"role": "assistant", "content": None, "tool_calls": {"not": "a list"}}),
        raw({"role": "assistant", "content": "lone \udfff surrogate", "tool_calls": [
            {"id": "abcdefghi", "type": "function", "function": {"name": "think", "arguments": '{"thought": "ok"}'}}]}),
        [call("finish", message="survived")],
    ]
    agent, _ = make_agent(ws, [], trajectory=traj, max_format_errors=100)
    agent.model = Script(replies)
    stop = agent.run("survive")
    assert isinstance(stop, Finished) and stop.message == "survived"
    obs = [m["content"] for m in agent.messages if m["role"] in ("tool", "user")][1:]
    expected = ["is a file, not a directory", "too long", "NUL character", "NUL character", "lone surrogate",
                "lone surrogate", "lone surrogate", "not valid JSON", "Created", "exit code 0",
                "changed after the last edit", "not a chat message", "not a chat message",
                "content must be text", "tool_calls must be a list", "thought has been noted"]
    assert len(obs) == len(expected)
    for text, fragment in zip(obs, expected, strict=True):
        assert fragment in text, (fragment, text[:300])
    assert (ws / "u.txt").read_text() == "changed\n"
    # The trajectory is valid UTF-8 JSON that Mistral's own validator accepts for fine-tuning.
    record = json.loads(traj.read_bytes().decode("utf-8"))
    request = ChatCompletionRequest.from_openai(record["messages"], tools=record["tools"])
    MistralRequestValidatorV13(mode=ValidationMode.finetuning).validate_request(request)
    assert "lone \ufffd surrogate" in traj.read_text()
    agent.toolbox.close()


def test_a_non_dict_message_over_http_is_a_format_error(tmp_path: Path, capsys):
    with HostileEndpoint(["hello", [1, 2], finish("ok")]) as server:
        code = main(agent_argv("t", tmp_path, server.url, "--no-sandbox"))
    assert code == 0, capsys.readouterr().err
    told = [m["content"] for m in server.requests[-1]["messages"] if m["role"] == "user"]
    assert sum("not a chat message" in t for t in told) == 2


def test_a_crash_exits_3_with_its_traceback(tmp_path: Path, monkeypatch, capsys):
    def broken(self, name, args, time_left_s=None):
        raise RuntimeError("a bug in a tool")

    monkeypatch.setattr(ToolBox, "run", broken)
    with HostileEndpoint([bash("true"), finish()]) as server:
        code = main(agent_argv("t", tmp_path, server.url, "--no-sandbox"))
    err = capsys.readouterr().err
    assert code == 3
    assert "Traceback" in err and "RuntimeError: a bug in a tool" in err and "crashed" in err


def test_max_time_holds_against_a_50_mb_reply_and_an_endless_answer(tmp_path: Path):
    async def trickle():
        while True:  # headers, then one byte now and then, forever
            yield b" "
            await _sleep(0.2)

    huge = {"role": "assistant", "content": ("All work and no play. " * 50 + "\n") * 46_000, "tool_calls": None}
    assert len(huge["content"]) > 50_000_000
    endless = StreamingResponse(trickle(), media_type="application/json")
    with HostileEndpoint([huge, lambda messages: endless]) as server:
        agent = spawn_agent(["agent", "t", "-w", str(tmp_path), "--base-url", server.url, "--mode", "auto",
                             "--no-sandbox", "--max-time", "8"])
        # A guard against hanging, far above --max-time; what is checked is how the run ended.
        _, err = agent.communicate(timeout=300)
    err = err.decode()
    assert agent.returncode == 1, err
    assert re.search(r"time limit reached", err)
    assert len(err) < 100_000  # the 50 MB text was cut before printing
    assert "more characters" in err
    assert len(server.requests) == 2


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def test_in_process_model_stops_at_the_deadline(tiny_hf):
    from devstral.agent.inprocess_model import InProcessChatModel

    model = InProcessChatModel(str(tiny_hf), device="cpu", max_tokens=8)
    with pytest.raises(DeadlineExceeded):
        model.chat([{"role": "user", "content": "count to a million"}], [], deadline=time.monotonic())
    reply = model.chat([{"role": "user", "content": "hi"}], [], deadline=time.monotonic() + 600)
    assert reply.message["role"] == "assistant"
