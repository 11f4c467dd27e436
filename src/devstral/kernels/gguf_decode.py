"""Triton helpers that decode the planar GGUF layout (gguf_pack.py) inside the kernels.

QT codes: 0 Q4_K, 1 Q5_K, 2 Q6_K, 3 Q8_0. SB is the sub-block (weights per scale), WPS its words.

Two ways in:
* `slice_f` + `sub_scales` (the GEMVs): a 3-D tile of words [rows, sub-blocks, WPS] is read once and
  decoded one value position s at a time. Quants become floats without an int->float conversion
  (a slow instruction): the level is or-ed into the mantissa of 1.0, giving f = 1 + q / 2^bits, and
  the weight is c1 * f + c0 with c1, c0 per row and sub-block. Three or four instructions per weight.
* `subblock_values` (dequantize, tensor-core GEMM): one sub-block for a band of rows, in weight
  order, computed operation for operation like quant/dequant.py, so bf16 results are bit-identical
  to `dequantize(...).to(torch.bfloat16)`.
"""

from __future__ import annotations

import triton
import triton.language as tl

ONE_F32_BITS = tl.constexpr(0x3F800000)  # 1.0f: levels or-ed into its mantissa give 1 + q / 2^bits
XOR_SIGN_BYTES = tl.constexpr(-2139062144)  # 0x80808080 as int32: int8 q -> unsigned q + 128, per byte

# (SB, WPS, values per word) for each QT code; the host passes these as constexprs
GEOMETRY = {0: (32, 4, 8), 1: (32, 4, 8), 2: (16, 2, 8), 3: (32, 8, 4)}


@triton.jit
def _place(w, SRC: tl.constexpr, NBITS: tl.constexpr, DST: tl.constexpr):
    """Bits SRC..SRC+NBITS-1 of w moved to DST.., everything else cleared."""
    if DST >= SRC:
        v = w << (DST - SRC)
    else:
        v = w >> (SRC - DST)
    return v & (((1 << NBITS) - 1) << DST)


@triton.jit
def slice_f(words, hi, one, S: tl.constexpr, QT: tl.constexpr):
    """Value position S of every word as f = 1 + q / 2^bits (fp32). Q8_0 words come pre-xored.

    `one` is ONE_F32_BITS passed in as a kernel argument: in a register, the mask and the or fuse
    into one three-input LOP3 (with two immediates they take two instructions)."""
    # grouped as (lo & m1) | ((hi & m2) | one): each pair is one three-input LOP3 after its shift
    if QT == 0:
        b = _place(words, 4 * S, 4, 19) | one
    elif QT == 1:
        b = _place(words, 4 * S, 4, 18) | (_place(hi, S, 1, 22) | one)
    elif QT == 2:
        b = _place(words, 4 * S, 4, 17) | (_place(hi, 2 * S, 2, 21) | one)
    else:
        b = _place(words, 8 * S, 8, 15) | one
    return b.to(tl.float32, bitcast=True)


@triton.jit
def planar_scale_min(lo, hl):
    """Q4_K/Q5_K: the 6-bit sub-block scales and mins from the planar layout's two fields (gguf_pack.py).

    lo: the sc byte (int32, zero-extended) of one sub-block, or four sub-blocks' sc bytes as the bytes of an int32
    word (byte k: sub-block k; a 16-bit word of two likewise); hl: the sub-block's mn nibble (the top 2 bits of its
    scale, then of its min) in bits 0-3 of the matching byte, bits 4-7 of each byte ignored. Returns (scale, min)
    packed as lo is: one value, or one byte per sub-block. Integer ops only, a few a sub-block (or a word of four).
    Why: the layout keeps the file's 12 bytes a super-block (a byte each took 16: +2.8% of the bytes a bandwidth-bound
    decode step reads) without the file's 12-byte record, whose fields would be gathered byte by byte. The torch twin
    is gguf_pack.planar_scale_min_ref."""
    scale = (lo & 0x0F0F0F0F) | ((hl << 4) & 0x30303030)
    mins = ((lo >> 4) & 0x0F0F0F0F) | ((hl << 2) & 0x30303030)
    return scale, mins


