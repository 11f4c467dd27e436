"""NF4 weights (bitsandbytes' layout, as model/nf4.py stores them) on CUDA: GEMV and dequantize.

The layout stays bitsandbytes': row-major nibbles, the first of each pair in the high nibble, one
absmax per 64 weights, optionally double-quantized (uint8 indices into the signed dynamic map,
times an fp32 scale per 256 blocks, plus one offset). A code value is a lookup in the 16-entry NF4
table (one L1-resident load per weight).

* `dequantize`: any numel, flat indexing; the absmax and the product are computed in the order
  model/nf4.py uses, without FMA contraction, so the result equals dequantize_nf4() exactly.
* `gemv`: rows of whole blocks (K % blocksize == 0); per tile a [BN, NS, 8] view of words (one
  64-weight block per 8 words), sum(code * x) per block, then times the block's absmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels.gguf_splitk import counters, store_output, usable_split, workspace


@triton.jit
def _block_absmax(absmax_ptr, scale_ptr, dmap_ptr, offset, b, mask, DQ: tl.constexpr):
    if DQ:
        q = tl.load(absmax_ptr + b, mask=mask, other=0).to(tl.int32)
        code = tl.load(dmap_ptr + q, mask=mask, other=0.0)
        s = tl.load(scale_ptr + b // 256, mask=mask, other=0.0)
        am = code * s + offset
    else:
        am = tl.load(absmax_ptr + b, mask=mask, other=0.0)
    return am


@triton.jit
def _nf4_dequant_kernel(out_ptr, packed_ptr, absmax_ptr, scale_ptr, dmap_ptr, code_ptr, offset, numel,
                        BLOCKSIZE: tl.constexpr, DQ: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < numel
    byte = tl.load(packed_ptr + e // 2, mask=ok, other=0).to(tl.int32)
    idx = tl.where(e % 2 == 0, byte >> 4, byte & 0xF)
    v = tl.load(code_ptr + idx, mask=ok, other=0.0)
    am = _block_absmax(absmax_ptr, scale_ptr, dmap_ptr, offset, e // BLOCKSIZE, ok, DQ)
    tl.store(out_ptr + e, (v * am).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _nf4_gemv_kernel(x_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, packed_ptr, absmax_ptr, scale_ptr, dmap_ptr,
                     code_ptr, offset, M, N, K, s_xm, s_om,
                     BLOCKSIZE: tl.constexpr, WPB: tl.constexpr, DQ: tl.constexpr, BN: tl.constexpr,
                     NS: tl.constexpr, BM: tl.constexpr, SPLIT_K, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    # WPB: int32 words (8 weights each) per absmax block
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BN + tl.arange(0, BN)
    n2 = rows[:, None]
    row_ok = n2 < N
    c = tl.arange(0, NS * WPB)[None, :]
    jn = tl.arange(0, NS)[None, :]
    words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    words_per_row = K // 8
    blocks_per_row = K // BLOCKSIZE
    n_tiles = tl.cdiv(blocks_per_row, NS)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)
    m0 = pid_m * BM
    acc0 = tl.zeros((BN, NS), dtype=tl.float32)
    if BM > 1:
        acc1 = tl.zeros((BN, NS), dtype=tl.float32)
    if BM > 2:
        acc2 = tl.zeros((BN, NS), dtype=tl.float32)
        acc3 = tl.zeros((BN, NS), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        w_idx = t * (NS * WPB) + c
        c_ok = w_idx < words_per_row
        words = tl.load(words_ptr + n2.to(tl.int64) * words_per_row + w_idx, mask=row_ok & c_ok, other=0)
        words = tl.reshape(words, (BN, NS, WPB))
        j = t * NS + jn
        am = _block_absmax(absmax_ptr, scale_ptr, dmap_ptr, offset, n2 * blocks_per_row + j,
                           row_ok & (j < blocks_per_row), DQ)
        xk = x_ptr + m0 * s_xm + w_idx * 8
        acc0 += am * _nf4_block_dots(words, code_ptr, xk, c_ok & (m0 < M), NS, WPB)
        if BM > 1:
            acc1 += am * _nf4_block_dots(words, code_ptr, xk + s_xm, c_ok & (m0 + 1 < M), NS, WPB)
        if BM > 2:
            acc2 += am * _nf4_block_dots(words, code_ptr, xk + 2 * s_xm, c_ok & (m0 + 2 < M), NS, WPB)
            acc3 += am * _nf4_block_dots(words, code_ptr, xk + 3 * s_xm, c_ok & (m0 + 3 < M), NS, WPB)
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


@triton.jit
def _nf4_block_dots(words, code_ptr, xk, mask, NS: tl.constexpr, WPB: tl.constexpr):
    """sum over each block of code[idx] * x: [BN, NS]. Weight e of a word sits at bits 4 * (e ^ 1)."""
    p = tl.zeros(words.shape, dtype=tl.float32)
    for e in tl.static_range(8):
        idx = (words >> (4 * (e ^ 1))) & 0xF
        xs = tl.reshape(tl.load(xk + e, mask=mask, other=0.0).to(tl.float32), (1, NS, WPB))
        p += tl.load(code_ptr + idx) * xs
    return tl.sum(p, axis=2)


def _dq_args(t) -> tuple:
    """(absmax or absmax_q, scale, dynamic map, offset, DQ) for an NF4Tensor."""
    from devstral.model.nf4 import dynamic_map_signed

    if t.absmax is not None:
        return t.absmax, t.absmax, t.absmax, 0.0, False
    return t.absmax_q, t.absmax_scale, _device_table("dmap", dynamic_map_signed, t.packed.device), \
        float(t.absmax_offset), True


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _device_table(name: str, make, device: torch.device) -> torch.Tensor:
    key = (name, torch.device(device))
    if key not in _TABLES:
        _TABLES[key] = make().to(device=device, dtype=torch.float32).contiguous()
    return _TABLES[key]


def code_table(device: torch.device) -> torch.Tensor:
    from devstral.model.nf4 import nf4_code

    return _device_table("nf4", nf4_code, device)


def dequantize(t, dtype: torch.dtype = torch.bfloat16, *, block: int = 1024) -> torch.Tensor:
    """NF4Tensor -> its values as `dtype`, equal to model/nf4.dequantize_nf4(t, dtype)."""
    absmax, scale, dmap, offset, dq = _dq_args(t)
    out = torch.empty(t.shape, dtype=dtype, device=t.packed.device)
    numel = out.numel()
    _nf4_dequant_kernel[(triton.cdiv(numel, block),)](
        out, t.packed, absmax, scale, dmap, code_table(t.packed.device), offset, numel,
        BLOCKSIZE=t.blocksize, DQ=dq, BLOCK=block, enable_fp_fusion=False)
    return out


def gemv(x: torch.Tensor, t, bias: torch.Tensor | None, out: torch.Tensor, *, bn: int = 32, ns: int = 4,
         bm: int = 1, split_k: int = 1, num_warps: int = 4) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W^T (+ bias) for an [N, K] NF4Tensor whose rows hold whole blocks."""
    m, k = x.shape
    n = t.shape[0]
    absmax, scale, dmap, offset, dq = _dq_args(t)
    tiles_n, tiles_m = triton.cdiv(n, bn), triton.cdiv(m, bm)
    split_k = usable_split(split_k, tiles_n * tiles_m, m, n)
    ws = workspace(split_k, m, n, x.device)
    _nf4_gemv_kernel[(tiles_n, split_k, tiles_m)](
        x, out, bias if bias is not None else out, ws, counters(x.device), t.packed, absmax, scale, dmap,
        code_table(x.device), offset, m, n, k, x.stride(0), out.stride(0),
        BLOCKSIZE=t.blocksize, WPB=t.blocksize // 8, DQ=dq, BN=bn, NS=ns, BM=bm, SPLIT_K=split_k, SPLIT=split_k > 1, HAS_BIAS=bias is not None,
        num_warps=num_warps)
    return out


def gemv_supported(t) -> bool:
    return len(t.shape) == 2 and t.shape[1] % t.blocksize == 0 and t.blocksize % 32 == 0
