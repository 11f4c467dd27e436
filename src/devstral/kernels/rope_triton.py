"""Rotary embedding of queries and keys in one program per token (Triton). Semantics: `rope.py`.

Each product and sum is rounded to the output dtype exactly where the reference's elementwise torch
ops round (a bf16 * bf16 product is exact in float32, so rounding it once gives torch's result), so
the kernel matches the reference bit for bit in bf16/fp16, provided it compiles without floating-point
contraction: LLVM narrows each rounded product and sum to a bf16/fp16 instruction and would then fuse
`x1 * c1 - x2 * s1` into one fma, skipping a rounding (seen on the H200: errors of many ulps where
the two terms cancel). The inputs may be strided views of a
fused qkv projection (last dim contiguous); the outputs are new contiguous tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels import pdl
from devstral.kernels.interpret_triton import kernels_for
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait


@triton.jit
def rotate_heads(src, s_h, dst, n_heads, c1, c2, s1, s2, qs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, SCALED: tl.constexpr):
    """One token's [n_heads, 2 * HALF] rotated into `dst` (contiguous heads): out = x * cos +
    rotate_half(x) * sin, rotate_half(x) = (-x2, x1), each product and sum rounded to dst's dtype;
    times `qs` (already rounded to that dtype) when SCALED."""
    T_OUT = dst.dtype.element_ty
    d = tl.arange(0, BLOCK_HALF)
    h = tl.arange(0, BLOCK_H)
    mask = (h < n_heads)[:, None] & (d < HALF)[None, :]
    at = src + h[:, None] * s_h + d[None, :]
    x1 = tl.load(at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(at + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = ((x1 * c1).to(T_OUT).to(tl.float32) - (x2 * s1).to(T_OUT).to(tl.float32)).to(T_OUT)
    o2 = ((x2 * c2).to(T_OUT).to(tl.float32) + (x1 * s2).to(T_OUT).to(tl.float32)).to(T_OUT)
    if SCALED:
        o1 = (o1.to(tl.float32) * qs).to(T_OUT)
        o2 = (o2.to(tl.float32) * qs).to(T_OUT)
    out = dst + h[:, None] * 2 * HALF + d[None, :]
    tl.store(out, o1, mask=mask)
    tl.store(out + HALF, o2, mask=mask)


@triton.jit
def cos_sin(c_row, s_row, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One position's cos/sin halves in float32, shaped to broadcast over heads."""
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    c1 = tl.load(c_row + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_row + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    return c1, c2, s1, s2


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qs_ptr, q_out_ptr, k_out_ptr, T, n_heads, n_kv_heads,
                 q_sb, q_st, q_sh, k_sb, k_st, k_sh, c_sb, c_st, s_sb, s_st, qs_sb, qs_st,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr,
                 HAS_Q_SCALE: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py (and waits for the kernel before)
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    c1, c2, s1, s2 = cos_sin(cos_ptr + b * c_sb + t * c_st, sin_ptr + b * s_sb + t * s_st, HALF, BLOCK_HALF)
    qs = 1.0
    if HAS_Q_SCALE:
        qs = tl.load(qs_ptr + b * qs_sb + t * qs_st).to(q_out_ptr.dtype.element_ty).to(tl.float32)
    rotate_heads(q_ptr + b * q_sb + t * q_st, q_sh, q_out_ptr + pid.to(tl.int64) * n_heads * 2 * HALF, n_heads,
                  c1, c2, s1, s2, qs, HALF, BLOCK_HALF, BLOCK_H, HAS_Q_SCALE)
    rotate_heads(k_ptr + b * k_sb + t * k_st, k_sh, k_out_ptr + pid.to(tl.int64) * n_kv_heads * 2 * HALF,
                  n_kv_heads, c1, c2, s1, s2, qs, HALF, BLOCK_HALF, BLOCK_HK, False)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      q_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, H, D], k [B, T, Hkv, D] (or without B); cos/sin broadcastable to [B, T, D]; q_scale
    broadcastable to [B, T] or None."""
    if q.dim() == 3:
        q_out, k_out = apply_rope_triton(q[None], k[None], cos[None] if cos.dim() == 2 else cos,
                                         sin[None] if sin.dim() == 2 else sin,
                                         None if q_scale is None else q_scale.reshape(1, -1))
        return q_out[0], k_out[0]
    if q.dim() != 4 or q.shape[-1] % 2:
        from devstral.kernels.rope import apply_rope_ref

        return apply_rope_ref(q, k, cos, sin, q_scale)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    rot = torch.promote_types(cos.dtype, sin.dtype)
    q_out = torch.empty((B, T, H, D), dtype=torch.promote_types(q.dtype, rot), device=q.device)
    k_out = torch.empty((B, T, Hkv, D), dtype=torch.promote_types(k.dtype, rot), device=q.device)
    if B * T == 0:
        return q_out, k_out
    q, k = _last_contiguous(q), _last_contiguous(k)
    cos = _last_contiguous(cos.expand(B, T, D))
    sin = _last_contiguous(sin.expand(B, T, D))
    qs = q_scale.expand(B, T) if q_scale is not None else cos
    on = pdl.enabled(q.device)
    kernels_for(q, __name__)._rope_kernel[(B * T,)](
        q, k, cos, sin, qs, q_out, k_out, T, H, Hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), qs.stride(0), qs.stride(1),
        HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2), BLOCK_H=triton.next_power_of_2(H),
        BLOCK_HK=triton.next_power_of_2(Hkv), HAS_Q_SCALE=q_scale is not None, PDL=on, num_warps=4,
        enable_fp_fusion=False, launch_pdl=on)  # round each product as the reference does (module docstring)
    return q_out, k_out
