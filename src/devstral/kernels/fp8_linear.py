"""A frozen linear layer with e4m3 weights and one fp32 scale per output channel (--quantize-on-load fp8).

CUDA: the Triton fp8 GEMV for a few rows; above that torch._scaled_mm (activations quantized per row,
Hopper or later, dimensions multiple of 16), or a dequantized bf16 weight and cuBLAS otherwise.
CPU: the weight dequantized to the input's dtype and F.linear (the reference the kernels are
checked against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from devstral.kernels import fp8_kernels


class FP8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, name: str = "?"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.name = name
        q, scale = fp8_kernels.quantize_rowwise(weight)
        self.register_buffer("weight_fp8", q, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fp8_kernels.dequantize(self.weight_fp8, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from devstral.quant.linear import cuda_kernels

        if not (x.is_cuda and cuda_kernels(x.device)) or (x.requires_grad and torch.is_grad_enabled()):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        from devstral.kernels.gguf_config import fp8_plan

        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m = x2.shape[0]
        kind, cfg = fp8_plan(m, self.out_features, self.in_features, x.device)
        if kind == "gemv":
            out = torch.empty(m, self.out_features, dtype=x.dtype, device=x.device)
            fp8_kernels.gemv(x2, self.weight_fp8, self.weight_scale, self.bias, out, **cfg)
        elif x.dtype in (torch.bfloat16, torch.float16) and fp8_kernels.scaled_mm_ok(self.weight_fp8, x.device):
            out = fp8_kernels.scaled_mm(x2, self.weight_fp8, self.weight_scale, self.bias)
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            out = F.linear(x2, self.dequantized_weight(x.dtype), bias)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3, bias={self.bias is not None}"
