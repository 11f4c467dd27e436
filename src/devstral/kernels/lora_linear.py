"""LoRA linear with a hand-written backward: y = base(x) + (x A^T) B^T s, saving only x.

Autograd on the plain expression keeps x (cast) for dA and x A^T for dB, plus a cast copy of x under
autocast. Here backward recomputes x A^T (an [tokens, r] product, r ~ 16: cheap) from the saved x, so a
LoRA-wrapped projection keeps one activation, the input it had to keep anyway. The frozen base is an
nn.Linear (dx = g W) or an NF4Linear (dx = g dequant(W), the weight unpacked again in backward, never
kept). Gradients: dB = s g^T (x A^T), dA = s (g B)^T x, dx = g W + s (g B) A.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x, base.weight.to(x.dtype))
    return base.matmul(x)  # NF4Linear


def _base_input_grad(base: nn.Module, g: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return g @ base.weight.to(g.dtype)
    return g @ base.weight_nf4_dequantized(g.dtype)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float):
        x2 = x.reshape(-1, x.shape[-1])
        out = _base_forward(base, x2)
        xl = x2.to(a.dtype)
        out = out + ((xl @ a.t()) @ b.t() * scale).to(out.dtype)
        ctx.save_for_backward(x, a, b)
        ctx.base, ctx.scale = base, scale
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, b = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gl = g.to(a.dtype)
        gb = (gl @ b) * s  # [tokens, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (_base_input_grad(ctx.base, g.to(x.dtype)) + (gb @ a).to(x.dtype)).reshape(x.shape)
        if ctx.needs_input_grad[2]:
            grad_a = gb.t() @ x2.to(a.dtype)
        if ctx.needs_input_grad[3]:
            grad_b = (gl.t() @ (x2.to(a.dtype) @ a.t())) * s  # x A^T recomputed, not saved
        return grad_x, None, grad_a, grad_b, None


def fusable_base(base: nn.Module) -> bool:
    """A frozen bias-free nn.Linear or an NF4Linear: the bases the fused backward knows."""
    from devstral.model.nf4 import NF4Linear

    if isinstance(base, NF4Linear):
        return True
    return type(base) is nn.Linear and base.bias is None and not base.weight.requires_grad


def lora_linear(x: torch.Tensor, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """base(x) + (x @ a^T) @ b^T * scale. Under autocast everything runs in the autocast dtype (gradients reach
    fp32 A and B through the casts); otherwise the base runs in x's dtype and the LoRA path in A's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        x, a, b = x.to(low), a.to(low), b.to(low)
    with torch.autocast(dev, enabled=False):
        return _LoRALinear.apply(x, base, a, b, scale)
