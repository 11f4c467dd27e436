"""decode_advance's update in one launch (Triton): one program, a lane a row. Semantics: `decode_advance.py`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels.interpret_triton import kernels_for


@triton.jit
def _advance_kernel(tok_ptr, picked_ptr, pos_ptr, slot_ptr, ctx_ptr, tab_ptr, s_tab, W, B, BS: tl.constexpr,
                    BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    slot = tl.load(slot_ptr + r, mask=r < B, other=-1)
    live = (r < B) & (slot >= 0)
    pos = tl.load(pos_ptr + r, mask=live, other=0) + 1
    index = pos // BS
    inside = live & (index < W)
    block = tl.load(tab_ptr + r * s_tab + index, mask=inside, other=0).to(tl.int64)
    tl.store(tok_ptr + r, tl.load(picked_ptr + r, mask=live, other=0), mask=live)
    tl.store(slot_ptr + r, tl.where(inside, block * BS + pos % BS, -1), mask=live)
    tl.store(pos_ptr + r, pos, mask=live)
    tl.store(ctx_ptr + r, tl.load(ctx_ptr + r, mask=live, other=0) + 1, mask=live)


def advance_triton(tokens: torch.Tensor, picked: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                   context: torch.Tensor, tables: torch.Tensor, block_size: int) -> None:
    """tokens, positions, slots int64 [B], context int32 [B], tables int32 [B, W] (unit column stride),
    picked int64 [B] (unit stride)."""
    B, W = tables.shape
    kernels_for(tokens, __name__)._advance_kernel[(1,)](
        tokens, picked, positions, slots, context, tables, tables.stride(0), W, B, BS=block_size,
        BLOCK=triton.next_power_of_2(max(B, 16)), num_warps=1 if B <= 32 else 4)
