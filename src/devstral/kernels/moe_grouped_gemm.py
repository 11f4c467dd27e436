"""Grouped expert GEMM for GGUF experts: a prefill batch's (token, expert) pairs through all experts in
one launch, each weight tile dequantized in registers (gguf_gemm.py's K loop), with no bf16 copy of the
experts in between.

Inputs: the pairs' activations sorted by expert (ExpertStack.prefill gathers them) [P, K], the expert
counts on the device [E], and one projection of all experts as a planar weight of E * N rows
(moe_experts.stack_packed). Output [P, N] in the same order.

No host sync: the grid is sized from shapes only, for the most row tiles any split of P pairs over E
experts can need (cdiv(P, BM) + E - 1: each expert adds at most one partial tile) times the N tiles.
Each program reads the E counts, takes the real number of row tiles T from them, finds its own expert
and rows, and returns if it is past T. Row tiles never straddle experts: each is one expert's rows
(the last one masked), multiplied by that expert's weight (its rows start at e * N: a 64-bit base
pointer a program).

The real tiles are ordered as gguf_gemm.py orders its own: GROUP_M row tiles walk N together, so an
expert's weight tile is fetched from DRAM about once per group and its other row tiles read it from
L2. With BM 64 and Mixtral's 128 pairs per expert at a 512-token prefill, an expert's 2-3 row tiles sit
in one group.

The K loop is `gguf_gemm.accumulate`, the dense kernel's: the same dequantization (rounded to the
activations' 16-bit type) and the same dot order, so with the same BN, BM and NSUB each expert's rows
come out as the dense kernel gives them on that expert's slice alone (the interpreter tests check this
bit for bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels import stage_fit
from devstral.kernels.gguf_decode import GEOMETRY, ONE_F32_BITS, qt_code
from devstral.kernels.gguf_gemm import accumulate, dot_mode
from devstral.kernels.gguf_gemv import field_args
from devstral.kernels.gguf_pack import PackedGGUF
from devstral.kernels.gguf_splitk import store_output

# a benchmark's launch constants for f"{qtype}|{N}|{K}" (set in its process; see candidates())
TUNED: dict[str, dict] = {}
K_STEP = 64  # weight values a row per K iteration by default: 2 sub-blocks of 32, 4 of Q6_K's 16


@triton.jit
def _grouped_kernel(x_ptr, out_ptr, cnt_ptr, q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
                    E, N, K, s_xm, s_om, s_q, s_qh, s_sc, s_d, one,
                    QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                    NSUB: tl.constexpr, GROUP_M: tl.constexpr, EP: tl.constexpr, DOT: tl.constexpr):
    pid = tl.program_id(0)
    ex = tl.arange(0, EP)
    counts = tl.load(cnt_ptr + ex, mask=ex < E, other=0).to(tl.int32)
    tiles = (counts + BM - 1) // BM  # row tiles of each expert
    ends = tl.cumsum(tiles, 0)  # row tiles of the experts up to and including each
    num_m = tl.sum(tiles, 0)
    num_n = tl.cdiv(N, BN)
    if pid >= num_m * num_n:  # the grid's bound assumed the most partial tiles: this one is not needed
        return
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    e = tl.sum((ends <= pid_m).to(tl.int32), 0)  # the first expert whose tiles reach past pid_m
    before = ex < e
    row0 = tl.sum(tl.where(before, counts, 0), 0)  # the expert's first pair
    row_end = row0 + tl.sum(tl.where(ex == e, counts, 0), 0)
    cols = row0 + (pid_m - tl.sum(tl.where(before, tiles, 0), 0)) * BM + tl.arange(0, BM)
    col_ok = (cols < row_end)[None, :]  # rows of the next expert are not this tile's
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = (rows < N)[:, None]
    x_tile = x_ptr + cols[None, :].to(tl.int64) * s_xm + tl.arange(0, SB)[:, None]
    base = e.to(tl.int64) * N  # the expert's first weight row: 64-bit, as E * N rows * row words may not fit 32
    n_sub = K // SB
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    acc = accumulate(acc, x_tile, col_ok, q_ptr + base * s_q, qh_ptr + base * s_qh, sc_ptr + base * s_sc,
                     mn_ptr + base * (s_sc // 2), d_ptr + base * s_d, dm_ptr + base * s_d, rows[:, None], row_ok,
                     0, tl.cdiv(n_sub, NSUB), n_sub, s_q, s_qh, s_sc, s_d, one, QT, SB, WPS, NSUB, DOT)
    # unsplit: the workspace, counter and bias arguments are not read
    store_output(acc, rows, cols, N, row_end, out_ptr, s_om, out_ptr, out_ptr, cnt_ptr, 0, 0, 1, False, False)


def default_config(qtype: str) -> dict:
    """BM 64: Mixtral's 512-token prefill gives each expert ~128 pairs, so 2-3 row tiles an expert and a
    partial last one wastes at most 63 rows of it (BM 128 would often waste half a tile); BN 128: the
    dequantized tile is the dot's first operand (wgmma's M), and each dequantized weight serves 64 rows;
    K 64 values an iteration with three stages of loads in flight (the dense GEMM's measured picks at
    M 64-128 on the H200 were BN 64-128, 2 sub-blocks of 32 (Q6_K 4-8 of 16), 2-3 stages); 4 warps
    hold the 128 x 64 fp32 accumulator in 64 registers a thread. Not measured on a GPU yet."""
    sb = 16 if qtype == "Q6_K" else 32
    return dict(bm=64, bn=128, nsub=K_STEP // sb, group_m=8, num_warps=4, num_stages=3)


def plan(qtype: str, n: int, k: int) -> dict:
    """Launch constants: TUNED's entry for this type and shape when a benchmark set one, else the default."""
    return dict(TUNED.get(f"{qtype}|{n}|{k}") or default_config(qtype))


