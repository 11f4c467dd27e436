"""Security: confinement of edits, reads outside and sensitive files, process cleanup, secret masking."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from devstral.agent import (
    Decision,
    Mode,
    Policy,
    SecretMasker,
    ToolBox,
    ToolLimits,
    TrajectoryWriter,
    Workspace,
)
from devstral.agent.secrets import MASK


def toolbox(ws: Path, mode: Mode, approver=None, env=None, masker=None) -> ToolBox:
    workspace = Workspace.open(ws)
    return ToolBox(workspace, Policy(mode, workspace, approver), masker or SecretMasker(env or {}),
                   ToolLimits(soft_timeout_s=5), env=env)


def always_yes(request):
    return Decision.YES


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("mode,approver", [(Mode.AUTO, None), (Mode.CONFIRM, always_yes)])
def test_edits_outside_the_workspace_are_refused(tmp_path: Path, mode, approver):
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (outside / "victim.txt").write_text("original\n")
    (ws / "link_dir").symlink_to(outside, target_is_directory=True)
    (ws / "link_file").symlink_to(outside / "victim.txt")
    (ws / "dangling").symlink_to(outside / "new.txt")
    before = snapshot(outside)
    tb = toolbox(ws, mode, approver)
    attempts = [
        {"command": "create", "path": f"{ws}/../outside/new.txt", "file_text": "x"},
        {"command": "create", "path": str(outside / "abs.txt"), "file_text": "x"},
        {"command": "create", "path": f"{ws}/link_dir/via_link.txt", "file_text": "x"},
        {"command": "create", "path": f"{ws}/dangling", "file_text": "x"},
        {"command": "str_replace", "path": f"{ws}/link_file", "old_str": "original", "new_str": "owned"},
        {"command": "insert", "path": f"{ws}/../outside/victim.txt", "insert_line": 0, "new_str": "owned"},
        {"command": "str_replace", "path": "/etc/hostname", "old_str": "a", "new_str": "b"},
    ]
    for args in attempts:
        obs = tb.run("str_replace_editor", tb.validate("str_replace_editor", args))
        assert obs.startswith("ERROR: Refused") and "outside the workspace" in obs, obs
    assert snapshot(outside) == before
    tb.close()


def test_reads_outside_ask_in_confirm_and_are_refused_in_auto(tmp_path: Path):
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (outside / "notes.txt").write_text("hello outside\n")
    args = {"command": "view", "path": str(outside / "notes.txt")}
    tb = toolbox(ws, Mode.AUTO)
    assert tb.run("str_replace_editor", args).startswith("ERROR: Refused in auto mode")
    tb.close()
    asked = []
    tb = toolbox(ws, Mode.CONFIRM, lambda r: asked.append(r) or Decision.NO)
    assert "did not allow" in tb.run("str_replace_editor", args)
    tb.close()
    tb = toolbox(ws, Mode.CONFIRM, lambda r: asked.append(r) or Decision.YES)
    assert "hello outside" in tb.run("str_replace_editor", args)
    assert len(asked) == 2 and "outside the workspace" in asked[0].warnings[0]
    tb.close()


@pytest.mark.parametrize("name", [".env", "server.pem", "id_rsa", ".ssh/config"])
def test_sensitive_files_ask(tmp_path: Path, name: str):
    target = tmp_path / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("TOKEN=abc\n")
    asked = []
    tb = toolbox(tmp_path, Mode.CONFIRM, lambda r: asked.append(r) or Decision.NO)
    assert "did not allow" in tb.run("str_replace_editor", {"command": "view", "path": str(target)})
    assert "did not allow" in tb.run("execute_bash", {"command": f"cat {name}"})
    assert len(asked) == 2 and asked[1].similar is None  # never covered by "approve similar"
    tb.close()
    tb = toolbox(tmp_path, Mode.AUTO)
    assert "Refused in auto mode" in tb.run("str_replace_editor", {"command": "view", "path": str(target)})
    assert "Refused in auto mode" in tb.run("execute_bash", {"command": f"cat {name}"})
    tb.close()


def test_read_only_mode(tmp_path: Path):
    (tmp_path / "a.txt").write_text("keep\n")
    tb = toolbox(tmp_path, Mode.READ_ONLY)
    assert "keep" in tb.run("execute_bash", {"command": "cat a.txt | grep keep && git status 2>/dev/null; ls"})
    for command in ["rm a.txt", "echo x > a.txt", "find . -delete", "sed -i s/k/K/ a.txt", "cat $(echo a.txt)"]:
        assert "read-only mode" in tb.run("execute_bash", {"command": command}), command
    assert "read-only mode" in tb.run("str_replace_editor", {"command": "create", "path": str(tmp_path / "b"),
                                                             "file_text": "x"})
    assert (tmp_path / "a.txt").read_text() == "keep\n" and not (tmp_path / "b").exists()
    tb.close()


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_hard_timeout_kills_the_command_and_its_children(tmp_path: Path):
    tb = toolbox(tmp_path, Mode.AUTO)
    obs = tb.run("execute_bash", {"command": "sleep 1000 & echo $! > child.pid; sleep 1000", "timeout": 2})
    assert "killed together with its child processes" in obs and "Exit code -1" in obs
    child = int((tmp_path / "child.pid").read_text())
    assert _dead(child)
    assert "alive" in tb.run("execute_bash", {"command": "echo alive"})  # the session still works
    tb.close()


def test_background_processes_are_cleaned_up_on_exit(tmp_path: Path):
    tb = toolbox(tmp_path, Mode.AUTO)
    obs = tb.run("execute_bash", {"command": "sleep 1000 & echo $! > a.pid; (setsid sleep 1000 & echo $! > b.pid); "
                                             "nohup sleep 1000 >/dev/null 2>&1 & echo $! > c.pid; sleep 0.2"})
    assert "exit code 0" in obs
    pids = [int((tmp_path / f"{n}.pid").read_text()) for n in "abc"]
    assert not any(_dead(p) for p in pids)  # they outlived their command
    tb.close()
    assert all(_dead(p) for p in pids)


def test_c_c_interrupts_even_when_the_agent_ignores_sigint(tmp_path: Path):
    """An agent started in the background by a script inherits SIGINT ignored; the commands must not: the
    supervisor puts the default back, so the model's C-c still stops them."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        workspace = Workspace.open(tmp_path)
        tb = ToolBox(workspace, Policy(Mode.AUTO, workspace), SecretMasker({}), ToolLimits(soft_timeout_s=0.5))
        assert "still running" in tb.run("execute_bash", {"command": "echo started; sleep 1000"})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "exit code 130" in tb.run("execute_bash", {"command": "C-c", "is_input": "true"})
    tb.close()


