"""Rotary position embeddings: plain RoPE, YaRN scaling, and the llama-4 query temperature.

We use the "rotate half" layout (first half of each head pairs with the second half), as HF
checkpoints do. Mistral's native checkpoints pair interleaved dimensions instead; their q/k rows are
permuted into this layout at load time (formats/safetensors.py).
"""

from __future__ import annotations

import math

import torch

from devstral.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim/2] float32, attention_factor applied to cos and sin)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if cfg.yarn is None:
        return 1.0 / pos_freqs, 1.0
    y = cfg.yarn

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(y.original_max_position_embeddings / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (y.factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, y.resolved_attention_factor()


class Rotary(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = inverse_frequencies(cfg)
        # both halves of a head rotate by the same angles: one product gives cos/sin's full width
        self.register_buffer("inv_freq_full", torch.cat((inv_freq, inv_freq)), persistent=False)
        self.llama4_beta = cfg.llama4_beta
        self.llama4_max = cfg.llama4_original_max

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, head_dim] in `dtype`."""
        # Integer positions promote to float32 in the product (the conversion .to(float32) makes), and a factor
        # of 1 is skipped (x * 1.0 is x): the same bits in 5 kernels instead of 9 -- each a launch in a decode step.
        # The frequencies are asked for in float32 (a no-op as built) so that a module cast to bf16 still takes
        # its angles in float32.
        emb = positions[..., None] * self.inv_freq_full.to(positions.device, torch.float32)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def query_scale(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Llama-4 style temperature [B, T] for queries, or None when the model has none."""
        if self.llama4_beta is None:
            return None
        return 1 + self.llama4_beta * torch.log(1 + torch.floor(positions.to(torch.float32) / self.llama4_max))