def candidates(qtype: str) -> list[dict]:
    """Launch constants a benchmark may time for TUNED (tests/test_moe_gpu.py runs each on Q4_K experts):
    row tiles of 32-128 pairs, 64 or 128 weight rows, 64 or 128 values of K an iteration, 2 or 3 stages,
    4 warps, or 8 at the 128 x 128 tile (its accumulator alone would take 128 registers a thread at 4)."""
    sb = 16 if qtype == "Q6_K" else 32
    out = []
    for bm in (32, 64, 128):
        for bn in (64, 128):
            for k_step in (64, 128):
                for stages in (2, 3):
                    warps = 8 if bm * bn >= 128 * 128 else 4
                    out.append(dict(bm=bm, bn=bn, nsub=k_step // sb, group_m=8, num_warps=warps, num_stages=stages))
    return out


def grouped_gemm(xs: torch.Tensor, counts: torch.Tensor, w: PackedGGUF, n: int, out: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """out[P, n]: rows of xs [P, K] in expert order (counts[e] rows for expert e, counts on the device, not
    read here) times their expert's weight (rows e * n .. (e + 1) * n of w, a stack of E = len(counts)
    experts). xs bf16 or fp16 (fp32 activations would be rounded to bf16 for the dot)."""
    p, k = xs.shape
    n_experts = counts.numel()
    if w.n != n_experts * n or w.k != k:
        raise ValueError(f"a stack of {w.n} x {w.k} for {n_experts} experts of {n} x {k}")
    if out is None:
        out = torch.empty(p, n, dtype=xs.dtype, device=xs.device)
    if p == 0:
        return out
    if xs.stride(1) != 1:
        xs = xs.contiguous()
    cfg = config or plan(w.qtype.name, n, k)
    qt = qt_code(w.qtype)
    sb, wps, _ = GEOMETRY[qt]
    bm, bn = cfg["bm"], cfg["bn"]
    m_tiles = triton.cdiv(p, bm) + n_experts - 1  # the most any counts summing to p can need
    fields, (s_q, s_qh, s_sc, s_d) = field_args(w)
    consts = dict(QT=qt, SB=sb, WPS=wps, BN=bn, BM=bm, NSUB=cfg["nsub"], GROUP_M=cfg.get("group_m", 8),
                  EP=max(2, triton.next_power_of_2(n_experts)), DOT=dot_mode(xs.dtype), num_warps=cfg.get("num_warps", 4))
    stage_fit.launch(("moe_grouped_gemm", xs.device, *consts.items()), cfg.get("num_stages", 3),
                     lambda stages: _grouped_kernel[(m_tiles * triton.cdiv(n, bn),)](
                         xs, out, counts, *fields, n_experts, n, k, xs.stride(0), out.stride(0), s_q, s_qh, s_sc, s_d,
                         ONE_F32_BITS.value, **consts, num_stages=stages))
    return out
