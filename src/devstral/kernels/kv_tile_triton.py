"""One [BLOCK_N, HEAD_DIM] tile of keys or values from the paged KV cache, in registers, for every KV
kind (`kv_format.py`): the decode attention's loads (paged_attention_triton.py). Semantics:
`kv_format.dequantize`.

Float kinds load as they are. The 1-byte kinds (fp8, q8_0, q4_0) load as int32 words, multi-buffered
like the 2-byte tiles, and are unpacked four values at a time by a few lines of PTX (exactly; the
interpreter and pre-sm_90 builds take the same arithmetic in Triton); q8_0/q4_0 scales come as one
[BLOCK_N, HEAD_DIM / 32] tile broadcast in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The 1-byte kinds' tiles are loaded as 32-bit words (a [BLOCK_N, HEAD_DIM] int8 tile lives in registers
# one byte a register, unpacked and repacked around every use). q8_0/q4_0 on the GPU: each byte (sign
# bit flipped for q8_0) or nibble goes into bits 8..15 of the float 2^23 with one PRMT, f = 2^23 + u*2^8;
# then x * scale = fma(f, scale * 2^-8, -(2^15 + offset) * scale), offset 128 (q8_0) or 8 (q4_0). Both
# constants are exact in float32 (2^15 + offset has at most 13 significant bits, the scale 11), and so is
# the fma's one rounding (x * scale has at most 19): the reference's float32 product bit for bit, in a
# PRMT, an FFMA, half an F2FP (the pack to q's dtype, which the reference's rounding needs anyway) and a
# quarter of a LOP3 a value, where int8 -> float32 alone is an I2F (the conversion unit: 16 a clock per SM).
_PRMT_BYTES = "prmt.b32 ${}, {}, k, 0x76{}4; "  # output, word, byte: 0x00 | byte << 8 | 0x00 << 16 | 0x4B << 24
_BYTE_FLOATS = "".join(_PRMT_BYTES.format(i, "t", i) for i in range(4))
_NIBBLE_FLOATS = "".join(_PRMT_BYTES.format(i, "lo", i) + _PRMT_BYTES.format(4 + i, "hi", i) for i in range(4))
Q8_0_ASM = tl.constexpr("{ .reg .b32 t, k; mov.b32 k, 0x4B000000; xor.b32 t, $4, 0x80808080; " + _BYTE_FLOATS + "}")
Q4_0_ASM = tl.constexpr("{ .reg .b32 lo, hi, k; mov.b32 k, 0x4B000000; and.b32 lo, $8, 0x0F0F0F0F; "
                         "shr.b32 hi, $8, 4; and.b32 hi, hi, 0x0F0F0F0F; " + _NIBBLE_FLOATS + "}")
BITS_8_15 = tl.constexpr(2.0 ** -8)  # f's unit
Q8_0_BIAS, Q4_0_BIAS = tl.constexpr(32768.0 + 128.0), tl.constexpr(32768.0 + 8.0)  # 2^15 + offset


# fp8 words: four e4m3 -> two fp16 pairs (the hardware's paired conversion, exact) -> four float32 (HADD2.F32,
# on the FMA pipe), where Triton's own e4m3 -> bfloat16 takes an F2F (the conversion unit) a value
E4M3_WORD_ASM = tl.constexpr(
    "{ .reg .b16 l, h, x0, x1, x2, x3; .reg .b32 a, b; mov.b32 {l, h}, $4; cvt.rn.f16x2.e4m3x2 a, l; "
    "cvt.rn.f16x2.e4m3x2 b, h; mov.b32 {x0, x1}, a; mov.b32 {x2, x3}, b; cvt.f32.f16 $0, x0; cvt.f32.f16 $1, x1; "
    "cvt.f32.f16 $2, x2; cvt.f32.f16 $3, x3; }")


@triton.jit
def columns(HEAD_DIM: tl.constexpr, KIND: tl.constexpr):
    """The head-dim index of each column of a tile as `_tile` returns it: the identity, except for
    q4_0, whose tiles keep the two nibbles of a byte side by side (byte j of a 32-block holds values j
    and j + 16). q and the output are read and written through the same columns, so the products see
    matching orders and nothing is shuffled in the loop."""
    t = tl.arange(0, HEAD_DIM)
    if KIND == 3:
        t = (t // 32) * 32 + (t % 2) * 16 + (t % 32) // 2
    return t


@triton.jit
def _interleave4(a, b, c, d):
    """[..., n] x 4 -> [..., 4n]: a[i], b[i], c[i], d[i] at 4i .. 4i + 3 (no data moves: each thread
    keeps its own values)."""
    x = tl.join(tl.join(a, c), tl.join(b, d))
    return tl.reshape(x, [x.shape[0], 4 * x.shape[1]])


@triton.jit
def _q8_0_values(words, ASM: tl.constexpr):
    """int32 words [N, W] of four int8 -> [N, 4W] float32: on the GPU 2^23 + (x + 128) * 2^8 (see
    above), else x."""
    if ASM:
        b0, b1, b2, b3 = tl.inline_asm_elementwise(Q8_0_ASM, "=r,=r,=r,=r,r", [words],
                                                   dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:
        b0, b1, b2, b3 = _int8_at(words, 0), _int8_at(words, 8), _int8_at(words, 16), _int8_at(words, 24)
    return _interleave4(b0, b1, b2, b3)


@triton.jit
def _int8_at(words, SHIFT: tl.constexpr):
    """The signed byte at bit SHIFT of each word, as float32."""
    return ((words << (24 - SHIFT)) >> 24).to(tl.float32)


@triton.jit
def _q4_0_values(words, ASM: tl.constexpr):
    """int32 words [N, W] of four q4_0 bytes -> [N, 8W] float32, each byte's low nibble then its high
    one: on the GPU 2^23 + nibble * 2^8 (see above), else nibble - 8."""
    if ASM:
        lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = tl.inline_asm_elementwise(
            Q4_0_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        lo0, lo1, lo2, lo3 = _nibble_at(words, 0), _nibble_at(words, 8), _nibble_at(words, 16), _nibble_at(words, 24)
        hi0, hi1, hi2, hi3 = _nibble_at(words, 4), _nibble_at(words, 12), _nibble_at(words, 20), _nibble_at(words, 28)
    x = tl.join(_interleave4(lo0, lo1, lo2, lo3), _interleave4(hi0, hi1, hi2, hi3))
    return tl.reshape(x, [x.shape[0], 2 * x.shape[1]])


@triton.jit
def _nibble_at(words, SHIFT: tl.constexpr):
    """The q4_0 value (nibble - 8) at bit SHIFT of each word, as float32."""
    return ((words >> SHIFT) & 15).to(tl.float32) - 8.0


@triton.jit
def _group_scales(s_ptr, scale_rows, nmask, NG: tl.constexpr):
    """The q8_0/q4_0 scales of a tile's tokens, [BLOCK_N, NG] float32: one fp16 per 32 values, a
    token's NG scales contiguous (loaded as one vector, pipelined like the tile)."""
    g = tl.arange(0, NG)
    return tl.load(s_ptr + scale_rows[:, None] + g[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)


@triton.jit
def _fma_by_group(f, mul, add, HEAD_DIM: tl.constexpr):
    """f [BLOCK_N, HEAD_DIM] * mul + add, with mul and add [BLOCK_N, HEAD_DIM // 32] per 32 columns
    (broadcast in registers, never gathered per value)."""
    NG: tl.constexpr = HEAD_DIM // 32
    f3 = tl.reshape(f, [f.shape[0], NG, 32])
    return tl.reshape(tl.fma(f3, mul[:, :, None], add[:, :, None]), [f.shape[0], HEAD_DIM])


@triton.jit
def _quantized_tile(c_ptr, s_ptr, rows, scale_rows, nmask, HEAD_DIM: tl.constexpr, KIND: tl.constexpr,
                    ASM: tl.constexpr):
    """q8_0 (KIND 2) or q4_0 (3) values times their scales, float32 [BLOCK_N, HEAD_DIM], exact; c_ptr
    and rows address int32 words."""
    WORDS: tl.constexpr = HEAD_DIM // 4 if KIND == 2 else HEAD_DIM // 8
    words = tl.load(c_ptr + rows[:, None] + tl.arange(0, WORDS)[None, :], mask=nmask[:, None], other=0)
    sc = _group_scales(s_ptr, scale_rows, nmask, HEAD_DIM // 32)
    if KIND == 2:
        x = _q8_0_values(words, ASM)
        bias = Q8_0_BIAS
    else:
        x = _q4_0_values(words, ASM)
        bias = Q4_0_BIAS
    if ASM:
        tile = _fma_by_group(x, sc * BITS_8_15, sc * -bias, HEAD_DIM)
    else:
        tile = _fma_by_group(x, sc, sc * 0.0, HEAD_DIM)
    return tile


@triton.jit
def _fp8_values(words, ASM: tl.constexpr):
    """int32 words [N, W] of four e4m3 -> [N, 4W] float32 (exact)."""
    if ASM:
        b0, b1, b2, b3 = tl.inline_asm_elementwise(E4M3_WORD_ASM, "=r,=r,=r,=r,r", [words],
                                                   dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:
        b0, b1, b2, b3 = (_e4m3(words), _e4m3(words >> 8), _e4m3(words >> 16), _e4m3(words >> 24))
    return _interleave4(b0, b1, b2, b3)


@triton.jit
def _e4m3(bits):
    return (bits & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def tile(c_ptr, s_ptr, rows, scale_rows, nmask, HEAD_DIM: tl.constexpr, KIND: tl.constexpr, OUT_T: tl.constexpr,
          UNSCALED: tl.constexpr, ASM: tl.constexpr):
    """A [BLOCK_N, HEAD_DIM] tile of keys or values in OUT_T, dequantized as `kv_format.dequantize`
    does (columns in `columns` order); with UNSCALED an fp8 tile comes back without its per-token
    scale (the caller folds it in)."""
    if KIND == 1:  # fp8 e4m3, one float32 scale per token; c_ptr and rows address int32 words
        words = tl.load(c_ptr + rows[:, None] + tl.arange(0, HEAD_DIM // 4)[None, :], mask=nmask[:, None], other=0)
        x = _fp8_values(words, ASM)
        if not UNSCALED:
            x = x * tl.load(s_ptr + scale_rows, mask=nmask, other=0.0)[:, None]
        tile = x.to(OUT_T)
    elif KIND >= 2:  # q8_0, q4_0
        tile = _quantized_tile(c_ptr, s_ptr, rows, scale_rows, nmask, HEAD_DIM, KIND, ASM).to(OUT_T)
    else:
        tile = tl.load(c_ptr + rows[:, None] + tl.arange(0, HEAD_DIM)[None, :], mask=nmask[:, None],
                       other=0.0).to(OUT_T)
    return tile
