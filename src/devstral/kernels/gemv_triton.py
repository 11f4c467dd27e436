"""Skinny GEMM for decode: y [M, N] = x [M, K] @ W[N, K]^T with M <= 16 (Triton). Semantics: F.linear.

At M <= 16 the matmul is a stream of the weight: 2 bytes per weight for 2M flops, so all that
matters is reading W at full HBM bandwidth. Each program owns BLOCK_N rows of W and, with split-K, one
K-range of them. It computes the transposed product acc[BLOCK_N, 16] += W_tile @ x_tile^T, so the
weight tile is the MMA's M operand (BLOCK_N >= 64 lets Hopper issue wgmma straight from shared
memory) and x, padded to 16 rows by masked loads that cost no traffic, is the narrow N operand. The
K loop is software-pipelined (`num_stages` tiles of W in flight per program, 16-byte loads along the
contiguous K). Where N is small (o_proj, down, qkv: N = 5-6k) there are too few row tiles to fill
132 SMs, so K is split; the float32 partials [split, M, N] are summed in a fixed order by a second
kernel (deterministic, no atomics). The persistent variant walks the same tiles with a fixed number
of programs per SM, so one pipeline runs across tile boundaries.

Which config, and whether to use this kernel at all, is decided per GPU and shape from measurement:
`gemv.py` reads the table that `benchmarks/engine_kernels.py` writes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from devstral.kernels.interpret_triton import kernels_for, on_interpreter

BLOCK_M = 16  # the narrow MMA dimension; rows beyond M are masked
MAX_M = BLOCK_M


class GemvConfig(NamedTuple):
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    persistent: int = 0  # > 0: that many programs per SM loop over the tiles (one pipeline across tiles)

    def __str__(self) -> str:
        tail = f"_p{self.persistent}" if self.persistent else ""
        return f"n{self.block_n}_k{self.block_k}_split{self.split_k}_w{self.num_warps}_s{self.num_stages}{tail}"


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, part_ptr, M, N, K, x_sm, w_sn, y_sm, k_per_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                 EVEN: tl.constexpr, DOT_T: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    nmask = n < N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_rows = w_ptr + n[:, None].to(tl.int64) * w_sn
    x_rows = x_ptr + m[None, :] * x_sm
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        if EVEN:
            w = tl.load(w_rows + kk[None, :])
            xt = tl.load(x_rows + kk[:, None], mask=mmask[None, :], other=0.0)
        else:
            kmask = kk < k_hi
            w = tl.load(w_rows + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            xt = tl.load(x_rows + kk[:, None], mask=mmask[None, :] & kmask[:, None], other=0.0)
        acc = tl.dot(w.to(DOT_T), xt.to(DOT_T), acc, input_precision=PRECISION)
    mask = nmask[:, None] & mmask[None, :]
    if SPLIT:
        tl.store(part_ptr + (pid_k * M + m[None, :]).to(tl.int64) * N + n[:, None], acc, mask=mask)
    else:
        tl.store(y_ptr + m[None, :] * y_sm + n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_persistent_kernel(x_ptr, w_ptr, y_ptr, part_ptr, M, N, K, x_sm, w_sn, y_sm, k_per_split, num_programs,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            SPLIT: tl.constexpr, EVEN: tl.constexpr, DOT_T: tl.constexpr, PRECISION: tl.constexpr):
    """The same tiles, walked by a fixed number of programs: the flattened loop nest is one software
    pipeline, so the next tile's first loads are in flight while this tile finishes (no prologue
    bubble per tile, no partly filled last wave)."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    total = tiles_n * tl.cdiv(K, k_per_split)
    k_steps = k_per_split // BLOCK_K  # every tile the same trip count; a short last split is masked
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    x_rows = x_ptr + m[None, :] * x_sm
    for tile in tl.range(tl.program_id(0), total, num_programs, flatten=True):
        pid_n = tile % tiles_n
        pid_k = tile // tiles_n
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        w_rows = w_ptr + n[:, None].to(tl.int64) * w_sn
        k_lo = pid_k * k_per_split
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for step in range(k_steps):
            kk = k_lo + step * BLOCK_K + tl.arange(0, BLOCK_K)
            if EVEN:
                w = tl.load(w_rows + kk[None, :])
                xt = tl.load(x_rows + kk[:, None], mask=mmask[None, :], other=0.0)
            else:
                kmask = kk < K
                w = tl.load(w_rows + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
                xt = tl.load(x_rows + kk[:, None], mask=mmask[None, :] & kmask[:, None], other=0.0)
            acc = tl.dot(w.to(DOT_T), xt.to(DOT_T), acc, input_precision=PRECISION)
        mask = nmask[:, None] & mmask[None, :]
        if SPLIT:
            tl.store(part_ptr + (pid_k * M + m[None, :]).to(tl.int64) * N + n[:, None], acc, mask=mask)
        else:
            tl.store(y_ptr + m[None, :] * y_sm + n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_sum_kernel(part_ptr, y_ptr, M, N, y_sm, splits, BLOCK: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = tl.program_id(1)
    mask = n < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(splits):
        acc += tl.load(part_ptr + (s * M + m).to(tl.int64) * N + n, mask=mask, other=0.0)
    tl.store(y_ptr + m * y_sm + n, acc.to(y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Shapes and dtypes the kernel handles: 2-byte floats, one dtype, W rows contiguous, M <= 16."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.dtype != weight.dtype:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) and not on_interpreter(x):
        return False
    m = x.numel() // max(1, x.shape[-1])
    return 0 < m <= MAX_M and weight.stride(1) == 1 and x.device == weight.device


def linear_triton(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig = GemvConfig()) -> torch.Tensor:
    """F.linear(x, weight) for x [..., K] with at most 16 rows."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    assert 0 < M <= MAX_M, f"linear_triton: {M} rows (at most {MAX_M})"
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    cfg = config
    k_per_split = triton.cdiv(triton.cdiv(K, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(K, k_per_split)
    part = torch.empty((splits, M, N) if splits > 1 else (1,), dtype=torch.float32, device=x.device)
    dot_t = tl.float32 if on_interpreter(x) or x.dtype == torch.float32 else (
        tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16)
    kernels = kernels_for(x, __name__)
    args = (x2, weight, y, part, M, N, K, x2.stride(0), weight.stride(0), y.stride(0), k_per_split)
    meta = dict(BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=splits > 1, DOT_T=dot_t,
                PRECISION="ieee" if dot_t == tl.float32 else "tf32", num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    tiles = triton.cdiv(N, cfg.block_n)
    if cfg.persistent:
        programs = min(tiles * splits, cfg.persistent * _num_sms(x.device))
        kernels._gemv_persistent_kernel[(programs,)](
            *args, programs, EVEN=N % cfg.block_n == 0 and K % k_per_split == 0, **meta)
    else:
        kernels._gemv_kernel[(tiles, splits)](*args, EVEN=N % cfg.block_n == 0 and K % cfg.block_k == 0, **meta)
    if splits > 1:
        block = 1024
        kernels._split_k_sum_kernel[(triton.cdiv(N, block), M)](part, y, M, N, y.stride(0), splits, BLOCK=block,
                                                                num_warps=4)
    return y.view(*x.shape[:-1], N)
