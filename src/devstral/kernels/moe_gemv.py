"""Routed-expert GEMV for decode and small batches: one launch computes every (token, expert) pair's
projection, reading only the selected experts' rows. No loop over experts on the host, no host sync
(the expert of a pair is read from device memory inside the kernel), so it runs in a CUDA graph.

Weights are the experts of one projection stacked along rows, [E * N, K]: bf16, or GGUF Q4_K / Q5_K /
Q6_K / Q8_0 in the planar layout (gguf_pack.py), decoded with the dense GEMV's helpers (gguf_decode.py,
gguf_gemv.py): two integer ops and one FMA per weight. Two launches per layer:

  gate_up  program (pair p, row tile): h[p] = silu(G_e x_t) * (U_e x_t), e = ids[p], t = p // top_k
           (without U: G_e x_t alone, for gate and up of different types)
  down     program (token t, row tile): out[t] = sum over its k pairs of w[p] * (D_e h[p]), in x's dtype

Grid: (pair or token, row tile), the first axis fastest: the programs in flight at one time all work
on one row tile, so an expert's tile fetched for one token serves the other tokens routed there from
L2 (no sort needed). Expert ids and router weights are read as `topk` returned them (int64, fp32).
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
def _store_rows(out_ptr, row, s_om, local, ok, val):
    tl.store(out_ptr + row.to(tl.int64) * s_om + local, val.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gguf_gate_up_kernel(x_ptr, h_ptr, ids_ptr,
                         aq, aqh, asc, amn, ad, adm, bq, bqh, bsc, bmn, bd, bdm,
                         N, K, s_xm, s_hm, as_q, as_qh, as_sc, as_d, bs_q, bs_qh, bs_sc, bs_d, one,
                         TOPK: tl.constexpr, GLU: tl.constexpr, QT: tl.constexpr, SB: tl.constexpr,
                         WPS: tl.constexpr, E: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr):
    p = tl.program_id(0)
    e = tl.load(ids_ptr + p).to(tl.int64)
    x0 = x_ptr + (p // TOPK).to(tl.int64) * s_xm
    local = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = local < N
    n2 = (e * N + local)[:, None]
    a = _gguf_rows_dot(aq, aqh, asc, amn, ad, adm, n2, ok[:, None], x0, K, as_q, as_qh, as_sc, as_d, one,
                       QT, SB, WPS, E, BN, NS)
    if GLU:
        b = _gguf_rows_dot(bq, bqh, bsc, bmn, bd, bdm, n2, ok[:, None], x0, K, bs_q, bs_qh, bs_sc, bs_d, one,
                           QT, SB, WPS, E, BN, NS)
        a = a / (1.0 + tl.exp(-a)) * b
    _store_rows(h_ptr, p, s_hm, local, ok, a)


@triton.jit
def _gguf_down_kernel(h_ptr, out_ptr, ids_ptr, w_ptr, q, qh, sc, mn, d, dm, N, K, s_hm, s_om, s_q, s_qh, s_sc, s_d,
                      one, TOPK: tl.constexpr, QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr,
                      E: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr):
    t = tl.program_id(0)
    local = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = local < N
    acc = tl.zeros((BN,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        p = t * TOPK + j
        e = tl.load(ids_ptr + p).to(tl.int64)
        n2 = (e * N + local)[:, None]
        y = _gguf_rows_dot(q, qh, sc, mn, d, dm, n2, ok[:, None], h_ptr + p.to(tl.int64) * s_hm, K,
                           s_q, s_qh, s_sc, s_d, one, QT, SB, WPS, E, BN, NS)
        acc += tl.load(w_ptr + p).to(tl.float32) * y
    _store_rows(out_ptr, t, s_om, local, ok, acc)


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
def _dense_gate_up_kernel(x_ptr, h_ptr, ids_ptr, a_ptr, b_ptr, N, K, s_xm, s_hm,
                          TOPK: tl.constexpr, GLU: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    p = tl.program_id(0)
    e = tl.load(ids_ptr + p).to(tl.int64)
    x0 = x_ptr + (p // TOPK).to(tl.int64) * s_xm
    local = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = local < N
    n2 = (e * N + local)[:, None]
    a = _dense_rows_dot(a_ptr, n2, ok[:, None], x0, K, BN, BK)
    if GLU:
        b = _dense_rows_dot(b_ptr, n2, ok[:, None], x0, K, BN, BK)
        a = a / (1.0 + tl.exp(-a)) * b
    _store_rows(h_ptr, p, s_hm, local, ok, a)


@triton.jit
def _dense_down_kernel(h_ptr, out_ptr, ids_ptr, w_ptr, d_ptr, N, K, s_hm, s_om,
                       TOPK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    t = tl.program_id(0)
    local = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = local < N
    acc = tl.zeros((BN,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        p = t * TOPK + j
        e = tl.load(ids_ptr + p).to(tl.int64)
        y = _dense_rows_dot(d_ptr, (e * N + local)[:, None], ok[:, None], h_ptr + p.to(tl.int64) * s_hm, K, BN, BK)
        acc += tl.load(w_ptr + p).to(tl.float32) * y
    _store_rows(out_ptr, t, s_om, local, ok, acc)


def _block_rows(n: int, programs: int, sms: int, widest: int) -> int:
    """Rows per program: the widest tile that still puts about four programs on every SM."""
    bn = widest
    while bn > 8 and programs * triton.cdiv(n, bn) < 4 * sms:
        bn //= 2
    return bn


def _gguf_tile(p: PackedGGUF, n: int, programs: int, sms: int) -> dict:
    """Launch constants for n rows per expert of p."""
    qt = qt_code(p.qtype)
    sb, wps, e = GEOMETRY[qt]
    bn = _block_rows(n, programs, sms, 64)
    # 256 weights of a row per iteration, as the dense GEMV; narrow tiles take more of each row so
    # that a program still loads 16 bytes per thread per row (512 words for 4 warps)
    ns = 16 if qt == 2 else 8
    while bn * ns * wps < 512 and (2 * ns) * sb <= p.k:
        ns *= 2
    return dict(QT=qt, SB=sb, WPS=wps, E=e, BN=bn, NS=ns)


def gate_up(x: torch.Tensor, gate, up, h: torch.Tensor, ids: torch.Tensor, *, n: int, top_k: int,
            sms: int = 132) -> torch.Tensor:
    """h[p, :n] = silu(gate_e x_t) * (up_e x_t) for every pair p (e = ids[p], t = p // top_k); with up
    None, gate_e x_t. gate/up: [E * n, K] bf16 tensors or PackedGGUF of E * n rows; ids: contiguous."""
    pairs, k = ids.numel(), x.shape[1]
    if pairs == 0:
        return h
    glu = up is not None
    if isinstance(gate, PackedGGUF):
        tile = _gguf_tile(gate, n, pairs, sms)
        a_fields, a_strides = field_args(gate)
        b_fields, b_strides = field_args(up) if glu else (a_fields, a_strides)
        _gguf_gate_up_kernel[(pairs, triton.cdiv(n, tile["BN"]))](
            x, h, ids, *a_fields, *b_fields, n, k, x.stride(0), h.stride(0), *a_strides, *b_strides,
            ONE_F32_BITS.value, TOPK=top_k, GLU=glu, **tile, num_warps=4, num_stages=1)
    else:
        bn = _block_rows(n, pairs, sms, 32)
        _dense_gate_up_kernel[(pairs, triton.cdiv(n, bn))](
            x, h, ids, gate, up if glu else gate, n, k, x.stride(0), h.stride(0), TOPK=top_k, GLU=glu,
            BN=bn, BK=256, num_warps=4, num_stages=2)
    return h


def down(h: torch.Tensor, w, out: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, *, n: int, top_k: int,
         sms: int = 132) -> torch.Tensor:
    """out[t, :n] = sum over j < top_k of weights[t, j] * (w_e h[t * top_k + j]), e = ids[t, j]."""
    tokens, k = out.shape[0], h.shape[1]
    if tokens == 0:
        return out
    if isinstance(w, PackedGGUF):
        tile = _gguf_tile(w, n, tokens, sms)
        fields, strides = field_args(w)
        _gguf_down_kernel[(tokens, triton.cdiv(n, tile["BN"]))](
            h, out, ids, weights, *fields, n, k, h.stride(0), out.stride(0), *strides, ONE_F32_BITS.value,
            TOPK=top_k, **tile, num_warps=4, num_stages=1)
    else:
        bn = _block_rows(n, tokens, sms, 32)
        _dense_down_kernel[(tokens, triton.cdiv(n, bn))](
            h, out, ids, weights, w, n, k, h.stride(0), out.stride(0), TOPK=top_k, BN=bn, BK=256,
            num_warps=4, num_stages=2)
    return out