def test_soft_timeout_returns_partial_output_and_c_c_interrupts(tmp_path: Path):
    workspace = Workspace.open(tmp_path)
    tb = ToolBox(workspace, Policy(Mode.AUTO, workspace), SecretMasker({}), ToolLimits(soft_timeout_s=0.5))
    obs = tb.run("execute_bash", {"command": "echo started; sleep 1000"})
    assert obs.startswith("started") and "still running" in obs
    assert "still running" in tb.run("execute_bash", {"command": "echo other"})
    obs = tb.run("execute_bash", {"command": "C-c", "is_input": "true"})
    assert "exit code 130" in obs
    assert "nothing to send input to" in tb.run("execute_bash", {"command": "C-c", "is_input": "true"})
    assert "bye" in tb.run("execute_bash", {"command": "echo bye"})
    tb.close()


def test_shell_environment_and_stdin(tmp_path: Path):
    tb = toolbox(tmp_path, Mode.AUTO)
    obs = tb.run("execute_bash", {"command": 'echo "$PAGER $GIT_PAGER $TERM"; cat; echo stdin-done'})
    assert obs.startswith("cat cat dumb\nstdin-done")  # cat read /dev/null and returned at once
    tb.close()


def test_secrets_are_absent_unless_passed_and_then_masked(tmp_path: Path):
    secret, exported = "s3cr3t-value-123456", "made-up-token-98765"
    env = dict(os.environ, MY_API_KEY=secret)
    masker = SecretMasker(env)
    tb = toolbox(tmp_path, Mode.AUTO, env=env, masker=masker)
    assert tb.run("execute_bash", {"command": "echo \"[$MY_API_KEY]\""}).startswith("[]\n")  # not passed: absent
    tb.close()
    workspace = Workspace.open(tmp_path)
    tb = ToolBox(workspace, Policy(Mode.AUTO, workspace), masker, ToolLimits(soft_timeout_s=5), env=env,
                 pass_env=["MY_API_KEY"])
    obs1 = tb.run("execute_bash", {"command": "echo $MY_API_KEY"})
    tb.run("execute_bash", {"command": f"export GH_TOKEN={exported}"})
    obs2 = tb.run("execute_bash", {"command": "echo $GH_TOKEN"})
    assert secret not in obs1 and MASK in obs1 and exported not in obs2 and MASK in obs2
    traj = tmp_path / "t.jsonl"
    messages = [
        {"role": "user", "content": f"use key {secret}"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "abcdefghi", "type": "function", "function": {
            "name": "execute_bash", "arguments": json.dumps({"command": f"curl -H 'x: {secret}'"})}}]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": obs1},
        {"role": "assistant", "content": f"the token is {exported}"},
    ]
    TrajectoryWriter(traj, tb.schemas, masker).write(messages)
    text = traj.read_text()
    assert secret not in text and exported not in text and text.count(MASK) == 4
    tb.close()


