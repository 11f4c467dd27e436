"""Routed-expert GEMV for decode and small batches: one launch computes every (token, expert) pair's
projection, reading only the selected experts' rows. No loop over experts on the host, no host sync
(the expert of a pair is read from device memory inside the kernel), so it runs in a CUDA graph.

Weights are the experts of one projection stacked along rows, [E * N, K]: bf16, or GGUF Q4_K / Q5_K /
Q6_K / Q8_0 in the planar layout (gguf_pack.py). The GGUF kernels are the streaming GEMV's frame
(gguf_gemv_wide.py: its tile loads, scale decoding and row dot, imported, not copied) with the
expert's first row as a per-program base pointer: a thread owns whole 16-byte sub-blocks of a few
rows, the next tile's words and scales are in flight while this one is computed, and shapes that tile
evenly run without masks; Q4_K/Q6_K/Q8_0 may take its int8-activation (dp4a) row dot, the activations
quantized in every thread or (xq) once, by gguf_xq.py in a small launch just before (gate_up: x, a row
per token, shared by its pairs' gate and up dots; down: h, a row per pair). Two launches per layer
(with xq, each after its quantization):

  gate_up  program (pair p, row tile, K split): h[p] = silu(G_e x_t) * (U_e x_t), e = ids[p],
           t = p // top_k; gate and up tiles are streamed side by side (without U: G_e x_t alone, for
           gate and up of different types). With K split, the gate and up partials meet in
           gguf_splitk's workspace and the last program applies the SwiGLU.
  down     program (token t, row tile, split s): s runs over top_k * SPLIT_K, (slot j, K range);
           each partial is w[t, j] * (D_e h[t * top_k + j]) over its K range, and the split-K epilogue
           (gguf_splitk.py: last arrival sums in fixed order) also mixes the token's k experts and adds
           the decoder layer's residual (one rounding, one launch fewer).
           Mixtral's down has N = 4096 rows: 32 row tiles per token, so the splits are what fill
           132 SMs at one token.

Grid axis 0 is the pair (or token), the fastest-varying: the programs in flight at one time work on
one row tile, so an expert's tile fetched for one token serves the other tokens routed there from L2
(no sort needed). Expert ids and router weights are read as `topk` returned them (int64, fp32).
Launch constants: `plan()` (heuristic: programs for about two per SM, as the dense GEMV), unless
`TUNED` holds a measured entry for the shape (benchmarks/moe_gpu.py times candidates).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from devstral.kernels import gguf_gemv_wide as wide
from devstral.kernels import gguf_xq, pdl
from devstral.kernels.gguf_config import split_k as split_for
from devstral.kernels.gguf_decode import GEOMETRY, ONE_F32_BITS, XOR_SIGN_BYTES, qt_code
from devstral.kernels.gguf_gemv import field_args
from devstral.kernels.gguf_pack import PackedGGUF
from devstral.kernels.gguf_splitk import MAX_TILES, counters, split_sum, usable_split, workspace
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait
from devstral.kernels.silu_mul import silu_mul

NS = 8  # sub-blocks per row and tile: one super-block of a row (half of one for Q6_K), as the dense GEMV
# measured launch constants, "kind|qtype|rows|n|k" -> dict(bn=, split_k=, num_warps=, int8=, and optionally ns=,
# num_stages=, xq=); rows = pairs for gate_up, tokens for down. Empty: plan() decides. benchmarks/moe_gpu.py
# fills it from its timings.
TUNED: dict[str, dict] = {}


@triton.jit
def _tile_loads(q, qh, sc, mn, d, dm, n2, row_ok, t, c, n_sub, s_q, s_qh, s_sc, s_d, QT: tl.constexpr,
                SB: tl.constexpr, WPS: tl.constexpr, NS: tl.constexpr, EVEN: tl.constexpr):
    """Tile t's words [BN, NS * WPS] and raw scales (gguf_gemv_wide._load_scales) of rows n2 (relative to the
    expert's base)."""
    words, hi = wide.load_tile_words(q, qh, n2, t * NS * WPS + c, row_ok & (t * NS * WPS + c < n_sub * WPS),
                                     s_q, s_qh, QT, EVEN)
    f_d, f_sc, f_dm, f_mn = wide.load_tile_scales(sc, mn, d, dm, n2, row_ok, t, n_sub, s_sc, s_d, QT, SB, NS, EVEN)
    return words, hi, f_d, f_sc, f_dm, f_mn


