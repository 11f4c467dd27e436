"""kernels/stamps.py: the phases computed from a snapshot, by hand; stamps stay off on the CPU. The kernels'
timer reads are checked in their PTX (tests/test_kernels_pdl.py); the GPU fills the buffer."""

from __future__ import annotations

import torch

from devstral.kernels import stamps


def _snapshot() -> dict[str, list[list[int]]]:
    t = 1_000_000_000  # ns; every stamp below is t + an offset
    return {
        "rope_store": [[t, t + 500, t + 2_000, t + 2_000]],
        # two splits with keys (they passed the wait 800 and 1_200 ns after RoPE's end), one with none
        "attention_split": [[t + 100, t + 2_800, t + 5_800, t + 6_300],
                             [t + 100, t + 3_200, t + 6_200, t + 7_000],
                             [t + 100, t + 2_900, 0, t + 3_100]],
        "attention_merge": [[t + 200, t + 8_000, t + 9_000, t + 9_500], [t + 200, t + 8_100, 0, t + 8_200]],
        "norm": [[t, t + 1_000, t + 1_600, t + 2_600], [t, t + 1_200, t + 2_000, t + 2_800]],
    }


def test_phases_from_a_hand_made_snapshot():
    ph = stamps.phases(_snapshot())
    assert ph["rope_wait_to_end"] == 1.5
    assert ph["rope_end_to_split_waited_first"] == 0.8 and ph["rope_end_to_split_waited_last"] == 1.2
    assert ph["split_waited_to_work_median"] == 3.0  # both busy splits took 3 us from the wait to their data
    assert ph["split_work_to_end_median"] == 0.8  # 0.5 and 0.8: the upper median of two
    assert ph["rope_end_to_split_end"] == 5.0
    assert ph["split_programs_busy"] == 2 and ph["split_programs"] == 3
    assert ph["rope_end_to_idle_split_end_last"] == 1.1
    assert ph["split_end_to_merge_waited_first"] == 1.0  # the merge with work, 8_000 - 7_000
    assert ph["merge_waited_to_work_median"] == 1.0 and ph["rope_end_to_merge_end"] == 7.5
    assert ph["norm_start_to_waited_median"] == 1.2 and ph["norm_waited_to_work_median"] == 0.8
    assert ph["norm_work_to_end_median"] == 1.0


def test_phases_of_an_empty_snapshot_are_empty():
    assert stamps.phases({name: [] for name in stamps.NAMES}) == {}


def test_stamps_are_off_on_the_cpu(monkeypatch):
    out = torch.empty(3)
    assert stamps.kernel_args(torch.device("cpu"), out) == (out, False)
    stamps.enabled.cache_clear()
    monkeypatch.setenv("DEVSTRAL_STAMPS", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        assert not stamps.enabled()
        assert stamps.snapshot(torch.device("cpu")) is None
        stamps.enabled.cache_clear()
        monkeypatch.delenv("TRITON_INTERPRET")
        assert stamps.enabled()  # asked for, yet a CPU device has no stamps to read or pass
        assert stamps.snapshot(torch.device("cpu")) is None
        assert stamps.kernel_args(torch.device("cpu"), out) == (out, False)
    finally:
        stamps.enabled.cache_clear()
