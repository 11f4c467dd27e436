"""`--max-minutes`: the step count is fixed once from measured step times, and the run keeps to it."""

from __future__ import annotations

import json

import pytest

from devstral.cli import main
from devstral.train.time_budget import CALIBRATION, RESERVE, TimeBudget


def test_the_count_fills_what_is_left_of_the_budget_and_respects_the_cap():
    now = [100.0]
    budget = TimeBudget(10.0, clock=lambda: now[0])  # 600 s from t=100
    for t in [5.0, 4.0, 3.0] + [1.0] * (CALIBRATION - 3):  # slow first steps (compile, allocator) are skipped
        budget.observe(t)
    assert budget.ready() and budget.per_step == 1.0
    now[0] = 100.0 + 60.0  # loading and the calibration steps used a minute
    total = budget.total_steps(CALIBRATION, cap=10**9)
    assert total == CALIBRATION + int(600 * (1 - RESERVE) - 60)
    assert budget.total_steps(CALIBRATION, cap=CALIBRATION + 30) == CALIBRATION + 30
    now[0] = 100.0 + 10_000.0  # already over: stop after one more step rather than never
    assert budget.total_steps(CALIBRATION, cap=10**9) == CALIBRATION + 1


def _finetune(tmp_path, tiny_hf, *extra):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} " * (5 + i % 7)}) + "\n" for i in range(24)))
    out = tmp_path / "out"
    code = main(["finetune", "--model", str(tiny_hf), "--data", str(data), "--output", str(out), "--full",
                 "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--no-progress", "--max-seq-len", "64",
                 *extra])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return code, [r for r in rows if "loss" in r]


def test_a_spent_budget_stops_one_step_after_calibration_and_the_schedule_ends_there(tmp_path, tiny_hf):
    code, steps = _finetune(tmp_path, tiny_hf, "--max-minutes", "0.0001", "--schedule", "linear")
    assert code == 0 and len(steps) == CALIBRATION + 1
    # before calibration the count is unbounded (lr stays at its peak); the last step is then the final one of a
    # linear decay over CALIBRATION + 1 steps
    assert steps[0]["lr"] == pytest.approx(1e-3) and steps[-1]["lr"] == pytest.approx(1e-3 / (CALIBRATION + 1))


def test_max_steps_caps_a_generous_budget(tmp_path, tiny_hf):
    code, steps = _finetune(tmp_path, tiny_hf, "--max-minutes", "60", "--max-steps", "25")
    assert code == 0 and len(steps) == 25


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_bad_budget_is_one_line(tmp_path, tiny_hf, capsys, value):
    code = main(["finetune", "--model", str(tiny_hf), "--data", str(tmp_path / "x.jsonl"), "--output",
                 str(tmp_path / "o"), "--max-minutes", value])
    assert code == 2 and "--max-minutes must be a positive number" in capsys.readouterr().err
