"""Activations quantized for the int8 streaming GEMV (gguf_gemv_wide, kind "wide_xq"): the packed
layout, the value that carries it between kernels, and the reference quantizer. No Triton here: the
dispatchers (rms_norm.py, silu_mul.py, quant/linear.py) import it on CPU-only installs too.

Layout, int32 [M, K // 32, 12], one row of 12 words (48 bytes, 16-byte aligned) per 32 values:
  words 0-7   the int8 levels round(x * 127 / absmax), four to a word, byte 0 first:
              STRIDE8 (Q4_K, Q8_0 weights): word i holds values i, i+8, i+16, i+24 -- a Q8_0 word's
              values, and for Q4_K the low nibbles' (words 0-3) and high nibbles' (words 4-7) operands;
              STRIDE4 (Q6_K weights, sub-blocks of 16): word 4h + i holds values 16h + i, +4, +8, +12
  word 8      the scale absmax / 127 (fp32 bits)
  word 9      the fp32 sum of the 32 values (Q4_K's min term), added as a fixed pairwise tree
              (neighbours, then pairs of pairs, ...): the same bits whatever layout a kernel holds
              the values in, so a kernel that quantizes its own output (RMSNorm, SwiGLU) writes what
              norm-then-quantize writes
  words 10-11 the integer sum of the levels of each half of 16 (Q6_K stores levels + 32)
Rounding: x * inv + 1.5 * 2^23 leaves round(x * inv) (ties to even) in the low mantissa bits; all-zero
blocks stay zero. On the GPU that multiply-add compiles to one FMA (one rounding) in every kernel that
quantizes (they share gguf_xq.quantize_blocks), so their outputs are equal to each other; `reference`
rounds twice, as Triton's interpreter does, so a level can differ from a GPU kernel's by one at a tie.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32  # values per scale
WORDS = 12  # int32 words per block of 32
STRIDE8, STRIDE4 = 0, 1


@dataclass(frozen=True, slots=True)
class Quantized:
    """Activations [*lead, K] already in the int8 GEMV's input layout: what the float activations
    would have become in gguf_xq.quantize, written instead by the kernel that produced them.

    words  int32 [M, K // 32, 12] in `layout` (M = the product of the lead dims)
    shape  the float activations' shape [*lead, K]; dtype their dtype (the GEMV's output takes it)"""

    words: torch.Tensor
    layout: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def rows(self) -> int:
        return self.words.shape[0]

    @property
    def device(self) -> torch.device:
        return self.words.device


def layout_for(qt: int) -> int:
    """The byte order a weight type's dp4a operands take (qt: gguf_decode.qt_code; Q6_K is 2)."""
    return STRIDE4 if qt == 2 else STRIDE8


def layout_for_type(qtype_name: str) -> int:
    return STRIDE4 if qtype_name == "Q6_K" else STRIDE8


def pairwise_sum32(xf: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (32) as the kernels add it: neighbours first, then pairs of pairs."""
    s = xf
    while s.shape[-1] > 1:
        s = s[..., 0::2] + s[..., 1::2]
    return s[..., 0]


def reference(x: torch.Tensor, layout: int) -> torch.Tensor:
    """x [M, K] (K a multiple of 32) -> int32 [M, K // 32, 12]: the kernels' arithmetic in PyTorch."""
    m, k = x.shape
    xf = x.float().reshape(m, k // BLOCK, BLOCK)
    amax = xf.abs().amax(-1)
    # IEEE division, as the kernels' div_rn (a Python number over a tensor is a reciprocal times it in torch)
    inv = torch.full_like(amax, 127.0) / amax.clamp_min(1e-30)
    q = ((xf * inv[..., None] + 12582912.0).view(torch.int32) - 0x4B400000).to(torch.int64)
    if layout == STRIDE8:
        q4 = q.reshape(m, -1, 4, 8)  # [.., a, i]: value 8a + i
        words = sum((q4[:, :, a, :] & 0xFF) << (8 * a) for a in range(4))
    else:
        q5 = q.reshape(m, -1, 2, 4, 4)  # [.., h, a, i]: value 16h + 4a + i
        words = sum((q5[:, :, :, a, :] & 0xFF) << (8 * a) for a in range(4)).reshape(m, -1, 8)
    words = torch.where(words >= 2**31, words - 2**32, words)
    out = torch.empty(m, k // BLOCK, WORDS, dtype=torch.int32, device=x.device)
    out[..., :8] = words.to(torch.int32)
    out[..., 8] = (amax * (1.0 / 127.0)).view(torch.int32)
    out[..., 9] = pairwise_sum32(xf).view(torch.int32)
    out[..., 10:] = q.reshape(m, -1, 2, 16).sum(-1).to(torch.int32)
    return out


def quantized_reference(x: torch.Tensor, layout: int) -> Quantized:
    """x [*lead, K] as a Quantized, by `reference` (the path of a producer that has no fused kernel)."""
    return Quantized(reference(x.reshape(-1, x.shape[-1]), layout), layout, x.shape, x.dtype)
