"""Decode attention over the paged KV cache: split-KV flash decoding, GQA-aware (Triton). Semantics:
`paged_attention.decode_attention_ref`.

Pass 1, grid (sequence, kv head, split): one program reads its share of one sequence's keys and
values for one kv head once, and serves all the query heads of that GQA group with them (a
[BLOCK_H >= 16, head_dim] query tile, so both products run on tensor cores). Tiles of BLOCK_N tokens
are gathered through the block table, dequantized in registers (fp8 scales are folded into the
scores and the probabilities; q8_0/q4_0 are expanded to q's dtype as the reference does), and
reduced with an online softmax in base 2. Each split writes its normalized partial output and
log-sum-exp; pass 2, grid (sequence, query head), merges the splits. With one split, pass 1 writes
the output itself and pass 2 is skipped.

CUDA graphs: the grid depends only on the batch size, `max_context` and the device, never on the
values of `context_lens`. Each row divides its own context (or window) evenly over the splits, in
whole tiles, so a short row uses few splits and the rest exit at once; a padding row (context_len 1)
costs one tile. Bytes read: every key and value in the window once, plus the partials (B x H x
splits x (head_dim + 1) float32, written and read once).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from devstral.kernels.interpret_triton import kernels_for, on_interpreter
from devstral.kernels.kv_format import KVLayer
from devstral.kernels.kv_store_triton import KIND_CODES, fp8_supported

LOG2E = 1.4426950408889634
MAX_SPLITS = 128
MIN_SPLIT_TOKENS = 256  # a split shorter than this at max_context costs more in partials than it buys
PROGRAMS_PER_SM = 4  # split until the longest rows give every SM this many programs


class DecodeConfig:
    """Launch parameters of pass 1. `splits` None: chosen from the batch, max_context and the SMs.
    num_stages 5 is the fewest with which Triton 3.6's pipeliner double-buffers the K/V tiles behind
    their block-table lookup (seen in the sm_90a TTGIR, and checked by tests/test_kernels_compile.py):
    with fewer, each tile has one buffer and its load never overlaps the previous tile's math."""

    def __init__(self, block_n: int = 64, num_warps: int = 4, num_stages: int = 5, splits: int | None = None,
                 programs_per_sm: int = PROGRAMS_PER_SM):
        self.block_n, self.num_warps, self.num_stages = block_n, num_warps, num_stages
        self.splits, self.programs_per_sm = splits, programs_per_sm

    def __repr__(self) -> str:
        return (f"DecodeConfig(block_n={self.block_n}, num_warps={self.num_warps}, num_stages={self.num_stages}, "
                f"splits={self.splits}, programs_per_sm={self.programs_per_sm})")


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def num_splits(batch: int, n_kv_heads: int, max_context: int, device: torch.device, cfg: DecodeConfig) -> int:
    if cfg.splits is not None:
        return max(1, cfg.splits)
    want = triton.cdiv(cfg.programs_per_sm * _num_sms(device), batch * n_kv_heads)
    useful = triton.cdiv(max_context, max(MIN_SPLIT_TOKENS, cfg.block_n))
    return max(1, min(want, useful, MAX_SPLITS))


