"""Streaming dequantize-GEMV for planar GGUF weights (Q4_K, Q5_K, Q6_K, Q8_0) at decode: y = x @ W^T + b.

At batch 1 every weight byte is read once, so the kernel must (1) keep enough bytes in flight to
cover DRAM latency on 132 SMs and (2) spend few instructions per weight: an H200 streams ~7e12 Q4_K
weights/s and issues ~3.4e13 thread-instructions/s, of which only half can be integer/logic ops.
The first GEMV (gguf_gemv.py) spends 5.2 SASS instructions per Q4_K weight, a good part of them
outside the arithmetic: per-iteration cross-thread sums of x (shuffles, shared memory, barriers)
and layout conversions. Here:

* Words are loaded 2-D, [BN rows, NS*WPS words] (a row's words one contiguous run: 16-byte loads,
  a warp reading whole 128-byte row segments), and viewed as [BN, NS sub-blocks, WPS words]; the
  activations as [1, NS, WPS] in the same layout, so they broadcast over rows for free. A thread
  owns whole sub-blocks (Q4_K/Q5_K one, Q6_K two, Q8_0 half of one) of R = BN * NS * WPS /
  (128 * num_warps) rows; the per-sub-block sums stay in the thread. NS of 16-32 (a warp reading
  256-512 contiguous bytes of a row) measured faster than 8 for the big Q4_K/Q6_K matrices. Only the
  scales ([BN, NS], a few bytes per row) change layout once per tile. Q4_K/Q5_K's 6-bit scales and mins
  (the file's 12 bytes a super-block, gguf_pack.py) are loaded as words and decoded four sub-blocks an
  integer op (_k4_words, _planar_scale_min_f32).
* Per weight: the level goes into the mantissa of 1.0f (f = 1 + q / 2^bits: a shift and a LOP3;
  Q4_K needs only 3 shifts per 8 nibbles, see _row_dot_q4k) and one FMA adds f * x into a per-word
  partial; the sub-block's scale and min meet the partial sums once per sub-block and row. The
  activations are loaded and converted once per thread and reused over its R rows.
* The next tile's words and scales are loaded before this tile is computed (register double
  buffering), so each thread has two tiles of loads in flight while it computes; or, with
  num_stages > 1, Triton's software pipeline carries the tiles through shared memory (cp.async), which
  costs no registers for the bytes in flight.
* int8=True (all four types): activations as int8 per sub-block and dp4a on the weights
  (_row_dot_int8), quantized by each thread for its rows, or (xq=True) once beforehand by gguf_xq.py
  (_row_dot_xq).
* Programmatic dependent launch (kernels/pdl.py; on by default on sm_90+): the first tile's weight loads
  go out before the wait for the kernel that produced the activations; it signals its dependents at its
  loop's end. (Signalling at the start even where the whole grid fits in one wave lost on the H200:
  Devstral Q4_K_M 192.3 -> 158.6 tok/s, Mixtral 293.3 -> 246.7, so that variant was removed.)
* Masks only where the shape needs them (EVEN_N / EVEN_K are constexprs).
* Small N (attn k/v, o, ffn_down) is covered by split-K with the deterministic one-launch epilogue
  of gguf_splitk.py, or by stream-K (stream=P): P programs per SM, each an equal contiguous run of the
  (row tile, K-tile) units, so the grid is whole waves whatever the shape; a row tile shared by several
  programs is summed by the last of them, in program order (gguf_splitk.store_share). On the H200 it
  won Q6_K ffn_down (50.2 us against 51.5 for the best split) and lost Q4_K ffn_down and gate/up by 1-6%.

`reference()` below is the same computation in PyTorch (the CPU twin the tests compare against
quant.dequantize + matmul). kernels/sass_stats.py compiles this kernel for sm_90 without a GPU and
counts SASS instructions per weight in its loop (tests/test_kernels_gguf_wide.py bounds it): Q4_K
3.65, Q8_0 4.3, Q5_K 6.8, Q6_K 7.2 at 8 rows per thread, against 5.2, 4.7 and 11.2 for gguf_gemv.py
(Q4_K 3.75 and Q5_K 6.9 since their scales and mins are packed in 12 bytes a super-block).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from devstral.kernels import gguf_xq, pdl
from devstral.kernels.gguf_decode import (
    GEOMETRY,
    ONE_F32_BITS,
    XOR_SIGN_BYTES,
    dp4a,
    planar_scale_min,
    qt_code,
)
from devstral.kernels.gguf_gemv import field_args
from devstral.kernels.gguf_pack import PackedGGUF
from devstral.kernels.gguf_splitk import (
    MAX_TILES,
    counters,
    store_output,
    store_share,
    usable_split,
    workspace,
)
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait

MAX_BM = 4  # activation rows per program; more rows run as more programs along grid axis 2


@triton.jit
def _and_or(a, mask, b, ASM: tl.constexpr):
    """(a & mask) | b as one LOP3. Written as and/or, ptxas regroups (a & m1) | (h & m2) | one into
    three LOP3s; pinned in PTX it is two. Plain ops under Triton's interpreter (no PTX there)."""
    if ASM:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [a, mask, b],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return (a & mask) | b


@triton.jit
def _level_f(words, hi, one, S: tl.constexpr, QT: tl.constexpr, ASM: tl.constexpr):
    """Value position S of every word as f = 1 + q / 2^bits in fp32 (the mantissa trick)."""
    if QT == 0:  # Q4_K: nibble S -> mantissa bits 19..22
        if 4 * S <= 19:
            b = ((words << (19 - 4 * S)) & (0xF << 19)) | one
        else:
            b = ((words >> (4 * S - 19)) & (0xF << 19)) | one
    elif QT == 1:  # Q5_K: nibble + 1 high bit -> bits 18..22
        if 4 * S <= 18:
            lo = words << (18 - 4 * S)
        else:
            lo = words >> (4 * S - 18)
        b = _and_or(lo, 0xF << 18, _and_or(hi << (22 - S), 1 << 22, one, ASM), ASM)
    elif QT == 2:  # Q6_K: nibble + 2 high bits -> bits 17..22
        if 4 * S <= 17:
            lo = words << (17 - 4 * S)
        else:
            lo = words >> (4 * S - 17)
        if 2 * S <= 21:
            h = hi << (21 - 2 * S)
        else:
            h = hi >> (2 * S - 21)
        b = _and_or(lo, 0xF << 17, _and_or(h, 3 << 21, one, ASM), ASM)
    else:  # Q8_0: byte S (sign bit pre-flipped) -> bits 15..22
        if 8 * S <= 15:
            b = ((words << (15 - 8 * S)) & (0xFF << 15)) | one
        else:
            b = ((words >> (8 * S - 15)) & (0xFF << 15)) | one
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _load_scales(sc_ptr, mn_ptr, d_ptr, dm_ptr, n2, row_ok, t, n_sub, s_sc, s_d, QT: tl.constexpr, SB: tl.constexpr,
                 NS: tl.constexpr, EVEN: tl.constexpr):
    """Raw scale fields of tile t's NS sub-blocks of rows n2 ([BN, 1]; row_ok: n2 < N); decoded later by _scales.
    Q4_K/Q5_K's sc and mn planes come as words (_k4_words), the other fields one element a sub-block ([BN, NS])."""
    j2 = t * NS + tl.arange(0, NS)[None, :]
    ok = row_ok & (j2 < n_sub)
    if QT == 3:
        if EVEN:
            d = tl.load(d_ptr + n2 * s_d + j2)
        else:
            d = tl.load(d_ptr + n2 * s_d + j2, mask=ok, other=0.0)
        sc = d
        dm = d
        mn = d
    else:
        blk = j2 // (256 // SB)
        if EVEN:
            d = tl.load(d_ptr + n2 * s_d + blk)
        else:
            d = tl.load(d_ptr + n2 * s_d + blk, mask=ok, other=0.0)
        if QT == 2:
            if EVEN:
                sc = tl.load(sc_ptr + n2 * s_sc + j2)
            else:
                sc = tl.load(sc_ptr + n2 * s_sc + j2, mask=ok, other=0)
            dm = d
            mn = sc
        else:
            if EVEN:
                dm = tl.load(dm_ptr + n2 * s_d + blk)
            else:
                dm = tl.load(dm_ptr + n2 * s_d + blk, mask=ok, other=0.0)
            sc, mn = _k4_words(sc_ptr, mn_ptr, n2, row_ok, t, n_sub, s_sc, NS, EVEN)
    return d, sc, dm, mn


