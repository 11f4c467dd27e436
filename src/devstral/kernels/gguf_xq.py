"""Activations quantized once per decode GEMV input, for the int8 streaming GEMV (gguf_gemv_wide, xq=True).

The int8 GEMV quantizes activations inside each thread: every thread that shares a sub-block column
redoes it for its own rows, and at 8-16 rows a thread that is a third to a half of the loop's
instructions (SASS counted offline: Q4_K 2.34 instructions per weight at 8 rows, 1.79 at 16). Done once
here instead -- one small launch per input, shared by a fused q/k/v or gate/up -- the GEMV only loads
the packed bytes, in the order its dp4a operands take them.

Layout, int32 [M, K // 32, 12], one row of 12 words (48 bytes, 16-byte aligned) per 32 values:
  words 0-7   the int8 levels round(x * 127 / absmax), four to a word, byte 0 first:
              STRIDE8 (Q4_K, Q5_K, Q8_0 weights): word i holds values i, i+8, i+16, i+24 -- a Q8_0
              word's values, and for Q4_K/Q5_K the low nibbles' (words 0-3) and high nibbles' (words
              4-7) operands;
              STRIDE4 (Q6_K weights, sub-blocks of 16): word 4h + i holds values 16h + i, +4, +8, +12
  word 8      the scale absmax / 127 (fp32 bits)
  word 9      the fp32 sum of the 32 values (Q4_K's and Q5_K's min terms), added in pairs: (v0 + v1),
              (v2 + v3), ..., then those in pairs, and so on (one order whichever kernel packs)
  words 10-11 the integer sum of the levels of each half of 16 (Q6_K stores levels + 32)
Rounding is the in-kernel path's (magic-number add, ties to even); all-zero blocks stay zero.
`reference()` is the same in PyTorch (the CPU twin the tests compare against).

A kernel that produces a GEMV's input can write these words itself with `pack_blocks` (the RMSNorm
before q/k/v and gate/up does, rms_norm_triton.py) and `offer()` them: `quantize()` of exactly that
tensor, unwritten since, then returns them instead of launching.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels import pdl
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait

BLOCK = 32  # values per scale
WORDS = 12  # int32 words per block of 32
STRIDE8, STRIDE4 = 0, 1
BLOCKS_PER_PROGRAM = 16


@triton.jit
def _pairwise_sum(x, BLOCKS: tl.constexpr):
    """Each block's 32 values added in a fixed tree of pairs. fp32 addition is commutative, so every step
    gives the same bits whichever thread holds which operand; a plain tl.sum's order follows the register
    layout, which differs between this kernel and the RMSNorm that packs its rows (rms_norm_triton.py)."""
    s = tl.sum(tl.reshape(x, (BLOCKS, 16, 2)), axis=2)
    s = tl.sum(tl.reshape(s, (BLOCKS, 8, 2)), axis=2)
    s = tl.sum(tl.reshape(s, (BLOCKS, 4, 2)), axis=2)
    s = tl.sum(tl.reshape(s, (BLOCKS, 2, 2)), axis=2)
    return tl.sum(s, axis=1)


@triton.jit
def pack_blocks(x, base, ok, LAYOUT: tl.constexpr, BLOCKS: tl.constexpr):
    """x fp32 [BLOCKS, 32] -> the 12 words of each block at base [BLOCKS] (int32 pointers), where ok.
    The one packing: _quantize_kernel's and the RMSNorm's, so both write the same bits for one row."""
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
    tl.store(base[:, None] + tl.arange(0, 8)[None, :], words, mask=ok[:, None])
    tl.store(base + 8, (amax * (1.0 / 127.0)).to(tl.int32, bitcast=True), mask=ok)
    tl.store(base + 9, _pairwise_sum(x, BLOCKS).to(tl.int32, bitcast=True), mask=ok)
    tl.store(base[:, None] + 10 + tl.arange(0, 2)[None, :], halves, mask=ok[:, None])


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, K, s_xm, s_om, LAYOUT: tl.constexpr, BLOCKS: tl.constexpr,
                     PDL: tl.constexpr = False, GLU: tl.constexpr = False):
    if PDL:  # launched as a dependent of the kernel before, and the GEMV after may start (kernels/pdl.py)
        gdc_launch_dependents()
        gdc_wait()
    m = tl.program_id(0)
    b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)  # the blocks of 32 of this program
    n_blocks = K // 32
    ok = b < n_blocks
    v = tl.arange(0, 32)
    ptrs = x_ptr + m.to(tl.int64) * s_xm + b[:, None] * 32 + v[None, :]
    x = tl.load(ptrs, mask=ok[:, None], other=0.0)
    if GLU:  # x is the gate half of [gate | up]: the values are silu(gate) * up, rounded as silu_mul rounds
        up = tl.load(ptrs + K, mask=ok[:, None], other=0.0)
        gf = x.to(tl.float32)
        silu = (gf / (1.0 + tl.exp(-gf))).to(x.dtype)
        x = (silu.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
    pack_blocks(x.to(tl.float32), out_ptr + m.to(tl.int64) * s_om + b * 12, ok, LAYOUT, BLOCKS)


def layout_for(qt: int) -> int:
    """The byte order a weight type's dp4a operands take (qt: gguf_decode.qt_code)."""
    return STRIDE4 if qt == 2 else STRIDE8


