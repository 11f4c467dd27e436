"""Fused dequantize-GEMV on CUDA cores for GGUF weights in the planar layout: y = x @ W^T + b, M <= 4.

Decode is bandwidth-bound: every weight byte is read once, so the work per weight must stay at a
few instructions. Each program owns BN output rows; per iteration it loads NS sub-blocks of quant
words per row (16-byte loads: one sub-block per thread and row) and, for each of the E value
positions, turns the levels into floats with the mantissa trick (2 integer ops) and adds f * x into
a register tile (1 FMA). The per-sub-block sums then meet the scales: weight = c1 * f + c0, so a
sub-block contributes c1 * sum(f x) + c0 * sum(x). Small N is covered by split-K (gguf_splitk.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels.gguf_decode import GEOMETRY, ONE_F32_BITS, load_words, qt_code, slice_f, sub_scales
from devstral.kernels.gguf_pack import PackedGGUF
from devstral.kernels.gguf_splitk import counters, store_output, usable_split, workspace


@triton.jit
def _dot_subblocks(words, hi, one, xp, mask, NS: tl.constexpr, WPS: tl.constexpr, E: tl.constexpr,
                   QT: tl.constexpr):
    """sum over each sub-block of f * x (f = 1 + q / 2^bits): [BN, NS]. One FMA per weight.

    x is loaded as [1, NS*WPS]: the same register layout as the [BN, NS*WPS] words (so the
    broadcast over rows is free) and converted to fp32 once per thread, not once per row."""
    xs = tl.reshape(tl.load(xp, mask=mask, other=0.0).to(tl.float32), (1, NS, WPS))
    p = slice_f(words, hi, one, 0, QT) * xs
    for s in tl.static_range(1, E):
        xs = tl.reshape(tl.load(xp + s * WPS, mask=mask, other=0.0).to(tl.float32), (1, NS, WPS))
        p += slice_f(words, hi, one, s, QT) * xs
    return tl.sum(p, axis=2)


@triton.jit
def _x_sums(xp, mask, NS: tl.constexpr, SB: tl.constexpr):
    """Sum of the activations over each sub-block of the tile: [1, NS]."""
    xs = tl.load(xp + tl.arange(0, NS * SB), mask=mask, other=0.0).to(tl.float32)
    return tl.sum(tl.reshape(xs, (NS, SB)), axis=1)[None, :]


@triton.jit
def _gemv_kernel(x_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
                 M, N, K, s_xm, s_om, s_q, s_qh, s_sc, s_d, one,
                 QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, E: tl.constexpr,
                 BN: tl.constexpr, NS: tl.constexpr, BM: tl.constexpr, SPLIT_K, SPLIT: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BN + tl.arange(0, BN)
    n2 = rows[:, None]
    row_ok = n2 < N
    # Loads are 2-D [BN, NS*WPS]: Triton sees the words of a row as one contiguous run and gives a
    # warp whole 128-byte row segments (16 bytes per thread). The products are summed per
    # sub-block on the 3-D view [BN, NS, WPS] (within a thread), and the scales applied to those
    # sums: per weight, two integer ops and one FMA.
    c = tl.arange(0, NS * WPS)[None, :]
    jn = tl.arange(0, NS)[None, :]
    n_sub = K // SB
    n_tiles = tl.cdiv(n_sub, NS)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)
    m0 = pid_m * BM
    x0 = x_ptr + m0 * s_xm
    xw = x0 + (c // WPS) * SB + c % WPS
    acc0 = tl.zeros((BN, NS), dtype=tl.float32)
    if BM > 1:
        acc1 = tl.zeros((BN, NS), dtype=tl.float32)
    if BM > 2:
        acc2 = tl.zeros((BN, NS), dtype=tl.float32)
        acc3 = tl.zeros((BN, NS), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        w_idx = t * (NS * WPS) + c
        c_ok = w_idx < n_sub * WPS
        words, hi = load_words(q_ptr, qh_ptr, n2, w_idx, row_ok & c_ok, s_q, s_qh, QT)
        words = tl.reshape(words, (BN, NS, WPS))
        hi = tl.reshape(hi, (BN, NS, WPS))
        j = t * NS + jn
        j_ok = j < n_sub
        c1, c0 = sub_scales(sc_ptr, mn_ptr, d_ptr, dm_ptr, n2, j, row_ok & j_ok, s_sc, s_d, QT, SB)
        k0 = t * (NS * SB)
        x_ok = (k0 + tl.arange(0, NS * SB)) < K
        acc0 += c1 * _dot_subblocks(words, hi, one, xw + k0, c_ok & (m0 < M), NS, WPS, E, QT) \
            + c0 * _x_sums(x0 + k0, x_ok & (m0 < M), NS, SB)
        if BM > 1:
            acc1 += c1 * _dot_subblocks(words, hi, one, xw + k0 + s_xm, c_ok & (m0 + 1 < M), NS, WPS, E, QT) \
                + c0 * _x_sums(x0 + k0 + s_xm, x_ok & (m0 + 1 < M), NS, SB)
        if BM > 2:
            acc2 += c1 * _dot_subblocks(words, hi, one, xw + k0 + 2 * s_xm, c_ok & (m0 + 2 < M), NS, WPS, E, QT) \
                + c0 * _x_sums(x0 + k0 + 2 * s_xm, x_ok & (m0 + 2 < M), NS, SB)
            acc3 += c1 * _dot_subblocks(words, hi, one, xw + k0 + 3 * s_xm, c_ok & (m0 + 3 < M), NS, WPS, E, QT) \
                + c0 * _x_sums(x0 + k0 + 3 * s_xm, x_ok & (m0 + 3 < M), NS, SB)
    cols = m0 + tl.arange(0, BM)
    which = tl.arange(0, BM)[None, :]
    res = tl.where(which == 0, tl.sum(acc0, axis=1)[:, None], 0.0)
    if BM > 1:
        res = tl.where(which == 1, tl.sum(acc1, axis=1)[:, None], res)
    if BM > 2:
        res = tl.where(which == 2, tl.sum(acc2, axis=1)[:, None], res)
        res = tl.where(which == 3, tl.sum(acc3, axis=1)[:, None], res)
    store_output(res, rows, cols, N, M, out_ptr, s_om, bias_ptr, ws_ptr, cnt_ptr,
                 pid_m * tl.num_programs(0) + pid_n, pid_k, SPLIT_K, HAS_BIAS, SPLIT)


def field_args(p: PackedGGUF) -> tuple:
    """(q, qh, sc, mn, d, dmin) pointers, absent fields replaced by q, and the row strides of q, qh, sc and d
    (Q4_K/Q5_K's mn plane has rows half as long as sc's: the kernels address it with s_sc // 2)."""
    q = p["q"]
    arrs = [p.get(name) if p.get(name) is not None else q for name in ("qh", "sc", "mn", "d", "dmin")]
    strides = (q.stride(0), arrs[0].stride(0), arrs[1].stride(0), arrs[3].stride(0))
    if p.get("mn") is not None and 2 * arrs[2].stride(0) != arrs[1].stride(0):
        raise ValueError("the mn plane's row stride must be half the sc plane's (the kernels derive it)")
    return (q, *arrs), strides


def gemv(x: torch.Tensor, p: PackedGGUF, bias: torch.Tensor | None, out: torch.Tensor, *,
         bn: int, ns: int, bm: int, split_k: int, num_warps: int = 4, num_stages: int = 1) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W^T (+ bias); x contiguous rows; M <= 4 is what this kernel is for."""
    m, k = x.shape
    qt = qt_code(p.qtype)
    sb, wps, e = GEOMETRY[qt]
    tiles_n, tiles_m = triton.cdiv(p.n, bn), triton.cdiv(m, bm)
    split_k = usable_split(split_k, tiles_n * tiles_m, m, p.n)
    ws = workspace(split_k, m, p.n, x.device)
    fields, (s_q, s_qh, s_sc, s_d) = field_args(p)
    _gemv_kernel[(tiles_n, split_k, tiles_m)](
        x, out, bias if bias is not None else out, ws, counters(x.device), *fields,
        m, p.n, k, x.stride(0), out.stride(0), s_q, s_qh, s_sc, s_d, ONE_F32_BITS.value,
        QT=qt, SB=sb, WPS=wps, E=e, BN=bn, NS=ns, BM=bm, SPLIT_K=split_k, SPLIT=split_k > 1, HAS_BIAS=bias is not None,
        num_warps=num_warps, num_stages=num_stages)
    return out
