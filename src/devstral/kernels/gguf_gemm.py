"""Dequantize-into-tiles tensor-core GEMM for GGUF weights in the planar layout: y = x @ W^T + b.

For batches past the GEMV's few rows. Each program computes an output tile of BN features x BM
activation rows as W_tile @ x_tile^T, so the dequantized weights are the dot's first operand
(Hopper's wgmma can take it straight from registers). The K loop steps one sub-block (one scale
per row) at a time, NSUB sub-blocks per iteration: a weight tile is [BN, SB] values computed exactly
as dequant.py does, rounded to the activations' 16-bit type. Programs walk N within groups of
GROUP_M activation tiles so that a weight tile is fetched from DRAM once per group, not once per
tile. Split-K (gguf_splitk.py) fills the GPU when M and N give few tiles. The K loop (`accumulate`) is
shared with the grouped expert GEMM (moe_grouped_gemm.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from devstral.kernels import stage_fit
from devstral.kernels.gguf_decode import GEOMETRY, ONE_F32_BITS, qt_code, subblock_values
from devstral.kernels.gguf_gemv import field_args
from devstral.kernels.gguf_pack import PackedGGUF
from devstral.kernels.gguf_splitk import counters, store_output, usable_split, workspace


@triton.jit
def accumulate(acc, x_tile, col_ok, q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, n, row_ok, kt_lo, kt_hi, n_sub,
               s_q, s_qh, s_sc, s_d, one, QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr,
               NSUB: tl.constexpr, DOT: tl.constexpr):
    """acc [BN, BM] + W[n, K tiles kt_lo..kt_hi-1] @ x^T: the K loop, NSUB sub-blocks a tile.

    n, row_ok: weight rows [BN, 1]; x_tile: [SB, BM] pointers to the first sub-block of the activation
    rows, col_ok [1, BM] which of them exist. One function for the dense and the grouped expert GEMM
    (moe_grouped_gemm.py): the same dequantization, roundings and dot order in both."""
    if DOT == 1:
        dot_t = tl.float16
    else:
        dot_t = tl.bfloat16
    r = tl.arange(0, SB)[None, :]
    for kt in range(kt_lo, kt_hi):
        for u in tl.static_range(NSUB):
            j = kt * NSUB + u
            j_ok = j < n_sub
            w = subblock_values(q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, n, j, r, row_ok & j_ok,
                                s_q, s_qh, s_sc, s_d, one, QT, SB, WPS, False)
            xt = tl.load(x_tile + j * SB, mask=col_ok & j_ok, other=0.0)
            if DOT == 2:
                acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(w.to(dot_t), xt.to(dot_t), acc)
    return acc


@triton.jit
def _gemm_kernel(x_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
                 M, N, K, s_xm, s_om, s_q, s_qh, s_sc, s_d, one,
                 QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr,
                 BN: tl.constexpr, BM: tl.constexpr, NSUB: tl.constexpr, SPLIT_K, SPLIT: tl.constexpr,
                 GROUP_M: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BN)
    num_m = tl.cdiv(M, BM)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = (rows < N)[:, None]
    cols = pid_m * BM + tl.arange(0, BM)
    col_ok = (cols < M)[None, :]
    rk = tl.arange(0, SB)[:, None]
    x_tile = x_ptr + cols[None, :] * s_xm + rk
    n_sub = K // SB
    n_kt = tl.cdiv(n_sub, NSUB)
    per_split = tl.cdiv(n_kt, SPLIT_K)
    kt_lo = pid_k * per_split
    kt_hi = tl.minimum(kt_lo + per_split, n_kt)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    acc = accumulate(acc, x_tile, col_ok, q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, rows[:, None], row_ok,
                     kt_lo, kt_hi, n_sub, s_q, s_qh, s_sc, s_d, one, QT, SB, WPS, NSUB, DOT)
    store_output(acc, rows, cols, N, M, out_ptr, s_om, bias_ptr, ws_ptr, cnt_ptr, pid, pid_k, SPLIT_K, HAS_BIAS, SPLIT)


def dot_mode(dtype: torch.dtype) -> int:
    """The dot's operand type: the activations' 16-bit type (bf16 for fp32 activations). Under the
    Triton interpreter fp32: its bf16 dot is wrong (Triton 3.6), and the interpreter checks logic only."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 2
    return 1 if dtype == torch.float16 else 0


def gemm(x: torch.Tensor, p: PackedGGUF, bias: torch.Tensor | None, out: torch.Tensor, *,
         bn: int, bm: int, nsub: int, split_k: int = 1, group_m: int = 8, num_warps: int = 4,
         num_stages: int = 2) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W^T (+ bias) with the weight dequantized tile by tile."""
    m, k = x.shape
    qt = qt_code(p.qtype)
    sb, wps, _ = GEOMETRY[qt]
    tiles = triton.cdiv(p.n, bn) * triton.cdiv(m, bm)
    split_k = usable_split(split_k, tiles, m, p.n)
    ws = workspace(split_k, m, p.n, x.device)
    fields, (s_q, s_qh, s_sc, s_d) = field_args(p)
    consts = dict(QT=qt, SB=sb, WPS=wps, BN=bn, BM=bm, NSUB=nsub, SPLIT_K=split_k, SPLIT=split_k > 1, GROUP_M=group_m,
                  DOT=dot_mode(x.dtype), HAS_BIAS=bias is not None, num_warps=num_warps)
    stage_fit.launch(("gguf_gemm", x.device, *consts.items()), num_stages, lambda stages: _gemm_kernel[(tiles, split_k)](
        x, out, bias if bias is not None else out, ws, counters(x.device), *fields,
        m, p.n, k, x.stride(0), out.stride(0), s_q, s_qh, s_sc, s_d, ONE_F32_BITS.value, **consts, num_stages=stages))
    return out
