"""RMSNorm and residual-add + RMSNorm in one pass per row (Triton). Semantics: `rms_norm.py`.

One program per row holds the whole row in registers: read x (and delta) once, write the normed row
(and the residual) once. Bytes per row: 2-byte dtypes, dim d: 4d for the norm, 8d for add + norm.
The residual is rounded to its dtype before it is normed, and the normed row is cast to that dtype
before the weight multiplies it, exactly as the reference does.

xq: when the projection after takes int8 activations (quant.linear.input_layout), the program writes the
normed row in that packed layout (xq_format.py) instead of the float row: the values it would have
stored, rounded to the output dtype, through gguf_xq.quantize_blocks -- the code of the quantization
launch it replaces, so the words are those of norm-then-quantize, bit for bit. One launch and one
float row's round trip through memory less per norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels import gguf_xq, pdl
from devstral.kernels.gguf_xq import quantize_blocks
from devstral.kernels.interpret_triton import kernels_for
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait
from devstral.kernels.xq_format import Quantized

MAX_DIM = 32768  # a row in registers; wider rows take the reference
TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _rms_norm_kernel(x_ptr, x_row_stride, delta_ptr, delta_row_stride, w_ptr, out_ptr, res_ptr, xq_ptr, s_xq, n_cols,
                     eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, XQ: tl.constexpr = -1,
                     XQ_DTYPE: tl.constexpr = None, PDL: tl.constexpr = False):
    """XQ >= 0: the normed row, rounded to XQ_DTYPE (the float output's dtype), goes to xq_ptr in that
    int8 layout, and out_ptr is not written."""
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
    if XQ >= 0:
        blocks = tl.arange(0, BLOCK // 32)
        yq = tl.reshape(y.to(XQ_DTYPE).to(tl.float32), (BLOCK // 32, 32))  # as the float row would be stored
        quantize_blocks(yq, xq_ptr + row * s_xq, blocks, blocks < n_cols // 32, XQ, BLOCK // 32)
    else:
        tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])  # a view whenever the leading dims allow one


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 512))


def _launch(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, num_warps: int | None,
            xq: int | None) -> tuple[torch.Tensor | Quantized, torch.Tensor | None]:
    n = x.shape[-1]
    res_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
    out_dtype = torch.promote_types(weight.dtype, res_dtype)
    if xq is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    else:
        out = gguf_xq.empty(x.shape, xq, out_dtype, x.device)
    res = torch.empty(x.shape, dtype=res_dtype, device=x.device) if delta is not None else None
    x2 = _rows(x)
    d2 = _rows(delta) if delta is not None else x2
    if x2.shape[0] == 0:
        return out, res
    block = triton.next_power_of_2(n)
    on = pdl.enabled(x.device)
    dst = out if xq is None else x2  # with xq, no float row is written
    words = out.words if xq is not None else out
    kernels_for(x, __name__)._rms_norm_kernel[(x2.shape[0],)](
        x2, x2.stride(0), d2, d2.stride(0), weight.contiguous(), dst, res if res is not None else dst, words,
        words.stride(0), n, eps, HAS_DELTA=delta is not None, BLOCK=block, XQ=-1 if xq is None else xq,
        XQ_DTYPE=TL_DTYPES[out_dtype] if xq is not None else None, PDL=on,
        num_warps=num_warps or _num_warps(block), launch_pdl=on)
    return out, res


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, *, num_warps: int | None = None,
                    xq: int | None = None) -> torch.Tensor | Quantized:
    """xq: a layout (xq_format.STRIDE8 / STRIDE4): the normed rows as a Quantized in it, no float rows."""
    if x.shape[-1] > MAX_DIM:
        from devstral.kernels.rms_norm import rms_norm_ref

        return _quantized_ref(rms_norm_ref(x, weight, eps), xq)
    return _launch(x, None, weight, eps, num_warps, xq)[0]


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, *,
                        num_warps: int | None = None,
                        xq: int | None = None) -> tuple[torch.Tensor | Quantized, torch.Tensor]:
    """(rms_norm(x + delta), x + delta); xq as in rms_norm_triton."""
    if x.shape[-1] > MAX_DIM or delta.shape != x.shape:
        from devstral.kernels.rms_norm import add_rms_norm_ref

        normed, res = add_rms_norm_ref(x, delta, weight, eps)
        return _quantized_ref(normed, xq), res
    return _launch(x, delta, weight, eps, num_warps, xq)


def _quantized_ref(normed: torch.Tensor, xq: int | None) -> torch.Tensor | Quantized:
    """The reference path's row, quantized when asked (a shape the kernel does not take)."""
    if xq is None:
        return normed
    return Quantized(gguf_xq.quantize(_rows(normed), xq), xq, normed.shape, normed.dtype)
