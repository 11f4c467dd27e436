"""The agent loop driven by a scripted ChatModel: every tool, every format error, every limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import MistralRequestValidatorV13, ValidationMode

from devstral.agent import (
    Agent,
    AgentLimits,
    ChatReply,
    Decision,
    Finished,
    LimitReached,
    Mode,
    Policy,
    SecretMasker,
    ToolBox,
    ToolLimits,
    TrajectoryWriter,
    Workspace,
)
from devstral.errors import ContextOverflowError


def call(name: str, **args) -> dict:
    return {"name": name, "arguments": json.dumps(args)}


class ScriptedModel:
    """Answers with the next scripted reply; a reply is a list of calls, a text, or a callable."""

    def __init__(self, replies: list, provides_system_prompt: bool = False):
        self.replies = list(replies)
        self.provides_system_prompt = provides_system_prompt
        self.seen: list[list[dict]] = []

    def check(self) -> None:
        pass

    def chat(self, messages, tools, deadline=None):
        self.seen.append(json.loads(json.dumps(messages)))
        reply = self.replies.pop(0)
        if callable(reply):
            reply = reply(messages)
        if isinstance(reply, str):
            return ChatReply({"role": "assistant", "content": reply, "tool_calls": None}, "stop")
        calls = [{"id": f"call{i:05d}", "type": "function", "function": c} for i, c in enumerate(reply)]
        return ChatReply({"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls")


def make_agent(ws: Path, replies, mode=Mode.AUTO, approver=None, trajectory: Path | None = None,
               provides_system_prompt=False, **limits):
    workspace = Workspace.open(ws)
    masker = SecretMasker({})
    toolbox = ToolBox(workspace, Policy(mode, workspace, approver), masker, ToolLimits(soft_timeout_s=5))
    writer = TrajectoryWriter(trajectory, toolbox.schemas, masker) if trajectory else None
    model = ScriptedModel(replies, provides_system_prompt)
    return Agent(model, toolbox, limits=AgentLimits(**limits), trajectory=writer), model


def tool_messages(agent: Agent) -> list[str]:
    return [m["content"] for m in agent.messages if m["role"] == "tool"]


def validate_for_finetuning(record: dict) -> None:
    request = ChatCompletionRequest.from_openai(record["messages"], tools=record["tools"])
    MistralRequestValidatorV13(mode=ValidationMode.finetuning).validate_request(request)


def test_every_tool_end_to_end(tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    f = ws / "app.py"
    traj = tmp_path / "traj.jsonl"
    agent, model = make_agent(ws, [
        [call("think", thought="plan: write, check, fix")],
        [call("str_replace_editor", command="create", path=str(f), file_text="a = 1\nb = 2\nprint(a + b)\n")],
        [call("str_replace_editor", command="view", path=str(f), view_range=[2, -1])],
        [call("str_replace_editor", command="str_replace", path=str(f), old_str="b = 2", new_str="b = 40")],
        [call("str_replace_editor", command="insert", path=str(f), insert_line=0, new_str="# demo")],
        [call("str_replace_editor", command="undo_edit", path=str(f))],
        [call("execute_bash", command="cd sub 2>/dev/null || mkdir sub && cd sub && export X=7")],
        [call("execute_bash", command="pwd; echo $X; python3 ../app.py")],
        [call("str_replace_editor", command="view", path=str(ws))],
        [call("finish", message="done")],
    ], trajectory=traj)
    stop = agent.run("make app.py print 41")
    assert isinstance(stop, Finished) and stop.exit_code == 0 and stop.message == "done"
    assert f.read_text() == "a = 1\nb = 40\nprint(a + b)\n"
    obs = tool_messages(agent)
    assert obs[0] == "Your thought has been noted."
    assert "     2\tb = 2\n     3\tprint(a + b)\n     4\t" in obs[2]  # cat -n of lines 2..end
    assert "b = 40" in obs[3] and "undo_edit" in obs[3]
    assert "     1\t# demo" in obs[4]
    assert f"{ws / 'sub'}\n7\n41\n" in obs[7]
    assert "[Command finished with exit code 0]" in obs[7]
    assert f"[Current working directory: {ws / 'sub'}]" in obs[7]
    assert f"{ws / 'app.py'}" in obs[8] and f"{ws / 'sub'}/" in obs[8]
    record = json.loads(traj.read_text())
    assert record["messages"][-1]["tool_calls"][0]["function"]["name"] == "finish"
    assert [t["function"]["name"] for t in record["tools"]] == ["execute_bash", "str_replace_editor", "think", "finish"]
    validate_for_finetuning(record)
    agent.toolbox.close()


def test_format_errors_are_told_counted_and_reset(tmp_path: Path):
    agent, model = make_agent(tmp_path, [
        "I will just talk.",                                               # no tool call
        [{"name": "execute_bash", "arguments": "{not json"}],              # bad JSON
        [call("think", thought="ok")],                                     # good: resets the count
        [call("launch_rockets", n=1)],                                     # unknown tool
        [call("str_replace_editor", command="view")],                      # missing required path
        [call("str_replace_editor", command="explode", path="/x")],        # enum violation
    ], max_format_errors=3)
    stop = agent.run("task")
    assert isinstance(stop, LimitReached) and stop.exit_code == 1 and "3 malformed" in stop.reason
    told = [m["content"] for m in model.seen[1] if m["role"] == "user"][-1]
    assert "contained no tool call" in told and "1 of 3" in told
    obs = tool_messages(agent)
    assert "not valid JSON" in obs[0]
    assert "no tool named 'launch_rockets'" in obs[2]
    assert "'path' is a required property" in obs[3]
    assert "field command" in obs[4] and "explode" in obs[4]
    weights = [m.get("weight") for m in agent.messages if m["role"] == "assistant"]
    assert weights == [0, 0, None, 0, 0, 0]
    agent.toolbox.close()


def test_text_format_fallback_runs_the_call(tmp_path: Path):
    text = ("Let me look.\n<function=execute_bash>\n<parameter=command>\necho from-text\n</parameter>\n"
            "<parameter=timeout>\n10\n</parameter>\n</function>")
    agent, _ = make_agent(tmp_path, [text, [call("finish", message="ok")]])
    assert agent.run("t").exit_code == 0
    assistant = [m for m in agent.messages if m["role"] == "assistant"][0]
    assert assistant["content"] == "Let me look."
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"command": "echo from-text", "timeout": 10}
    assert "from-text" in tool_messages(agent)[0]
    agent.toolbox.close()


def test_step_limit_and_time_limit(tmp_path: Path):
    agent, _ = make_agent(tmp_path, [[call("think", thought=str(i))] for i in range(10)], max_steps=3)
    stop = agent.run("t")
    assert isinstance(stop, LimitReached) and "step limit" in stop.reason
    assert len([m for m in agent.messages if m["role"] == "assistant"]) == 3
    agent.toolbox.close()
    agent, model = make_agent(tmp_path, [[call("think", thought="x")]], max_time_s=1e-9)
    stop = agent.run("t")
    assert isinstance(stop, LimitReached) and "time limit" in stop.reason and model.seen == []
    agent.toolbox.close()


def test_stuck_loop_is_detected(tmp_path: Path):
    agent, _ = make_agent(tmp_path, [[call("execute_bash", command="echo same")]] * 10, stuck_repeats=4)
    stop = agent.run("t")
    assert isinstance(stop, LimitReached) and "stuck" in stop.reason
    assert len(tool_messages(agent)) == 4
    agent.toolbox.close()


def test_context_overflow_is_a_limit(tmp_path: Path):
    def overflow(messages):
        raise ContextOverflowError(200_000, 131072)

    agent, _ = make_agent(tmp_path, [overflow])
    stop = agent.run("t")
    assert isinstance(stop, LimitReached) and "context window" in stop.reason
    agent.toolbox.close()


def test_agents_md_and_own_system_prompt(tmp_path: Path):
    (tmp_path / "AGENTS.md").write_text("Run tests with `make check`.\n")
    agent, model = make_agent(tmp_path, [[call("finish", message="ok")]], provides_system_prompt=True)
    agent.run("do it")
    first = model.seen[0]
    assert [m["role"] for m in first] == ["user"]  # the model's own SYSTEM_PROMPT.txt applies
    assert "make check" in first[0]["content"] and "do it" in first[0]["content"]
    assert "finish" in first[0]["content"]  # the agent's instructions moved into the user turn
    agent.toolbox.close()
    agent, model = make_agent(tmp_path, [[call("finish", message="ok")]])
    agent.run("do it")
    assert [m["role"] for m in model.seen[0]] == ["system", "user"]
    agent.toolbox.close()


def test_history_carries_over_between_tasks(tmp_path: Path):
    traj = tmp_path / "t.jsonl"
    traj.write_text('{"messages": [], "tools": []}\n')  # an earlier run's line is kept
    agent, model = make_agent(tmp_path, [[call("finish", message="one")], [call("finish", message="two")]],
                              trajectory=traj)
    assert agent.run("first").exit_code == 0
    assert agent.run("second").exit_code == 0
    second_request = model.seen[1]
    assert "first" in second_request[1]["content"] and "second" in second_request[-1]["content"]
    # The first finish call was answered before the new task, as servers require.
    assert second_request[-2]["role"] == "tool"
    lines = traj.read_text().splitlines()
    assert len(lines) == 2 and lines[0] == '{"messages": [], "tools": []}'
    validate_for_finetuning(json.loads(lines[1]))
    agent.toolbox.close()


def test_confirm_mode_asks_and_approve_similar(tmp_path: Path):
    asked = []
    answers = [Decision.NO, Decision.SIMILAR, Decision.YES]

    def approver(request):
        asked.append(request)
        return answers.pop(0)

    agent, _ = make_agent(tmp_path, [
        [call("execute_bash", command="echo one")],            # asked: no
        [call("execute_bash", command="echo two")],            # asked: similar
        [call("execute_bash", command="echo three | cat")],    # asked: `cat` is not approved yet -> yes
        [call("execute_bash", command="echo four")],           # not asked
        [call("finish", message="ok")],
    ], mode=Mode.CONFIRM, approver=approver)
    agent.run("t")
    obs = tool_messages(agent)
    assert "did not allow" in obs[0]
    assert obs[1].startswith("two") and obs[2].startswith("three") and obs[3].startswith("four")
    assert [r.action for r in asked] == ["run: echo one", "run: echo two", "run: echo three | cat"]
    assert asked[1].similar == "commands running echo"
    agent.toolbox.close()


@pytest.mark.parametrize("path_in_call", ["relative/file.py", ""])
def test_editor_wants_absolute_paths(tmp_path: Path, path_in_call: str):
    agent, _ = make_agent(tmp_path, [[call("str_replace_editor", command="create", path=path_in_call, file_text="x")],
                                     [call("finish", message="ok")]])
    agent.run("t")
    assert "must be absolute" in tool_messages(agent)[0] and str(tmp_path) in tool_messages(agent)[0]
    assert not (tmp_path / "relative").exists()
    agent.toolbox.close()
