"""Liger-Kernel's training kernels behind our ops' signatures (chosen by kernels/train_backends.py).

Semantics checked against ours (tests/test_train_backends.py runs Liger itself through the Triton
interpreter on CPU and, with a GPU, compiled):

* fused linear + cross-entropy: our loss is the SUM over rows of CE(h W^T, target), rows whose target is
  -100 ignored, no softcap, no label smoothing, no z-loss, fp32 result. The label shift happens before
  (train/loss.py hands over the hidden state of position t with the token of t + 1), so Liger gets
  aligned rows. When W trains (full fine-tuning) its gradient accumulates in fp32 over the chunks, as
  ours does; Liger's default would accumulate in W's dtype.
* RoPE: ours and HF's rotate-half rotation with cos/sin [B, T, head_dim] whose two halves are equal
  (model/rope.py builds cat(freqs, freqs); Liger reads the first half only). Liger takes [B, H, T, D];
  our token-major [B, T, H, D] tensors go in as transposed views, so Liger's kernel sees the memory it
  expects with no copy. It rotates q and k in place: they are the fresh outputs of the projections, which
  no autograd node keeps. Liger has no query temperature (Devstral Small 2's llama-4 scaling), so the
  dispatch (kernels/rope.py) uses it only when the model has none.
"""

from __future__ import annotations

import torch


def liger_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from liger_kernel.ops.rope import LigerRopeFunction

    q_out, k_out = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def liger_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int) -> torch.Tensor:
    """h [N, D] and weight [V, D] in one dtype (the caller applied autocast), targets [N]: an fp32 scalar."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(
        h, weight, targets, ignore_index=ignore_index, reduction="sum", softcap=None, label_smoothing=0.0,
        lse_square_scale=0.0, accum_dtype=torch.float32 if weight.requires_grad else None)
