"""Routed-expert GEMV for decode and small batches: one launch computes every (token, expert) pair's
projection, reading only the selected experts' rows. No loop over experts on the host, no host sync
(the expert of a pair is read from device memory inside the kernel), so it runs in a CUDA graph.

Weights are the experts of one projection stacked along rows, [E * N, K]: bf16, or GGUF Q4_K / Q5_K /
Q6_K / Q8_0 in the planar layout (gguf_pack.py), decoded with the dense GEMV's helpers (gguf_decode.py,
gguf_gemv.py): two integer ops and one FMA per weight. A program owns BN output rows of one pair:

  GLU    out[p] = silu(A_e x) * (B_e x)   the gate and up projections of expert e, SwiGLU applied
  plain  out[p] = (A_e x) * scale[p]      the down projection, times the pair's router weight

Grid: (pair slot, row tile), pair slots fastest. The host orders the slots by expert, so the programs
in flight at one time read the same expert's rows: a weight tile fetched for one token serves the
others routed there from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels.gguf_decode import GEOMETRY, ONE_F32_BITS, load_words, qt_code, sub_scales
from devstral.kernels.gguf_gemv import _dot_subblocks, _x_sums, field_args
from devstral.kernels.gguf_pack import PackedGGUF


@triton.jit
def _gguf_rows_dot(q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, n2, row_ok, x0, K, s_q, s_qh, s_sc, s_d, one,
                   QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, E: tl.constexpr, BN: tl.constexpr,
                   NS: tl.constexpr):
    """[BN] fp32: rows n2 ([BN, 1], absolute rows of the stack) of a planar GGUF weight times x0[:K]."""
    c = tl.arange(0, NS * WPS)[None, :]
    jn = tl.arange(0, NS)[None, :]
    n_sub = K // SB
    xw = x0 + (c // WPS) * SB + c % WPS
    acc = tl.zeros((BN, NS), dtype=tl.float32)
    for t in range(0, tl.cdiv(n_sub, NS)):
        w_idx = t * (NS * WPS) + c
        c_ok = w_idx < n_sub * WPS
        words, hi = load_words(q_ptr, qh_ptr, n2, w_idx, row_ok & c_ok, s_q, s_qh, QT)
        words = tl.reshape(words, (BN, NS, WPS))
        hi = tl.reshape(hi, (BN, NS, WPS))
        j = t * NS + jn
        c1, c0 = sub_scales(sc_ptr, mn_ptr, d_ptr, dm_ptr, n2, j, row_ok & (j < n_sub), s_sc, s_d, QT, SB)
        k0 = t * (NS * SB)
        x_ok = (k0 + tl.arange(0, NS * SB)) < K
        acc += c1 * _dot_subblocks(words, hi, one, xw + k0, c_ok, NS, WPS, E, QT) + c0 * _x_sums(x0 + k0, x_ok, NS, SB)
    return tl.sum(acc, axis=1)


@triton.jit
def _pair(slot_ptr, ids_ptr, x_ptr, s_xm, TOPK: tl.constexpr, X_PER_PAIR: tl.constexpr):
    """The pair this program serves, its expert and its activation row."""
    p = tl.load(slot_ptr + tl.program_id(0))
    e = tl.load(ids_ptr + p).to(tl.int64)
    if X_PER_PAIR:
        x0 = x_ptr + p.to(tl.int64) * s_xm
    else:
        x0 = x_ptr + (p // TOPK).to(tl.int64) * s_xm
    return p, e, x0


@triton.jit
def _store(out_ptr, p, s_om, local, ok, a, b, scale_ptr, GLU: tl.constexpr, SCALE: tl.constexpr):
    if GLU:
        val = a / (1.0 + tl.exp(-a)) * b
    else:
        val = a
    if SCALE:
        val = val * tl.load(scale_ptr + p).to(tl.float32)
    tl.store(out_ptr + p.to(tl.int64) * s_om + local, val.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gguf_experts_kernel(x_ptr, out_ptr, slot_ptr, ids_ptr, scale_ptr,
                         aq, aqh, asc, amn, ad, adm, bq, bqh, bsc, bmn, bd, bdm,
                         N, K, s_xm, s_om, as_q, as_qh, as_sc, as_d, bs_q, bs_qh, bs_sc, bs_d, one,
                         TOPK: tl.constexpr, X_PER_PAIR: tl.constexpr, GLU: tl.constexpr, SCALE: tl.constexpr,
                         QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, E: tl.constexpr,
                         BN: tl.constexpr, NS: tl.constexpr):
    p, e, x0 = _pair(slot_ptr, ids_ptr, x_ptr, s_xm, TOPK, X_PER_PAIR)
    local = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = local < N
    n2 = (e * N + local)[:, None]
    a = _gguf_rows_dot(aq, aqh, asc, amn, ad, adm, n2, ok[:, None], x0, K, as_q, as_qh, as_sc, as_d, one,
                       QT, SB, WPS, E, BN, NS)
    b = a
    if GLU:
        b = _gguf_rows_dot(bq, bqh, bsc, bmn, bd, bdm, n2, ok[:, None], x0, K, bs_q, bs_qh, bs_sc, bs_d, one,
                           QT, SB, WPS, E, BN, NS)
    _store(out_ptr, p, s_om, local, ok, a, b, scale_ptr, GLU, SCALE)


@triton.jit
def _dense_rows_dot(w_ptr, n2, row_ok, x0, K, BN: tl.constexpr, BK: tl.constexpr):
    """[BN] fp32: rows n2 of a row-major [*, K] weight times x0[:K]; 16-byte loads along K."""
    kk = tl.arange(0, BK)[None, :]
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + kk) < K
        w = tl.load(w_ptr + n2 * K + k0 + kk, mask=row_ok & k_ok, other=0.0)
        xv = tl.load(x0 + k0 + kk, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * xv.to(tl.float32)
    return tl.sum(acc, axis=1)


@triton.jit
def _dense_experts_kernel(x_ptr, out_ptr, slot_ptr, ids_ptr, scale_ptr, a_ptr, b_ptr, N, K, s_xm, s_om,
                          TOPK: tl.constexpr, X_PER_PAIR: tl.constexpr, GLU: tl.constexpr, SCALE: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr):
    p, e, x0 = _pair(slot_ptr, ids_ptr, x_ptr, s_xm, TOPK, X_PER_PAIR)
    local = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = local < N
    n2 = (e * N + local)[:, None]
    a = _dense_rows_dot(a_ptr, n2, ok[:, None], x0, K, BN, BK)
    b = a
    if GLU:
        b = _dense_rows_dot(b_ptr, n2, ok[:, None], x0, K, BN, BK)
    _store(out_ptr, p, s_om, local, ok, a, b, scale_ptr, GLU, SCALE)


def _block_rows(n: int, pairs: int, sms: int, widest: int) -> int:
    """Rows per program: the widest tile that still puts about four programs on every SM."""
    bn = widest
    while bn > 8 and pairs * triton.cdiv(n, bn) < 4 * sms:
        bn //= 2
    return bn


def expert_gemv(x: torch.Tensor, a, b, out: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor, *,
                n: int, top_k: int, x_per_pair: bool, scale: torch.Tensor | None = None,
                sms: int = 132) -> torch.Tensor:
    """out[p, :n] for every pair p listed in `slots` (the order programs run in; each pair once).

    a, b: the stacked projections ([E * n, K] bf16 tensors or PackedGGUF with n rows per expert);
    b given means GLU (silu(a x) * b x), else a x (times scale[p] when given). ids[p] is pair p's
    expert; its activation row is x[p] (x_per_pair) or x[p // top_k]."""
    k = x.shape[1]
    pairs = slots.numel()
    if pairs == 0:
        return out
    glu = b is not None
    dummy = scale if scale is not None else out
    flags = dict(TOPK=top_k, X_PER_PAIR=x_per_pair, GLU=glu, SCALE=scale is not None)
    if isinstance(a, PackedGGUF) or not isinstance(a, torch.Tensor):
        qt = qt_code(a.qtype)
        sb, wps, e = GEOMETRY[qt]
        bn = _block_rows(n, pairs, sms, 64)
        # 256 weights of a row per iteration, as the dense GEMV; narrow tiles take more of each row so
        # that a program still loads 16 bytes per thread per row (512 words for 4 warps)
        ns = 16 if qt == 2 else 8
        while bn * ns * wps < 512 and (2 * ns) * sb <= k:
            ns *= 2
        a_fields, a_strides = field_args(a)
        b_fields, b_strides = field_args(b) if glu else (a_fields, a_strides)
        _gguf_experts_kernel[(pairs, triton.cdiv(n, bn))](
            x, out, slots, ids, dummy, *a_fields, *b_fields, n, k, x.stride(0), out.stride(0),
            *a_strides, *b_strides, ONE_F32_BITS.value, **flags, QT=qt, SB=sb, WPS=wps, E=e, BN=bn, NS=ns,
            num_warps=4, num_stages=1)
    else:
        bn = _block_rows(n, pairs, sms, 32)
        _dense_experts_kernel[(pairs, triton.cdiv(n, bn))](
            x, out, slots, ids, dummy, a, b if glu else a, n, k, x.stride(0), out.stride(0), **flags,
            BN=bn, BK=256, num_warps=4, num_stages=2)
    return out
