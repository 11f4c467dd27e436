"""SwiGLU's silu(gate) * up for training: the inference kernel forward (silu_mul_triton.py) and a Triton
backward that produces both input gradients in one pass.

Semantics: `silu_mul.py`. With s = sigmoid(a) and silu(a) = a s:

    d_up = g silu(a)        d_gate = g b s (1 + a (1 - s))

in float32, rounded once to each input's dtype. Saved for backward: gate and up themselves, which
the projections produced anyway (no extra activation). Bytes: 3 x n x itemsize forward, 5 x n
backward (read g, gate, up; write both gradients), in 16-byte vectors (BLOCK columns per program,
a 2-D grid of rows x column blocks so that thousands of programs cover the 132 SMs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels.interpret_triton import kernels_for
from devstral.kernels.silu_mul_triton import _rows, silu_mul_triton

BLOCK = 2048


@triton.jit
def _silu_mul_bwd_kernel(g_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_cols, g_stride, gate_stride, up_stride,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-a))
    tl.store(dup_ptr + row * n_cols + cols, (g * a * s).to(dup_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + row * n_cols + cols, (g * b * s * (1.0 + a * (1.0 - s))).to(dgate_ptr.dtype.element_ty),
             mask=mask)


def silu_mul_backward_triton(g: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *,
                             block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    n = gate.shape[-1]
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if gate.numel() == 0:
        return dgate, dup
    g2, a2, b2 = _rows(g), _rows(gate), _rows(up)
    grid = (a2.shape[0], triton.cdiv(n, block))
    kernels_for(gate, __name__)._silu_mul_bwd_kernel[grid](
        g2, a2, b2, dgate, dup, n, g2.stride(0), a2.stride(0), b2.stride(0), BLOCK=block, num_warps=4)
    return dgate, dup


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return silu_mul_triton(gate, up)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        gate, up = ctx.saved_tensors
        return silu_mul_backward_triton(g, gate, up)


def supported(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return gate.shape == up.shape


def silu_mul_autograd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SiluMul.apply(gate, up)