@triton.jit
def planar_top_bits(mn_ptr, n, j, ok, s_sc):
    """planar_scale_min's hl for sub-blocks j of rows n (one each): nibble j & 1 of mn byte j // 2. The mn plane's rows
    are half as long as the sc plane's (s_sc // 2 bytes: K / 64)."""
    hb = tl.load(mn_ptr + n * (s_sc // 2) + (j >> 1), mask=ok, other=0).to(tl.int32)
    return hb >> (4 * (j & 1))


@triton.jit
def sub_scales(sc_ptr, mn_ptr, d_ptr, dm_ptr, n, j, ok, s_sc, s_d, QT: tl.constexpr, SB: tl.constexpr):
    """(c1, c0) with weight = c1 * f + c0 for f from slice_f; n, j broadcastable row / sub-block indices."""
    if QT == 3:
        d = tl.load(d_ptr + n * s_d + j, mask=ok, other=0.0).to(tl.float32)
        c1 = 256.0 * d  # q = 256 f - 384
        c0 = -384.0 * d
    else:
        blk = j // (256 // SB)
        d = tl.load(d_ptr + n * s_d + blk, mask=ok, other=0.0).to(tl.float32)
        sc = tl.load(sc_ptr + n * s_sc + j, mask=ok, other=0)
        if QT == 2:
            c1 = 64.0 * (d * sc.to(tl.float32))  # q - 32 = 64 f - 96
            c0 = -1.5 * c1
        else:
            dm = tl.load(dm_ptr + n * s_d + blk, mask=ok, other=0.0).to(tl.float32)
            sc, mn = planar_scale_min(sc.to(tl.int32), planar_top_bits(mn_ptr, n, j, ok, s_sc))
            sc = sc.to(tl.float32)
            mn = mn.to(tl.float32)
            if QT == 0:
                c1 = 16.0 * (d * sc)
            else:
                c1 = 32.0 * (d * sc)
            c0 = -(c1 + dm * mn)
    return c1, c0


@triton.jit
def load_words(q_ptr, qh_ptr, n, w, ok, s_q, s_qh, QT: tl.constexpr):
    """Quant words (and their high bits, for Q5_K/Q6_K) at word index w of rows n."""
    words = tl.load(q_ptr + n * s_q + w, mask=ok, other=0)
    if QT == 3:
        words = words ^ XOR_SIGN_BYTES
    if QT == 1 or QT == 2:
        hi = tl.load(qh_ptr + n * s_qh + w, mask=ok, other=0).to(tl.int32)
    else:
        hi = words
    return words, hi


@triton.jit
def subblock_values(q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, n, j, r, ok, s_q, s_qh, s_sc, s_d, one,
                    QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, EXACT: tl.constexpr):
    """Sub-block j of rows n ([BN, 1]) in weight order r ([1, SB]): fp32 [BN, SB].

    EXACT: operation for operation as dequant.py (two FMAs per weight). Otherwise the scale and the
    level offset are folded into one FMA, c1 * f + c0, which may differ in the last bit."""
    if not EXACT:
        return _subblock_fast(q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, n, j, r, ok, s_q, s_qh, s_sc, s_d,
                              one, QT, SB, WPS)
    s = r // WPS
    w = j * WPS + r % WPS
    words, hi = load_words(q_ptr, qh_ptr, n, w, ok, s_q, s_qh, QT)
    if QT == 3:
        u = (words >> (8 * s)) & 0xFF
        f = ((u << 15) | one).to(tl.float32, bitcast=True)
        d = tl.load(d_ptr + n * s_d + j, mask=ok, other=0.0).to(tl.float32)
        val = d * (f * 256.0 - 384.0)
    else:
        lo = (words >> (4 * s)) & 0xF
        blk = j // (256 // SB)
        d = tl.load(d_ptr + n * s_d + blk, mask=ok, other=0.0).to(tl.float32)
        sc = tl.load(sc_ptr + n * s_sc + j, mask=ok, other=0)
        if QT != 2:
            sc, mn = planar_scale_min(sc.to(tl.int32), planar_top_bits(mn_ptr, n, j, ok, s_sc))
        dl = d * sc.to(tl.float32)
        if QT == 2:
            q6 = lo | (((hi >> (2 * s)) & 3) << 4)
            f = ((q6 << 17) | one).to(tl.float32, bitcast=True)
            val = dl * (f * 64.0 - 96.0)
        else:
            if QT == 0:
                f = ((lo << 19) | one).to(tl.float32, bitcast=True)
                qf = f * 16.0 - 16.0
            else:
                q5 = lo | (((hi >> s) & 1) << 4)
                f = ((q5 << 18) | one).to(tl.float32, bitcast=True)
                qf = f * 32.0 - 32.0
            dm = tl.load(dm_ptr + n * s_d + blk, mask=ok, other=0.0).to(tl.float32)
            val = dl * qf - dm * mn.to(tl.float32)
    return val


@triton.jit
def _subblock_fast(q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, n, j, r, ok, s_q, s_qh, s_sc, s_d, one,
                   QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr):
    s = r // WPS
    words, hi = load_words(q_ptr, qh_ptr, n, j * WPS + r % WPS, ok, s_q, s_qh, QT)
    if QT == 3:
        b = ((words >> (8 * s)) & 0xFF) << 15
    elif QT == 0:
        b = ((words >> (4 * s)) & 0xF) << 19
    elif QT == 1:
        b = (((words >> (4 * s)) & 0xF) | (((hi >> s) & 1) << 4)) << 18
    else:
        b = (((words >> (4 * s)) & 0xF) | (((hi >> (2 * s)) & 3) << 4)) << 17
    f = (b | one).to(tl.float32, bitcast=True)
    c1, c0 = sub_scales(sc_ptr, mn_ptr, d_ptr, dm_ptr, n, j, ok, s_sc, s_d, QT, SB)
    return c1 * f + c0


@triton.jit
def dp4a(a, b, c, A_SIGNED: tl.constexpr, ASM: tl.constexpr):
    """c + sum over the four bytes of a * b (b signed; a unsigned unless A_SIGNED)."""
    if ASM:
        if A_SIGNED:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    for i in tl.static_range(4):
        ab = (a >> (8 * i)) & 0xFF
        if A_SIGNED:
            ab = (ab ^ 0x80) - 0x80
        bb = (((b >> (8 * i)) & 0xFF) ^ 0x80) - 0x80
        c += ab * bb
    return c


@triton.jit
def spread_pairs(t):
    """2-bit fields at bits 0, 4, 8, 12 of t -> bits 4, 12, 20, 28 (the top bits of four 6-bit bytes)."""
    t = t & 0x3333
    t = (t | (t << 8)) & 0x00330033
    t = (t | (t << 4)) & 0x03030303
    return t << 4


def qt_code(qtype) -> int:
    from gguf import GGMLQuantizationType as QType

    return {QType.Q4_K: 0, QType.Q5_K: 1, QType.Q6_K: 2, QType.Q8_0: 3}[QType(qtype)]


__all__ = ["GEOMETRY", "dp4a", "load_words", "planar_scale_min", "planar_top_bits", "qt_code", "spread_pairs", "slice_f",
           "sub_scales", "subblock_values", "triton"]
