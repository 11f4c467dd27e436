"""Rotary embedding for training: the inference kernel forward (rope_triton.py) and a Triton backward.

Semantics: `rope.py`. RoPE is linear in q and k, so its gradient is the transposed rotation of the
incoming gradient: with out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 (halves of the head dim) and the
query temperature s_t multiplying the rotated queries,

    dx1 = (g1 c1 + g2 s2) s_t        dx2 = (g2 c2 - g1 s1) s_t

in float32, rounded once to the input's dtype. Nothing but cos/sin/q_scale (already kept by the
model) is saved; one program per token handles all its query and key heads, reading the gradient
and writing dx once (4 bytes per element in 2-byte dtypes). cos and sin get no gradient: they are
functions of the positions, never trained.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels.interpret_triton import kernels_for
from devstral.kernels.rope_triton import apply_rope_triton


@triton.jit
def _rotate_back(g_ptr, dx_ptr, heads, c1, c2, s1, s2, qs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, HAS_SCALE: tl.constexpr):
    d = tl.arange(0, BLOCK_HALF)
    h = tl.arange(0, BLOCK_H)
    mask = (h < heads)[:, None] & (d < HALF)[None, :]
    at = h[:, None] * 2 * HALF + d[None, :]
    g1 = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(g_ptr + at + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g1 = g1 * qs
        g2 = g2 * qs
    dx1 = g1 * c1 + g2 * s2
    dx2 = g2 * c2 - g1 * s1
    DT = dx_ptr.dtype.element_ty
    tl.store(dx_ptr + at, dx1.to(DT), mask=mask)
    tl.store(dx_ptr + at + HALF, dx2.to(DT), mask=mask)


@triton.jit
def _rope_bwd_kernel(gq_ptr, gk_ptr, cos_ptr, sin_ptr, qs_ptr, dq_ptr, dk_ptr, T, n_heads, n_kv_heads,
                     c_sb, c_st, s_sb, s_st, qs_sb, qs_st,
                     HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr,
                     HAS_Q_SCALE: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    c_row = cos_ptr + b * c_sb + t * c_st
    s_row = sin_ptr + b * s_sb + t * s_st
    c1 = tl.load(c_row + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_row + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    qs = 1.0
    if HAS_Q_SCALE:  # the forward multiplies by q_scale rounded to the queries' dtype
        qs = tl.load(qs_ptr + b * qs_sb + t * qs_st).to(dq_ptr.dtype.element_ty).to(tl.float32)
    row = pid.to(tl.int64) * 2 * HALF
    _rotate_back(gq_ptr + row * n_heads, dq_ptr + row * n_heads, n_heads, c1, c2, s1, s2, qs, HALF, BLOCK_HALF,
                 BLOCK_H, HAS_Q_SCALE)
    _rotate_back(gk_ptr + row * n_kv_heads, dk_ptr + row * n_kv_heads, n_kv_heads, c1, c2, s1, s2, qs, HALF,
                 BLOCK_HALF, BLOCK_HK, False)


def rope_backward_triton(gq: torch.Tensor, gk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         q_scale: torch.Tensor | None, q_dtype: torch.dtype,
                         k_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """gq [B, T, H, D], gk [B, T, Hkv, D] -> (dq, dk) in the inputs' dtypes."""
    B, T, H, D = gq.shape
    Hkv = gk.shape[2]
    gq, gk = gq.contiguous(), gk.contiguous()
    dq = torch.empty(gq.shape, dtype=q_dtype, device=gq.device)
    dk = torch.empty(gk.shape, dtype=k_dtype, device=gk.device)
    if B * T == 0:
        return dq, dk
    cos = cos.expand(B, T, D)
    sin = sin.expand(B, T, D)
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    qs = q_scale.expand(B, T) if q_scale is not None else cos
    kernels_for(gq, __name__)._rope_bwd_kernel[(B * T,)](
        gq, gk, cos, sin, qs, dq, dk, T, H, Hkv,
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), qs.stride(0), qs.stride(1),
        HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2), BLOCK_H=triton.next_power_of_2(H),
        BLOCK_HK=triton.next_power_of_2(Hkv), HAS_Q_SCALE=q_scale is not None, num_warps=4)
    return dq, dk


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, q_scale):
        ctx.save_for_backward(cos, sin, q_scale)
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.q_shape, ctx.k_shape = q.shape, k.shape
        return apply_rope_triton(q, k, cos, sin, q_scale)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin, q_scale = ctx.saved_tensors
        q_dtype, k_dtype = ctx.dtypes
        if gq is None:
            gq = torch.zeros(ctx.q_shape, dtype=q_dtype, device=cos.device)
        if gk is None:
            gk = torch.zeros(ctx.k_shape, dtype=k_dtype, device=cos.device)
        dq, dk = rope_backward_triton(gq, gk, cos, sin, q_scale, q_dtype, k_dtype)
        return dq, dk, None, None, None


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """The 4-D token-major layout with an even head dim, as the model makes it."""
    return q.dim() == 4 and k.dim() == 4 and q.shape[-1] % 2 == 0 and q.shape[:2] == k.shape[:2]


def apply_rope_autograd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        q_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _Rope.apply(q, k, cos, sin, q_scale)
