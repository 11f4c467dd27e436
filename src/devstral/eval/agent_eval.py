"""`devstral eval agent`: the agent on a suite of small repository tasks, each checked by its own command.

A task is a folder (see agent_tasks/README.md): `task.json`, `repo/` and optionally `check/`. Each run
works in a fresh temporary copy of `repo/`, with the same agent `devstral agent --mode auto` runs
(same tools, policy and limits). When the agent stops (finished or a limit), the `check/` files are
copied over its copy and the task's check command runs there, with a timeout, in its own process
group, killed whole at the end. Success is the check's exit code 0, whatever the agent said.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devstral.errors import DevstralError

SUITE_DIR = Path(__file__).parent / "agent_tasks"
_TAIL = 2000


@dataclass(frozen=True)
class AgentTask:
    name: str
    folder: Path
    prompt: str
    check: list[str]
    check_timeout_s: float = 60.0
    max_steps: int | None = None
    kind: str = ""


def _load_task(folder: Path) -> AgentTask:
    spec_path = folder / "task.json"
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DevstralError(f"{spec_path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DevstralError(f"{spec_path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(spec, dict):
        raise DevstralError(f"{spec_path}: expected a JSON object")
    prompt, check = spec.get("prompt"), spec.get("check")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DevstralError(f"{spec_path}: field 'prompt' must be a non-empty string")
    if not isinstance(check, list) or not check or not all(isinstance(a, str) for a in check):
        raise DevstralError(f"{spec_path}: field 'check' must be a non-empty list of strings (a command)")
    if not (folder / "repo").is_dir():
        raise DevstralError(f"{folder}: no repo/ folder")
    timeout = spec.get("check_timeout_s", 60)
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise DevstralError(f"{spec_path}: field 'check_timeout_s' must be a positive number")
    max_steps = spec.get("max_steps")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise DevstralError(f"{spec_path}: field 'max_steps' must be a positive integer")
    return AgentTask(folder.name, folder, prompt, check, float(timeout), max_steps, str(spec.get("kind", "")))


def load_suite(suite: Path | None = None, names: list[str] | None = None) -> list[AgentTask]:
    """The tasks of a suite folder (default: the one shipped with devstral), sorted by name."""
    root = Path(suite) if suite is not None else SUITE_DIR
    if not root.is_dir():
        raise DevstralError(f"--suite {root}: no such folder")
    tasks = [_load_task(d) for d in sorted(root.iterdir()) if (d / "task.json").is_file()]
    if not tasks:
        raise DevstralError(f"--suite {root}: no task folders (a task is a folder with task.json and repo/)")
    if names:
        known = {t.name: t for t in tasks}
        missing = [n for n in names if n not in known]
        if missing:
            raise DevstralError(f"unknown task {missing[0]!r}; the suite has {', '.join(known)}")
        tasks = [known[n] for n in names]
    return tasks


@dataclass
class TaskResult:
    name: str
    kind: str
    success: bool
    stop: str  # "finished" or "limit" or "error"
    reason: str
    steps: int
    prompt_tokens: int
    completion_tokens: int
    check_exit_code: int | None
    check_output: str
    agent_s: float
    check_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AgentReport:
    model: str
    results: list[TaskResult] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return sum(r.success for r in self.results) / max(len(self.results), 1)

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": "agent-tasks", "model": self.model, "tasks": len(self.results),
                "solved": sum(r.success for r in self.results), "success_rate": self.success_rate,
                "steps": sum(r.steps for r in self.results),
                "prompt_tokens": sum(r.prompt_tokens for r in self.results),
                "completion_tokens": sum(r.completion_tokens for r in self.results),
                "results": [r.to_dict() for r in self.results]}

    def summary(self) -> str:
        lines = [f"agent tasks: {sum(r.success for r in self.results)}/{len(self.results)} solved "
                 f"({100 * self.success_rate:.1f} %), model {self.model}"]
        for r in self.results:
            mark = "PASS" if r.success else "FAIL"
            lines.append(f"  {mark} {r.name:<24} {r.steps:>3} steps  {r.prompt_tokens:>7} prompt + "
                         f"{r.completion_tokens:>6} completion tokens  agent {r.stop}: {r.reason[:60]}")
        total = self.to_dict()
        lines.append(f"total: {total['steps']} steps, {total['prompt_tokens']} prompt + "
                     f"{total['completion_tokens']} completion tokens")
        return "\n".join(lines)


def run_check(task: AgentTask, workspace: Path) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, the output's tail, seconds)."""
    if (task.folder / "check").is_dir():
        shutil.copytree(task.folder / "check", workspace, dirs_exist_ok=True)
    argv = [sys.executable if a == "{python}" else a.replace("{python}", sys.executable) for a in task.check]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(workspace)}
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(argv, cwd=workspace, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as e:
            return 127, f"cannot run the check {argv[0]}: {e.strerror}", 0.0
        try:
            rc: int | None = proc.wait(timeout=task.check_timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        text = out.read().decode("utf-8", errors="replace")
    if rc is None:
        text += f"\n[check killed after {task.check_timeout_s:g} s]"
    return rc, text[-_TAIL:], time.monotonic() - start


def run_task(task: AgentTask, model, *, max_steps: int = 30, max_time_s: float | None = 600.0,
             soft_timeout_s: float = 30.0, trajectory: Path | None = None, keep: Path | None = None,
             on_event=None) -> TaskResult:
    """One task in a fresh copy of its repo; `model` is any agent ChatModel."""
    from devstral.agent import (
        Agent,
        AgentLimits,
        Finished,
        Mode,
        Policy,
        SecretMasker,
        ToolBox,
        ToolLimits,
        TrajectoryWriter,
        Workspace,
    )

    tmp = Path(tempfile.mkdtemp(prefix=f"devstral-eval-{task.name}-"))
    try:
        shutil.copytree(task.folder / "repo", tmp / "repo")
        ws = Workspace.open(tmp / "repo")
        masker = SecretMasker(os.environ)
        toolbox = ToolBox(ws, Policy(Mode.AUTO, ws, None), masker, ToolLimits(soft_timeout_s=soft_timeout_s))
        writer = TrajectoryWriter(trajectory, toolbox.schemas, masker) if trajectory else None
        usage = {"steps": 0, "prompt_tokens": 0, "completion_tokens": 0}

        def event(kind: str, data: dict[str, Any]) -> None:
            if kind == "assistant":
                usage["steps"] = max(usage["steps"], int(data.get("step") or 0))
                u = data.get("usage") or {}
                usage["prompt_tokens"] += int(u.get("prompt_tokens") or 0)
                usage["completion_tokens"] += int(u.get("completion_tokens") or 0)
            if on_event is not None:
                on_event(kind, data)

        runner = Agent(model, toolbox, limits=AgentLimits(max_steps=task.max_steps or max_steps,
                                                          max_time_s=max_time_s),
                       trajectory=writer, on_event=event)
        start = time.monotonic()
        try:
            stop = runner.run(task.prompt)
            kind, reason = ("finished" if isinstance(stop, Finished) else "limit"), str(stop)
        except DevstralError as e:  # the model failed (a server went away): the task fails, the suite goes on
            kind, reason = "error", str(e)
        finally:
            toolbox.close()
        agent_s = time.monotonic() - start
        rc, output, check_s = run_check(task, ws.root)
        if keep is not None:
            shutil.copytree(tmp / "repo", Path(keep) / task.name, dirs_exist_ok=True)
        return TaskResult(task.name, task.kind, rc == 0, kind, reason, usage["steps"], usage["prompt_tokens"],
                          usage["completion_tokens"], rc, output, round(agent_s, 2), round(check_s, 2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_suite(tasks: list[AgentTask], model, *, model_label: str, trajectories: Path | None = None,
              on_task=None, **kwargs: Any) -> AgentReport:
    report = AgentReport(model_label)
    if trajectories is not None:
        try:
            Path(trajectories).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DevstralError(f"--trajectories {trajectories}: {e.strerror}") from None
    for task in tasks:
        traj = Path(trajectories) / f"{task.name}.jsonl" if trajectories is not None else None
        result = run_task(task, model, trajectory=traj, **kwargs)
        report.results.append(result)
        if on_task is not None:
            on_task(result)
    return report
