"""RMSNorm and residual-add + RMSNorm in one pass per row (Triton). Semantics: `rms_norm.py`.

One program per row holds the whole row in registers: read x (and delta) once, write the normed row
(and the residual) once. Bytes per row: 2-byte dtypes, dim d: 4d for the norm, 8d for add + norm.
The residual is rounded to its dtype before it is normed, and the normed row is cast to that dtype
before the weight multiplies it, exactly as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels import pdl
from devstral.kernels.interpret_triton import kernels_for
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait

MAX_DIM = 32768  # a row in registers; wider rows take the reference


@triton.jit
def _rms_norm_kernel(x_ptr, x_row_stride, delta_ptr, delta_row_stride, w_ptr, out_ptr, res_ptr, n_cols, eps,
                     HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py: the GEMV after may start loading its weights (and waits for the kernel before)
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * delta_row_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * n_cols + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean_sq = tl.sum(h * h, axis=0) / n_cols
    h = (h * tl.rsqrt(mean_sq + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * h.to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])  # a view whenever the leading dims allow one


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 512))


def _launch(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
            num_warps: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    res_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, res_dtype), device=x.device)
    res = torch.empty(x.shape, dtype=res_dtype, device=x.device) if delta is not None else None
    x2 = _rows(x)
    d2 = _rows(delta) if delta is not None else x2
    if x2.shape[0] == 0:
        return out, res
    block = triton.next_power_of_2(n)
    on = pdl.enabled(x.device)
    kernels_for(x, __name__)._rms_norm_kernel[(x2.shape[0],)](
        x2, x2.stride(0), d2, d2.stride(0), weight.contiguous(), out, res if res is not None else out, n, eps,
        HAS_DELTA=delta is not None, BLOCK=block, PDL=on, num_warps=num_warps or _num_warps(block), launch_pdl=on)
    return out, res


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, *, num_warps: int | None = None) -> torch.Tensor:
    if x.shape[-1] > MAX_DIM:
        from devstral.kernels.rms_norm import rms_norm_ref

        return rms_norm_ref(x, weight, eps)
    return _launch(x, None, weight, eps, num_warps)[0]


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, *,
                        num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + delta), x + delta)."""
    if x.shape[-1] > MAX_DIM or delta.shape != x.shape:
        from devstral.kernels.rms_norm import add_rms_norm_ref

        return add_rms_norm_ref(x, delta, weight, eps)
    return _launch(x, delta, weight, eps, num_warps)