@triton.jit
def _k4_words(sc_ptr, mn_ptr, n2, row_ok, t, n_sub, s_sc, NS: tl.constexpr, EVEN: tl.constexpr):
    """Q4_K/Q5_K's sc and mn planes for tile t as words of G = min(NS, 4) sub-blocks, [BN, NS // G] each: G sc bytes
    (an int32 or uint16 word) and G mn nibbles (a uint16 word or a byte). _scales then decodes G sub-blocks an integer
    op (planar_scale_min on whole words), and a thread loads a row's scales a few bytes at a time. A row holds a multiple
    of 8 sub-blocks (whole super-blocks), so a word is all in the row or all past it."""
    G: tl.constexpr = min(NS, 4)
    tl.static_assert(G >= 2, "Q4_K/Q5_K tiles of 2 sub-blocks or more")
    if G == 4:
        sc_t: tl.constexpr = tl.int32
        mn_t: tl.constexpr = tl.uint16
    else:
        sc_t: tl.constexpr = tl.uint16
        mn_t: tl.constexpr = tl.uint8
    w2 = t * (NS // G) + tl.arange(0, NS // G)[None, :]
    sc_w = sc_ptr.to(tl.pointer_type(sc_t)) + n2 * (s_sc // G) + w2
    mn_w = mn_ptr.to(tl.pointer_type(mn_t)) + n2 * (s_sc // G) + w2  # mn rows: half the sc plane's bytes
    if EVEN:
        sc = tl.load(sc_w)
        mn = tl.load(mn_w)
    else:
        w_ok = row_ok & (w2 * G < n_sub)
        sc = tl.load(sc_w, mask=w_ok, other=0)
        mn = tl.load(mn_w, mask=w_ok, other=0)
    return sc, mn


@triton.jit
def _k4_values(w, BN: tl.constexpr, NS: tl.constexpr):
    """Words of G = min(NS, 4) 6-bit values (byte k: sub-block G i + k) -> fp32 [BN, NS], no byte extracted: byte k
    or-ed into the mantissa of 2^23 where it lies is 2^23 + v 256^k, and one FADD or FMA by a power of two takes v
    out, exactly. Byte 3 is shifted to byte 2's place first (its bits would reach the exponent)."""
    G: tl.constexpr = min(NS, 4)
    f0 = ((w & 0x3F) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    f1 = tl.fma(((w & 0x3F00) | 0x4B000000).to(tl.float32, bitcast=True), 1.0 / 256.0, -32768.0)
    if G == 2:
        return tl.reshape(tl.join(f0, f1), (BN, NS))
    f2 = tl.fma(((w & 0x3F0000) | 0x4B000000).to(tl.float32, bitcast=True), 1.0 / 65536.0, -128.0)
    f3 = tl.fma((((w >> 8) & 0x3F0000) | 0x4B000000).to(tl.float32, bitcast=True), 1.0 / 65536.0, -128.0)
    return tl.reshape(tl.join(tl.join(f0, f2), tl.join(f1, f3)), (BN, NS))  # [.., word, k // 2, k % 2]


@triton.jit
def _planar_scale_min_f32(sc, mn, BN: tl.constexpr, NS: tl.constexpr):
    """_k4_words' sc and mn words -> Q4_K/Q5_K's 6-bit sub-block scales and mins, fp32 [BN, NS] each."""
    # the mn word's G nibbles (nibble k: sub-block G i + k) to the low nibbles of bytes 0..G-1 (planar_scale_min's hl):
    # a 16-bit word's two bytes to bytes 0 and 2, then each byte's high nibble into the next byte's low one (what
    # is left in the high nibbles planar_scale_min ignores)
    x = mn.to(tl.int32)
    x = (x | (x << 8)) & 0x00FF00FF
    scale, mins = planar_scale_min(sc.to(tl.int32), x | (x << 4))
    return _k4_values(scale, BN, NS), _k4_values(mins, BN, NS)


@triton.jit
def _scales(d, sc, dm, mn, QT: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr):
    """(c1, c0) per sub-block as the row dots use them: weight = c1 * f + c0 for f from _level_f
    (Q5_K, Q6_K, Q8_0); Q4_K as _row_dot_q4k says. [BN, NS] each, from _load_scales' fields."""
    d = d.to(tl.float32)
    if QT == 3:
        c1 = 256.0 * d  # q = 256 f - 384
        c0 = -384.0 * d
    elif QT == 2:
        c1 = 64.0 * (d * sc.to(tl.float32))  # int8 scale: q - 32 = 64 f - 96
        c0 = -1.5 * c1
    else:
        scale, mins = _planar_scale_min_f32(sc, mn, BN, NS)
        if QT == 0:
            c1 = 128.0 * (d * scale)  # _row_dot_q4k: weight = d sc q - dmin mn
            c0 = -(dm.to(tl.float32) * mins)
        else:
            c1 = 32.0 * (d * scale)  # Q5_K
            c0 = -(c1 + dm.to(tl.float32) * mins)
    return c1, c0


@triton.jit
def _load_words(q_ptr, qh_ptr, n2, w2, ok, s_q, s_qh, QT: tl.constexpr, EVEN: tl.constexpr,
                UNPACK: tl.constexpr = False):
    """Words [BN, NS * WPS]: 2-D so that a row's words are one contiguous run (16-byte loads, a
    warp reading whole 128-byte row segments).
    UNPACK (compiled int8 row dots): Q5_K's high-bit bytes widened by PTX as they arrive, one
    instruction per word; the compiler carries them through the loop as 8-bit values and widens each
    with two at its use. The float row dot keeps that: its 8-bit values share registers two by two,
    and widened ones make it spill at 8 rows a thread."""
    # .cg (L2 only): each word is read once a step, and L1 keeps the fp16 super-block scales and sc/mn runs
    # that neighbouring threads and tiles share (H200, three A/Bs in sessions 18-19: +0.4-0.5% decode)
    if EVEN:
        words = tl.load(q_ptr + n2 * s_q + w2, cache_modifier=".cg")
    else:
        words = tl.load(q_ptr + n2 * s_q + w2, mask=ok, other=0, cache_modifier=".cg")
    if QT == 1:
        # Q5_K's bytes in runs of four as far as the compiler knows: told the truth (32 contiguous),
        # the coalescing pass gives this load 16 bytes a thread, and so the whole tile 16 words (four
        # sub-blocks) of 2 rows a thread instead of one sub-block of 8 rows: 4x the activation work
        # per weight, and 255 registers
        h_off = tl.max_contiguous(n2 * s_qh + w2, [1, 4])
        if EVEN:
            hb = tl.load(qh_ptr + h_off)
        else:
            hb = tl.load(qh_ptr + h_off, mask=ok, other=0)
        if UNPACK:
            hi = tl.inline_asm_elementwise(BYTES_PTX, "=r,=r,=r,=r,r", [hb], dtype=tl.int32, is_pure=True,
                                           pack=4)
        else:
            hi = hb.to(tl.int32)
    elif QT == 2:
        # Q6_K's 16-bit high-bit words likewise in runs of four (Q5_K above): told the truth, the layout
        # pass widens this load and the tile's layout with it (offline SASS per weight at BN 128, NS 8:
        # int8 6.21 -> 4.84, float 7.62 -> 7.17, xq 3.38 -> 3.29; xq at 512-weight tiles 2-3% more)
        h_off = tl.max_contiguous(n2 * s_qh + w2, [1, 4])
        if EVEN:
            hi = tl.load(qh_ptr + h_off).to(tl.int32)
        else:
            hi = tl.load(qh_ptr + h_off, mask=ok, other=0).to(tl.int32)
    else:
        hi = words
    return words, hi


@triton.jit
def _x_slice(xp, x_ok, NS: tl.constexpr, WPS: tl.constexpr, EVEN: tl.constexpr):
    """Activations for one value position of every word: [1, NS, WPS] fp32."""
    if EVEN:
        xs = tl.load(xp)
    else:
        xs = tl.load(xp, mask=x_ok, other=0.0)
    return tl.reshape(xs.to(tl.float32), (1, NS, WPS))


@triton.jit
def _row_dot_q4k(words, one, xp, x_ok, c1, c0, NS: tl.constexpr, WPS: tl.constexpr, EVEN: tl.constexpr):
    """Q4_K with three shifts per eight nibbles instead of eight.

    A nibble needs no shift when it already sits at mantissa bits 12..15 (f = 1 + q 2^-11) or
    16..19 (f = 1 + q 2^-7): fp32 keeps >= 13 bits of q x either way. Four copies of the word --
    w, w << 8, w >> 8 and w rotated by 16 -- bring every nibble to one of the two places: odd
    values (3, 1, 5, 7) to bits 12..15, even values (4, 2, 6, 0) to 16..19. The two classes have
    their own partial sums: sum q x = 2^7 (16 (P_odd - X_odd) + P_even - X_even).
    c1 here is 2^7 d sc and c0 is -dmin mn (see _scales)."""
    w8l = words << 8
    w8r = words >> 8
    rot = (words << 16) | ((words >> 16) & 0xFFFF)
    x0 = _x_slice(xp, x_ok, NS, WPS, EVEN)
    x1 = _x_slice(xp + WPS, x_ok, NS, WPS, EVEN)
    x2 = _x_slice(xp + 2 * WPS, x_ok, NS, WPS, EVEN)
    x3 = _x_slice(xp + 3 * WPS, x_ok, NS, WPS, EVEN)
    x4 = _x_slice(xp + 4 * WPS, x_ok, NS, WPS, EVEN)
    x5 = _x_slice(xp + 5 * WPS, x_ok, NS, WPS, EVEN)
    x6 = _x_slice(xp + 6 * WPS, x_ok, NS, WPS, EVEN)
    x7 = _x_slice(xp + 7 * WPS, x_ok, NS, WPS, EVEN)
    p_odd = ((words & 0xF000) | one).to(tl.float32, bitcast=True) * x3
    p_odd += ((w8l & 0xF000) | one).to(tl.float32, bitcast=True) * x1
    p_odd += ((w8r & 0xF000) | one).to(tl.float32, bitcast=True) * x5
    p_odd += ((rot & 0xF000) | one).to(tl.float32, bitcast=True) * x7
    p_even = ((words & 0xF0000) | one).to(tl.float32, bitcast=True) * x4
    p_even += ((w8l & 0xF0000) | one).to(tl.float32, bitcast=True) * x2
    p_even += ((w8r & 0xF0000) | one).to(tl.float32, bitcast=True) * x6
    p_even += ((rot & 0xF0000) | one).to(tl.float32, bitcast=True) * x0
    x_odd = (x1 + x3) + (x5 + x7)
    x_even = (x0 + x2) + (x4 + x6)
    t = tl.sum(16.0 * p_odd + p_even, axis=2)
    xc = tl.sum(16.0 * x_odd + x_even, axis=2)
    xs = tl.sum(x_odd + x_even, axis=2)
    return c1 * (t - xc) + c0 * xs


@triton.jit
def _row_dot(words, hi, one, xp, x_ok, c1, c0, QT: tl.constexpr, E: tl.constexpr, NS: tl.constexpr,
             WPS: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr, INT8: tl.constexpr = False):
    if INT8:
        return _row_dot_int8(words, hi, xp, x_ok, c1, c0, QT, NS, WPS, EVEN, ASM)
    if QT == 0:
        return _row_dot_q4k(words, one, xp, x_ok, c1, c0, NS, WPS, EVEN)
    return _row_dot_generic(words, hi, one, xp, x_ok, c1, c0, QT, E, NS, WPS, EVEN, ASM)


@triton.jit
def _int8_bits(x, inv):
    """round(x * inv) as the low byte of an int32 (two's complement): adding 1.5 * 2^23 leaves the
    rounded integer in the low mantissa bits (one FFMA; no float->int conversion, a slow instruction)."""
    return (x * inv + 12582912.0).to(tl.int32, bitcast=True)


@triton.jit
def _pack4(a, b, c, d, ASM: tl.constexpr):
    """The low bytes of a, b, c, d as one word (a in byte 0): three PRMTs."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t0, t1; prmt.b32 t0, $1, $2, 0x0040; prmt.b32 t1, $3, $4, 0x0040; "
            "prmt.b32 $0, t0, t1, 0x5410; }", "=r,r,r,r,r", [a, b, c, d], dtype=tl.int32, is_pure=True, pack=1)
    return (a & 0xFF) | ((b & 0xFF) << 8) | ((c & 0xFF) << 16) | (d << 24)


@triton.jit
def _x_int8(x0, x1, x2, x3, amax):
    """The four slices' int8 bits (see _int8_bits) at the sub-block scale amax / 127."""
    inv = (127.0 / tl.maximum(amax, 1e-30))[:, :, None]  # all-zero sub-blocks stay zero
    return _int8_bits(x0, inv), _int8_bits(x1, inv), _int8_bits(x2, inv), _int8_bits(x3, inv)


@triton.jit
def _absmax4(x0, x1, x2, x3):
    return tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3)))


@triton.jit
def _q6k_high_pairs(hi, ASM: tl.constexpr):
    """Q6_K's high bits as the bits 4..5 of each byte of the two dp4a operands (value positions 0, 2,
    4, 6 and 1, 3, 5, 7). hi holds value s's two bits at 2s..2s+1: bytes B0 = values 0-3, B1 = 4-7.
    One PRMT makes [B0, B0, B1, B1]; then each byte needs its field at bits 4..5, which is a shift
    of the whole word by +4 or 0 (even values) and +2 or -2 (odd values), alternating by byte: two
    shifted copies merged under a constant mask (one LOP3). About 7 instructions for both operands
    where spreading the pairs bit by bit takes 14."""
    if ASM:
        u = tl.inline_asm_elementwise("prmt.b32 $0, $1, $1, 0x1100;", "=r,r", [hi], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        b0 = hi & 0xFF
        b1 = (hi >> 8) & 0xFF
        u = b0 | (b0 << 8) | (b1 << 16) | (b1 << 24)
    sel = 0x00300030  # bytes 0 and 2 take the first copy, bytes 1 and 3 the second
    h_lo = ((u << 4) & sel) | (u & (0x30303030 ^ sel))
    h_hi = ((u << 2) & sel) | ((u >> 2) & (0x30303030 ^ sel))
    return h_lo, h_hi


# Q5_K's high bits (one byte per word, bit s: value s) as the signs of bytes. A multiply by these lays four
# copies of the byte ten bits apart -- none overlap, so nothing carries -- with bits 6, 4, 2, 0 (EVEN) or
# 7, 5, 3, 1 (ODD) at the tops of bytes 0..3, where a sign-replicating PRMT reads them
Q5K_SPREAD_EVEN = tl.constexpr(-2145384446)  # 0x80200802: copies at bits 1, 11, 21, 31
Q5K_SPREAD_ODD = tl.constexpr(0x40100401)  # copies at bits 0, 10, 20, 30
HIGH_NIBBLES = tl.constexpr(-252645136)  # 0xF0F0F0F0 as int32
# byte b of $0: bit 7 of byte 3 - b of $1, replicated over the byte (selector nibbles 8 + byte)
SIGNS_REVERSED_PTX = tl.constexpr("prmt.b32 $0, $1, $1, 0x89AB;")
# (nib & 0x0F0F0F0F) | (~r & 0xF0F0F0F0): the truth table of that function of ($1, $2, the constant)
NIBBLES_UNDER_PTX = tl.constexpr("lop3.b32 $0, $1, $2, 0x0F0F0F0F, 0xB1;")
# four bytes of one register ($4: elements 0..3 in bytes 0..3) zero-extended to $0..$3
BYTES_PTX = tl.constexpr("and.b32 $0, $4, 0xFF; prmt.b32 $1, $4, 0, 0x4441; prmt.b32 $2, $4, 0, 0x4442; "
                         "shr.u32 $3, $4, 24;")


@triton.jit
def _sign_bytes_reversed(p, ASM: tl.constexpr):
    """Byte b of the result: 0xFF where bit 7 of byte 3 - b of p is set, else 0x00 (one PRMT)."""
    if ASM:
        return tl.inline_asm_elementwise(SIGNS_REVERSED_PTX, "=r,r", [p], dtype=tl.int32, is_pure=True,
                                         pack=1)
    r = (p >> 31) & 0xFF  # int32 >> is arithmetic: each term is all ones or zero before its mask
    r = r | (((p << 8) >> 31) & 0xFF00)
    r = r | (((p << 16) >> 31) & 0xFF0000)
    return r | (((p << 24) >> 31) & -16777216)  # 0xFF000000


@triton.jit
def _nibbles_under(nib, r, ASM: tl.constexpr):
    """The low nibble of each byte of nib under bits 4..7 of ~r: one LOP3 (written as and/or/not,
    LLVM turns it into and, xor and and-or, which ptxas keeps as three)."""
    if ASM:
        return tl.inline_asm_elementwise(NIBBLES_UNDER_PTX, "=r,r,r", [nib, r], dtype=tl.int32, is_pure=True,
                                         pack=1)
    return (nib & 0x0F0F0F0F) | (~r & HIGH_NIBBLES)


@triton.jit
def _q5k_operands(words, hi, ASM: tl.constexpr):
    """Q5_K's two dp4a operands (value positions 0, 2, 4, 6 and 1, 3, 5, 7) as signed bytes q - 16:
    the nibble in bits 0..3 and the high bit, inverted, in all of bits 4..7 (as int8: n + 16 h - 16).
    The high bit alone at bit 4 of its byte, for unsigned levels, would take a mask, a multiply and a
    mask per operand (no multiply moves four of hi's bits to bit 4 of their bytes without other bits'
    partial products landing next to them); a byte full of it needs the bit only at the top of some
    byte, which one multiply gives (Q5K_SPREAD_*) and one PRMT spreads. Seven instructions per word
    for both operands, against three for Q4_K's nibbles."""
    r_even = _sign_bytes_reversed(hi * Q5K_SPREAD_EVEN, ASM)
    r_odd = _sign_bytes_reversed(hi * Q5K_SPREAD_ODD, ASM)
    return _nibbles_under(words, r_even, ASM), _nibbles_under(words >> 4, r_odd, ASM)


@triton.jit
def _weight_operands(words, hi, QT: tl.constexpr, ASM: tl.constexpr):
    """A word of eight levels as two dp4a operands, value positions 0, 2, 4, 6 and 1, 3, 5, 7 (byte b:
    value 2b or 2b + 1): Q4_K's nibbles and Q6_K's levels + 32 unsigned, Q5_K's levels - 16 signed."""
    if QT == 1:
        return _q5k_operands(words, hi, ASM)
    w_lo = words & 0x0F0F0F0F
    w_hi = (words >> 4) & 0x0F0F0F0F
    if QT == 2:  # Q6_K: the two high bits of each level into bits 4..5 of its byte
        h_lo, h_hi = _q6k_high_pairs(hi, ASM)
        w_lo = w_lo | h_lo
        w_hi = w_hi | h_hi
    return w_lo, w_hi


@triton.jit
def _row_dot_int8(words, hi, xp, x_ok, c1, c0, QT: tl.constexpr, NS: tl.constexpr, WPS: tl.constexpr,
                  EVEN: tl.constexpr, ASM: tl.constexpr):
    """The sub-block sums with int8 activations and dp4a: [BN, NS].

    Each thread already holds its sub-blocks' activations (the [1, NS, WPS] slices), so it quantizes
    them itself, per sub-block (absmax / 127, as llama.cpp's q8_1), once for its R rows. Then a word
    of eight nibbles is two dp4a operands (w & 0x0F0F0F0F holds value positions 0, 2, 4, 6;
    (w >> 4) & 0x0F0F0F0F positions 1, 3, 5, 7): five instructions per eight weights where the float
    decode needs about twenty (Q5_K's high bits add five, _q5k_operands). The activations' bytes are
    packed in the same value order. c1 is _scales' (Q4_K 2^7 d sc, Q5_K 2^5 d sc, Q6_K 2^6 d sc, Q8_0
    2^8 d); the power of two is folded into the activation scale. Q4_K's min term and Q5_K's (with the
    16 d sc its signed levels leave out) use the exact float sum of the sub-block's activations; Q6_K's
    offset (levels stored as q + 32) the integer sum of the int8 levels."""
    x0 = _x_slice(xp, x_ok, NS, WPS, EVEN)
    x1 = _x_slice(xp + WPS, x_ok, NS, WPS, EVEN)
    x2 = _x_slice(xp + 2 * WPS, x_ok, NS, WPS, EVEN)
    x3 = _x_slice(xp + 3 * WPS, x_ok, NS, WPS, EVEN)
    zero = tl.zeros(words.shape, dtype=tl.int32)
    SIGNED: tl.constexpr = QT == 1  # Q5_K's operands are signed (_q5k_operands)
    if QT == 3:  # Q8_0: the word's four bytes are signed levels of value positions 0..3
        amax = tl.max(_absmax4(x0, x1, x2, x3), axis=2)  # [1, NS]
        b0, b1, b2, b3 = _x_int8(x0, x1, x2, x3, amax)
        s = dp4a(words, tl.broadcast_to(_pack4(b0, b1, b2, b3, ASM), words.shape), zero, True, ASM)
        res = (c1 * (amax * (1.0 / (127.0 * 256.0)))) * tl.sum(s, axis=2).to(tl.float32)
    else:
        x4 = _x_slice(xp + 4 * WPS, x_ok, NS, WPS, EVEN)
        x5 = _x_slice(xp + 5 * WPS, x_ok, NS, WPS, EVEN)
        x6 = _x_slice(xp + 6 * WPS, x_ok, NS, WPS, EVEN)
        x7 = _x_slice(xp + 7 * WPS, x_ok, NS, WPS, EVEN)
        amax = tl.max(tl.maximum(_absmax4(x0, x1, x2, x3), _absmax4(x4, x5, x6, x7)), axis=2)
        b0, b1, b2, b3 = _x_int8(x0, x1, x2, x3, amax)
        b4, b5, b6, b7 = _x_int8(x4, x5, x6, x7, amax)
        x_lo = tl.broadcast_to(_pack4(b0, b2, b4, b6, ASM), words.shape)
        x_hi = tl.broadcast_to(_pack4(b1, b3, b5, b7, ASM), words.shape)
        w_lo, w_hi = _weight_operands(words, hi, QT, ASM)
        s = dp4a(w_hi, x_hi, dp4a(w_lo, x_lo, zero, SIGNED, ASM), SIGNED, ASM)
        isum = tl.sum(s, axis=2).to(tl.float32)  # [BN, NS]
        if QT == 2:
            # the sub-block's int8 levels summed (each b is 0x4B400000 + level)
            lv = ((b0 - 0x4B400000) + (b1 - 0x4B400000)) + ((b2 - 0x4B400000) + (b3 - 0x4B400000))
            lv += ((b4 - 0x4B400000) + (b5 - 0x4B400000)) + ((b6 - 0x4B400000) + (b7 - 0x4B400000))
            qsum = tl.sum(lv, axis=2).to(tl.float32)
            res = (c1 * (amax * (1.0 / (127.0 * 64.0)))) * (isum - 32.0 * qsum)
        else:
            xsum = tl.sum(((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), axis=2)
            if QT == 1:
                # Q5_K: weight = d sc (q - 16) + (16 d sc - dmin mn); c1 = 2^5 d sc, c0 = -(c1 + dmin mn)
                res = (c1 * (amax * (1.0 / (127.0 * 32.0)))) * isum + (c0 + 1.5 * c1) * xsum
            else:
                # Q4_K: weight = d sc q - dmin mn; c1 = 2^7 d sc, c0 = -dmin mn
                res = (c1 * (amax * (1.0 / (127.0 * 128.0)))) * isum + c0 * xsum
    return res


@triton.jit
def _row_dot_xq(words, hi, xq, t, row_ok, K, c1, c0, QT: tl.constexpr, SB: tl.constexpr, NS: tl.constexpr,
                WPS: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr):
    """The sub-block sums [BN, NS] against activations quantized beforehand (gguf_xq.py: int8 bytes
    already in the dp4a operands' order, the block's scale and sums): the int8 row dot without its
    per-thread quantization. xq: this activation row's first block; row_ok: the row exists."""
    jn = t * NS + tl.arange(0, NS)  # the tile's sub-blocks
    if QT == 2:  # sub-blocks of 16: two to an activation block of 32
        bp = xq + (jn // 2) * 12
        wp = bp + 4 * (jn % 2)
    else:
        bp = xq + jn * 12
        wp = bp
    if EVEN_K:
        ok = row_ok & (jn >= 0)
    else:
        ok = row_ok & (jn * SB < K)
    wi = tl.arange(0, WPS)[None, None, :]
    w3 = wp[None, :, None] + wi
    ok3 = ok[None, :, None]
    xs = tl.load(bp + 8, mask=ok, other=0).to(tl.float32, bitcast=True)[None, :]
    zero = tl.zeros(words.shape, dtype=tl.int32)
    if QT == 3:
        xw = tl.broadcast_to(tl.load(w3, mask=ok3, other=0), words.shape)
        isum = tl.sum(dp4a(words, xw, zero, True, ASM), axis=2).to(tl.float32)
        return (c1 * (xs * (1.0 / 256.0))) * isum
    x_lo = tl.broadcast_to(tl.load(w3, mask=ok3, other=0), words.shape)
    x_hi = tl.broadcast_to(tl.load(w3 + WPS, mask=ok3, other=0), words.shape)  # Q4_K/Q5_K 4-7, Q6_K 2-3
    w_lo, w_hi = _weight_operands(words, hi, QT, ASM)
    SIGNED: tl.constexpr = QT == 1  # Q5_K's operands are signed (_q5k_operands)
    isum = tl.sum(dp4a(w_hi, x_hi, dp4a(w_lo, x_lo, zero, SIGNED, ASM), SIGNED, ASM), axis=2).to(tl.float32)
    if QT == 2:
        lsum = tl.load(bp + 10 + jn % 2, mask=ok, other=0).to(tl.float32)[None, :]
        return (c1 * (xs * (1.0 / 64.0))) * (isum - 32.0 * lsum)
    xsum = tl.load(bp + 9, mask=ok, other=0).to(tl.float32, bitcast=True)[None, :]
    if QT == 1:  # Q5_K: levels - 16 (see _row_dot_int8)
        return (c1 * (xs * (1.0 / 32.0))) * isum + (c0 + 1.5 * c1) * xsum
    return (c1 * (xs * (1.0 / 128.0))) * isum + c0 * xsum


@triton.jit
def _row_dot_generic(words, hi, one, xp, x_ok, c1, c0, QT: tl.constexpr, E: tl.constexpr, NS: tl.constexpr,
                     WPS: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr):
    """sum over each sub-block of the weights times x (one activation row): [BN, NS].

    words/hi are [BN, NS, WPS]; per weight one mantissa decode and one FMA; per sub-block
    c1 * sum(f x) + c0 * sum(x)."""
    xs = _x_slice(xp, x_ok, NS, WPS, EVEN)
    p = _level_f(words, hi, one, 0, QT, ASM) * xs
    xw = xs
    for s in tl.static_range(1, E):
        xs = _x_slice(xp + s * WPS, x_ok, NS, WPS, EVEN)
        p += _level_f(words, hi, one, s, QT, ASM) * xs
        xw += xs
    return c1 * tl.sum(p, axis=2) + c0 * tl.sum(xw, axis=2)


@triton.jit
def _tile(acc0, acc1, acc2, acc3, words, hi, d, sc, dm, mn, t, xp0, x_in, s_xm, m0, M, K, one,
          QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, E: tl.constexpr, BN: tl.constexpr,
          NS: tl.constexpr, BM: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr, INT8: tl.constexpr,
          XQ: tl.constexpr):
    """One tile's row dots added into the BM accumulators (XQ: xp0 is the first row's quantized blocks)."""
    if QT == 3 and not INT8:
        words = words ^ XOR_SIGN_BYTES
    w3 = tl.reshape(words, (BN, NS, WPS))
    h3 = tl.reshape(hi, (BN, NS, WPS))
    c1, c0 = _scales(d, sc, dm, mn, QT, BN, NS)
    if XQ:
        acc0 += _row_dot_xq(w3, h3, xp0, t, m0 < M, K, c1, c0, QT, SB, NS, WPS, EVEN_K, ASM)
        if BM > 1:
            acc1 += _row_dot_xq(w3, h3, xp0 + s_xm, t, m0 + 1 < M, K, c1, c0, QT, SB, NS, WPS, EVEN_K, ASM)
        if BM > 2:
            acc2 += _row_dot_xq(w3, h3, xp0 + 2 * s_xm, t, m0 + 2 < M, K, c1, c0, QT, SB, NS, WPS, EVEN_K, ASM)
            acc3 += _row_dot_xq(w3, h3, xp0 + 3 * s_xm, t, m0 + 3 < M, K, c1, c0, QT, SB, NS, WPS, EVEN_K, ASM)
    else:
        k0 = t * (NS * SB)
        x_ok = (k0 + x_in) < K
        xp = xp0 + k0
        acc0 += _row_dot(w3, h3, one, xp, x_ok & (m0 < M), c1, c0, QT, E, NS, WPS, EVEN_K, ASM, INT8)
        if BM > 1:
            acc1 += _row_dot(w3, h3, one, xp + s_xm, x_ok & (m0 + 1 < M), c1, c0, QT, E, NS, WPS, False, ASM, INT8)
        if BM > 2:
            acc2 += _row_dot(w3, h3, one, xp + 2 * s_xm, x_ok & (m0 + 2 < M), c1, c0, QT, E, NS, WPS, False, ASM,
                             INT8)
            acc3 += _row_dot(w3, h3, one, xp + 3 * s_xm, x_ok & (m0 + 3 < M), c1, c0, QT, E, NS, WPS, False, ASM,
                             INT8)
    return acc0, acc1, acc2, acc3


@triton.jit
def _row_tile(x_ptr, q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, rows, t_lo, t_hi, m0, M, N, K, s_xm, s_q, s_qh,
              s_sc, s_d, one, QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, E: tl.constexpr,
              BN: tl.constexpr, NS: tl.constexpr, BM: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
              ASM: tl.constexpr, INT8: tl.constexpr, STAGES: tl.constexpr, XQ: tl.constexpr, WAIT: tl.constexpr):
    """Output rows `rows` ([BN]) x activation rows m0.. ([BM]) summed over K-tiles t_lo..t_hi-1: fp32 [BN, BM].
    WAIT: a programmatic dependent waits for the kernel before once its first weights are on their way."""
    n2 = rows[:, None]
    row_ok = n2 < N
    c = tl.arange(0, NS * WPS)[None, :]  # word c of the tile: sub-block c // WPS, word c % WPS
    n_sub = K // SB
    n_tiles = tl.cdiv(n_sub, NS)
    EVEN: tl.constexpr = EVEN_N and EVEN_K
    UNPACK: tl.constexpr = ASM and INT8
    # activation of word c, value position s: x[m, k0 + (c // WPS) * SB + s * WPS + c % WPS]
    if XQ:
        xp0 = x_ptr + m0 * s_xm  # the quantized blocks of row m0 (gguf_xq.py)
    else:
        xp0 = x_ptr + m0 * s_xm + (c // WPS) * SB + c % WPS
    x_in = (c // WPS) * SB  # offset of the word's sub-block inside the tile (for the K mask)
    # four accumulators whatever BM: the unused ones are never added to and compile away
    acc0 = tl.zeros((BN, NS), dtype=tl.float32)
    acc1 = tl.zeros((BN, NS), dtype=tl.float32)
    acc2 = tl.zeros((BN, NS), dtype=tl.float32)
    acc3 = tl.zeros((BN, NS), dtype=tl.float32)
    if STAGES > 1:
        if WAIT:  # the pipeline's prologue reads activations too: wait for the kernel before first
            gdc_wait()
        # Triton's software pipeliner: each tile's words, scales and activations go to shared memory
        # by cp.async STAGES - 1 tiles ahead. The bytes in flight then cost no registers (the
        # register-prefetch loop below holds two tiles in registers: 145-255 of them at 8-16 rows a
        # thread, one to three warps per scheduler), so a CTA keeps ~2-3x more of DRAM's latency covered.
        for t in tl.range(t_lo, t_hi, num_stages=STAGES):
            w_ok = row_ok & (t * NS * WPS + c < n_sub * WPS)
            words, hi = _load_words(q_ptr, qh_ptr, n2, t * NS * WPS + c, w_ok, s_q, s_qh, QT, EVEN, UNPACK)
            d, sc, dm, mn = _load_scales(sc_ptr, mn_ptr, d_ptr, dm_ptr, n2, row_ok, t, n_sub, s_sc, s_d, QT, SB, NS,
                                         EVEN)
            acc0, acc1, acc2, acc3 = _tile(acc0, acc1, acc2, acc3, words, hi, d, sc, dm, mn, t, xp0, x_in, s_xm, m0,
                                           M, K, one, QT, SB, WPS, E, BN, NS, BM, EVEN_K, ASM, INT8, XQ)
    else:
        # prologue: the first tile's loads (an empty split loads a valid tile and skips the loop)
        t0 = tl.minimum(t_lo, n_tiles - 1)
        w_ok = row_ok & (t0 * NS * WPS + c < n_sub * WPS)
        words, hi = _load_words(q_ptr, qh_ptr, n2, t0 * NS * WPS + c, w_ok, s_q, s_qh, QT, EVEN, UNPACK)
        d, sc, dm, mn = _load_scales(sc_ptr, mn_ptr, d_ptr, dm_ptr, n2, row_ok, t0, n_sub, s_sc, s_d, QT, SB, NS, EVEN)
        if WAIT:  # the first tile's weights are on their way; the activations come from the kernel before
            gdc_wait()
        if STAGES == 0:  # the program's only tile (one_tile()): no next-tile buffer, nothing loaded after the wait
            if t_lo < t_hi:
                acc0, acc1, acc2, acc3 = _tile(acc0, acc1, acc2, acc3, words, hi, d, sc, dm, mn, t0, xp0, x_in, s_xm,
                                               m0, M, K, one, QT, SB, WPS, E, BN, NS, BM, EVEN_K, ASM, INT8, XQ)
        else:
            for t in range(t_lo, t_hi):
                # the next tile's loads go out before this tile is computed (clamped: the last iteration
                # reloads its own tile, same addresses, no mask needed)
                tn = tl.minimum(t + 1, t_hi - 1)
                wn_ok = row_ok & (tn * NS * WPS + c < n_sub * WPS)
                words_n, hi_n = _load_words(q_ptr, qh_ptr, n2, tn * NS * WPS + c, wn_ok, s_q, s_qh, QT, EVEN,
                                            UNPACK)
                d_n, sc_n, dm_n, mn_n = _load_scales(sc_ptr, mn_ptr, d_ptr, dm_ptr, n2, row_ok, tn, n_sub, s_sc, s_d,
                                                     QT, SB, NS, EVEN)
                acc0, acc1, acc2, acc3 = _tile(acc0, acc1, acc2, acc3, words, hi, d, sc, dm, mn, t, xp0, x_in, s_xm, m0,
                                               M, K, one, QT, SB, WPS, E, BN, NS, BM, EVEN_K, ASM, INT8, XQ)
                words, hi, d, sc, dm, mn = words_n, hi_n, d_n, sc_n, dm_n, mn_n
    which = tl.arange(0, BM)[None, :]
    res = tl.where(which == 0, tl.sum(acc0, axis=1)[:, None], 0.0)
    if BM > 1:
        res = tl.where(which == 1, tl.sum(acc1, axis=1)[:, None], res)
    if BM > 2:
        res = tl.where(which == 2, tl.sum(acc2, axis=1)[:, None], res)
        res = tl.where(which == 3, tl.sum(acc3, axis=1)[:, None], res)
    return res


@triton.jit
def _stream_segment(r, u_lo, u_hi, units, G, g, x_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, q_ptr, qh_ptr, sc_ptr,
                    mn_ptr, d_ptr, dm_ptr, m0, pid_m, M, N, K, s_xm, s_om, s_q, s_qh, s_sc, s_d, one,
                    QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, E: tl.constexpr, BN: tl.constexpr,
                    NS: tl.constexpr, BM: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
                    EVEN_K: tl.constexpr, ASM: tl.constexpr, INT8: tl.constexpr, STAGES: tl.constexpr,
                    XQ: tl.constexpr, WAIT: tl.constexpr, FIXED: tl.constexpr = False):
    """Stream-K: this program's share of row tile r (K-tiles t_lo..t_hi-1 of it), then that tile's output --
    whole, or a partial that the last of the tile's programs adds up (gguf_splitk.store_share)."""
    n_tiles = tl.cdiv(K // SB, NS)
    t_lo = tl.maximum(u_lo - r * n_tiles, 0)
    t_hi = tl.minimum(u_hi - r * n_tiles, n_tiles)
    rows = r * BN + tl.arange(0, BN)
    res = _row_tile(x_ptr, q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, rows, t_lo, t_hi, m0, M, N, K, s_xm, s_q,
                    s_qh, s_sc, s_d, one, QT, SB, WPS, E, BN, NS, BM, EVEN_N, EVEN_K, ASM, INT8, STAGES, XQ, WAIT)
    # the programs that share row tile r: the one holding its first unit to the one holding its last
    g0 = ((r * n_tiles + 1) * G - 1) // units
    g1 = ((r + 1) * n_tiles * G - 1) // units
    cols = m0 + tl.arange(0, BM)
    store_share(res, rows, cols, N, M, out_ptr, s_om, bias_ptr, ws_ptr, cnt_ptr, pid_m * tl.cdiv(N, BN) + r, g - g0,
                g1 - g0 + 1, HAS_BIAS, FIXED)


@triton.jit
def _wide_kernel(x_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
                 M, N, K, s_xm, s_om, s_q, s_qh, s_sc, s_d, one,
                 QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, E: tl.constexpr,
                 BN: tl.constexpr, NS: tl.constexpr, BM: tl.constexpr, SPLIT_K, SPLIT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr,
                 INT8: tl.constexpr = False, STAGES: tl.constexpr = 1,
                 XQ: tl.constexpr = False, PDL: tl.constexpr = False, STREAM: tl.constexpr = False,
                 FIXED: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    m0 = pid_m * BM
    n_tiles = tl.cdiv(K // SB, NS)
    if STREAM:
        # Stream-K: G programs (a whole number per SM) share the tiles_n x n_tiles units (row tile, K-tile)
        # in row-tile order, each a contiguous run of equal length (+-1): whole waves by construction,
        # where a split-K grid of 1.06 waves leaves a second wave of a few programs.
        G = tl.num_programs(0)
        units = tl.cdiv(N, BN) * n_tiles
        u_lo = (pid_n * units) // G
        u_hi = ((pid_n + 1) * units) // G
        r0 = u_lo // n_tiles
        if u_lo < u_hi:
            _stream_segment(r0, u_lo, u_hi, units, G, pid_n, x_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, q_ptr, qh_ptr,
                            sc_ptr, mn_ptr, d_ptr, dm_ptr, m0, pid_m, M, N, K, s_xm, s_om, s_q, s_qh, s_sc, s_d, one,
                            QT, SB, WPS, E, BN, NS, BM, HAS_BIAS, EVEN_N, EVEN_K, ASM, INT8, STAGES, XQ, PDL, FIXED)
            for r in range(r0 + 1, tl.cdiv(u_hi, n_tiles)):
                _stream_segment(r, u_lo, u_hi, units, G, pid_n, x_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, q_ptr,
                                qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, m0, pid_m, M, N, K, s_xm, s_om, s_q, s_qh, s_sc,
                                s_d, one, QT, SB, WPS, E, BN, NS, BM, HAS_BIAS, EVEN_N, EVEN_K, ASM, INT8, STAGES, XQ,
                                False, FIXED)
        if PDL:
            gdc_launch_dependents()
    else:
        _split_program(pid_n, pid_k, m0, pid_m * tl.num_programs(0) + pid_n, x_ptr, out_ptr, bias_ptr, ws_ptr,
                       cnt_ptr, q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, M, N, K, s_xm, s_om, s_q, s_qh, s_sc,
                       s_d, one, SPLIT_K, QT, SB, WPS, E, BN, NS, BM, SPLIT, HAS_BIAS, EVEN_N, EVEN_K, ASM, INT8,
                       STAGES, XQ, PDL, FIXED)


@triton.jit
def _split_program(pid_n, pid_k, m0, tile_id, x_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, q_ptr, qh_ptr, sc_ptr,
                   mn_ptr, d_ptr, dm_ptr, M, N, K, s_xm, s_om, s_q, s_qh, s_sc, s_d, one, SPLIT_K,
                   QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, E: tl.constexpr, BN: tl.constexpr,
                   NS: tl.constexpr, BM: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr, INT8: tl.constexpr,
                   STAGES: tl.constexpr, XQ: tl.constexpr, PDL: tl.constexpr, FIXED: tl.constexpr = False):
    """Row tile pid_n over split pid_k's K-tiles, stored (or deposited for the split-K epilogue, counter
    tile_id) for activation rows m0.. -- one program of a split-K launch."""
    n_tiles = tl.cdiv(K // SB, NS)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)
    rows = pid_n * BN + tl.arange(0, BN)
    res = _row_tile(x_ptr, q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, rows, t_lo, t_hi, m0, M, N, K, s_xm, s_q,
                    s_qh, s_sc, s_d, one, QT, SB, WPS, E, BN, NS, BM, EVEN_N, EVEN_K, ASM, INT8, STAGES, XQ, PDL)
    if PDL:
        # the next kernel may be scheduled now; it waits for this grid's end before it reads our output.
        # Signalled at the loop's end, not its start: at the start, a GEMV of more than one wave let the
        # next kernel's programs take SM slots its own later waves needed (H200: 155 tok/s against 175)
        gdc_launch_dependents()
    cols = m0 + tl.arange(0, BM)
    store_output(res, rows, cols, N, M, out_ptr, s_om, bias_ptr, ws_ptr, cnt_ptr, tile_id, pid_k, SPLIT_K, HAS_BIAS,
                 SPLIT, FIXED)


@triton.jit
def _pair_kernel(xa, outa, wsa, aq, aqh, asc, amn, ad, adm, NA, s_xa, s_oa, as_q, as_qh, as_sc, as_d, SPLIT_K_A,
                 xb, outb, wsb, bq, bqh, bsc, bmn, bd, bdm, NB, s_xb, s_ob, bs_q, bs_qh, bs_sc, bs_d, SPLIT_K_B,
                 cnt_ptr, M, K, one,
                 QT_A: tl.constexpr, SB_A: tl.constexpr, WPS_A: tl.constexpr, E_A: tl.constexpr, BN_A: tl.constexpr,
                 NS_A: tl.constexpr, SPLIT_A: tl.constexpr, EVEN_N_A: tl.constexpr, EVEN_K_A: tl.constexpr,
                 STAGES_A: tl.constexpr,
                 QT_B: tl.constexpr, SB_B: tl.constexpr, WPS_B: tl.constexpr, E_B: tl.constexpr, BN_B: tl.constexpr,
                 NS_B: tl.constexpr, SPLIT_B: tl.constexpr, EVEN_N_B: tl.constexpr, EVEN_K_B: tl.constexpr,
                 STAGES_B: tl.constexpr, BM: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """Two GEMVs of one input in one launch (gemv_pair): programs 0..GA-1 are A's split-K grid, the rest
    B's, each with its own type, tile and split; counters A's row tiles then B's."""
    f = tl.program_id(0)
    pid_m = tl.program_id(2)
    tiles_a = tl.cdiv(NA, BN_A)
    tiles_b = tl.cdiv(NB, BN_B)
    tile0 = pid_m * (tiles_a + tiles_b)
    if f < tiles_a * SPLIT_K_A:
        _split_program(f % tiles_a, f // tiles_a, pid_m * BM, tile0 + f % tiles_a, xa, outa, outa, wsa, cnt_ptr,
                       aq, aqh, asc, amn, ad, adm, M, NA, K, s_xa, s_oa, as_q, as_qh, as_sc, as_d, one, SPLIT_K_A,
                       QT_A, SB_A, WPS_A, E_A, BN_A, NS_A, BM, SPLIT_A, False, EVEN_N_A, EVEN_K_A, ASM, True,
                       STAGES_A, True, PDL)
    else:
        g = f - tiles_a * SPLIT_K_A
        _split_program(g % tiles_b, g // tiles_b, pid_m * BM, tile0 + tiles_a + g % tiles_b, xb, outb, outb, wsb,
                       cnt_ptr, bq, bqh, bsc, bmn, bd, bdm, M, NB, K, s_xb, s_ob, bs_q, bs_qh, bs_sc, bs_d, one,
                       SPLIT_K_B, QT_B, SB_B, WPS_B, E_B, BN_B, NS_B, BM, SPLIT_B, False, EVEN_N_B, EVEN_K_B, ASM,
                       True, STAGES_B, True, PDL)


def bm_for(m: int) -> int:
    return 1 if m == 1 else (2 if m == 2 else MAX_BM)


INT8_TYPES = (0, 1, 2, 3)  # Q4_K, Q5_K, Q6_K, Q8_0 (QT codes): the types with an int8-activation row dot


def gemv(x: torch.Tensor, p: PackedGGUF, bias: torch.Tensor | None, out: torch.Tensor, *,
         bn: int, ns: int, bm: int, split_k: int = 1, num_warps: int = 4, num_stages: int = 1,
         int8: bool = False, xq: bool = False, stream: int = 0, glu: bool = False,
         fixed_zero: torch.Tensor | None = None) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W^T (+ bias); x with unit column stride. Any M (BM rows per program).
    int8: activations quantized to int8 per sub-block inside the kernel, dp4a on the weights
    (about 0.3% relative error, as llama.cpp's quantized matmuls).
    num_stages 1: the next tile prefetched into registers; 2 or more: tiles pipelined through shared
    memory (cp.async), num_stages - 1 of them in flight.
    xq (with int8): the activations quantized once by gguf_xq.quantize (one more launch) instead of in
    every thread.
    stream > 0: stream-K instead of split_k -- stream programs per SM share the row-tile x K-tile units
    equally (stream_programs).
    glu (with xq): x is [M, 2K], a gate/up projection's [gate | up] rows, and the GEMV's input is their
    SwiGLU, applied by the activation quantization (gguf_xq.quantize(glu=True): no silu_mul launch).
    fixed_zero: out is an int64 fixed-point buffer the programs add into, and fixed_zero [M, N] the buffer they
    zero (kernels/fixed_point.py); no bias."""
    m, k = x.shape[0], p.k
    qt = qt_code(p.qtype)
    if int8 and qt not in INT8_TYPES:
        raise ValueError(f"no int8-activation GEMV for {p.qtype.name}")
    if glu and not xq:
        raise ValueError("glu needs xq: the SwiGLU is applied by the activation quantization")
    xin = gguf_xq.quantize(x, gguf_xq.layout_for(qt), glu=glu) if xq else x
    on = pdl.enabled(x.device)
    s_xin = xin.stride(0)
    sb, wps, e = GEOMETRY[qt]
    tiles_n, tiles_m = triton.cdiv(p.n, bn), triton.cdiv(m, bm)
    n_tiles = triton.cdiv(k // sb, ns)
    use_stream = False
    if stream:
        g = stream_programs(stream, tiles_n * n_tiles, x.device)
        shares = stream_shares(tiles_n * n_tiles, g, n_tiles)
        use_stream = usable_split(shares, tiles_n * tiles_m, m, p.n) == shares  # else the plain launch below
    if use_stream:
        grid, split_k, ws = (g, 1, tiles_m), 1, workspace(shares, m, p.n, x.device)
    else:
        split_k = usable_split(split_k, tiles_n * tiles_m, m, p.n)
        grid, ws = (tiles_n, split_k, tiles_m), workspace(split_k, m, p.n, x.device)
    if fixed_zero is not None:
        ws = fixed_buffers(out, fixed_zero, bias, m, p.n)
    fields, (s_q, s_qh, s_sc, s_d) = field_args(p)
    even_k = k % (ns * sb) == 0
    args = (xin, out, bias if bias is not None else out, ws, counters(x.device), *fields,
            m, p.n, k, s_xin, out.stride(0), s_q, s_qh, s_sc, s_d, ONE_F32_BITS.value)
    stages = 0 if num_stages == 1 and not use_stream and one_tile(n_tiles, split_k) else num_stages
    consts = dict(QT=qt, SB=sb, WPS=wps, E=e, BN=bn, NS=ns, BM=bm, SPLIT_K=split_k, SPLIT=split_k > 1,
                  HAS_BIAS=bias is not None, EVEN_N=p.n % bn == 0, EVEN_K=even_k,
                  ASM=os.environ.get("TRITON_INTERPRET") != "1", INT8=int8 or xq, STAGES=stages, XQ=xq, PDL=on,
                  STREAM=use_stream, FIXED=fixed_zero is not None, num_warps=num_warps, num_stages=num_stages)
    _wide_kernel[grid](*args, **consts, launch_pdl=on)
    return out


def fixed_buffers(out: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None, m: int, n: int) -> torch.Tensor:
    """The zeroed buffer, passed where the split-K workspace goes, once both buffers are checked."""
    if bias is not None or out.dtype != torch.int64 or zero.dtype != torch.int64 or zero.shape != out.shape \
            or tuple(out.shape) != (m, n) or out.stride(1) != 1 or zero.stride() != out.stride():
        raise ValueError("fixed-point output: int64 [M, N] buffers of one layout and no bias")
    return zero


def one_tile(n_tiles: int, split_k: int) -> bool:
    """Whether every program of a split-K launch has one K-tile (or none): the kernel then loads it before
    waiting for the kernel before (programmatic dependent launch) and keeps no next-tile buffer (STAGES 0),
    so a small GEMV's weights are all in flight while the kernel before runs."""
    return triton.cdiv(n_tiles, split_k) <= 1


def pairs_with(cfg_a: dict, cfg_b: dict) -> bool:
    """Whether two weights' launch constants can share one gemv_pair launch: split-K (no stream-K), the
    register-prefetch loop, one BM and one warp count."""
    return all(c.get("stream", 0) == 0 and c.get("num_stages", 1) == 1 for c in (cfg_a, cfg_b)) and \
        cfg_a.get("bm") == cfg_b.get("bm") and cfg_a.get("num_warps", 4) == cfg_b.get("num_warps", 4)


def gemv_pair(x: torch.Tensor, a: PackedGGUF, cfg_a: dict, out_a: torch.Tensor, b: PackedGGUF, cfg_b: dict,
              out_b: torch.Tensor) -> None:
    """out_a[M, Na] = x @ A^T and out_b[M, Nb] = x @ B^T in one launch, for two weights of one input that
    cannot share a planar weight (q and k/v of different types): one launch, one ramp and one DRAM
    latency instead of two, and one activation quantization where the types share its layout. Both run
    the xq row dot; cfg_a / cfg_b are each weight's split-K constants (bn, ns, split_k; pairs_with())."""
    m, k = x.shape
    if a.k != k or b.k != k or not pairs_with(cfg_a, cfg_b):
        raise ValueError("gemv_pair: one K and compatible launch constants (pairs_with) needed")
    bm = cfg_a["bm"]
    tiles_m = triton.cdiv(m, bm)
    la, lb = gguf_xq.layout_for(qt_code(a.qtype)), gguf_xq.layout_for(qt_code(b.qtype))
    xa = gguf_xq.quantize(x, la)
    xb = xa if lb == la else gguf_xq.quantize(x, lb)

    def member(p: PackedGGUF, cfg: dict, suffix: str):
        qt = qt_code(p.qtype)
        sb, wps, e = GEOMETRY[qt]
        if qt not in INT8_TYPES:
            raise ValueError(f"no int8-activation GEMV for {p.qtype.name}")
        bn, ns = cfg["bn"], cfg["ns"]
        tiles = triton.cdiv(p.n, bn)
        split = usable_split(cfg.get("split_k", 1), tiles * tiles_m, m, p.n)
        consts = dict(QT=qt, SB=sb, WPS=wps, E=e, BN=bn, NS=ns, SPLIT=split > 1, EVEN_N=p.n % bn == 0,
                      EVEN_K=k % (ns * sb) == 0, STAGES=0 if one_tile(triton.cdiv(k // sb, ns), split) else 1)
        return tiles, split, workspace(split, m, p.n, x.device), {f"{key}_{suffix}": v for key, v in consts.items()}

    tiles_a, split_a, ws_a, consts_a = member(a, cfg_a, "A")
    tiles_b, split_b, ws_b, consts_b = member(b, cfg_b, "B")
    if (tiles_a + tiles_b) * tiles_m > MAX_TILES:
        raise ValueError("gemv_pair: more row tiles than split-K counters")
    fields_a, strides_a = field_args(a)
    fields_b, strides_b = field_args(b)
    on = pdl.enabled(x.device)
    _pair_kernel[(tiles_a * split_a + tiles_b * split_b, 1, tiles_m)](
        xa, out_a, ws_a, *fields_a, a.n, xa.stride(0), out_a.stride(0), *strides_a, split_a,
        xb, out_b, ws_b, *fields_b, b.n, xb.stride(0), out_b.stride(0), *strides_b, split_b,
        counters(x.device), m, k, ONE_F32_BITS.value, **consts_a, **consts_b, BM=bm,
        ASM=os.environ.get("TRITON_INTERPRET") != "1", PDL=on, num_warps=cfg_a.get("num_warps", 4), num_stages=1,
        launch_pdl=on)


def stream_programs(per_sm: int, units: int, device: torch.device) -> int:
    """Stream-K grid: per_sm programs on every SM (never more programs than units)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return max(1, min(units, per_sm * sms))


def stream_shares(units: int, programs: int, n_tiles: int) -> int:
    """The most programs that share one row tile (n_tiles units) when `programs` split `units` into
    contiguous runs of units // programs or one more: the workspace's partials per tile."""
    run = units // programs
    if run == 0:
        return n_tiles
    return min(programs, -(-n_tiles // run) + 1)


def reference(x: torch.Tensor, p: PackedGGUF, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch (fp32): per sub-block c1 * sum(f x) + c0 * sum(x) from the
    planar fields, f = 1 + q / 2^bits. Equal to dequantize(W) @ x up to fp32 rounding."""
    from devstral.kernels.gguf_pack import FORMATS, _from_words, _high_from_planar, planar_scale_min_ref

    fmt = FORMATS[p.qtype]
    qt = qt_code(p.qtype)
    q = _from_words(p["q"], fmt, p.n, p.k).to(torch.int32)
    if qt == 3:
        q = q ^ 0x80  # int8 levels as unsigned, sign flipped (what the kernel decodes)
    if "qh" in p.arrays:
        q = q | (_high_from_planar(p["qh"], fmt, p.n, p.k, p.qtype).to(torch.int32) << 4)
    bits = {0: 4, 1: 5, 2: 6, 3: 8}[qt]
    f = 1.0 + q.float() / (1 << bits)  # [n, k]
    sub = fmt.sub
    n_sub = p.k // sub
    d = p["d"].float()
    if qt == 3:
        c1 = 256.0 * d
        c0 = -384.0 * d
    else:
        dd = d.repeat_interleave(256 // sub, dim=1)
        sc = p["sc"]
        if qt != 2:
            sc, mn = planar_scale_min_ref(sc, p["mn"])
        c1 = (64.0 if qt == 2 else 16.0 if qt == 0 else 32.0) * dd * sc.float()
        c0 = -1.5 * c1 if qt == 2 else -(c1 + p["dmin"].float().repeat_interleave(256 // sub, dim=1) * mn.float())
    xf = x.float().reshape(-1, n_sub, sub)
    fx = torch.einsum("nju,mju->mnj", f.reshape(p.n, n_sub, sub), xf)
    y = (fx * c1[None] + xf.sum(-1)[:, None, :] * c0[None]).sum(-1)
    return y if bias is None else y + bias.float()


# The loop's device functions under public names, for kernels built on this frame with their own grid
# and epilogue (moe_gemv.py's routed experts): one tile's words and raw scales, the scales decoded, and
# the per-sub-block dot of one activation row (row_dot_xq: that row quantized beforehand by gguf_xq.py).
load_tile_words = _load_words
load_tile_scales = _load_scales
tile_scales = _scales
row_dot = _row_dot
row_dot_xq = _row_dot_xq
