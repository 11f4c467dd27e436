"""`--max-minutes`: train for a wall-clock budget instead of a step count.

The learning-rate schedule needs its length up front (cosine decays to zero at the last step), so the
step count is fixed once, early: after CALIBRATION steps the median step time gives how many steps fit
in what is left of the budget. Everything before the loop (loading, tokenizing) counts against it, and a
reserve is kept for the final evaluation and save.
"""

from __future__ import annotations

import statistics
import time

CALIBRATION = 50  # steps timed before the count is fixed; the first SKIP (allocator growth, autotune) are left out
# (on an H200 the median of steps 4-20 was 16 % slower than the rest: the 6.5-minute run had an 8.5-minute budget)
SKIP = 10
RESERVE = 0.04  # of the budget, for the evaluations, checkpoints and the final save
UNBOUNDED = 1 << 62  # the step count before calibration, when only the budget bounds the run


class TimeBudget:
    def __init__(self, minutes: float, *, started: float | None = None, clock=None):
        self.seconds = minutes * 60.0
        self.clock = clock or time.perf_counter
        self.started = self.clock() if started is None else started
        self.times: list[float] = []

    def observe(self, step_seconds: float) -> None:
        self.times.append(step_seconds)

    def ready(self) -> bool:
        return len(self.times) == CALIBRATION

    @property
    def per_step(self) -> float:
        return statistics.median(self.times[SKIP:] or self.times)

    def total_steps(self, done: int, cap: int) -> int:
        """The run's step count, given `done` steps so far and at most `cap` (at least done + 1)."""
        per_step = self.per_step
        left = self.seconds * (1.0 - RESERVE) - (self.clock() - self.started)
        return max(done + 1, min(cap, done + int(left / per_step)))
