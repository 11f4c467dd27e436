"""Fixed-point GEMV outputs for the decode step's o and down projections (on by default where they are K-quants,
`DEVSTRAL_FIXED_DELTAS`; quant/fixed_deltas.py decides where).

A split-K GEMV ends with a tail: each split stores its partial tile, counts itself in, and the split that
arrives last reads the partials back and adds them in split order (gguf_splitk.split_sum) -- two L2 round trips
after the loop, on the decode chain. o and down feed only the next residual add + RMSNorm, so their splits can
instead add their partials into an int64 buffer as fixed-point numbers (value x 2^32, rounded toward zero) with
fire-and-forget atomics and leave: integer addition is associative, so the sum is the same bits whatever order
the splits arrive in, and the norm reads the buffer (from_fixed) where it read the bf16 output.

Semantics (the torch twins below): each split's fp32 partial is rounded toward zero to a multiple of 2^-32,
the partials are added exactly, and the sum is converted to float32 (round to nearest) and then to the output
dtype, which is what the norm adds. Against the split-K epilogue's fp32 sum in split order this differs by
float32 rounding only (below the bf16 output's own rounding). Values must stay below 2^31 in magnitude.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SHIFT = 32
ONE = float(1 << SHIFT)
_ONE = tl.constexpr(ONE)
_INV = tl.constexpr(1.0 / ONE)


def to_fixed_ref(partial: torch.Tensor) -> torch.Tensor:
    """A float32 partial as int64 fixed point (x 2^32, toward zero), as `to_fixed` computes it."""
    return (partial.to(torch.float32) * ONE).to(torch.int64)


def from_fixed_ref(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fixed-point sum as the GEMV's output in dtype, as `from_fixed` computes it."""
    return (acc.to(torch.float32) * (1.0 / ONE)).to(dtype)


@triton.jit
def to_fixed(partial):
    return (partial * _ONE).to(tl.int64)


@triton.jit
def from_fixed(acc, dtype: tl.constexpr):
    return (acc.to(tl.float32) * _INV).to(dtype)


@triton.jit
def add_fixed(acc, rows, cols, N, M, acc_ptr, s_om, zero_ptr, first):
    """Add this program's partial tile (fp32 [BN, BM], rows x activation rows) into the int64 buffer at
    acc_ptr ([M, N], row stride s_om); the program holding the tile's first share (`first`) also zeroes the
    same entries of zero_ptr, the buffer the GEMV before this kind of GEMV filled and a norm has read since
    (quant/fixed_deltas.py). Relaxed atomics, no counter: the kernel after waits for the whole grid."""
    mask = (rows < N)[:, None] & (cols < M)[None, :]
    at = cols[None, :].to(tl.int64) * s_om + rows[:, None]
    tl.atomic_add(acc_ptr + at, to_fixed(acc), mask=mask, sem="relaxed")
    if first:
        tl.store(zero_ptr + at, tl.zeros(acc.shape, tl.int64), mask=mask)


__all__ = ["ONE", "SHIFT", "add_fixed", "from_fixed", "from_fixed_ref", "to_fixed", "to_fixed_ref"]
