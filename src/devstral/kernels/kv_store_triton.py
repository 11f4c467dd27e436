"""Store new keys and values into the paged cache, quantizing in registers (Triton). Semantics:
`kv_store.py`, formats: `kv_format.py`.

One program per token writes its keys and values for every kv head. A negative slot writes
nothing, so the padding rows of a captured CUDA-graph batch cost one load and no store; nothing here
syncs with the host, so the launch can be captured. The quantizers repeat the reference's float32
arithmetic operation for operation (IEEE division, round half away from zero, ggml's q4_0 rule), so
the stored bytes are the reference's bytes. The kernel compiles without floating-point contraction:
with it, `x * inv + 0.5` becomes one fma that skips the product's rounding, and a value on a rounding
boundary lands in the neighbouring code (seen on the H200).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from devstral.kernels import pdl
from devstral.kernels.interpret_triton import kernels_for
from devstral.kernels.kv_format import FLOAT_KINDS, GROUP, KVLayer
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait

KIND_FLOAT, KIND_FP8, KIND_Q8_0, KIND_Q4_0 = 0, 1, 2, 3
KIND_CODES = {**dict.fromkeys(FLOAT_KINDS, KIND_FLOAT), "fp8": KIND_FP8, "q8_0": KIND_Q8_0, "q4_0": KIND_Q4_0}


@functools.cache
def fp8_supported(device: torch.device) -> bool:
    """Triton converts to and from e4m3 on sm89+ (Ada, Hopper); older GPUs take the reference."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


