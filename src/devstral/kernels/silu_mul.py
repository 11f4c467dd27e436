"""SwiGLU's gate: silu(gate) * up, from the two halves of a fused gate/up projection or two tensors.

`xq`: the down projection takes int8 activations in that layout (xq_format.py; the model asks
quant.linear.input_layout): the product comes back as a xq_format.Quantized -- what gguf_xq.quantize
would make of it -- written by the SwiGLU kernel itself on the GPU, with no float intermediate."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from devstral.kernels import use_triton, use_triton_training
from devstral.kernels.xq_format import Quantized, quantized_reference


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, xq: int | None = None) -> torch.Tensor | Quantized:
    if xq is not None:  # inference only (input_layout says None while gradients are recorded)
        if use_triton(gate):
            from devstral.kernels.silu_mul_triton import silu_mul_triton

            return silu_mul_triton(gate, up, xq=xq)
        return quantized_reference(silu_mul_ref(gate, up), xq)
    if use_triton_training(gate, up):
        from devstral.kernels import silu_mul_autograd as train

        if train.supported(gate, up):
            return train.silu_mul_autograd(gate, up)
        return silu_mul_ref(gate, up)
    if use_triton(gate):
        from devstral.kernels.silu_mul_triton import silu_mul_triton

        return silu_mul_triton(gate, up)
    return silu_mul_ref(gate, up)
