"""RMSNorm and residual-add + RMSNorm for training: Triton forward and hand-written backward (autograd).

Semantics: `rms_norm.py` (the reference; its plain autograd is what the gradients are checked against).
The forward is the inference kernel's arithmetic (rms_norm_triton.py) and also writes each row's
1/rms in float32, so backward never reduces a row twice. With y = w * n, n = x r, r = 1/rms(x):

    dw = sum over rows of g * n          dx = r * (g w - n * mean(g w n))

all in float32 and rounded once (the reference rounds n and g w to the 2-byte dtype first; float32
is the more exact of the two, and the test measures both against float64). The add + norm variant
also takes the gradient that reaches the residual stream directly and adds it in the same pass, so
the block's residual gradient costs one read of each input and one write.

Bytes per row of width d, 2-byte dtype: forward 4d (8d with the add), backward 6d (8d with the
residual's gradient). Without a weight gradient (LoRA: the norm is frozen) one program per row; with
one, a fixed number of programs (a few per SM) each walk a run of rows and keep their share of dw in
registers, summed by one small reduction after.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from devstral.kernels.interpret_triton import kernels_for
from devstral.kernels.rms_norm_triton import MAX_DIM, _num_warps, _rows


@triton.jit
def _fwd_kernel(x_ptr, x_stride, delta_ptr, delta_stride, w_ptr, out_ptr, res_ptr, rstd_ptr, n_cols, eps,
                HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * delta_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * n_cols + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    n = (h * rstd).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, (w.to(tl.float32) * n.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _bwd_kernel(g_ptr, g_stride, x_ptr, x_stride, w_ptr, rstd_ptr, gres_ptr, gres_stride, dx_ptr, dw_ptr,
                n_rows, n_cols, rows_per_program,
                HAS_GRES: tl.constexpr, HAS_DW: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(rows_per_program):
        row = first + i
        if row < n_rows:
            g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            n = x * rstd
            gw = g * w
            dx = rstd * (gw - n * (tl.sum(gw * n, axis=0) / n_cols))
            if HAS_GRES:
                dx += tl.load(gres_ptr + row * gres_stride + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_DW:
                dw += g * n
    if HAS_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_for_dw(x: torch.Tensor, rows: int) -> int:
    if x.is_cuda:
        return max(1, min(rows, 4 * _sm_count(x.device.index if x.device.index is not None else 0)))
    return max(1, min(rows, 3))  # the interpreter: a few programs, so the run-of-rows loop is exercised


def _forward(x, delta, weight, eps):
    n = x.shape[-1]
    res_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, res_dtype), device=x.device)
    res = torch.empty(x.shape, dtype=res_dtype, device=x.device) if delta is not None else None
    x2 = _rows(x)
    d2 = _rows(delta) if delta is not None else x2
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        kernels_for(x, __name__)._fwd_kernel[(x2.shape[0],)](
            x2, x2.stride(0), d2, d2.stride(0), weight.contiguous(), out, res if res is not None else out, rstd, n, eps,
            HAS_DELTA=delta is not None, BLOCK=block, num_warps=_num_warps(block))
    return out, res, rstd


def _backward(g, x, weight, rstd, g_res, need_dw: bool, dx_dtype: torch.dtype):
    """(dx [x.shape] in dx_dtype, with g_res added when given; dw in float32 or None)."""
    n = x.shape[-1]
    g2, x2 = _rows(g), _rows(x)
    r2 = _rows(g_res) if g_res is not None else g2
    rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=dx_dtype, device=x.device)
    if rows == 0:
        return dx, (torch.zeros(n, dtype=torch.float32, device=x.device) if need_dw else None)
    programs = _programs_for_dw(x, rows) if need_dw else rows
    per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, per_program)
    partial = torch.empty((programs, n), dtype=torch.float32, device=x.device) if need_dw else rstd
    block = triton.next_power_of_2(n)
    kernels_for(x, __name__)._bwd_kernel[(programs,)](
        g2, g2.stride(0), x2, x2.stride(0), weight.contiguous(), rstd, r2, r2.stride(0), dx, partial,
        rows, n, per_program, HAS_GRES=g_res is not None, HAS_DW=need_dw, BLOCK=block,
        num_warps=_num_warps(block))
    return dx, (partial.sum(0) if need_dw else None)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, _, rstd = _forward(x, None, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(g, x, weight, rstd, None, ctx.needs_input_grad[1], x.dtype)
        return dx, (dw.to(weight.dtype) if dw is not None else None), None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
        out, res, rstd = _forward(x, delta, weight, eps)
        ctx.save_for_backward(res, weight, rstd)
        ctx.dtypes = (x.dtype, delta.dtype)
        return out, res

    @staticmethod
    def backward(ctx, g: torch.Tensor | None, g_res: torch.Tensor | None):
        res, weight, rstd = ctx.saved_tensors
        if g is None:  # only the residual stream was used
            g = torch.zeros_like(res, dtype=torch.promote_types(weight.dtype, res.dtype))
        dres, dw = _backward(g, res, weight, rstd, g_res, ctx.needs_input_grad[2], res.dtype)
        x_dtype, delta_dtype = ctx.dtypes
        return (dres.to(x_dtype) if ctx.needs_input_grad[0] else None,
                dres.to(delta_dtype) if ctx.needs_input_grad[1] else None,
                dw.to(weight.dtype) if dw is not None else None, None)


def supported(x: torch.Tensor) -> bool:
    return 0 < x.shape[-1] <= MAX_DIM


def rms_norm_autograd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def add_rms_norm_autograd(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + delta), x + delta), both differentiable."""
    return _AddRMSNorm.apply(x, delta, weight, eps)
