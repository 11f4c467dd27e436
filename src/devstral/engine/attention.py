"""The model's attention cache for one engine step: rotate the batch's new queries and keys and store
the keys/values in the paged pool (one kernel on the GPU), then attend. The step's tokens are laid out decode rows first (one token per sequence, each a
single query over its pages: one batched kernel), then prefill chunks (a run of queries of one
sequence after its cached prefix: FlashAttention per chunk)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from devstral.engine.kv_pool import KVPool
from devstral.kernels.kv_store import rope_and_store_kv
from devstral.kernels.paged_attention import decode_attention, prefill_attention


@dataclass
class PrefillChunk:
    offset: int  # first row of the chunk in the step's tokens
    length: int
    start: int  # the chunk's first position in its sequence (= tokens already cached before it)
    block_table: torch.Tensor  # [n_blocks] int32, on the device


@dataclass
class BatchAttention:
    pool: KVPool
    slot_mapping: torch.Tensor  # [N]: each token's slot; -1 for padding rows
    n_decode: int  # rows 0..n_decode-1 are single-query sequences
    block_tables: torch.Tensor  # [n_decode, max_blocks] int32
    context_lens: torch.Tensor  # [n_decode] int32: keys each decode row attends to, itself included
    max_context: int
    scale: float
    window: int | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, q_scale: torch.Tensor | None, xq: tuple[int, ...] = ()) -> torch.Tensor:
        # the step is one flat row of tokens: [N, heads, D]
        q, k, v, cos, sin = q[0], k[0], v[0], cos[0], sin[0]
        kv = self.pool.layers[layer]
        q, k = rope_and_store_kv(q, k, v, cos, sin, None if q_scale is None else q_scale[0], kv, self.slot_mapping)
        # the step's context lengths were copied in before the step: the attention may read them before it
        # waits for the RoPE kernel (settled, paged_attention_triton.py)
        if not self.prefills:
            # a step of decode rows only: the merge pass may write the o projection's activations (xq)
            out = decode_attention(q, kv, self.block_tables, self.context_lens, self.scale, self.window,
                                   max_context=self.max_context, settled=True, xq_layout=xq[0] if xq else None)
            return out[None]
        out = torch.empty_like(q)
        nd = self.n_decode
        if nd:
            out[:nd] = decode_attention(q[:nd], kv, self.block_tables, self.context_lens, self.scale, self.window,
                                        max_context=self.max_context, settled=True)
        for c in self.prefills:
            rows = slice(c.offset, c.offset + c.length)
            out[rows] = prefill_attention(q[rows], k[rows], v[rows], kv, c.block_table, c.start, self.scale,
                                          self.window)
        return out[None]
