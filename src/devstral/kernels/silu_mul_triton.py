"""silu(gate) * up in one pass (Triton). Semantics: `silu_mul.py`.

gate and up may be the two halves of one fused gate/up projection (rows strided, last dim
contiguous). silu is computed in float32 and rounded to gate's dtype, then multiplied by up and
rounded to the result dtype, as `F.silu(gate) * up` does. Bytes: 3 x rows x width x itemsize.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels import pdl
from devstral.kernels.interpret_triton import kernels_for
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait

BLOCK = 2048


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n_cols, gate_row_stride, up_row_stride, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py: the down projection's GEMV may start loading its weights (and waits for the kernel before)
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0)
    u = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    y = silu.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor, *, block: int = BLOCK,
                    num_warps: int = 4) -> torch.Tensor:
    if gate.shape != up.shape:
        from devstral.kernels.silu_mul import silu_mul_ref

        return silu_mul_ref(gate, up)
    n = gate.shape[-1]
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    g2, u2 = _rows(gate), _rows(up)
    if out.numel() == 0:
        return out
    grid = (g2.shape[0], triton.cdiv(n, block))
    on = pdl.enabled(gate.device)
    kernels_for(gate, __name__)._silu_mul_kernel[grid](g2, u2, out, n, g2.stride(0), u2.stride(0), BLOCK=block,
                                                      PDL=on, num_warps=num_warps, launch_pdl=on)
    return out
