"""Integer-dot GEMV for GGUF weights (Q4_K, Q6_K, Q8_0) at decode batch sizes, M <= 8.

Why not floats: at 4 bits per weight an H200 streams 8e12 weights/s, and its CUDA cores issue about
3.4e13 thread-instructions/s, so a float path that spends 3-4 instructions per weight (unpack, convert,
FMA) is instruction-bound at about 45% of the memory bandwidth (measured: 1.0-1.8 TB/s). Here, as in
llama.cpp's MMVQ, the activations are quantized to int8 per sub-block (one fp32 scale each) and the
weights stay integers: `dp4a` multiplies four weight bytes by four activation bytes and accumulates
in one instruction, and a 32-bit word of eight nibbles becomes two dp4a operands with two logic ops.
About 0.6 instructions per Q4_K weight, so the kernel can run at the bandwidth.

The activations are quantized inside each program for its own K range (no extra launch; a CUDA graph
of a 40-layer model would otherwise carry 280 more tiny kernels): x is loaded in the order the
planar weight words hold their values (gguf_pack.py: value s of word v is weight s*WPS + v of the
sub-block), so that byte b of packed activation word (v, p) meets byte b of weight operand p of word
v. Per sub-block j and activation row m, with integer sum S = sum(q * xq):
  Q4_K  y += d*sc_j * dx_j * S - dmin*mn_j * sum(x_j)        (q in 0..15)
  Q6_K  y += d*sc_j * dx_j * (S - 32 * sum(xq_j))             (q + 32 in 0..63, stored unsigned)
  Q8_0  y += d_j * dx_j * S                                   (q signed)
The int8 rounding of the activations is the only approximation (relative error ~0.3%, what llama.cpp
accepts for every quantized matmul); `DEVSTRAL_GGUF_FLOAT_GEMV=1` keeps the exact float GEMV.

Triton's interpreter cannot run PTX, so under TRITON_INTERPRET=1 `dp4a` is computed with integer
ops (the same result): the CPU test then checks all the indexing.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from devstral.kernels.gguf_decode import (
    GEOMETRY,
    dp4a,
    planar_scale_min,
    planar_top_bits,
    qt_code,
    spread_pairs,
)
from devstral.kernels.gguf_gemv import field_args
from devstral.kernels.gguf_pack import PackedGGUF
from devstral.kernels.gguf_splitk import counters, store_output, usable_split, workspace


@triton.jit
def _idot_kernel(x_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
                 M, N, K, s_xm, s_om, s_q, s_qh, s_sc, s_d,
                 QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, P: tl.constexpr,
                 BN: tl.constexpr, NS: tl.constexpr, BM: tl.constexpr, SPLIT_K, SPLIT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ASM: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BN + tl.arange(0, BN)
    n2 = rows[:, None]
    row_ok = n2 < N
    m0 = pid_m * BM
    mi = m0 + tl.arange(0, BM)
    m_ok = (mi < M)[:, None]
    # activation element c of a tile (c = ((j*WPS + v)*P + p)*4 + b) is weight (b*P + p)*WPS + v of
    # sub-block j: packed 4 bytes at a time it lines up with weight operand p of word v
    c = tl.arange(0, NS * SB)
    r = c % SB
    x_off = (c // SB) * SB + ((r % 4) * P + (r // 4) % P) * WPS + r // (4 * P)
    shift = (c % 4) * 8
    cw = tl.arange(0, NS * WPS)[None, :]
    jn = tl.arange(0, NS)[None, :]
    n_sub = K // SB
    n_tiles = tl.cdiv(n_sub, NS)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)
    acc = tl.zeros((BM, BN, NS), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        k0 = t * (NS * SB)
        # activations: int8 per sub-block, packed into words in the weights' value order
        x_ok = m_ok & ((k0 + c) < K)[None, :]
        xf = tl.load(x_ptr + mi[:, None] * s_xm + k0 + x_off[None, :], mask=x_ok, other=0.0).to(tl.float32)
        xf3 = tl.reshape(xf, (BM, NS, SB))
        amax = tl.max(tl.abs(xf3), axis=2)
        dx = amax / 127.0
        inv = tl.where(amax > 0, 127.0 / amax, 0.0)
        v = xf3 * inv[:, :, None]
        xq = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(0.5 - v)).to(tl.int32)
        xb = tl.reshape((xq & 0xFF) << tl.reshape(shift, (1, NS, SB)), (BM, NS * WPS * P, 4))
        xw = tl.sum(xb, axis=2)  # bytes do not overlap: the sum is their bitwise or
        # weights: [BN, NS*WPS] words, a row's words contiguous (16-byte loads)
        w_idx = t * (NS * WPS) + cw
        w_ok = row_ok & (w_idx < n_sub * WPS)
        words = tl.load(q_ptr + n2 * s_q + w_idx, mask=w_ok, other=0)
        if QT == 2:
            hi = tl.load(qh_ptr + n2 * s_qh + w_idx, mask=w_ok, other=0).to(tl.int32)
        if P == 2:
            x_lo, x_hi = tl.split(tl.reshape(xw, (BM, NS * WPS, 2)))
            x_lo = tl.reshape(x_lo, (BM, 1, NS * WPS))
            x_hi = tl.reshape(x_hi, (BM, 1, NS * WPS))
            w_lo = words & 0x0F0F0F0F
            w_hi = (words >> 4) & 0x0F0F0F0F
            if QT == 2:
                w_lo = w_lo | spread_pairs(hi)
                w_hi = w_hi | spread_pairs(hi >> 2)
            w_lo = tl.broadcast_to(w_lo[None, :, :], (BM, BN, NS * WPS))
            w_hi = tl.broadcast_to(w_hi[None, :, :], (BM, BN, NS * WPS))
            x_lo = tl.broadcast_to(x_lo, (BM, BN, NS * WPS))
            x_hi = tl.broadcast_to(x_hi, (BM, BN, NS * WPS))
            s = dp4a(w_lo, x_lo, tl.zeros((BM, BN, NS * WPS), dtype=tl.int32), False, ASM)
            s = dp4a(w_hi, x_hi, s, False, ASM)
        else:
            wb = tl.broadcast_to(words[None, :, :], (BM, BN, NS * WPS))
            xb8 = tl.broadcast_to(tl.reshape(xw, (BM, 1, NS * WPS)), (BM, BN, NS * WPS))
            s = dp4a(wb, xb8, tl.zeros((BM, BN, NS * WPS), dtype=tl.int32), True, ASM)
        isum = tl.sum(tl.reshape(s, (BM, BN, NS, WPS)), axis=3).to(tl.float32)  # [BM, BN, NS]
        # scales
        j = t * NS + jn
        s_ok = row_ok & (j < n_sub)
        if QT == 3:
            d = tl.load(d_ptr + n2 * s_d + j, mask=s_ok, other=0.0).to(tl.float32)
            acc += (d[None, :, :] * dx[:, None, :]) * isum
        else:
            blk = j // (256 // SB)
            d = tl.load(d_ptr + n2 * s_d + blk, mask=s_ok, other=0.0).to(tl.float32)
            sc = tl.load(sc_ptr + n2 * s_sc + j, mask=s_ok, other=0)
            if QT == 2:
                dl = d * sc.to(tl.float32)
                qsum = tl.sum(tl.reshape(xq, (BM, NS, SB)), axis=2).to(tl.float32)
                acc += (dl[None, :, :] * dx[:, None, :]) * (isum - 32.0 * qsum[:, None, :])
            else:
                sc, mn = planar_scale_min(sc.to(tl.int32), planar_top_bits(mn_ptr, n2, j, s_ok, s_sc))
                dl = d * sc.to(tl.float32)
                dm = tl.load(dm_ptr + n2 * s_d + blk, mask=s_ok, other=0.0).to(tl.float32)
                xsum = tl.sum(xf3, axis=2)
                acc += (dl[None, :, :] * dx[:, None, :]) * isum - (dm * mn.to(tl.float32))[None, :, :] * xsum[:, None, :]
    res = tl.trans(tl.sum(acc, axis=2))  # [BN, BM]
    store_output(res, rows, mi, N, M, out_ptr, s_om, bias_ptr, ws_ptr, cnt_ptr,
                 pid_m * tl.num_programs(0) + pid_n, pid_k, SPLIT_K, HAS_BIAS, SPLIT)


def gemv(x: torch.Tensor, p: PackedGGUF, bias: torch.Tensor | None, out: torch.Tensor, *,
         bn: int, ns: int, bm: int, split_k: int, num_warps: int = 4, num_stages: int = 1) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W^T (+ bias) with int8 activations; x contiguous rows, M <= 8."""
    m, k = x.shape
    qt = qt_code(p.qtype)
    sb, wps, e = GEOMETRY[qt]
    tiles_n, tiles_m = triton.cdiv(p.n, bn), triton.cdiv(m, bm)
    split_k = usable_split(split_k, tiles_n * tiles_m, m, p.n)
    ws = workspace(split_k, m, p.n, x.device)
    fields, (s_q, s_qh, s_sc, s_d) = field_args(p)
    _idot_kernel[(tiles_n, split_k, tiles_m)](
        x, out, bias if bias is not None else out, ws, counters(x.device), *fields,
        m, p.n, k, x.stride(0), out.stride(0), s_q, s_qh, s_sc, s_d,
        QT=qt, SB=sb, WPS=wps, P=e // 4, BN=bn, NS=ns, BM=bm, SPLIT_K=split_k, SPLIT=split_k > 1,
        HAS_BIAS=bias is not None, ASM=os.environ.get("TRITON_INTERPRET") != "1",
        num_warps=num_warps, num_stages=num_stages)
    return out
