"""benchmarks/step_profile.py's attribution of a decode step to kernels, on a made-up trace: under
programmatic dependent launch a kernel starts before the one it waits for ends, and the exclusive
times must add up to the GPU's busy time (the union of the kernels' intervals), charging the wait to
the kernel waited for."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from step_profile import _trace  # noqa: E402


class _Prof:
    def __init__(self, events):
        self.events = events

    def export_chrome_trace(self, path):
        Path(path).write_text(json.dumps({"traceEvents": self.events}))


def _kernel(name, ts, dur, grid=(1, 1, 1)):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"grid": list(grid), "registers per thread": 32}}


def test_exclusive_times_add_up_to_the_busy_time_under_overlap():
    events = [
        _kernel("_rms_norm_kernel", 0.0, 3.0),
        _kernel("_wide_kernel", 1.0, 10.0),  # launched early, waited 2 us for the norm
        _kernel("_decode_split_kernel", 9.0, 4.0),  # overlaps the GEMV's tail by 2 us
        _kernel("_wide_kernel", 20.0, 5.0, grid=(8, 1, 1)),  # after a gap: all its own
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 100.0},  # not a kernel
    ]
    by_name, by_grid = _trace(_Prof(events))
    assert by_name["_rms_norm_kernel"] == [1, 3.0, 3.0]
    assert by_name["_wide_kernel"] == [2, 15.0, 8.0 + 5.0]
    assert by_name["_decode_split_kernel"] == [1, 4.0, 2.0]
    union = 13.0 + 5.0  # [0, 13) and [20, 25)
    assert sum(v[2] for v in by_name.values()) == union
    assert sum(v[1] for v in by_name.values()) > union  # durations double-count the overlap
    grids = {k.split(" grid=")[1]: v for k, v in by_grid.items() if k.startswith("_wide_kernel")}
    assert grids["[1, 1, 1] regs=32"] == [1, 10.0, 8.0] and grids["[8, 1, 1] regs=32"] == [1, 5.0, 5.0]
