"""The o projection's GEMV with the decode attention's split merge in its prologue (DEVSTRAL_O_MERGE=1 or late).

At batch-1 decode, pass 2 of the attention (paged_attention_triton.py: the merge of each head's split partials)
is a launch between pass 1 and o whose work is small and whose cost is the boundary: on the H200 removing it
(wrong results on purpose) took Devstral Q4_K_M decode 220.05 -> 223.32 tok/s. Here o's split-K programs do
it instead. o's K axis is the attention output's heads x head_dim, so program (row tile, K-tile t) needs only
the heads of tile t: NS * SB / HEAD_DIM of them (Devstral at NS 16: the 4 heads of one GQA group). Before the
dependent-launch wait it loads its weight tile (as gguf_gemv_wide's one-tile programs do); after it, it reads
those heads' log-sum-exps and partials, merges them as pass 2 does (each split weighted by exp2(lse - the
largest) over the weights' sum, added in split order: the first CHUNK splits loaded beside the log-sum-exps, the
rest two chunks a step), rounds to the output's dtype as pass 2
stores it, and feeds the result to the int8 row dot (gguf_gemv_wide.row_dot_int8_x), which quantizes it per
sub-block in its threads like the wide_i8 plan. A row whose keys fit in one split was written by pass 1; it is
read from the output instead. The epilogue is the streaming GEMV's (gguf_splitk.store_output: split-K sum or
fixed point).

What it costs: every program of a K-tile reads the same heads' partials (40 row tiles at Devstral's o: ~16 KB
each at 512 keys, ~90 KB at 32k), from L2, after its wait. `reference()` is the same in PyTorch: the CPU twin
the tests compare against, with the merge done as pass 2's reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels import deferred_merge, pdl
from devstral.kernels.deferred_merge import DeferredMerge
from devstral.kernels.gguf_config import WIDE_INT8_KINDS
from devstral.kernels.gguf_decode import GEOMETRY, qt_code
from devstral.kernels.gguf_gemv import field_args
from devstral.kernels.gguf_gemv_wide import (
    INT8_TYPES,
    fixed_buffers,
    load_tile_scales,
    load_tile_words,
    row_dot_int8_x,
    tile_scales,
)
from devstral.kernels.gguf_pack import PackedGGUF
from devstral.kernels.gguf_splitk import counters, store_output, usable_split, workspace
from devstral.kernels.interpret_triton import kernels_for
from devstral.kernels.paged_attention_triton import split_range
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait

CHUNK = 8  # splits merged a step: [heads, CHUNK, HEAD_DIM] partials in flight (32 floats a thread at 4 x 128)


@triton.jit
def _merged_heads(part_ptr, lse_ptr, direct_ptr, length, h0, num_splits, window, min_chunk,
                  NH: tl.constexpr, HEAD_DIM: tl.constexpr, ATT_BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  S_TILE: tl.constexpr, CHUNK: tl.constexpr):
    """Heads h0 .. h0 + NH - 1 of the (one-row) attention output, [NH, HEAD_DIM] fp32, as pass 2 would store
    them (rounded to the output's dtype). Loads bypass L1 (.cg): pass 1 wrote them in the launch waited for."""
    _, _, chunk, lo = split_range(length, 0, num_splits, window, min_chunk, ATT_BLOCK_N, HAS_WINDOW)
    used = tl.cdiv(length - lo, chunk)
    h = h0 + tl.arange(0, NH)
    first = h.to(tl.int64) * num_splits  # partial row of each head's split 0
    dd = tl.arange(0, HEAD_DIM)
    merged_rows = used > 1
    s = tl.arange(0, S_TILE)
    lse = tl.load(lse_ptr + first[:, None] + s[None, :], mask=(s < used)[None, :] & merged_rows,
                  other=float("-inf"), cache_modifier=".cg")
    # a row pass 1 wrote itself: its output, read beside the log-sum-exps
    direct = tl.load(direct_ptr + h[:, None] * HEAD_DIM + dd[None, :], mask=(h[:, None] >= 0) & (used == 1),
                     other=0.0, cache_modifier=".cg")
    # the first CHUNK splits' partials too, before the reductions below: their CTA barriers are a point later
    # loads do not cross, so a load behind them is a second L2 round trip (at 512 keys every split is here)
    split_lse, parts, ok = _chunk(part_ptr, lse_ptr, first, dd, 0, tl.where(merged_rows, used, 0), HEAD_DIM, CHUNK)
    top = tl.where(merged_rows, tl.max(lse, axis=1), 0.0)
    total = tl.where(merged_rows, tl.sum(tl.exp2(lse - top[:, None]), axis=1), 1.0)
    acc = _weighted(split_lse, parts, ok, top, total)
    # longer rows (32k keys: 43 splits with keys), two chunks a step, both loaded before either is reduced: half
    # the round trips of one a step, in split order all the same
    for s0 in range(CHUNK, tl.where(merged_rows, used, 0), 2 * CHUNK):
        lse_a, parts_a, ok_a = _chunk(part_ptr, lse_ptr, first, dd, s0, used, HEAD_DIM, CHUNK)
        lse_b, parts_b, ok_b = _chunk(part_ptr, lse_ptr, first, dd, s0 + CHUNK, used, HEAD_DIM, CHUNK)
        acc += _weighted(lse_a, parts_a, ok_a, top, total)
        acc += _weighted(lse_b, parts_b, ok_b, top, total)
    merged = tl.where(merged_rows, acc, direct.to(tl.float32))
    return merged.to(direct_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _chunk(part_ptr, lse_ptr, first, dd, s0, used, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr):
    """Splits s0 .. s0 + CHUNK - 1 of each head (first: its split 0's row): log-sum-exps [CHUNK, NH], partials
    [CHUNK, NH, HEAD_DIM] and which exist [CHUNK] (split < used)."""
    split = s0 + tl.arange(0, CHUNK)
    ok = split < used
    rows = first[None, :] + split[:, None]
    split_lse = tl.load(lse_ptr + rows, mask=ok[:, None], other=float("-inf"), cache_modifier=".cg")
    parts = tl.load(part_ptr + rows[:, :, None] * HEAD_DIM + dd[None, None, :], mask=ok[:, None, None], other=0.0,
                    cache_modifier=".cg")
    return split_lse, parts, ok


@triton.jit
def _weighted(split_lse, parts, ok, top, total):
    """A chunk's partials weighted as pass 2 weights them, summed over the chunk: [NH, HEAD_DIM]."""
    weight = tl.where(ok[:, None], tl.exp2(split_lse - top[None, :]) / total[None, :], 0.0)
    return tl.sum(parts * weight[:, :, None], axis=0)


@triton.jit
def _slices(values, NS: tl.constexpr, E: tl.constexpr, WPS: tl.constexpr):
    """A tile's activations [NS * SB] (SB = E * WPS) as the row dot's slices: x_s [1, NS, WPS] holds value
    j * SB + s * WPS + w at (j, w), s = 0 .. E - 1 (Q8_0's E = 4 repeats x0..x3 as x4..x7, unused)."""
    t = tl.permute(tl.reshape(values, (NS, E, WPS)), (0, 2, 1))  # [NS, WPS, E]: position s last
    if E == 8:
        a0, a1 = tl.split(tl.reshape(t, (NS, WPS, 2, 2, 2)))  # s = 4a + 2b + c: split c, then b, then a
        a00, a01 = tl.split(a0)
        a10, a11 = tl.split(a1)
        x0, x4 = tl.split(a00)
        x2, x6 = tl.split(a01)
        x1, x5 = tl.split(a10)
        x3, x7 = tl.split(a11)
    else:
        a0, a1 = tl.split(tl.reshape(t, (NS, WPS, 2, 2)))  # s = 2b + c
        x0, x2 = tl.split(a0)
        x1, x3 = tl.split(a1)
        x4, x5, x6, x7 = x0, x1, x2, x3
    return (tl.reshape(x0, (1, NS, WPS)), tl.reshape(x1, (1, NS, WPS)), tl.reshape(x2, (1, NS, WPS)),
            tl.reshape(x3, (1, NS, WPS)), tl.reshape(x4, (1, NS, WPS)), tl.reshape(x5, (1, NS, WPS)),
            tl.reshape(x6, (1, NS, WPS)), tl.reshape(x7, (1, NS, WPS)))


@triton.jit(do_not_specialize=["window", "num_splits", "min_chunk", "split_k"])
def _merge_gemv_kernel(part_ptr, lse_ptr, len_ptr, direct_ptr, out_ptr, ws_ptr, cnt_ptr,
                       q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, N, K, s_om, s_q, s_qh, s_sc, s_d,
                       num_splits, window, min_chunk, split_k,
                       QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, E: tl.constexpr, BN: tl.constexpr,
                       NS: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr, ASM: tl.constexpr,
                       PDL: tl.constexpr, FIXED: tl.constexpr, HEAD_DIM: tl.constexpr, ATT_BLOCK_N: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, S_TILE: tl.constexpr, CHUNK: tl.constexpr,
                       LEN_EARLY: tl.constexpr):
    """Grid (row tiles, K-tiles): program (n, t) computes output rows n * BN.. over K-tile t only."""
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    n2 = rows[:, None]
    row_ok = n2 < N
    c = tl.arange(0, NS * WPS)[None, :]
    n_sub = K // SB
    words, hi = load_tile_words(q_ptr, qh_ptr, n2, t * NS * WPS + c, row_ok, s_q, s_qh, QT, EVEN_N, ASM)
    d, sc, dm, mn = load_tile_scales(sc_ptr, mn_ptr, d_ptr, dm_ptr, n2, row_ok, t, n_sub, s_sc, s_d, QT, SB, NS,
                                     EVEN_N)
    if LEN_EARLY:  # the engine's step input, written before the kernel before this one started (settled)
        length = tl.load(len_ptr)
    if PDL:  # the weight tile is on its way; the partials come from the attention's pass 1
        gdc_wait()
    if not LEN_EARLY:
        length = tl.load(len_ptr)
    NH: tl.constexpr = NS * SB // HEAD_DIM
    merged = _merged_heads(part_ptr, lse_ptr, direct_ptr, length, t * NH, num_splits, window, min_chunk, NH, HEAD_DIM,
                           ATT_BLOCK_N, HAS_WINDOW, S_TILE, CHUNK)
    x0, x1, x2, x3, x4, x5, x6, x7 = _slices(tl.reshape(merged, (NS * SB,)), NS, E, WPS)
    c1, c0 = tile_scales(d, sc, dm, mn, QT, BN, NS)
    acc = row_dot_int8_x(tl.reshape(words, (BN, NS, WPS)), tl.reshape(hi, (BN, NS, WPS)), x0, x1, x2, x3, x4, x5,
                         x6, x7, c1, c0, QT, ASM)
    res = tl.sum(acc, axis=1)[:, None]  # [BN, 1]
    if PDL:  # as the streaming GEMV: at the loop's end (gguf_gemv_wide._split_program says why)
        gdc_launch_dependents()
    store_output(res, rows, tl.arange(0, 1), N, 1, out_ptr, s_om, out_ptr, ws_ptr, cnt_ptr, pid_n, t, split_k,
                 False, SPLIT, FIXED)


def plan_fits(p: PackedGGUF, kind: str, cfg: dict, head_dim: int) -> bool:
    """Whether o's one-row plan (gguf_config.gguf_plan's kind and config) is one this kernel runs as planned: an
    int8 streaming GEMV of one K-tile a program (split-K = K's tiles, as the H200 table's Q4_K o), on a type with
    an int8 row dot, each tile a power of two of whole heads. Elsewhere (Q8_0's o at four tiles a program) the
    attention keeps its merge pass, which writes that plan's quantized activations too."""
    qt = qt_code(p.qtype)
    sb, _, _ = GEOMETRY[qt]
    tile = cfg.get("ns", 0) * sb
    if kind not in WIDE_INT8_KINDS or qt not in INT8_TYPES or cfg.get("stream") or tile == 0 or tile % head_dim \
            or p.k % tile or triton.next_power_of_2(tile // head_dim) != tile // head_dim:
        return False
    return cfg.get("split_k", 1) == p.k // tile


def fits(merge: DeferredMerge, p: PackedGGUF, kind: str, cfg: dict) -> bool:
    """Whether o's weight p, on this plan, can take this merge: plan_fits, one output row, K the attention's
    heads x head_dim."""
    b, h, d = merge.out.shape
    return b == 1 and p.k == h * d and merge.out.is_contiguous() and plan_fits(p, kind, cfg, d)


def gemv(merge: DeferredMerge, p: PackedGGUF, out: torch.Tensor, *, bn: int, ns: int, num_warps: int = 4,
         fixed_zero: torch.Tensor | None = None, **_unused) -> torch.Tensor:
    """out[1, N] = merged attention output @ W^T, one K-tile a program (the split-K count is K's tiles);
    fixed_zero as gguf_gemv_wide.gemv's (out then an int64 fixed-point buffer)."""
    b, h, d = merge.out.shape
    qt = qt_code(p.qtype)
    sb, wps, e = GEOMETRY[qt]
    if not (b == 1 and p.k == h * d and p.k % (ns * sb) == 0):
        raise ValueError("gguf_gemv_merge: one row whose heads fill whole K-tiles of this weight (fits())")
    n_tiles = p.k // (ns * sb)
    tiles_n = triton.cdiv(p.n, bn)
    split_k = usable_split(n_tiles, tiles_n, 1, p.n)
    if split_k != n_tiles:
        raise ValueError("gguf_gemv_merge: too many tiles for the split-K workspace")
    ws = workspace(split_k, 1, p.n, out.device) if fixed_zero is None else fixed_buffers(out, fixed_zero, None, 1, p.n)
    fields, (s_q, s_qh, s_sc, s_d) = field_args(p)
    on = pdl.enabled(out.device)
    kernels_for(out, __name__)._merge_gemv_kernel[(tiles_n, n_tiles)](
        merge.part_out, merge.part_lse, merge.context_lens, merge.out, out, ws, counters(out.device), *fields,
        p.n, p.k, out.stride(0), s_q, s_qh, s_sc, s_d, merge.splits, merge.window, merge.min_chunk, split_k,
        QT=qt, SB=sb, WPS=wps, E=e, BN=bn, NS=ns, SPLIT=split_k > 1, EVEN_N=p.n % bn == 0, ASM=out.is_cuda,
        PDL=on, FIXED=fixed_zero is not None, HEAD_DIM=d, ATT_BLOCK_N=merge.block_n, HAS_WINDOW=merge.window > 0,
        S_TILE=triton.next_power_of_2(merge.splits), CHUNK=CHUNK, LEN_EARLY=merge.len_early and on,
        num_warps=num_warps, launch_pdl=on)
    return out


def reference(merge: DeferredMerge, weight: torch.Tensor) -> torch.Tensor:
    """The CPU twin: the attention output pass 2 would store (merged_reference) times the dequantized weight
    [N, K], in fp32: [1, N]. The kernel differs by its int8 activations (absmax / 127 per block of 32)."""
    return merged_reference(merge).reshape(1, -1) @ weight.float().t()


def merged_reference(merge: DeferredMerge) -> torch.Tensor:
    """The attention output pass 2 would store, from the partials (rows of one split: the output as pass 1 left it)."""
    length = int(merge.context_lens[0])
    lo = max(length - merge.window, 0) if merge.window else 0
    chunk = max(triton.cdiv(triton.cdiv(length - lo, merge.splits), merge.block_n) * merge.block_n, merge.min_chunk)
    used = triton.cdiv(length - lo, chunk)
    out = merge.out.float().clone()
    if used > 1:
        lse = merge.part_lse[0, :, :used].float()  # [H, used]
        w = torch.exp2(lse - lse.max(dim=1, keepdim=True).values)
        w = w / w.sum(dim=1, keepdim=True)
        out[0] = (merge.part_out[0, :, :used].float() * w[:, :, None]).sum(dim=1)
    return out.to(merge.out.dtype).float()


def enabled() -> bool:
    """DEVSTRAL_O_MERGE=1 or late (deferred_merge.mode): the attention leaves its merge to o where o can take it
    (off until measured)."""
    return deferred_merge.mode() != "0"