@pytest.mark.parametrize("passed,expected", [([], None), (["FOO"], "bar"), (["FOO=baz"], "baz")])
def test_command_environment_is_an_allowlist(passed, expected):
    from devstral.agent.environment import command_environment

    env = command_environment({"PATH": "/bin", "LANG": "C.UTF-8", "FOO": "bar", "AWS_SECRET_ACCESS_KEY": "x" * 20,
                               "HOME": "/home/me"}, passed)
    assert env.get("FOO") == expected and env["PATH"] == "/bin" and env["LANG"] == "C.UTF-8"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "HOME" not in env  # HOME: the session's own, set later


def test_env_flag_errors_are_one_line(tmp_path: Path, capsys):
    from devstral.cli import main

    assert main(["agent", "t", "-w", str(tmp_path), "--base-url", "http://127.0.0.1:1", "--mode", "auto",
                 "--no-sandbox", "--env", "NO_SUCH_VARIABLE_XYZ"]) == 2
    err = capsys.readouterr().err
    assert "--env NO_SUCH_VARIABLE_XYZ" in err and len(err.strip().splitlines()) == 1


def test_max_output_kills_and_keeps_head_and_tail(tmp_path: Path):
    workspace = Workspace.open(tmp_path)
    tb = ToolBox(workspace, Policy(Mode.AUTO, workspace), SecretMasker({}),
                 ToolLimits(soft_timeout_s=10, max_output_bytes=300_000))
    obs = tb.run("execute_bash", {"command": "seq 1 1000000", "timeout": 120})
    assert obs.startswith("1\n2\n3\n") and "printed more than 300000 bytes and was killed" in obs
    head, cut, tail = obs.partition(" bytes of output cut here")
    assert cut and len(obs) < 30_000
    numbers = [int(x) for x in tail.split("\n")[1:] if x.isdigit()][:-1]  # the last line may be cut by the kill
    assert len(numbers) > 1000 and numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    obs = tb.run("execute_bash", {"command": "seq 1 5000"})  # under the limit: all of it, nothing cut
    assert obs.startswith("\n".join(map(str, range(1, 5001))) + "\n")
    tb.close()


@pytest.mark.parametrize("sandboxed", [False, True], ids=["no-sandbox", "sandbox"])
def test_a_killed_supervisor_gives_a_fresh_session(tmp_path: Path, sandboxed: bool):
    from devstral.agent import SandboxOptions
    from devstral.agent.sandbox import detect

    if sandboxed and not detect().available:
        pytest.skip(f"no bubblewrap sandbox here: {detect().reason}")
    workspace = Workspace.open(tmp_path)
    tb = ToolBox(workspace, Policy(Mode.AUTO, workspace), SecretMasker({}), ToolLimits(soft_timeout_s=5),
                 sandbox=SandboxOptions(enabled=sandboxed))
    tb.run("execute_bash", {"command": "export KEPT=1; mkdir sub; cd sub"})
    obs = tb.run("execute_bash", {"command": "kill -9 $PPID; sleep 5"})  # $PPID: the supervisor
    assert "The shell session was lost" in obs
    obs = tb.run("execute_bash", {"command": "echo kept=$KEPT; pwd"})
    assert obs.startswith(f"kept=\n{tmp_path / 'sub'}\n") and "exit code 0" in obs
    tb.close()


def test_sandbox_detection_says_why_there_is_none(tmp_path: Path, monkeypatch):
    from devstral.agent.sandbox import detect

    monkeypatch.setenv("PATH", str(tmp_path))
    status = detect.__wrapped__()
    assert not status.available and "bubblewrap is not installed" in status.reason
    # A bwrap that cannot create namespaces (as in an unprivileged container) answers like this one.
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    status = detect.__wrapped__()
    assert not status.available and "No permissions to create new namespace" in status.reason
