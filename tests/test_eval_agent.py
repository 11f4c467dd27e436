"""`devstral eval agent`: the harness driven by scripted models (so the harness is tested, not a model).

The suite's own checks are the oracle: each must fail on the untouched repository and pass once the
task is really done."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from devstral.agent import ChatReply
from devstral.cli import main
from devstral.eval.agent_eval import SUITE_DIR, load_suite, run_suite

FIX = "sed -i 's/price + quantity/price \\* quantity/' inventory.py && python3 -m unittest -q 2>&1 | tail -1"
SLUGIFY = """cat >> textutils.py <<'EOF'


def slugify(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
EOF"""
RENAME = "grep -rl calc_area --include=*.py . | xargs sed -i 's/calc_area/rectangle_area/g' && python3 main.py"


def call(name: str, **args) -> dict:
    return {"name": name, "arguments": json.dumps(args)}


class ScriptedModel:
    """Replies from a per-task script, chosen by a phrase of the task; each reply reports token usage."""

    provides_system_prompt = False

    def __init__(self, scripts: dict[str, list]):
        self.scripts = {key: list(replies) for key, replies in scripts.items()}

    def check(self) -> None:
        pass

    def chat(self, messages, tools):
        task = next(m["content"] for m in messages if m["role"] == "user")
        key = next(k for k in self.scripts if k in task)
        reply = self.scripts[key].pop(0) if self.scripts[key] else [call("think", thought="nothing left")]
        calls = [{"id": f"call{i:05d}", "type": "function", "function": c} for i, c in enumerate(reply)]
        return ChatReply({"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls",
                         usage={"prompt_tokens": 100 * len(messages), "completion_tokens": 10})


def run(model, **kw):
    return run_suite(load_suite(), model, model_label="scripted", max_steps=kw.pop("max_steps", 6),
                     max_time_s=120, soft_timeout_s=20, **kw)


def test_the_suite_has_the_three_kinds_of_task():
    tasks = load_suite()
    assert [t.name for t in tasks] == ["add-function", "fix-failing-test", "rename-across-files"]
    assert {t.kind for t in tasks} == {"fix a failing test", "add a function", "rename across files"}


def test_reference_solutions_pass_every_check(tmp_path: Path):
    model = ScriptedModel({
        "failing test": [[call("execute_bash", command=FIX)], [call("finish", message="fixed")]],
        "slugify": [[call("execute_bash", command=SLUGIFY)], [call("finish", message="added")]],
        "calc_area": [[call("execute_bash", command=RENAME)], [call("finish", message="renamed")]],
    })
    report = run(model, trajectories=tmp_path / "traj")
    assert [(r.name, r.success, r.stop) for r in report.results] == [
        ("add-function", True, "finished"), ("fix-failing-test", True, "finished"),
        ("rename-across-files", True, "finished")]
    assert report.success_rate == 1.0
    assert sorted(p.name for p in (tmp_path / "traj").iterdir()) == [
        "add-function.jsonl", "fix-failing-test.jsonl", "rename-across-files.jsonl"]
    # every run worked in a copy: the shipped suite is untouched
    assert "price + quantity" in (SUITE_DIR / "fix-failing-test" / "repo" / "inventory.py").read_text()


def test_one_task_solved_one_abandoned_one_out_of_steps():
    model = ScriptedModel({
        "failing test": [[call("execute_bash", command="python3 -m unittest 2>&1 | tail -3")],
                         [call("execute_bash", command=FIX)], [call("finish", message="fixed")]],
        "slugify": [[call("finish", message="I added slugify.")]],  # claims success, did nothing
        "calc_area": [],  # only thinks until the step limit
    })
    report = run(model, max_steps=4)
    by_name = {r.name: r for r in report.results}
    assert by_name["fix-failing-test"].success and by_name["fix-failing-test"].steps == 3
    assert not by_name["add-function"].success and by_name["add-function"].stop == "finished"
    assert "slugify" in by_name["add-function"].check_output  # the check's ImportError
    assert not by_name["rename-across-files"].success and by_name["rename-across-files"].stop == "limit"
    assert by_name["rename-across-files"].steps == 4
    assert report.success_rate == pytest.approx(1 / 3)
    d = report.to_dict()
    assert d["solved"] == 1 and d["steps"] == 3 + 1 + 4
    assert d["completion_tokens"] == 10 * 8
    # the scripted usage is 100 tokens per message in the conversation: the harness sums every call's
    assert d["prompt_tokens"] == sum(r.prompt_tokens for r in report.results) > 0


def test_editing_the_tests_does_not_make_a_task_pass():
    cheat = "printf 'def test_nothing():\\n    pass\\n' > test_inventory.py && python3 -m unittest -q"
    model = ScriptedModel({"failing test": [[call("execute_bash", command=cheat)], [call("finish", message="ok")]],
                           "slugify": [[call("finish", message="-")]], "calc_area": [[call("finish", message="-")]]})
    report = run(model)
    assert [r.success for r in report.results] == [False, False, False]  # every check fails untouched


def test_bad_suites_and_unreachable_servers_are_one_line(tmp_path: Path, capsys):
    bad = tmp_path / "suite" / "broken"
    shutil.copytree(SUITE_DIR / "add-function", bad)
    (bad / "task.json").write_text('{"prompt": "x", "check": "not a list"}')
    assert main(["eval", "agent", "--suite", str(tmp_path / "suite"), "--base-url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("task.json: field 'check' must be a non-empty list of strings (a command)")
    assert "\n" not in err
    assert main(["eval", "agent", "--task", "nope", "--base-url", "http://127.0.0.1:9"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "agent", "--base-url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach the model endpoint http://127.0.0.1:9/v1") and "\n" not in err
