"""The greedy token and NaN flag of every logits row in one launch (Triton). Semantics: `greedy_pick.py`.

Grid (rows, V / BLOCK): a program takes BLOCK logits of one row, one load (a vocabulary of 131072 is 32
programs a row, so the row is read at the GPU's width, where a single-program argmax walks it in steps).
Each program folds its block into one int64 key -- the value's float bits made to order as signed
integers in the high word, the complement of the index in the low word, so the largest key is the
largest value at its first index -- and its NaN flag, with atomic max into the row's slot, then counts
itself in. The program that arrives last reads the slots, writes the token and the flag, and re-arms the
slots and the counter: one launch, nothing to reset between steps (as gguf_splitk's counters).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels.interpret_triton import kernels_for

BLOCK = 4096
MAX_ROWS = 4096  # rows a device's slots serve (more fall back to the reference)
KEY_FLOOR = -(1 << 63)  # a slot's re-armed value: below every key
_KEY_FLOOR = tl.constexpr(KEY_FLOOR)
_FLOAT_MAX = tl.constexpr(3.4028234663852886e38)
_SLOTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


@triton.jit
def _greedy_pick_kernel(x_ptr, s_xm, V, out_ptr, S, key_ptr, flag_ptr, cnt_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(x_ptr + row.to(tl.int64) * s_xm + offs, mask=ok, other=0.0).to(tl.float32)
    nan = x != x
    # sample()'s order: NaN lowest (-inf), -inf the lowest finite value, +inf the highest
    v = tl.where(x == float("inf"), _FLOAT_MAX, tl.where(x == float("-inf"), -_FLOAT_MAX, x))
    v = tl.where(nan, float("-inf"), v)
    bits = v.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed order of the float values
    key = (ordered.to(tl.int64) << 32) | (4294967295 - offs.to(tl.int64))  # ties: the first index wins
    key = tl.where(ok, key, _KEY_FLOOR)
    tl.atomic_max(key_ptr + row, tl.max(key, axis=0))
    tl.atomic_max(flag_ptr + row, tl.max(tl.where(ok & nan, 1, 0), axis=0))
    # acq_rel: this program's slot updates happen before its arrival is counted
    arrived = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel")
    if arrived == tl.num_programs(1) - 1:
        best = tl.atomic_xchg(key_ptr + row, _KEY_FLOOR)
        flag = tl.atomic_xchg(flag_ptr + row, 0)
        tl.store(out_ptr + row, 4294967295 - (best & 4294967295))
        tl.store(out_ptr + S + row, flag.to(tl.int64))
        tl.store(cnt_ptr + row, 0)


def _slots(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    slots = _SLOTS.get(device)
    if slots is None:
        slots = _SLOTS[device] = (torch.full((MAX_ROWS,), KEY_FLOOR, dtype=torch.int64, device=device),
                                  torch.zeros(MAX_ROWS, dtype=torch.int32, device=device),
                                  torch.zeros(MAX_ROWS, dtype=torch.int32, device=device))
    return slots


def greedy_pick_triton(logits: torch.Tensor, *, block: int = BLOCK) -> torch.Tensor:
    """logits [S, V] (unit column stride, S <= MAX_ROWS) -> int64 [2, S] (tokens, NaN flags)."""
    S, V = logits.shape
    if S > MAX_ROWS or logits.stride(-1) != 1 or V >= 1 << 31:
        from devstral.kernels.greedy_pick import greedy_pick_ref

        return greedy_pick_ref(logits)
    out = torch.empty(2, S, dtype=torch.int64, device=logits.device)
    keys, flags, counts = _slots(logits.device)
    kernels_for(logits, __name__)._greedy_pick_kernel[(S, triton.cdiv(V, block))](
        logits, logits.stride(0), V, out, S, keys, flags, counts, BLOCK=block, num_warps=4)
    return out