@triton.jit
def _tile_dot(words, hi, f_d, f_sc, f_dm, f_mn, one, xp0, t, K, x_in, x_row, BN: tl.constexpr, QT: tl.constexpr,
              SB: tl.constexpr, E: tl.constexpr, NS: tl.constexpr, WPS: tl.constexpr, EVEN_K: tl.constexpr,
              ASM: tl.constexpr, INT8: tl.constexpr, XQ: tl.constexpr):
    """Tile t's per-sub-block sums [BN, NS] against one activation row (the dense GEMV's row dot; INT8:
    its int8-activation dp4a variant; XQ: the row quantized beforehand by gguf_xq.py, xp0 its first
    block). Otherwise xp0 points at word c's first activation of tile 0, x_in is its sub-block's
    offset in a tile (the K mask); x_row: the activation row exists."""
    if QT == 3 and not INT8:
        words = words ^ XOR_SIGN_BYTES
    c1, c0 = wide.tile_scales(f_d, f_sc, f_dm, f_mn, QT, BN, NS)
    w3 = tl.reshape(words, (BN, NS, WPS))
    h3 = tl.reshape(hi, (BN, NS, WPS))
    # if/else, not an early return: compiled, the code after a constexpr branch's return is still built
    if XQ:
        sums = wide.row_dot_xq(w3, h3, xp0, t, x_row, K, c1, c0, QT, SB, NS, WPS, EVEN_K, ASM)
    else:
        k0 = t * (NS * SB)
        sums = wide.row_dot(w3, h3, one, xp0 + k0, (k0 + x_in) < K, c1, c0, QT, E, NS, WPS, EVEN_K, ASM, INT8)
    return sums


@triton.jit
def _k_range(K, pid_k, SPLIT_K, SB: tl.constexpr, NS: tl.constexpr):
    n_sub = K // SB
    n_tiles = tl.cdiv(n_sub, NS)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_lo = pid_k * per_split
    return n_sub, n_tiles, t_lo, tl.minimum(t_lo + per_split, n_tiles)


