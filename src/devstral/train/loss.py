"""Next-token cross-entropy over the learned positions only.

Only hidden states whose next token is learned go through lm_head, in chunks, so the [T, vocab] logits
of a long sequence over a 131k vocabulary are never materialized at once: the fused linear +
cross-entropy computes each chunk's loss and gradients together; any other head (quantized, biased)
goes through checkpointed chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from devstral.kernels.fused_linear_ce import linear_cross_entropy
from devstral.model.transformer import Transformer
from devstral.train.batching import Batch
from devstral.train.data import IGNORE

CHUNK = 1024


def summed_loss(model: Transformer, batch: Batch, *,
                inject: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """(sum of token losses as a scalar tensor, number of learned tokens). `inject`: the [IMG] rows'
    embeddings (train/images.py)."""
    h = model.hidden_states(batch.tokens, batch.positions, attn_mask=batch.attn_mask, documents=batch.documents,
                            inject=inject)
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE
    h = h[:, :-1][keep]
    targets = targets[keep]
    if type(model.lm_head) is torch.nn.Linear and model.lm_head.bias is None:
        # loss and its gradient per chunk in one pass (kernels/fused_linear_ce.py): no logits kept or recomputed
        return linear_cross_entropy(h, model.lm_head.weight, targets), int(targets.numel())
    total = h.new_zeros((), dtype=torch.float32)
    recompute = model.gradient_checkpointing and torch.is_grad_enabled()
    for start in range(0, targets.numel(), CHUNK):
        args = (model.lm_head, h[start:start + CHUNK], targets[start:start + CHUNK])
        # With checkpointing, each chunk's logits are recomputed in backward instead of kept.
        total = total + (checkpoint(_chunk_loss, *args, use_reentrant=False) if recompute else _chunk_loss(*args))
    return total, int(targets.numel())


def _chunk_loss(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, reduction="sum")
