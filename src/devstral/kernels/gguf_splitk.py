"""The output epilogue every quantized GEMV/GEMM kernel shares, with a one-kernel split-K.

A GEMV over a small N (the k/v projections: N = 1024) has too few output rows to keep 132 SMs
busy, so the K range is split over SPLIT_K programs. Instead of atomics into a zeroed fp32 output
and a cast kernel (two more launches, and a summation order that changes run to run), each split
writes its partial tile to a workspace and bumps a per-tile counter; the program that arrives last
adds the partials in split order, writes the output and re-arms the counter to zero. One launch,
deterministic results, and nothing to reset between CUDA-graph replays.

Counters live in one zeroed int32 buffer per device, shared by every layer: launches on one stream
run one after another and each leaves its counters at zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels.fixed_point import add_fixed

MAX_TILES = 1 << 16
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device) -> torch.Tensor:
    """The device's counter buffer; create it before any CUDA-graph capture (QuantLinear does at load)."""
    device = torch.device(device)
    buf = _COUNTERS.get(device)
    if buf is None:
        buf = _COUNTERS[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return buf


@triton.jit
def _store_tile(acc, rows, cols, mask, N, out_ptr, s_om, bias_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
    ptrs = out_ptr + cols[None, :].to(tl.int64) * s_om + rows[:, None]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def split_sum(acc, rows, cols, N, M, ws_ptr, cnt_ptr, tile_id, pid_k, split_k):
    """Deposit this split's partial tile (acc: fp32 [BN, BM], as store_output's) and return (the sum of
    all splits' partials in split order, whether this program arrived last). Only the last program's sum
    is complete; it has re-armed the tile's counter. Kernels with their own epilogue (moe_gemv.py's
    SwiGLU) store the sum themselves."""
    mask = (rows < N)[:, None] & (cols < M)[None, :]
    ws = ws_ptr + cols[None, :].to(tl.int64) * N + rows[:, None]
    split_stride = M * N  # int32: workspace() keeps SPLIT_K * M * N below 2^31 (and M may be the constant 1)
    tl.store(ws + pid_k * split_stride, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the counter moves (release)
    arrived = tl.atomic_add(cnt_ptr + tile_id, 1)
    last = arrived == split_k - 1
    total = tl.zeros_like(acc)
    if last:
        for k in range(split_k):  # fixed order: the same sum whichever split finished last
            total += tl.load(ws + k * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(cnt_ptr + tile_id, 0)
    return total, last


@triton.jit
def store_output(acc, rows, cols, N, M, out_ptr, s_om, bias_ptr, ws_ptr, cnt_ptr, tile_id, pid_k, split_k,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, FIXED: tl.constexpr = False):
    """acc: fp32 [BN, BM], output features `rows` x activation rows `cols`; out is [M, N] (row stride s_om).

    SPLIT (constexpr) says whether split_k (a runtime value, so that each split count is not a new
    compilation) is above 1. FIXED: out is an int64 fixed-point buffer every split adds into, and ws the
    buffer split 0 zeroes (kernels/fixed_point.py; no bias)."""
    mask = (rows < N)[:, None] & (cols < M)[None, :]
    if FIXED:
        add_fixed(acc, rows, cols, N, M, out_ptr, s_om, ws_ptr, pid_k == 0)
    elif not SPLIT:
        _store_tile(acc, rows, cols, mask, N, out_ptr, s_om, bias_ptr, HAS_BIAS)
    else:
        total, last = split_sum(acc, rows, cols, N, M, ws_ptr, cnt_ptr, tile_id, pid_k, split_k)
        if last:
            _store_tile(total, rows, cols, mask, N, out_ptr, s_om, bias_ptr, HAS_BIAS)


@triton.jit
def store_share(acc, rows, cols, N, M, out_ptr, s_om, bias_ptr, ws_ptr, cnt_ptr, tile_id, share, shares,
                HAS_BIAS: tl.constexpr, FIXED: tl.constexpr = False):
    """store_output for a stream-K program (gguf_gemv_wide.py): its share (0..shares-1) of output tile
    tile_id, where the number of programs sharing the tile is a runtime value. A tile one program holds
    whole is stored at once; shared tiles go through split_sum, shares in order. FIXED: as store_output's,
    share 0 zeroing."""
    mask = (rows < N)[:, None] & (cols < M)[None, :]
    if FIXED:
        add_fixed(acc, rows, cols, N, M, out_ptr, s_om, ws_ptr, share == 0)
    elif shares == 1:
        _store_tile(acc, rows, cols, mask, N, out_ptr, s_om, bias_ptr, HAS_BIAS)
    else:
        total, last = split_sum(acc, rows, cols, N, M, ws_ptr, cnt_ptr, tile_id, share, shares)
        if last:
            _store_tile(total, rows, cols, mask, N, out_ptr, s_om, bias_ptr, HAS_BIAS)


def usable_split(split_k: int, tiles: int, m: int, n: int) -> int:
    """split_k, or 1 when the counters or int32 workspace offsets would not cover the launch."""
    if split_k > 1 and (tiles > MAX_TILES or split_k * m * n >= 2**31):
        return 1
    return split_k


def workspace(split_k: int, m: int, n: int, device: torch.device) -> torch.Tensor:
    """fp32 partials for a split-K launch (a dummy when not split). Size depends only on shapes."""
    if split_k == 1:
        return torch.empty(1, dtype=torch.float32, device=device)
    return torch.empty(split_k * m * n, dtype=torch.float32, device=device)


__all__ = ["MAX_TILES", "counters", "split_sum", "store_output", "store_share", "triton", "usable_split",
           "workspace"]
