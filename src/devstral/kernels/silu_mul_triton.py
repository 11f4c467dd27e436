"""silu(gate) * up in one pass (Triton). Semantics: `silu_mul.py`.

gate and up may be the two halves of one fused gate/up projection (rows strided, last dim
contiguous). silu is computed in float32 and rounded to gate's dtype, then multiplied by up and
rounded to the result dtype, as `F.silu(gate) * up` does. Bytes: 3 x rows x width x itemsize.

xq: when the down projection takes int8 activations (quant.linear.input_layout), the product goes to
the packed layout it reads (xq_format.py) instead of a float tensor: `_silu_mul_xq_kernel` computes the
same rounded values (the one `_swiglu` below) and quantizes them through gguf_xq.quantize_blocks, the
code of the quantization launch it replaces, so the words are those of silu_mul-then-quantize, bit for
bit. No float intermediate (hidden_dim wide) is written or read back, and one launch less.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels import gguf_xq, pdl
from devstral.kernels.gguf_xq import quantize_blocks
from devstral.kernels.interpret_triton import kernels_for
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait
from devstral.kernels.xq_format import BLOCK as XQ_BLOCK
from devstral.kernels.xq_format import Quantized

BLOCK = 2048
XQ_BLOCKS = 16  # blocks of 32 per program of the fused kernel (512 values, as the quantization launch)
TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _swiglu(g, u, OUT: tl.constexpr):
    """silu(g) rounded to g's dtype, times u, rounded to OUT."""
    gf = g.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    return (silu.to(tl.float32) * u.to(tl.float32)).to(OUT)


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
    tl.store(out_ptr + row * n_cols + cols, _swiglu(g, u, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_xq_kernel(gate_ptr, up_ptr, xq_ptr, n_cols, gate_row_stride, up_row_stride, s_xq,
                        OUT: tl.constexpr, LAYOUT: tl.constexpr, BLOCKS: tl.constexpr, PDL: tl.constexpr = False):
    """Blocks of 32 values BLOCKS at a time ([BLOCKS, 32], the quantization launch's tile), each row of
    the grid's axis 0 its own activation row; the product, rounded to OUT, quantized into xq_ptr."""
    if PDL:  # kernels/pdl.py: the down projection's GEMV may start loading its weights (and waits for the kernel before)
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    ok = b < n_cols // 32
    cols = b[:, None] * 32 + tl.arange(0, 32)[None, :]
    g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=ok[:, None], other=0.0)
    u = tl.load(up_ptr + row * up_row_stride + cols, mask=ok[:, None], other=0.0)
    quantize_blocks(_swiglu(g, u, OUT).to(tl.float32), xq_ptr + row * s_xq, b, ok, LAYOUT, BLOCKS)


def _rows(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor, *, block: int = BLOCK, num_warps: int = 4,
                    xq: int | None = None) -> torch.Tensor | Quantized:
    """xq: a layout (xq_format.STRIDE8 / STRIDE4): the product as a Quantized in it, no float tensor."""
    if gate.shape != up.shape:
        from devstral.kernels.silu_mul import silu_mul_ref

        out = silu_mul_ref(gate, up)
        return out if xq is None else Quantized(gguf_xq.quantize(_rows(out), xq), xq, out.shape, out.dtype)
    n = gate.shape[-1]
    dtype = torch.promote_types(gate.dtype, up.dtype)
    g2, u2 = _rows(gate), _rows(up)
    on = pdl.enabled(gate.device)
    if xq is not None:
        out = gguf_xq.empty(gate.shape, xq, dtype, gate.device)
        if out.rows:
            grid = (g2.shape[0], triton.cdiv(n // XQ_BLOCK, XQ_BLOCKS))
            kernels_for(gate, __name__)._silu_mul_xq_kernel[grid](
                g2, u2, out.words, n, g2.stride(0), u2.stride(0), out.words.stride(0), OUT=TL_DTYPES[dtype],
                LAYOUT=xq, BLOCKS=XQ_BLOCKS, PDL=on, num_warps=4, launch_pdl=on)
        return out
    out = torch.empty(gate.shape, dtype=dtype, device=gate.device)
    if out.numel() == 0:
        return out
    grid = (g2.shape[0], triton.cdiv(n, block))
    kernels_for(gate, __name__)._silu_mul_kernel[grid](g2, u2, out, n, g2.stride(0), u2.stride(0), BLOCK=block,
                                                      PDL=on, num_warps=num_warps, launch_pdl=on)
    return out