# What the last producer kernel wrote beside its output (offer()): (y, y's version then, {layout: xq of y}, glu).
# One producer at a time: a decoder layer's norm output is consumed before the next norm runs.
_offered: tuple[torch.Tensor, int, dict[int, torch.Tensor], bool] | None = None


def offer(y: torch.Tensor, xqs: dict[int, torch.Tensor], glu: bool = False) -> None:
    """A kernel that wrote y [M, K] (contiguous) also wrote quantize(y, layout, glu) for each layout of xqs:
    quantize() hands those back for y's data instead of launching, as long as y is unchanged (an RMSNorm
    feeding int8 GEMVs, rms_norm_triton.py: one launch fewer per norm). y is held, so no other tensor can
    take its memory while the entry stands and a data pointer names y alone. An inference tensor has no
    version counter to tell an in-place write by: it is not recorded (and the entry before is dropped)."""
    global _offered
    _offered = None if y.is_inference() else (y, y._version, dict(xqs), glu)


def forget() -> None:
    """Drop the offered entry (and let its tensors go)."""
    global _offered
    _offered = None


def _offered_for(x: torch.Tensor, layout: int, glu: bool = False) -> torch.Tensor | None:
    """The offered xq when x [M, K] is exactly the offered y's data, unwritten since, else None. Host
    arithmetic only: the same answer while a CUDA graph is captured as when it runs eagerly."""
    entry = _offered
    if entry is None:
        return None
    y, version, xqs, offered_glu = entry
    xq = xqs.get(layout)
    if xq is None or offered_glu != glu or x.is_inference() or x.data_ptr() != y.data_ptr() or x.dtype != y.dtype \
            or x.device != y.device:
        return None
    m, k = x.shape
    if k != y.shape[-1] or m * k != y.numel() or x.stride(1) != 1 or (m > 1 and x.stride(0) != k):
        return None
    return xq if x._version == version else None


def quantize(x: torch.Tensor, layout: int, glu: bool = False) -> torch.Tensor:
    """x [M, K] (K a multiple of 32, unit column stride) -> int32 [M, K // 32, 12] (the layout above).
    glu: x is [M, 2K], a gate/up projection's [gate | up] rows, and the values quantized are their
    SwiGLU silu(gate) * up, each factor rounded to x's dtype as silu_mul does (one launch for both).
    An xq its producer already wrote for exactly x (offer(), with the same glu) is returned as is."""
    hit = _offered_for(x, layout, glu)
    if hit is not None:
        return hit
    m, k = x.shape[0], x.shape[1] // 2 if glu else x.shape[1]
    if k % BLOCK:
        raise ValueError(f"activation quantization needs K divisible by {BLOCK}, got {k}")
    out = torch.empty(m, k // BLOCK, WORDS, dtype=torch.int32, device=x.device)
    if m:
        grid = (m, triton.cdiv(k // BLOCK, BLOCKS_PER_PROGRAM))
        on = pdl.enabled(x.device)
        _quantize_kernel[grid](x, out, k, x.stride(0), out.stride(0), LAYOUT=layout, BLOCKS=BLOCKS_PER_PROGRAM, PDL=on,
                               GLU=glu, num_warps=4, launch_pdl=on)
    return out


def reference(x: torch.Tensor, layout: int, glu: bool = False) -> torch.Tensor:
    """The kernel in PyTorch (fp32 arithmetic, the same rounding)."""
    if glu:
        from devstral.kernels.silu_mul import silu_mul_ref

        gate, up = x.chunk(2, dim=-1)
        x = silu_mul_ref(gate, up)
    m, k = x.shape
    xf = x.float().reshape(m, k // BLOCK, BLOCK)
    amax = xf.abs().amax(-1)
    inv = torch.full_like(amax, 127.0) / amax.clamp_min(1e-30)  # IEEE division (scalar / tensor is 1 / x * 127)
    q = ((xf * inv[..., None] + 12582912.0).view(torch.int32) - 0x4B400000).to(torch.int64)
    if layout == STRIDE8:
        q4 = q.reshape(m, -1, 4, 8)  # [.., a, i]: value 8a + i
        words = sum((q4[:, :, a, :] & 0xFF) << (8 * a) for a in range(4))
    else:
        q5 = q.reshape(m, -1, 2, 4, 4)  # [.., h, a, i]: value 16h + 4a + i
        words = sum((q5[:, :, :, a, :] & 0xFF) << (8 * a) for a in range(4)).reshape(m, -1, 8)
    words = torch.where(words >= 2**31, words - 2**32, words)
    out = torch.empty(m, k // BLOCK, WORDS, dtype=torch.int32)
    out[..., :8] = words.to(torch.int32)
    out[..., 8] = (amax * (1.0 / 127.0)).view(torch.int32)
    total = xf
    while total.shape[-1] > 1:  # the kernels' tree of pairs, one IEEE fp32 add each
        total = total[..., 0::2] + total[..., 1::2]
    out[..., 9] = total[..., 0].view(torch.int32)
    out[..., 10:] = q.reshape(m, -1, 2, 16).sum(-1).to(torch.int32)
    return out
