"""SwiGLU's gate: silu(gate) * up, from the two halves of a fused gate/up projection or two tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from devstral.kernels import use_triton, use_triton_training


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton_training(gate, up):
        from devstral.kernels import silu_mul_autograd as train

        if train.supported(gate, up):
            return train.silu_mul_autograd(gate, up)
        return silu_mul_ref(gate, up)
    if use_triton(gate):
        from devstral.kernels.silu_mul_triton import silu_mul_triton

        return silu_mul_triton(gate, up)
    return silu_mul_ref(gate, up)
