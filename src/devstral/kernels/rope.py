"""Rotary embedding of queries and keys (rotate-half layout), with the llama-4 query temperature.

q [..., T, n_heads, D] and k [..., T, n_kv_heads, D] in the token-major ("BTHD") layout; cos/sin
[..., T, D] already carry YaRN's attention factor; q_scale [..., T] or None multiplies the rotated
queries (Devstral Small 2's position-dependent temperature).

Training on a GPU takes Liger-Kernel's RoPE when kernels/train_backends.py says so and there is no query
temperature (Liger has none); otherwise our Triton forward + backward (rope_autograd.py).
"""

from __future__ import annotations

import torch

from devstral.kernels import use_triton, use_triton_training


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   q_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    q_out = q * cos + rotate_half(q) * sin
    k_out = k * cos + rotate_half(k) * sin
    if q_scale is not None:
        q_out = q_out * q_scale[..., None, None].to(q_out.dtype)
    return q_out, k_out


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               q_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton_training(q, k):
        from devstral.kernels import rope_autograd as train
        from devstral.kernels.train_backends import use_liger

        # Liger rotates in place: q and k must not share memory (the model's never do)
        distinct = q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
        if q_scale is None and distinct and train.supported(q, k) and use_liger("rope", q):
            from devstral.kernels.liger import liger_rope  # faster on the H200 (train_backends.py)

            return liger_rope(q, k, cos, sin)

        if train.supported(q, k):
            return train.apply_rope_autograd(q, k, cos, sin, q_scale)
        return apply_rope_ref(q, k, cos, sin, q_scale)
    if use_triton(q):
        from devstral.kernels.rope_triton import apply_rope_triton

        return apply_rope_triton(q, k, cos, sin, q_scale)
    return apply_rope_ref(q, k, cos, sin, q_scale)
