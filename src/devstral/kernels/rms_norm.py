"""RMSNorm as HF Mistral computes it (normalize in float32, cast back, then scale), and its fusion
with the residual add that precedes it."""

from __future__ import annotations

import torch

from devstral.kernels import use_triton, use_triton_training


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm_ref(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + delta), x + delta): the residual stream and its normed copy in one pass."""
    residual = x + delta
    return rms_norm_ref(residual, weight, eps), residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, xq: tuple[int, ...] = ()) -> torch.Tensor:
    """xq: the gguf_xq layouts the int8 GEMVs after will quantize the output with; the Triton kernel
    writes them beside it at decode sizes (rms_norm_triton.py), the other paths ignore them."""
    if use_triton_training(x, weight):
        from devstral.kernels import rms_norm_autograd as train

        if train.supported(x):
            return train.rms_norm_autograd(x, weight, eps)
        return rms_norm_ref(x, weight, eps)
    if use_triton(x):
        from devstral.kernels.rms_norm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps, xq=xq)
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float, xq: tuple[int, ...] = (), *, x_settled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + delta), x + delta). x_settled: see add_rms_norm_triton (a launch-order promise; the
    result is the same either way). An int64 delta is a fixed-point GEMV output (kernels/fixed_point.py): the
    Triton kernel converts it as it reads it, the other paths first."""
    if delta.dtype == torch.int64 and not use_triton(x):
        from devstral.kernels.fixed_point import from_fixed_ref

        delta = from_fixed_ref(delta, x.dtype)
    if use_triton_training(x, delta, weight):
        from devstral.kernels import rms_norm_autograd as train

        if train.supported(x) and delta.shape == x.shape:
            return train.add_rms_norm_autograd(x, delta, weight, eps)
        return add_rms_norm_ref(x, delta, weight, eps)
    if use_triton(x):
        from devstral.kernels.rms_norm_triton import add_rms_norm_triton

        return add_rms_norm_triton(x, delta, weight, eps, xq=xq, x_settled=x_settled)
    return add_rms_norm_ref(x, delta, weight, eps)