@triton.jit
def _gguf_gate_up_kernel(x_ptr, h_ptr, ids_ptr, ws_ptr, cnt_ptr,
                         aq, aqh, asc, amn, ad, adm, bq, bqh, bsc, bmn, bd, bdm,
                         P, N, K, s_xm, s_hm, as_q, as_qh, as_sc, as_d, bs_q, bs_qh, bs_sc, bs_d, one, SPLIT_K,
                         TOPK: tl.constexpr, GLU: tl.constexpr, QT: tl.constexpr, SB: tl.constexpr,
                         WPS: tl.constexpr, E: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr,
                         SPLIT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr,
                         INT8: tl.constexpr, STAGES: tl.constexpr, XQ: tl.constexpr = False,
                         PDL: tl.constexpr = False, CAT: tl.constexpr = False):
    if PDL:  # kernels/pdl.py: the expert ids come from the router just before (with xq, x from the quantization
        # between them), so nothing loads first
        gdc_wait()
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    col0 = pid_n * 0  # CAT: where this program's rows go in h's [gate | up] row (a tensor, as the branch's N)
    if CAT:  # row tiles 0..T-1 stream gate, T..2T-1 up: one weight a program, as the dense GEMV
        T = tl.cdiv(N, BN)
        if pid_n >= T:
            aq, aqh, asc, amn, ad, adm = bq, bqh, bsc, bmn, bd, bdm
            pid_n -= T
            col0 = N
    r0 = tl.load(ids_ptr + p).to(tl.int64) * N  # the expert's first row in the stack
    # (Q4_K/Q5_K's mn plane: rows of half the sc plane's, s_sc // 2 bytes)
    aq, aqh, asc, amn, ad, adm = aq + r0 * as_q, aqh + r0 * as_qh, asc + r0 * as_sc, amn + r0 * (as_sc // 2), \
        ad + r0 * as_d, adm + r0 * as_d
    if GLU:
        bq, bqh, bsc, bmn, bd, bdm = bq + r0 * bs_q, bqh + r0 * bs_qh, bsc + r0 * bs_sc, bmn + r0 * (bs_sc // 2), \
            bd + r0 * bs_d, bdm + r0 * bs_d
    local = pid_n * BN + tl.arange(0, BN)
    n2 = local[:, None]
    row_ok = n2 < N
    c = tl.arange(0, NS * WPS)[None, :]  # word c of the tile: sub-block c // WPS, word c % WPS
    n_sub, n_tiles, t_lo, t_hi = _k_range(K, pid_k, SPLIT_K, SB, NS)
    EVEN: tl.constexpr = EVEN_N and EVEN_K
    if XQ:
        xp0 = x_ptr + (p // TOPK).to(tl.int64) * s_xm  # the token's quantized blocks (gguf_xq.py)
    else:
        xp0 = x_ptr + (p // TOPK).to(tl.int64) * s_xm + (c // WPS) * SB + c % WPS
    x_in = (c // WPS) * SB
    x_row = p < P  # always: the row dots mask on whether their activation row exists
    acc_a = tl.zeros((BN, NS), dtype=tl.float32)
    acc_b = tl.zeros((BN, NS), dtype=tl.float32)
    if STAGES > 1:
        # tiles pipelined through shared memory by cp.async (gguf_gemv_wide.py's num_stages > 1 loop)
        for t in tl.range(t_lo, t_hi, num_stages=STAGES):
            wa, ha, da, sa, dma, ma = _tile_loads(aq, aqh, asc, amn, ad, adm, n2, row_ok, t, c, n_sub,
                                                  as_q, as_qh, as_sc, as_d, QT, SB, WPS, NS, EVEN)
            acc_a += _tile_dot(wa, ha, da, sa, dma, ma, one, xp0, t, K, x_in, x_row, BN, QT, SB, E, NS, WPS, EVEN_K,
                               ASM, INT8, XQ)
            if GLU:
                wb, hb, db, sb, dmb, mb = _tile_loads(bq, bqh, bsc, bmn, bd, bdm, n2, row_ok, t, c, n_sub,
                                                      bs_q, bs_qh, bs_sc, bs_d, QT, SB, WPS, NS, EVEN)
                acc_b += _tile_dot(wb, hb, db, sb, dmb, mb, one, xp0, t, K, x_in, x_row, BN, QT, SB, E, NS, WPS,
                                   EVEN_K, ASM, INT8, XQ)
    else:
        # prologue: the first tile (an empty split loads a valid tile and skips the loop)
        t0 = tl.minimum(t_lo, n_tiles - 1)
        wa, ha, da, sa, dma, ma = _tile_loads(aq, aqh, asc, amn, ad, adm, n2, row_ok, t0, c, n_sub,
                                              as_q, as_qh, as_sc, as_d, QT, SB, WPS, NS, EVEN)
        if GLU:
            wb, hb, db, sb, dmb, mb = _tile_loads(bq, bqh, bsc, bmn, bd, bdm, n2, row_ok, t0, c, n_sub,
                                                  bs_q, bs_qh, bs_sc, bs_d, QT, SB, WPS, NS, EVEN)
        for t in range(t_lo, t_hi):
            # the next tile's loads (gate's and up's) go out before this one is computed
            tn = tl.minimum(t + 1, t_hi - 1)
            wa_n, ha_n, da_n, sa_n, dma_n, ma_n = _tile_loads(aq, aqh, asc, amn, ad, adm, n2, row_ok, tn, c,
                                                              n_sub, as_q, as_qh, as_sc, as_d, QT, SB, WPS, NS, EVEN)
            if GLU:
                wb_n, hb_n, db_n, sb_n, dmb_n, mb_n = _tile_loads(bq, bqh, bsc, bmn, bd, bdm, n2, row_ok, tn, c,
                                                                  n_sub, bs_q, bs_qh, bs_sc, bs_d, QT, SB, WPS, NS,
                                                                  EVEN)
            acc_a += _tile_dot(wa, ha, da, sa, dma, ma, one, xp0, t, K, x_in, x_row, BN, QT, SB, E, NS, WPS, EVEN_K,
                               ASM, INT8, XQ)
            if GLU:
                acc_b += _tile_dot(wb, hb, db, sb, dmb, mb, one, xp0, t, K, x_in, x_row, BN, QT, SB, E, NS, WPS,
                                   EVEN_K, ASM, INT8, XQ)
                wb, hb, db, sb, dmb, mb = wb_n, hb_n, db_n, sb_n, dmb_n, mb_n
            wa, ha, da, sa, dma, ma = wa_n, ha_n, da_n, sa_n, dma_n, ma_n
    if PDL:  # at the loop's end, as the dense GEMV: earlier, the next kernel would take this one's SM slots
        gdc_launch_dependents()
    a = tl.sum(acc_a, axis=1)
    b = tl.sum(acc_b, axis=1)
    ok = local < N
    if CAT:
        if SPLIT:  # workspace rows 0..2N-1 of column p (h's row)
            total, last = split_sum(a[:, None], col0 + local, p + tl.arange(0, 1), 2 * N, P, ws_ptr, cnt_ptr,
                                    p * tl.num_programs(1) + tl.program_id(1), pid_k, SPLIT_K)
            if last:
                _store_rows(h_ptr, p, s_hm, col0 + local, ok, tl.sum(total, axis=1))
        else:
            _store_rows(h_ptr, p, s_hm, col0 + local, ok, a)
    elif SPLIT:
        # gate and up as two workspace columns (2p, 2p + 1): one counter, the last split has both sums
        which = tl.arange(0, 2)[None, :]
        total, last = split_sum(tl.where(which == 0, a[:, None], b[:, None]), local, 2 * p + tl.arange(0, 2), N,
                                2 * P, ws_ptr, cnt_ptr, p * tl.num_programs(1) + pid_n, pid_k, SPLIT_K)
        if last:
            a = tl.sum(tl.where(which == 0, total, 0.0), axis=1)
            b = tl.sum(tl.where(which == 1, total, 0.0), axis=1)
            _store_rows(h_ptr, p, s_hm, local, ok, _glu(a, b, GLU))
    else:
        _store_rows(h_ptr, p, s_hm, local, ok, _glu(a, b, GLU))


@triton.jit
def _glu(a, b, GLU: tl.constexpr):
    if GLU:
        return a / (1.0 + tl.exp(-a)) * b
    return a


@triton.jit
def _store_rows(out_ptr, row, s_om, local, ok, val):
    tl.store(out_ptr + row.to(tl.int64) * s_om + local, val.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gguf_down_kernel(h_ptr, out_ptr, res_ptr, ids_ptr, w_ptr, ws_ptr, cnt_ptr, q, qh, sc, mn, d, dm,
                      T, N, K, s_hm, s_om, s_rm, s_q, s_qh, s_sc, s_d, one, SPLIT_K, RES: tl.constexpr,
                      TOPK: tl.constexpr, QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr,
                      E: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr, SPLIT: tl.constexpr,
                      EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr, INT8: tl.constexpr,
                      STAGES: tl.constexpr, XQ: tl.constexpr = False, PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py: h and the expert ids come from the kernels just before
        gdc_wait()
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)  # (slot j, K split)
    p = t * TOPK + s // SPLIT_K
    r0 = tl.load(ids_ptr + p).to(tl.int64) * N
    q, qh, sc, mn, d, dm = q + r0 * s_q, qh + r0 * s_qh, sc + r0 * s_sc, mn + r0 * (s_sc // 2), d + r0 * s_d, \
        dm + r0 * s_d
    local = pid_n * BN + tl.arange(0, BN)
    n2 = local[:, None]
    row_ok = n2 < N
    c = tl.arange(0, NS * WPS)[None, :]
    n_sub, n_tiles, t_lo, t_hi = _k_range(K, s % SPLIT_K, SPLIT_K, SB, NS)
    EVEN: tl.constexpr = EVEN_N and EVEN_K
    if XQ:
        xp0 = h_ptr + p.to(tl.int64) * s_hm  # the pair's quantized blocks (gguf_xq.py)
    else:
        xp0 = h_ptr + p.to(tl.int64) * s_hm + (c // WPS) * SB + c % WPS
    x_in = (c // WPS) * SB
    x_row = t < T  # always (see gate_up)
    acc = tl.zeros((BN, NS), dtype=tl.float32)
    if STAGES > 1:
        for kt in tl.range(t_lo, t_hi, num_stages=STAGES):
            w, hi, fd, fsc, fdm, fmn = _tile_loads(q, qh, sc, mn, d, dm, n2, row_ok, kt, c, n_sub, s_q, s_qh,
                                                   s_sc, s_d, QT, SB, WPS, NS, EVEN)
            acc += _tile_dot(w, hi, fd, fsc, fdm, fmn, one, xp0, kt, K, x_in, x_row, BN, QT, SB, E, NS, WPS, EVEN_K,
                             ASM, INT8, XQ)
    else:
        t0 = tl.minimum(t_lo, n_tiles - 1)
        w, hi, fd, fsc, fdm, fmn = _tile_loads(q, qh, sc, mn, d, dm, n2, row_ok, t0, c, n_sub, s_q, s_qh, s_sc,
                                               s_d, QT, SB, WPS, NS, EVEN)
        for kt in range(t_lo, t_hi):
            tn = tl.minimum(kt + 1, t_hi - 1)
            w_n, hi_n, fd_n, fsc_n, fdm_n, fmn_n = _tile_loads(q, qh, sc, mn, d, dm, n2, row_ok, tn, c, n_sub,
                                                               s_q, s_qh, s_sc, s_d, QT, SB, WPS, NS, EVEN)
            acc += _tile_dot(w, hi, fd, fsc, fdm, fmn, one, xp0, kt, K, x_in, x_row, BN, QT, SB, E, NS, WPS, EVEN_K,
                             ASM, INT8, XQ)
            w, hi, fd, fsc, fdm, fmn = w_n, hi_n, fd_n, fsc_n, fdm_n, fmn_n
    if PDL:
        gdc_launch_dependents()
    y = tl.load(w_ptr + p).to(tl.float32) * tl.sum(acc, axis=1)
    ok = local < N
    if SPLIT:
        total, last = split_sum(y[:, None], local, t + tl.arange(0, 1), N, T, ws_ptr, cnt_ptr,
                                t * tl.num_programs(1) + pid_n, s, TOPK * SPLIT_K)
        if last:
            _store_rows(out_ptr, t, s_om, local, ok, _plus_residual(tl.sum(total, axis=1), res_ptr, t, s_rm, local, ok,
                                                                     RES))
    else:
        _store_rows(out_ptr, t, s_om, local, ok, _plus_residual(y, res_ptr, t, s_rm, local, ok, RES))


@triton.jit
def _plus_residual(y, res_ptr, t, s_rm, local, ok, RES: tl.constexpr):
    """The layer's residual added in fp32 before the one rounding to the output dtype."""
    if RES:
        y += tl.load(res_ptr + t.to(tl.int64) * s_rm + local, mask=ok, other=0.0).to(tl.float32)
    return y


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
                          TOPK: tl.constexpr, GLU: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py
        gdc_launch_dependents()
        gdc_wait()
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
def _dense_down_kernel(h_ptr, out_ptr, res_ptr, ids_ptr, w_ptr, d_ptr, N, K, s_hm, s_om, s_rm, RES: tl.constexpr,
                       TOPK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0)
    local = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = local < N
    acc = tl.zeros((BN,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        p = t * TOPK + j
        e = tl.load(ids_ptr + p).to(tl.int64)
        y = _dense_rows_dot(d_ptr, (e * N + local)[:, None], ok[:, None], h_ptr + p.to(tl.int64) * s_hm, K, BN, BK)
        acc += tl.load(w_ptr + p).to(tl.float32) * y
    _store_rows(out_ptr, t, s_om, local, ok, _plus_residual(acc, res_ptr, t, s_rm, local, ok, RES))


def _block_rows(n: int, programs: int, sms: int, widest: int) -> int:
    """Rows per program for the bf16 kernels: the widest tile that still puts about four programs on
    every SM."""
    bn = widest
    while bn > 8 and programs * triton.cdiv(n, bn) < 4 * sms:
        bn //= 2
    return bn


def plan(kind: str, qtype: str, rows: int, n: int, k: int, top_k: int, sms: int,
         device: torch.device | None = None) -> dict:
    """Launch constants of a GGUF expert kernel: dict(bn=, split_k=, num_warps=, int8=) (measured entries
    may also carry ns=, num_stages= and xq=; see candidates()).

    `rows` is the grid's first axis (pairs for gate_up, tokens for down). A measured entry wins: TUNED
    (set by a benchmark in this process), then the device's tuned table ("moe_experts", what
    benchmarks/moe_gpu.py measured and a run committed); else the dense GEMV's rule: 8 weight rows per
    thread (BN 128 over 4 warps; gate_up streams two weights, so BN 64 keeps the same bytes in flight
    per thread without spilling), BN no wider than N needs, and K split until about two programs per
    SM (down's top_k slots count as splits). int8 activations (the streaming GEMV's dp4a row dot) where the device's tuned table says that
    variant wins the dense GEMV at one activation row, which is what each program here multiplies."""
    key = f"{kind}|{qtype}|{rows}|{n}|{k}"
    hit = TUNED.get(key)
    if hit is None:
        hit = _measured(device).get(key)
    if hit is not None:
        cfg = {**hit, "int8": hit.get("int8", False) and int8_allowed(qtype)}
        if "xq" in hit:  # an int8 variant: off with int8 (the launch would also drop it, see _xq)
            cfg["xq"] = hit["xq"] and int8_allowed(qtype)
        return cfg
    bn = 64 if kind == "gate_up" else 128
    while bn > 16 and bn >= 2 * n:
        bn //= 2
    sb = 16 if qtype == "Q6_K" else 32
    slots = top_k if kind == "down" else 1
    split = split_for(rows * triton.cdiv(n, bn) * slots, k // (sb * NS), sms)
    return dict(bn=bn, split_k=split, num_warps=4, int8=int8_allowed(qtype) and _int8_measured(qtype, device))


def _measured(device: torch.device | None) -> dict:
    from devstral.kernels.gguf_config import table_for

    return table_for(device).get("moe_experts", {})


def int8_allowed(qtype: str) -> bool:
    """Types with an int8-activation row dot, unless DEVSTRAL_GGUF_FLOAT_GEMV asks for the float ones."""
    from devstral.kernels.gguf_config import WIDE_INT8_TYPES

    return qtype in WIDE_INT8_TYPES and not os.environ.get("DEVSTRAL_GGUF_FLOAT_GEMV")


def _int8_measured(qtype: str, device: torch.device | None) -> bool:
    from devstral.kernels.gguf_config import WIDE_INT8_KINDS, measured_kind, table_for

    return measured_kind(table_for(device), qtype, 1) in WIDE_INT8_KINDS


def candidates(kind: str, qtype: str) -> list[dict]:
    """The launch constants benchmarks/moe_gpu.py times for TUNED (and tests/test_moe_gpu.py checks):
    tile widths around the plan's, K split 1-4 (down: 1-8 per slot); int8 activations at every width
    where the type has them (they won the dense GEMV at one row on the H200), float at the plan's width,
    and the pipelined loop (num_stages 3) at 64 and 128 rows; and each int8 config again with xq (the
    activations quantized once by gguf_xq.py before the launch: the dense GEMV's fastest variant at one
    row); gate_up's cat configs (concatenates()). Each width x split-or-not x int8 x xq x stages x cat is
    one more compilation (down's top_k slots count as splits, so it is always split): for a type with an
    int8 row dot, gate_up 80 configs in 50 compilations, down 102 in 17."""
    widths = (32, 64) if kind == "gate_up" else (64, 128)
    # split counts share one compilation (split > 1 is the constexpr), so several are cheap to time: what
    # fills whole waves depends on the tile's registers, hence on the config
    splits = (1, 2, 3, 4) if kind == "gate_up" else (1, 2, 3, 4, 6, 8)
    out = [dict(bn=widths[-1], split_k=s, num_warps=4, int8=False) for s in splits]
    if int8_allowed(qtype):
        out += [dict(bn=bn, split_k=s, num_warps=4, int8=True) for bn in widths for s in splits]
    # the software-pipelined loop (tiles through shared memory, fewer registers: wider tiles fit)
    out += [dict(bn=bn, split_k=s, num_warps=4, int8=int8_allowed(qtype), num_stages=3)
            for bn in (64, 128) for s in splits]
    # tiles of twice the sub-blocks a row at half the rows (a warp reads 256 contiguous bytes of a row per
    # load: on the dense GEMV this took Q4_K gate/up from 68 to 74 % of copy bandwidth)
    out += [dict(bn=widths[-1] // 2, split_k=s, num_warps=4, int8=int8_allowed(qtype), ns=2 * NS, num_stages=st)
            for s in splits for st in (1, 3)]
    # and at the full width, pipelined (the register-prefetch loop would spill there)
    out += [dict(bn=widths[-1], split_k=s, num_warps=4, int8=int8_allowed(qtype), ns=2 * NS, num_stages=3)
            for s in splits]
    if kind == "down" and int8_allowed(qtype):  # the dense GEMV's pick for its Q4_K/Q6_K ffn_down at one row
        out += [dict(bn=128, split_k=s, num_warps=4, int8=True, ns=2 * NS) for s in splits]
    # xq: the row dots only load the quantized bytes (dense Q4_K gate/up: 88 % of copy with it). Whether
    # its extra launch pays here, above all in down (one more kernel between gate_up and down), is the
    # timing's to say
    out += [{**cfg, "xq": True} for cfg in out if cfg["int8"]]
    if kind == "gate_up" and int8_allowed(qtype):
        # cat: one weight a program ([gate | up] rows, concatenates()), so the dense GEMV's tiles fit: its
        # Q4_K gate/up pick (128 rows, 16 sub-blocks, register prefetch, xq) and the widths around it
        out += [dict(bn=bn, split_k=s, num_warps=4, int8=True, xq=True, cat=True, ns=ns, num_stages=st)
                for bn in (64, 128, 256) for ns in (NS, 2 * NS) for st in (1, 3) for s in (1, 2)
                if bn * ns <= 2048]
    return out


def _int8(cfg: dict, p: PackedGGUF) -> bool:
    from devstral.kernels.gguf_config import WIDE_INT8_TYPES

    if not cfg.get("int8"):
        return False
    if p.qtype.name not in WIDE_INT8_TYPES:
        raise ValueError(f"no int8-activation expert GEMV for {p.qtype.name}")
    return int8_allowed(p.qtype.name)


def _xq(cfg: dict, p: PackedGGUF) -> bool:
    """xq: the int8 row dot on activations quantized beforehand (gguf_xq.py); it implies int8 and is
    gated as int8 is (_int8: the types with that row dot, DEVSTRAL_GGUF_FLOAT_GEMV)."""
    return bool(cfg.get("xq")) and _int8({**cfg, "int8": True}, p)


def quantizes_input(p: PackedGGUF, pairs: int, n: int, k: int, top_k: int, sms: int, device: torch.device) -> bool:
    """Whether gate_up() on weight p at `pairs` (token, slot) pairs quantizes its input once beforehand
    (gguf_xq.quantize: what the norm before the layer can write instead, kernels/rms_norm_triton.py)."""
    from devstral.kernels.gguf_config import WIDE_INT8_TYPES

    return p.qtype.name in WIDE_INT8_TYPES and _xq(plan("gate_up", p.qtype.name, pairs, n, k, top_k, sms, device), p)


def _stages(cfg: dict) -> int:
    """1: the next tile prefetched into registers; more: tiles pipelined through shared memory."""
    return cfg.get("num_stages", 1)


def _asm() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1"  # inline PTX only when compiled


def _geometry(p: PackedGGUF, k: int, bn: int, n: int, ns: int = NS) -> dict:
    qt = qt_code(p.qtype)
    sb, wps, e = GEOMETRY[qt]
    return dict(QT=qt, SB=sb, WPS=wps, E=e, BN=bn, NS=ns, EVEN_N=n % bn == 0, EVEN_K=k % (ns * sb) == 0, ASM=_asm())


def concatenates(cfg: dict, gate, up) -> bool:
    """Whether a GGUF gate_up launch with these constants writes [gate | up] rows (the "cat" key): gate and
    up of one type and layout, each program streaming one row tile of one of them, as the dense GEMV does
    over a fused gate/up weight. With both streamed side by side, a program holds twice the tile bytes in
    registers (Mixtral Q4_K on an H200: 66% of copy bandwidth against the dense gate/up's 94%). The
    SwiGLU then runs in down's activation quantization (down(glu=True))."""
    return (bool(cfg.get("cat")) and isinstance(gate, PackedGGUF) and isinstance(up, PackedGGUF)
            and gate.qtype == up.qtype and field_args(gate)[1] == field_args(up)[1])


def gate_up(x: torch.Tensor, gate, up, h: torch.Tensor, ids: torch.Tensor, *, n: int, top_k: int,
            sms: int = 132, config: dict | None = None) -> torch.Tensor:
    """h[p, :n] = silu(gate_e x_t) * (up_e x_t) for every pair p (e = ids[p], t = p // top_k); with up
    None, gate_e x_t; with a cat config (concatenates()), h[p, :2n] = [gate_e x_t | up_e x_t]. gate/up:
    [E * n, K] bf16 tensors or PackedGGUF of E * n rows; ids: contiguous. config: GGUF launch constants
    (plan()'s dict) instead of the plan."""
    pairs, k = ids.numel(), x.shape[1]
    if pairs == 0:
        return h
    glu = up is not None
    on = pdl.enabled(x.device)
    if isinstance(gate, PackedGGUF):
        cfg = config or plan("gate_up", gate.qtype.name, pairs, n, k, top_k, sms, x.device)
        cat = concatenates(cfg, gate, up)
        if cat and h.shape[1] != 2 * n:
            raise ValueError(f"a cat config writes [gate | up] rows: h needs {2 * n} columns, has {h.shape[1]}")
        bn, tiles = cfg["bn"], triton.cdiv(n, cfg["bn"])
        if cat:  # [gate | up] rows of 2n values: one row tile of either a program, no SwiGLU here
            split = usable_split(cfg["split_k"], pairs * 2 * tiles, pairs, 2 * n)
            ws = workspace(split, pairs, 2 * n, x.device)
        else:
            split = usable_split(cfg["split_k"], pairs * tiles, 2 * pairs, n)
            ws = workspace(split, 2 * pairs, n, x.device)
        a_fields, a_strides = field_args(gate)
        b_fields, b_strides = field_args(up) if glu else (a_fields, a_strides)
        xq = _xq(cfg, gate)
        # xq: each token's activations quantized once (one small launch), for all its pairs' gate and up
        # row dots, where the int8 row dot quantizes them in every thread, twice a tile
        xin = gguf_xq.quantize(x, gguf_xq.layout_for(qt_code(gate.qtype))) if xq else x
        _gguf_gate_up_kernel[(pairs, 2 * tiles if cat else tiles, split)](
            xin, h, ids, ws, counters(x.device), *a_fields, *b_fields, pairs, n, k, xin.stride(0), h.stride(0),
            *a_strides, *b_strides, ONE_F32_BITS.value, split, TOPK=top_k, GLU=glu and not cat, SPLIT=split > 1,
            INT8=xq or _int8(cfg, gate), **_geometry(gate, k, bn, n, cfg.get("ns", NS)), STAGES=_stages(cfg),
            XQ=xq, PDL=on, CAT=cat, num_warps=cfg["num_warps"], num_stages=_stages(cfg), launch_pdl=on)
    else:
        bn = _block_rows(n, pairs, sms, 32)
        _dense_gate_up_kernel[(pairs, triton.cdiv(n, bn))](
            x, h, ids, gate, up if glu else gate, n, k, x.stride(0), h.stride(0), TOPK=top_k, GLU=glu,
            BN=bn, BK=256, PDL=on, num_warps=4, num_stages=2, launch_pdl=on)
    return h


def down(h: torch.Tensor, w, out: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, *, n: int, top_k: int,
         sms: int = 132, config: dict | None = None, residual: torch.Tensor | None = None,
         glu: bool = False) -> torch.Tensor:
    """out[t, :n] = sum over j < top_k of weights[t, j] * (w_e h[t * top_k + j]), e = ids[t, j]; plus
    residual[t] when given (the decoder layer's skip connection, added before the rounding: one launch
    fewer per layer). glu: h holds a cat gate_up's [gate | up] rows, and h's rows here are their SwiGLU
    (computed by the activation quantization with xq, else by one silu_mul launch)."""
    tokens, k = out.shape[0], h.shape[1] // 2 if glu else h.shape[1]
    if tokens == 0:
        return out
    on = pdl.enabled(out.device)
    if isinstance(w, PackedGGUF):
        cfg = config or plan("down", w.qtype.name, tokens, n, k, top_k, sms, out.device)
        bn, tiles = cfg["bn"], triton.cdiv(n, cfg["bn"])
        # counters: one per (token, row tile); more tokens than they cover run as several launches
        step = max(1, MAX_TILES // tiles)
        fields, strides = field_args(w)
        xq = _xq(cfg, w)
        # xq: every pair's h quantized once, in one launch for all of them (as gate_up's x)
        if xq:
            hin = gguf_xq.quantize(h[:tokens * top_k], gguf_xq.layout_for(qt_code(w.qtype)), glu=glu)
        else:
            hin = silu_mul(h[:, :k], h[:, k:]) if glu else h
        for t0 in range(0, tokens, step):
            t1 = min(tokens, t0 + step)
            split = cfg["split_k"]
            if usable_split(split * top_k, (t1 - t0) * tiles, t1 - t0, n) != split * top_k:
                split = 1  # the workspace's int32 offsets: one split per slot
            ws = workspace(split * top_k, t1 - t0, n, out.device)
            res = residual[t0:] if residual is not None else out[t0:]
            _gguf_down_kernel[(t1 - t0, tiles, split * top_k)](
                hin[t0 * top_k:], out[t0:], res, ids[t0:], weights[t0:], ws, counters(out.device), *fields,
                t1 - t0, n, k, hin.stride(0), out.stride(0), res.stride(0), *strides, ONE_F32_BITS.value, split,
                RES=residual is not None, TOPK=top_k,
                SPLIT=split * top_k > 1, INT8=xq or _int8(cfg, w), **_geometry(w, k, bn, n, cfg.get("ns", NS)),
                STAGES=_stages(cfg), XQ=xq, PDL=on, num_warps=cfg["num_warps"], num_stages=_stages(cfg),
                launch_pdl=on)
    else:
        h = silu_mul(h[:, :k], h[:, k:]) if glu else h
        bn = _block_rows(n, tokens, sms, 32)
        res = residual if residual is not None else out
        _dense_down_kernel[(tokens, triton.cdiv(n, bn))](
            h, out, res, ids, weights, w, n, k, h.stride(0), out.stride(0), res.stride(0), RES=residual is not None,
            TOPK=top_k, BN=bn, BK=256, PDL=on, num_warps=4, num_stages=2, launch_pdl=on)
    return out

