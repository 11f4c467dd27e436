"""A decode graph's inputs moved on by one token on the device (kernels/decode_advance*.py), against what the
runner's step_inputs would upload for the next step -- the kernel in Triton's interpreter on CPU -- and the
runner's record of what the buffers hold (model_runner.Ahead), which decides when a graph is replayed bare.
GPU (`-m gpu`, tests/test_engine_gpu.py): the overlapped engine with advancing graphs against the engine
without them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from devstral.engine.model_runner import Ahead
from devstral.engine.sampling import SamplingParams
from devstral.engine.scheduler import ScheduledSeq
from devstral.engine.sequence import Sequence
from devstral.kernels.decode_advance import advance, advance_ref

BS = 16


def uploaded(rows: list[tuple[int, list[int]]], padding: int, width: int):
    """The graph buffers as the runner's copies leave them: rows (position, block table), then padding rows
    (slot -1, context 1, stale tables)."""
    n = len(rows) + padding
    tokens = torch.arange(100, 100 + n, dtype=torch.long)
    positions = torch.tensor([p for p, _ in rows] + [7] * padding, dtype=torch.long)
    tables = torch.full((n, width), 999, dtype=torch.int32)  # stale entries past each row's table
    slots = torch.full((n,), -1, dtype=torch.long)
    context = torch.ones(n, dtype=torch.int32)
    for i, (p, table) in enumerate(rows):
        tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
        slots[i] = table[p // BS] * BS + p % BS
        context[i] = p + 1
    return tokens, positions, slots, context, tables


def next_step(rows: list[tuple[int, list[int]]]) -> tuple[list[int], list[int]]:
    """step_inputs' slots and context lengths for each row one position further."""
    slots = [int(np.asarray(t)[(p + 1) // BS]) * BS + (p + 1) % BS for p, t in rows]
    return slots, [p + 2 for p, _ in rows]


ROWS = [(5, [3]), (15, [8, 2]), (31, [4, 9, 11]), (40, [6, 1, 0])]  # mid-block, into the next block, ...


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_advance_gives_the_next_steps_inputs(impl, monkeypatch):
    if impl == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    tokens, positions, slots, context, tables = uploaded(ROWS, padding=3, width=5)
    before = (tokens.clone(), positions.clone(), slots.clone(), context.clone(), tables.clone())
    picked = torch.tensor([11, 12, 13, 14, 0, 0, 0], dtype=torch.long)
    (advance_ref if impl == "ref" else advance)(tokens, picked, positions, slots, context, tables, BS)
    want_slots, want_context = next_step(ROWS)
    assert tokens[:4].tolist() == [11, 12, 13, 14]
    assert positions[:4].tolist() == [p + 1 for p, _ in ROWS]
    assert slots[:4].tolist() == want_slots
    assert context[:4].tolist() == want_context
    for got, old in zip((tokens, positions, slots, context), before, strict=False):  # padding rows untouched
        assert torch.equal(got[4:], old[4:])
    assert torch.equal(tables, before[4])


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_a_position_past_the_tables_width_gets_no_slot(impl, monkeypatch):
    """The width the buffers hold ends at the row's last block: a step past it writes nowhere (the runner
    uploads the grown table instead of replaying bare)."""
    if impl == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    tokens, positions, slots, context, tables = uploaded([(31, [4, 9])], padding=0, width=2)
    (advance_ref if impl == "ref" else advance)(tokens, torch.tensor([5]), positions, slots, context, tables, BS)
    assert (positions.item(), slots.item(), context.item()) == (32, -1, 33)


def test_the_kernel_equals_the_reference_over_random_buffers(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    for b, width in ((1, 1), (5, 3), (40, 9)):
        pos = torch.randint(0, width * BS, (b,), generator=g)
        tables = torch.randint(0, 500, (b, width), generator=g, dtype=torch.int32)
        slots = torch.where(torch.rand(b, generator=g) < 0.2, -1, torch.randint(0, 8000, (b,), generator=g))
        bufs = [torch.randint(0, 9, (b,), generator=g), pos, slots, torch.randint(1, 99, (b,), generator=g,
                                                                                 dtype=torch.int32)]
        picked = torch.randint(0, 131072, (b,), generator=g)
        want = [t.clone() for t in bufs]
        advance_ref(want[0], picked, want[1], want[2], want[3], tables, BS)
        advance(bufs[0], picked, bufs[1], bufs[2], bufs[3], tables, BS)
        for got, w in zip(bufs, want, strict=True):
            assert torch.equal(got, w)


def seq(position: int, table: list[int]) -> Sequence:
    s = Sequence([1] * (position + 1), SamplingParams(temperature=0), 64, set())
    s.num_computed, s.block_table = position, list(table)
    return s


def test_ahead_holds_only_the_step_after_the_one_it_recorded():
    a, b = seq(20, [3, 7]), seq(14, [5])
    ahead = Ahead(2, [a, b], [21, 15], [(2, 7), (1, 5)])
    step = [ScheduledSeq(a, 1, pending=True), ScheduledSeq(b, 1, pending=True)]
    assert not ahead.holds(step, BS)  # neither has been scheduled one further yet
    a.num_computed, b.num_computed = 21, 15
    assert ahead.holds(step, BS)
    assert not ahead.holds(step[::-1], BS)  # another row order
    assert not ahead.holds(step[:1], BS)  # a row fewer
    assert not ahead.holds([step[0], ScheduledSeq(seq(15, [5]), 1)], BS)  # another sequence in the row
    assert not ahead.holds([step[0], ScheduledSeq(b, 1, draft=[9])], BS)  # a draft needs the host
    b.num_computed = 16  # b's new position is in a block the buffers do not hold
    b.block_table.append(8)
    assert not ahead.holds(step, BS)
    b.num_computed = 15  # a grown table still holds the recorded prefix
    assert ahead.holds(step, BS)
    a.block_table[-1] = 4  # the last block swapped (copy on write): the buffers' table is stale
    assert not ahead.holds(step, BS)
    nxt = Ahead(2, [b], [15], [(1, 5)]).advanced()
    assert nxt.positions == [16] and nxt.tables == [(1, 5)]
