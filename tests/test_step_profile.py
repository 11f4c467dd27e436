"""benchmarks/step_profile.py's attribution of a decode step to kernels, on a made-up trace: under
programmatic dependent launch a kernel starts before the one it waits for ends, and the exclusive
times must add up to the GPU's busy time (the union of the kernels' intervals), charging the wait to
the kernel waited for."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from step_profile import _boundaries, _idle, _trace, _two_layers, other_prompt  # noqa: E402


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
    by_name, by_grid, timeline, copies, _ = _trace(_Prof(events + [
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "ts": 14.0, "dur": 2.0},
        {"cat": "gpu_memset", "name": "Memset (Device)", "ts": 17.0, "dur": 1.0}]))
    assert copies == [("Memcpy HtoD (Pageable -> Device)", 14.0, 16.0), ("Memset (Device)", 17.0, 18.0)]
    assert by_name["_rms_norm_kernel"] == [1, 3.0, 3.0]
    assert by_name["_wide_kernel"] == [2, 15.0, 8.0 + 5.0]
    assert by_name["_decode_split_kernel"] == [1, 4.0, 2.0]
    union = 13.0 + 5.0  # [0, 13) and [20, 25)
    assert sum(v[2] for v in by_name.values()) == union
    assert sum(v[1] for v in by_name.values()) > union  # durations double-count the overlap
    grids = {k.split(" grid=")[1]: v for k, v in by_grid.items() if k.startswith("_wide_kernel")}
    assert grids["[1, 1, 1] regs=32"] == [1, 10.0, 8.0] and grids["[8, 1, 1] regs=32"] == [1, 5.0, 5.0]
    assert [t[0] for t in timeline] == ["_rms_norm_kernel", "_wide_kernel", "_decode_split_kernel", "_wide_kernel"]


def test_two_layers_of_the_last_step_with_their_overlap():
    """Two layers of the last step from its middle: times from the first kernel's start, and each kernel's gap
    to the latest end before it (negative: it started early, as a dependent launch)."""
    step = [(f"k{i % 3}", [1, 1, 1], 100.0 + 10 * i, 100.0 + 10 * i + 12) for i in range(12)]
    rows = _two_layers([("prefill", None, 0.0, 50.0)] + step, per_step=12, per_layer=3)
    assert [r[0] for r in rows] == ["k0", "k1", "k2", "k0", "k1", "k2"]  # kernels 6..11 of the step
    assert rows[0][2:] == [0.0, 12.0, 0.0] and rows[1][2:] == [10.0, 22.0, -2.0]


def _two_steps() -> list:
    """A prefill, then two steps of three kernels from 0 and 36 us: norm 4 us, a 1 us gap, GEMV 10 us, and a
    sampling kernel that overlaps the GEMV's last 1 us (a dependent launch)."""
    def step(t0):
        return [("_rms_norm_kernel", None, t0, t0 + 4), ("_wide_kernel", None, t0 + 5, t0 + 15),
                ("argmax", None, t0 + 14, t0 + 16)]
    return [("prefill", None, -100.0, -40.0)] + step(0.0) + step(36.0)


def test_idle_gaps_are_charged_to_the_kernels_they_sit_between():
    """Two steps of three kernels: inside a step the second kernel starts 1 us after the first ends (a gap) and
    the third overlaps it (no gap, a dependent launch); between steps the next norm starts 20 us after the
    sampling kernel ends. In all 1 + 20 + 1 us over the two steps (the window ends with the second step)."""
    timeline = _two_steps()
    got = _idle(timeline, per_step=3, steps=2)
    assert got["idle_us_per_step"] == round((1 + 20 + 1) / 2, 1)
    assert got["largest_by_transition_us_per_step"] == [["argmax -> _rms_norm_kernel", 10.0],
                                                         ["_rms_norm_kernel -> _wide_kernel", 1.0]]
    assert got["copy_us_per_step"] == 0.0 and got["copies_us_per_step"] == {}
    assert _idle(timeline, per_step=0, steps=2) == {}


def test_copies_in_a_gap_are_not_idle():
    """The same two steps with copies in the second step boundary (16 -> 36): an upload 20-26 and a memset 24-28
    overlapping it (their union, 8 us, is copy time, each charged for its own share once), plus a copy before the
    window that does not count: the boundary's idle is 20 - 8 us."""
    timeline = _two_steps()
    copies = [("Memcpy HtoD", -90.0, -80.0), ("Memcpy HtoD", 20.0, 26.0), ("Memset", 24.0, 28.0)]
    got = _idle(timeline, per_step=3, steps=2, copies=copies)
    assert got["idle_us_per_step"] == round((1 + 12 + 1) / 2, 1)
    assert got["copy_us_per_step"] == 4.0
    assert got["copies_us_per_step"] == {"Memcpy HtoD": 3.0, "Memset": 1.0}
    assert got["largest_by_transition_us_per_step"][0] == ["argmax -> _rms_norm_kernel", 6.0]


def test_boundaries_list_the_work_between_two_graph_replays():
    """A replay's kernels share one correlation id; what runs between two replays is the host's per-step work."""
    def op(cat, name, ts, dur, corr):
        return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}
    replay = lambda t0, corr: [op("kernel", f"g{i}", t0 + 10 * i, 8.0, corr) for i in range(16)]  # noqa: E731
    events = (replay(0.0, 1) + [op("kernel", "argmax", 160.0, 3.0, 2), op("gpu_memcpy", "Memcpy DtoH", 165.0, 2.0, 3)]
              + replay(180.0, 4) + replay(340.0, 5))
    got = _boundaries(events, graph_ops=16)
    assert got[0] == {"span_us": 22.0, "last_gap_us": 13.0,
                      "ops": [["argmax", 3.0, 2.0], ["Memcpy DtoH", 2.0, 2.0]]}
    assert got[1] == {"span_us": 2.0, "last_gap_us": 2.0, "ops": []}  # back to back: only the launch gap
    assert _boundaries([_kernel("k", 0.0, 1.0)]) == []  # no correlation ids: nothing to say


def test_the_two_profiled_prompts_share_no_cached_block():
    """The step is the difference of two generations; if the second found the first's blocks in the prefix cache
    its prefill would be shorter and the difference would carry prefill kernels."""
    for ids in ([1, 1005, 1006, 1007], [1, 1004, 1004, 1004], [1, 1002, 1003, 1002], [1] + list(range(1000, 1511))):
        other = other_prompt(ids)
        assert len(other) == len(ids) and other[0] == ids[0]
        assert all(a != b for a, b in zip(other[1:], ids[1:], strict=True))  # every block differs
        assert max(other) <= max(ids) + 1 and min(other[1:]) >= 1000
