"""RoPE of the step's queries and keys, and the store of keys and values into the paged cache, in one
launch (Triton). Semantics: `kv_store.rope_and_store_kv_ref` = `rope.apply_rope_ref`, then
`kv_store.store_kv_ref` of the rotated keys.

At batch-1 decode each launch of the ~570 a step makes pays its own start and a DRAM round trip
before the next can read what it wrote; RoPE and the KV store were two such launches per layer with a
few KB of work each. One program per token rotates the token's query and key heads (rope_triton's
arithmetic, rounding where the reference rounds), writes them out (the queries for the attention,
the keys for a prefill chunk's attention), and, after a barrier that makes its own threads' stores
visible to the whole program, quantizes and stores the rotated keys and the values at the token's slot
(kv_store_triton's arithmetic, so the cache holds the reference's bytes). A negative slot stores
nothing in the cache (CUDA-graph padding rows). Compiled without floating-point contraction, like both
kernels it joins.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels import pdl, stamps
from devstral.kernels.interpret_triton import kernels_for
from devstral.kernels.kv_format import GROUP, KVLayer
from devstral.kernels.kv_store_triton import KIND_CODES, KIND_Q4_0, KIND_Q8_0, fp8_supported, store_head_block
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait
from devstral.kernels.rope_triton import cos_sin, rotate_heads


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qs_ptr, q_out_ptr, k_out_ptr, slot_ptr,
                       kc_ptr, vc_ptr, ks_ptr, vs_ptr, n_heads, n_kv_heads,
                       q_st, q_sh, k_st, k_sh, v_st, v_sh, c_st, s_st, qs_st,
                       c_sb, c_so, c_sh, s_sb, s_so, s_sh,
                       HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr,
                       PAGE: tl.constexpr, KIND: tl.constexpr, HAS_Q_SCALE: tl.constexpr, PDL: tl.constexpr = False,
                       stamps_ptr=None, STAMPS: tl.constexpr = False):
    if STAMPS:  # kernels/stamps.py
        t_start = stamps.now()
    if PDL:  # kernels/pdl.py (and waits for the kernel before)
        gdc_launch_dependents()
        gdc_wait()
    if STAMPS:
        t_waited = stamps.now()
    i = tl.program_id(0).to(tl.int64)
    c1, c2, s1, s2 = cos_sin(cos_ptr + i * c_st, sin_ptr + i * s_st, HALF, BLOCK_HALF)
    qs = 1.0
    if HAS_Q_SCALE:
        qs = tl.load(qs_ptr + i * qs_st).to(q_out_ptr.dtype.element_ty).to(tl.float32)
    rotate_heads(q_ptr + i * q_st, q_sh, q_out_ptr + i * n_heads * 2 * HALF, n_heads, c1, c2, s1, s2, qs,
                  HALF, BLOCK_HALF, BLOCK_H, HAS_Q_SCALE)
    k_row = k_out_ptr + i * n_kv_heads * 2 * HALF
    rotate_heads(k_ptr + i * k_st, k_sh, k_row, n_kv_heads, c1, c2, s1, s2, qs, HALF, BLOCK_HALF, BLOCK_HK, False)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    if slot >= 0:
        tl.debug_barrier()  # the rotated keys, stored by other threads of this program, are read back below
        cache_at = (slot // PAGE) * c_sb + (slot % PAGE) * c_so
        scale_at = (slot // PAGE) * s_sb + (slot % PAGE) * s_so
        store_head_block(k_row, 2 * HALF, kc_ptr + cache_at, c_sh, ks_ptr + scale_at, s_sh, n_kv_heads,
                          2 * HALF, BLOCK_HK, KIND)
        store_head_block(v_ptr + i * v_st, v_sh, vc_ptr + cache_at, c_sh, vs_ptr + scale_at, s_sh, n_kv_heads,
                          2 * HALF, BLOCK_HK, KIND)
    if STAMPS:  # work: the rotation's inputs were in registers at the slot's load
        t_end = stamps.now()
        stamps.record(stamps_ptr, stamps.ROPE, i, t_start, t_waited, t_end, t_end)


def supported(q: torch.Tensor, k: torch.Tensor, layer: KVLayer) -> bool:
    """What the kernel takes: power-of-two head_dim and page, the cache's last dim contiguous, one
    position per token ([N, D] cos/sin), and fp8 only where Triton converts it."""
    head_dim, page = k.shape[-1], layer.k.shape[1]
    pow2 = lambda x: x > 0 and not x & (x - 1)  # noqa: E731
    return (pow2(head_dim) and pow2(page) and layer.k.stride(-1) == 1 and layer.k.stride() == layer.v.stride()
            and q.shape[-1] == head_dim and (layer.kind != "fp8" or fp8_supported(k.device))
            and (KIND_CODES[layer.kind] not in (KIND_Q4_0, KIND_Q8_0) or head_dim % GROUP == 0))


def rope_and_store_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, q_scale: torch.Tensor | None, layer: KVLayer,
                             slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, D], k/v [N, Hkv, D] (last dims contiguous), cos/sin [N, D], q_scale [N] or None,
    slot_mapping [N] -> (rotated q, rotated k), new contiguous tensors; the cache gets k and v."""
    n, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    rot = torch.promote_types(cos.dtype, sin.dtype)
    q_out = torch.empty(q.shape, dtype=torch.promote_types(q.dtype, rot), device=q.device)
    k_out = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, rot), device=q.device)
    if n == 0:
        return q_out, k_out
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    qs = q_scale if q_scale is not None else cos
    scales = (layer.k_scale, layer.v_scale) if layer.k_scale is not None else (layer.k, layer.v)
    ss = scales[0].stride()
    on = pdl.enabled(q.device)
    stamps_ptr, stamped = stamps.kernel_args(q.device, q_out)
    kernels_for(q, __name__)._rope_store_kernel[(n,)](
        q, k, v, cos, sin, qs, q_out, k_out, slot_mapping, layer.k, layer.v, scales[0], scales[1],
        n_heads, n_kv_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), qs.stride(0),
        layer.k.stride(0), layer.k.stride(1), layer.k.stride(2), ss[0], ss[1], ss[2],
        HALF=head_dim // 2, BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_HK=triton.next_power_of_2(n_kv_heads),
        PAGE=layer.k.shape[1], KIND=KIND_CODES[layer.kind], HAS_Q_SCALE=q_scale is not None, PDL=on,
        stamps_ptr=stamps_ptr, STAMPS=stamped, num_warps=4, enable_fp_fusion=False, launch_pdl=on)  # round as the reference does (module docstring)
    return q_out, k_out