@triton.jit
def store_head_block(x_ptr, x_sh, c_ptr, c_sh, s_ptr, s_sh, n_heads,
                      HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, KIND: tl.constexpr):
    """Quantize one token's [n_heads, HEAD_DIM] and store it at one cache slot (pointers already at
    the token and at the slot)."""
    h = tl.arange(0, BLOCK_H)
    hmask = h < n_heads
    if KIND == 0:  # a float kind: a cast
        d = tl.arange(0, HEAD_DIM)
        x = tl.load(x_ptr + h[:, None] * x_sh + d[None, :], mask=hmask[:, None])
        tl.store(c_ptr + h[:, None] * c_sh + d[None, :], x.to(c_ptr.dtype.element_ty), mask=hmask[:, None])
    elif KIND == 1:  # fp8 e4m3 with a float32 scale per (token, head): amax / 448
        d = tl.arange(0, HEAD_DIM)
        x = tl.load(x_ptr + h[:, None] * x_sh + d[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
        q = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
        tl.store(c_ptr + h[:, None] * c_sh + d[None, :], q.to(tl.float8e4nv), mask=hmask[:, None])
        tl.store(s_ptr + h * s_sh, scale, mask=hmask)
    elif KIND == 2:  # q8_0: per 32 values d = amax / 127 (stored fp16), q = round(x / d) in int8
        NG: tl.constexpr = HEAD_DIM // 32
        g = tl.arange(0, NG)
        j = tl.arange(0, 32)
        col = g[None, :, None] * 32 + j[None, None, :]
        m3 = hmask[:, None, None]
        x = tl.load(x_ptr + h[:, None, None] * x_sh + col, mask=m3, other=0.0).to(tl.float32)
        dq = tl.math.div_rn(tl.max(tl.abs(x), axis=2), tl.full((BLOCK_H, NG), 127.0, tl.float32))
        inv = tl.where(dq > 0, tl.math.div_rn(tl.full(dq.shape, 1.0, tl.float32), tl.where(dq > 0, dq, 1.0)), 0.0)
        y = x * inv[:, :, None]
        r = tl.where(y < 0, -tl.floor(-y + 0.5), tl.floor(y + 0.5))  # round half away from zero
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(c_ptr + h[:, None, None] * c_sh + col, r.to(tl.int8), mask=m3)
        tl.store(s_ptr + h[:, None] * s_sh + g[None, :], dq.to(tl.float16), mask=hmask[:, None])
    else:  # q4_0: d = (the value of largest magnitude) / -8; byte j holds q[j] | q[j + 16] << 4
        NG: tl.constexpr = HEAD_DIM // 32
        g = tl.arange(0, NG)
        j = tl.arange(0, 16)
        col = g[None, :, None] * 32 + j[None, None, :]
        m3 = hmask[:, None, None]
        src = x_ptr + h[:, None, None] * x_sh + col
        lo = tl.load(src, mask=m3, other=0.0).to(tl.float32)
        hi = tl.load(src + 16, mask=m3, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(lo), axis=2), tl.max(tl.abs(hi), axis=2))
        # the first index holding amax, as torch.argmax picks it
        first = tl.minimum(tl.min(tl.where(tl.abs(lo) == amax[:, :, None], j[None, None, :], 32), axis=2),
                           tl.min(tl.where(tl.abs(hi) == amax[:, :, None], j[None, None, :] + 16, 32), axis=2))
        signed = tl.sum(tl.where(j[None, None, :] == first[:, :, None], lo, 0.0), axis=2) + \
            tl.sum(tl.where(j[None, None, :] + 16 == first[:, :, None], hi, 0.0), axis=2)
        dq = signed * -0.125  # = signed / -8, exactly
        inv = tl.where(dq != 0, tl.math.div_rn(tl.full(dq.shape, 1.0, tl.float32), tl.where(dq != 0, dq, 1.0)), 0.0)
        qlo = tl.minimum(tl.floor(lo * inv[:, :, None] + 8.5), 15.0).to(tl.uint8)
        qhi = tl.minimum(tl.floor(hi * inv[:, :, None] + 8.5), 15.0).to(tl.uint8)
        packed = qlo | (qhi << 4)
        tl.store(c_ptr + h[:, None, None] * c_sh + g[None, :, None] * 16 + j[None, None, :], packed, mask=m3)
        tl.store(s_ptr + h[:, None] * s_sh + g[None, :], dq.to(tl.float16), mask=hmask[:, None])


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr,
                     k_st, k_sh, v_st, v_sh, c_sb, c_so, c_sh, s_sb, s_so, s_sh, n_heads,
                     PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, KIND: tl.constexpr,
                     PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py (and waits for the kernel before)
        gdc_launch_dependents()
        gdc_wait()
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    if slot >= 0:
        block = slot // PAGE
        offset = slot % PAGE
        cache_at = block * c_sb + offset * c_so
        scale_at = block * s_sb + offset * s_so
        store_head_block(k_ptr + i * k_st, k_sh, kc_ptr + cache_at, c_sh, ks_ptr + scale_at, s_sh, n_heads,
                          HEAD_DIM, BLOCK_H, KIND)
        store_head_block(v_ptr + i * v_st, v_sh, vc_ptr + cache_at, c_sh, vs_ptr + scale_at, s_sh, n_heads,
                          HEAD_DIM, BLOCK_H, KIND)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor) -> None:
    """k, v [N, n_kv_heads, head_dim] (last dim contiguous, other strides free); slot_mapping [N]."""
    n, n_heads, head_dim = k.shape
    page = layer.k.shape[1]
    if ((head_dim & (head_dim - 1)) or (page & (page - 1)) or layer.k.stride(-1) != 1 or n == 0
            or (layer.kind == "fp8" and not fp8_supported(k.device))):
        from devstral.kernels.kv_store import store_kv_ref

        return store_kv_ref(k, v, layer, slot_mapping) if n else None
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    assert layer.k.stride() == layer.v.stride(), "keys and values share one cache layout"
    kind = KIND_CODES[layer.kind]
    if kind in (KIND_Q4_0, KIND_Q8_0):
        assert head_dim % GROUP == 0
    scales = (layer.k_scale, layer.v_scale) if layer.k_scale is not None else (layer.k, layer.v)
    ss = scales[0].stride()
    on = pdl.enabled(k.device)
    kernels_for(k, __name__)._store_kv_kernel[(n,)](
        k, v, slot_mapping, layer.k, layer.v, scales[0], scales[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        layer.k.stride(0), layer.k.stride(1), layer.k.stride(2), ss[0], ss[1], ss[2], n_heads,
        PAGE=page, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(n_heads), KIND=kind, PDL=on, num_warps=4,
        enable_fp_fusion=False, launch_pdl=on)  # the reference rounds each product before the add (see above)