@triton.jit
def _split_range(length, s, num_splits, window, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Keys [lo, length) of a row; split s covers [start, end) of them in whole BLOCK_N tiles."""
    if HAS_WINDOW:
        lo = tl.maximum(length - window, 0)
    else:
        lo = length * 0
    chunk = tl.cdiv(tl.cdiv(length - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + s * chunk
    end = tl.minimum(start + chunk, length)
    return start, end, chunk, lo


@triton.jit
def _tile(c_ptr, s_ptr, rows, scale_rows, nmask, d, HEAD_DIM: tl.constexpr, KIND: tl.constexpr, OUT_T: tl.constexpr):
    """A [BLOCK_N, HEAD_DIM] tile of keys or values in OUT_T. fp8 comes back unscaled (the caller
    folds its per-token scale in); q8_0/q4_0 are scaled as `kv_format.dequantize` does."""
    m2 = nmask[:, None]
    if KIND == 2:  # q8_0
        x = tl.load(c_ptr + rows[:, None] + d[None, :], mask=m2, other=0).to(tl.float32)
        sc = tl.load(s_ptr + scale_rows[:, None] + (d // 32)[None, :], mask=m2, other=0.0).to(tl.float32)
        tile = (x * sc).to(OUT_T)
    elif KIND == 3:  # q4_0: value i of a 32-block is nibble i // 16 of byte i % 16
        col = (d // 32) * 16 + d % 16
        shift = ((d // 16) % 2) * 4
        byte = tl.load(c_ptr + rows[:, None] + col[None, :], mask=m2, other=0).to(tl.int32)
        nib = (byte >> shift[None, :]) & 15
        sc = tl.load(s_ptr + scale_rows[:, None] + (d // 32)[None, :], mask=m2, other=0.0).to(tl.float32)
        tile = ((nib.to(tl.float32) - 8.0) * sc).to(OUT_T)
    else:  # float kinds and fp8
        tile = tl.load(c_ptr + rows[:, None] + d[None, :], mask=m2, other=0.0).to(OUT_T)
    return tile


@triton.jit
def _decode_split_kernel(q_ptr, q_sb, q_sh, k_ptr, v_ptr, ks_ptr, vs_ptr, c_sb, c_so, c_sh, s_sb, s_so, s_sh,
                         table_ptr, table_sb, len_ptr, out_ptr, out_sb, out_sh, part_out_ptr, part_lse_ptr,
                         scale_log2e, window, num_splits, n_heads,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_N: tl.constexpr, KIND: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         DIRECT: tl.constexpr, DOT_T: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.load(len_ptr + b)
    start, end, chunk, lo = _split_range(length, s, num_splits, window, BLOCK_N, HAS_WINDOW)
    if start < end:
        Q_T = q_ptr.dtype.element_ty
        h = tl.arange(0, BLOCK_H)
        hmask = h < GROUP
        heads = kvh * GROUP + h
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b.to(tl.int64) * q_sb + heads[:, None] * q_sh + d[None, :], mask=hmask[:, None],
                    other=0.0).to(DOT_T)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
        table = table_ptr + b.to(tl.int64) * table_sb
        for n0 in tl.range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            page = tl.load(table + n // PAGE, mask=nmask, other=0).to(tl.int64)
            slot_at = page * c_sb + (n % PAGE) * c_so + kvh * c_sh
            scale_at = page * s_sb + (n % PAGE) * s_so + kvh * s_sh
            k = _tile(k_ptr, ks_ptr, slot_at, scale_at, nmask, d, HEAD_DIM, KIND, Q_T).to(DOT_T)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e
            if KIND == 1:
                scores = scores * tl.load(ks_ptr + scale_at, mask=nmask, other=0.0)[None, :]
            scores = tl.where(nmask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            if KIND == 1:
                p = p * tl.load(vs_ptr + scale_at, mask=nmask, other=0.0)[None, :]
            v = _tile(v_ptr, vs_ptr, slot_at, scale_at, nmask, d, HEAD_DIM, KIND, Q_T).to(DOT_T)
            acc = tl.dot(p.to(DOT_T), v, acc * alpha[:, None], input_precision=PRECISION)
            m = m_new
        out = acc / l_sum[:, None]
        if DIRECT:
            tl.store(out_ptr + b.to(tl.int64) * out_sb + heads[:, None] * out_sh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
        else:
            row = (b.to(tl.int64) * n_heads + heads) * num_splits + s
            tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=hmask[:, None])
            tl.store(part_lse_ptr + row, m + tl.log2(l_sum), mask=hmask)


@triton.jit
def _decode_merge_kernel(part_out_ptr, part_lse_ptr, len_ptr, out_ptr, out_sb, out_sh, window, num_splits,
                         n_heads, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_WINDOW: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    length = tl.load(len_ptr + b)
    _, _, chunk, lo = _split_range(length, 0, num_splits, window, BLOCK_N, HAS_WINDOW)
    used = tl.cdiv(length - lo, chunk)
    s = tl.arange(0, BLOCK_S)
    smask = s < used
    row = (b.to(tl.int64) * n_heads + h) * num_splits + s
    lse = tl.load(part_lse_ptr + row, mask=smask, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))
    weight = weight / tl.sum(weight, axis=0)
    d = tl.arange(0, HEAD_DIM)
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(parts * weight[:, None], axis=0)
    tl.store(out_ptr + b.to(tl.int64) * out_sb + h * out_sh + d, out.to(out_ptr.dtype.element_ty))


def _supported(q: torch.Tensor, layer: KVLayer) -> bool:
    head_dim, page = q.shape[-1], layer.k.shape[1]
    pow2 = lambda x: x > 0 and not x & (x - 1)  # noqa: E731
    return (pow2(head_dim) and head_dim >= 16 and pow2(page) and q.shape[1] % layer.k.shape[2] == 0
            and layer.k.stride(-1) == 1 and layer.k.stride() == layer.v.stride()
            and (layer.kind != "fp8" or fp8_supported(q.device)))


def decode_attention_triton(q: torch.Tensor, layer: KVLayer, block_tables: torch.Tensor, context_lens: torch.Tensor,
                            scale: float, window: int | None = None, *, max_context: int | None = None,
                            config: DecodeConfig | None = None) -> torch.Tensor:
    """q [B, n_heads, head_dim] (last dim contiguous) -> [B, n_heads, head_dim] in q's dtype.
    `max_context` bounds every context_len (None: the block table's width)."""
    if not _supported(q, layer):
        from devstral.kernels.paged_attention import decode_attention_ref

        return decode_attention_ref(q, layer, block_tables, context_lens, scale, window)
    cfg = config or DecodeConfig()
    B, H, D = q.shape
    Hkv, page = layer.k.shape[2], layer.k.shape[1]
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    bound = block_tables.shape[1] * page if max_context is None else max_context
    if window is not None:
        bound = min(bound, window)
    splits = num_splits(B, Hkv, bound, q.device, cfg)
    direct = splits == 1
    part_out = torch.empty((B, H, splits, D) if not direct else (1,), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B, H, splits) if not direct else (1,), dtype=torch.float32, device=q.device)
    kind = KIND_CODES[layer.kind]
    scales = (layer.k_scale, layer.v_scale) if layer.k_scale is not None else (layer.k, layer.v)
    ss = scales[0].stride()
    interp = on_interpreter(q)
    dot_t = tl.float32 if interp or q.dtype == torch.float32 else (tl.bfloat16 if q.dtype == torch.bfloat16
                                                                     else tl.float16)
    kernels = kernels_for(q, __name__)
    kernels._decode_split_kernel[(B, Hkv, splits)](
        q, q.stride(0), q.stride(1), layer.k, layer.v, scales[0], scales[1],
        layer.k.stride(0), layer.k.stride(1), layer.k.stride(2), ss[0], ss[1], ss[2],
        block_tables, block_tables.stride(0), context_lens, out, out.stride(0), out.stride(1), part_out, part_lse,
        scale * LOG2E, window or 0, splits, H,
        GROUP=H // Hkv, HEAD_DIM=D, PAGE=page, BLOCK_H=max(16, triton.next_power_of_2(H // Hkv)),
        BLOCK_N=cfg.block_n, KIND=kind, HAS_WINDOW=window is not None, DIRECT=direct, DOT_T=dot_t,
        PRECISION="ieee" if dot_t == tl.float32 else "tf32", num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not direct:
        kernels._decode_merge_kernel[(B, H)](
            part_out, part_lse, context_lens, out, out.stride(0), out.stride(1), window or 0, splits, H,
            HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(splits), BLOCK_N=cfg.block_n,
            HAS_WINDOW=window is not None, num_warps=4 if triton.next_power_of_2(splits) * D <= 8192 else 8)
    return out

