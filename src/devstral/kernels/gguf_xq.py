"""Activations quantized once per decode GEMV input, for the int8 streaming GEMV (gguf_gemv_wide, xq=True).

The int8 GEMV quantizes activations inside each thread: every thread that shares a sub-block column
redoes it for its own rows, and at 8-16 rows a thread that is a third to a half of the loop's
instructions (SASS counted offline: Q4_K 2.34 instructions per weight at 8 rows, 1.79 at 16). Done once
here instead -- one small launch per input, shared by a fused q/k/v or gate/up -- the GEMV only loads
the packed bytes, in the order its dp4a operands take them. Better still, the kernel that produces the
activations writes them in this layout itself (RMSNorm, SwiGLU: `quantize_blocks` below, the same
code, so the same bits), and this launch and the float round trip through memory go away.

The layout, the `Quantized` value that carries it and the PyTorch twin (`reference`) are in
xq_format.py (no Triton there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels import pdl
from devstral.kernels.interpret_triton import kernels_for
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait
from devstral.kernels.xq_format import BLOCK, STRIDE4, STRIDE8, WORDS, Quantized, layout_for, reference

BLOCKS_PER_PROGRAM = 16


@triton.jit
def _pairwise_sum32(x, BLOCKS: tl.constexpr):
    """Each row of x [BLOCKS, 32] summed as a fixed tree (neighbours, then pairs of pairs): every step
    adds two values, so the bits do not depend on how the kernel's layout spreads x over threads."""
    s = tl.sum(tl.reshape(x, (BLOCKS, 16, 2)), axis=2)
    s = tl.sum(tl.reshape(s, (BLOCKS, 8, 2)), axis=2)
    s = tl.sum(tl.reshape(s, (BLOCKS, 4, 2)), axis=2)
    s = tl.sum(tl.reshape(s, (BLOCKS, 2, 2)), axis=2)
    return tl.sum(s, axis=1)


@triton.jit
def quantize_blocks(x, row_ptr, b, ok, LAYOUT: tl.constexpr, BLOCKS: tl.constexpr):
    """Store x (fp32 [BLOCKS, 32]: blocks b [BLOCKS] of one activation row, stored where ok) in the
    packed layout at row_ptr (int32, 12 words per block). The one copy of the arithmetic that every
    kernel quantizing activations runs (this file's launch, RMSNorm's and SwiGLU's fused outputs)."""
    amax = tl.max(tl.abs(x), axis=1)
    inv = tl.math.div_rn(tl.full(amax.shape, 127.0, tl.float32), tl.maximum(amax, 1e-30))  # IEEE, as the twin
    # x * inv + 1.5 * 2^23 leaves round(x * inv) in the low mantissa bits (ties to even)
    q = (x * inv[:, None] + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    if LAYOUT == 0:  # value 8a + i -> byte a of word i
        q3 = tl.reshape(q, (BLOCKS, 4, 8))
        shift = (8 * tl.arange(0, 4))[None, :, None]
        words = tl.sum((q3 & 0xFF) << shift, axis=1)  # [BLOCKS, 8]; the bytes do not overlap
    else:  # value 16h + 4a + i -> byte a of word 4h + i
        q4 = tl.reshape(q, (BLOCKS, 2, 4, 4))
        shift = (8 * tl.arange(0, 4))[None, None, :, None]
        words = tl.reshape(tl.sum((q4 & 0xFF) << shift, axis=2), (BLOCKS, 8))
    halves = tl.sum(tl.reshape(q, (BLOCKS, 2, 16)), axis=2)  # [BLOCKS, 2]
    base = row_ptr + b * 12
    tl.store(base[:, None] + tl.arange(0, 8)[None, :], words, mask=ok[:, None])
    tl.store(base + 8, (amax * (1.0 / 127.0)).to(tl.int32, bitcast=True), mask=ok)
    tl.store(base + 9, _pairwise_sum32(x, BLOCKS).to(tl.int32, bitcast=True), mask=ok)
    tl.store(base[:, None] + 10 + tl.arange(0, 2)[None, :], halves, mask=ok[:, None])


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, K, s_xm, s_om, LAYOUT: tl.constexpr, BLOCKS: tl.constexpr,
                     PDL: tl.constexpr = False):
    if PDL:  # launched as a dependent of the kernel before, and the GEMV after may start (kernels/pdl.py)
        gdc_launch_dependents()
        gdc_wait()
    m = tl.program_id(0)
    b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)  # the blocks of 32 of this program
    ok = b < K // 32
    v = tl.arange(0, 32)
    x = tl.load(x_ptr + m.to(tl.int64) * s_xm + b[:, None] * 32 + v[None, :], mask=ok[:, None], other=0.0)
    quantize_blocks(x.to(tl.float32), out_ptr + m.to(tl.int64) * s_om, b, ok, LAYOUT, BLOCKS)


def empty(shape: torch.Size, layout: int, dtype: torch.dtype, device: torch.device) -> Quantized:
    """A Quantized for activations of `shape` [*lead, K], its words not yet written."""
    k = shape[-1]
    if k % BLOCK:
        raise ValueError(f"activation quantization needs K divisible by {BLOCK}, got {k}")
    m = shape.numel() // k if k else 0
    return Quantized(torch.empty(m, k // BLOCK, WORDS, dtype=torch.int32, device=device), layout, shape, dtype)


def quantize(x: torch.Tensor, layout: int) -> torch.Tensor:
    """x [M, K] (K a multiple of 32, unit column stride) -> int32 [M, K // 32, 12] (xq_format's layout)."""
    m, k = x.shape
    out = empty(x.shape, layout, x.dtype, x.device).words
    if m:
        grid = (m, triton.cdiv(k // BLOCK, BLOCKS_PER_PROGRAM))
        on = pdl.enabled(x.device)
        kernels_for(x, __name__)._quantize_kernel[grid](x, out, k, x.stride(0), out.stride(0), LAYOUT=layout,
                                                       BLOCKS=BLOCKS_PER_PROGRAM, PDL=on, num_warps=4, launch_pdl=on)
    return out


__all__ = ["BLOCK", "STRIDE4", "STRIDE8", "WORDS", "Quantized", "empty", "layout_for", "quantize", "quantize_blocks",
           "reference"]
