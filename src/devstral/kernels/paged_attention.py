"""Attention over the paged KV cache: one query per sequence (decode), or a chunk of one sequence's
queries after a cached prefix (prefill). References in plain PyTorch; the decode kernel is Triton.

Conventions: q [.., n_heads, head_dim] already rotated and scaled (llama-4 temperature); keys and values
for every position up to and including the queries' own are in the cache; GQA maps query head h to
key/value head h // (n_heads // n_kv_heads); `scale` is the softmax scale; `window` (or None) lets a
query at position p see keys at positions > p - window only (Mistral's sliding window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from devstral.kernels import use_triton
from devstral.kernels.kv_format import KVLayer, dequantize


def gather_kv(layer: KVLayer, block_table: torch.Tensor, length: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys and values for positions 0..length-1: [length, n_kv_heads, head_dim]."""
    block_size = layer.k.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    blocks = block_table[:n_blocks].long()

    def take(values, scales):
        vals = values[blocks].flatten(0, 1)[:length]
        sc = scales[blocks].flatten(0, 1)[:length] if scales is not None else None
        return dequantize(vals, sc, layer.kind, dtype)

    return take(layer.k, layer.k_scale), take(layer.v, layer.v_scale)


def _mask(q_pos: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
    k_pos = torch.arange(n_keys, device=q_pos.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :]) < window
    return allowed


def prefill_attention_ref(q: torch.Tensor, layer: KVLayer, block_table: torch.Tensor, start: int,
                          scale: float, window: int | None = None) -> torch.Tensor:
    """q [T, n_heads, D] at positions start..start+T-1 -> [T, n_heads, D]."""
    T = q.shape[0]
    k, v = gather_kv(layer, block_table, start + T, q.dtype)
    q_pos = torch.arange(start, start + T, device=q.device)
    mask = _mask(q_pos, start + T, window)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def decode_attention_ref(q: torch.Tensor, layer: KVLayer, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         scale: float, window: int | None = None) -> torch.Tensor:
    """q [B, n_heads, D], one query per row at position context_lens[b] - 1 -> [B, n_heads, D]. Rows that
    continue the row before them (same block table, next position: a sequence verifying drafts) are
    one causal chunk, computed in one call."""
    out = torch.empty_like(q)
    lens = context_lens.tolist()
    tables = block_tables.cpu().numpy()
    b = 0
    while b < len(lens):
        e = b + 1
        while e < len(lens) and lens[e] == lens[e - 1] + 1 and (tables[e] == tables[b]).all():
            e += 1
        out[b:e] = prefill_attention_ref(q[b:e], layer, block_tables[b], lens[b] - 1, scale, window)
        b = e
    return out


def decode_attention(q: torch.Tensor, layer: KVLayer, block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float, window: int | None = None, *, max_context: int | None = None,
                     settled: bool = False, xq_layout: int | None = None) -> torch.Tensor:
    """`max_context` bounds context_lens (the Triton kernel sizes its split grid from it, so that a
    captured CUDA graph stays valid for any batch whose contexts fit). `settled`: see
    decode_attention_triton (a launch-order promise; the result is the same either way). `xq_layout`: the
    o projection's activation layout, which the Triton kernel may write beside the output (the reference
    writes nothing: the GEMV then quantizes as usual)."""
    if use_triton(q):
        from devstral.kernels.paged_attention_triton import decode_attention_triton

        return decode_attention_triton(q, layer, block_tables, context_lens, scale, window, max_context=max_context,
                                       settled=settled, xq_layout=xq_layout)
    return decode_attention_ref(q, layer, block_tables, context_lens, scale, window)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: KVLayer, block_table: torch.Tensor,
                      start: int, scale: float, window: int | None = None) -> torch.Tensor:
    """q/k/v [T, heads, D]: one sequence's chunk at positions start..start+T-1, whose keys and values are
    already stored. On CUDA this is FlashAttention through SDPA: a chunk with no cached prefix attends
    to its own fresh keys (identical to the stored ones for the float kinds); otherwise the sequence's
    keys are gathered from the pages and the causal mask is aligned to the bottom right."""
    if not q.is_cuda:
        return prefill_attention_ref(q, layer, block_table, start, scale, window)
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    T = q.shape[0]
    qh = q.transpose(0, 1)[None]
    if start == 0 and window is None and layer.kind in ("bf16", "fp16", "f16", "fp32", "f32"):
        kh, vh = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        # cuDNN first: 593 against FlashAttention's 315 TFLOP/s on an H200 (8k causal chunk, GQA 32/8)
        with sdpa_kernel(_FRESH_ORDER, set_priority=True):
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    kg, vg = gather_kv(layer, block_table, start + T, q.dtype)
    kh, vh = kg.transpose(0, 1)[None], vg.transpose(0, 1)[None]
    if window is None:  # bottom-right causal: FlashAttention 350, cuDNN 265 TFLOP/s (8k after 24k)
        mask = causal_lower_right(T, start + T)
        with sdpa_kernel(_PREFIX_ORDER, set_priority=True):
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        mask = _mask(torch.arange(start, start + T, device=q.device), start + T, window)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def _backends(*names: str) -> list:
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, n) for n in names]


_FRESH_ORDER = _backends("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
_PREFIX_ORDER = _backends("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
