"""A decode graph's inputs moved on by one token, on the device, so that the next replay needs no copy.

An overlapped greedy decode (engine.step with overlap) replays the same captured graph step after step with
the same rows; between two replays the host used to copy the step's input ids, positions, KV slots, block
tables and context lengths into the graph's buffers: about a dozen small copies and fills, ~40 us of the
~75 us the GPU spent between replays (`engine_gguf_q4km_step_h200.json`). All of them follow from the
replay before: the input id is the token it picked, the position and the context length one more, and the
slot the block table's entry for the new position. So the graph ends by writing them itself
(DEVSTRAL_GRAPH_ADVANCE=0 turns that off), and the runner replays it bare whenever the buffers already hold the step it
is about to run (model_runner.Ahead says when: same rows, all greedy, the new position inside the block
table the buffers hold). Rows whose slot is -1 (a bucket's padding) stay as they are.
Measured (H200, Devstral-Small-shape GGUF, one lease, `decode_ab_s21_h200.json`): Q4_K_M 213.2 -> 214.7 tok/s,
Q8_0 150.3 -> 151.0.
"""

from __future__ import annotations

import os

import torch

from devstral.kernels import use_triton


def enabled() -> bool:
    """Whether decode graphs end by advancing their own inputs (on unless DEVSTRAL_GRAPH_ADVANCE=0)."""
    return os.environ.get("DEVSTRAL_GRAPH_ADVANCE", "1") != "0"


def advance_ref(tokens: torch.Tensor, picked: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                context: torch.Tensor, tables: torch.Tensor, block_size: int) -> None:
    """In place, for the rows whose slot is >= 0: the input id becomes `picked`, the position and the context
    length one more, the slot the block table's entry for the new position (block_size tokens a block).
    A new position past the table's width leaves the slot -1 (the runner never replays such a row bare)."""
    live = slots >= 0
    pos = positions + 1
    index = pos // block_size
    inside = index < tables.shape[1]
    block = tables.gather(1, index.clamp(max=tables.shape[1] - 1)[:, None])[:, 0].to(slots.dtype)
    tokens.copy_(torch.where(live, picked.to(tokens.dtype), tokens))
    slots.copy_(torch.where(live, torch.where(inside, block * block_size + pos % block_size, -1), slots))
    positions.copy_(torch.where(live, pos, positions))
    context.copy_(torch.where(live, context + 1, context))


def advance(tokens: torch.Tensor, picked: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            context: torch.Tensor, tables: torch.Tensor, block_size: int) -> None:
    """advance_ref's update in one launch where Triton runs."""
    if use_triton(tokens):
        from devstral.kernels.decode_advance_triton import advance_triton

        advance_triton(tokens, picked, positions, slots, context, tables, block_size)
    else:
        advance_ref(tokens, picked, positions, slots, context, tables, block_size)
