"""Write new keys and values into the paged cache at their slots (quantizing for the quantized kinds),
alone or together with the RoPE of the step's queries and keys (one launch on the GPU).

`slot_mapping[i]` is token i's slot (`block * block_size + offset`); a negative slot is skipped, so a
CUDA-graph batch can carry padding rows.
"""

from __future__ import annotations

import torch

from devstral.kernels import use_triton
from devstral.kernels.kv_format import KVLayer, quantize
from devstral.kernels.rope import apply_rope, apply_rope_ref


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor) -> None:
    """k, v [N, n_kv_heads, head_dim]; slot_mapping [N] int."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    slots = slot_mapping.long()
    for values, scales, x in ((layer.k, layer.k_scale, k), (layer.v, layer.v_scale, v)):
        q, s = quantize(x, layer.kind)
        values.view(-1, *values.shape[2:])[slots] = q
        if scales is not None:
            scales.view(-1, *scales.shape[2:])[slots] = s


def store_kv(k: torch.Tensor, v: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor) -> None:
    if use_triton(k):
        from devstral.kernels.kv_store_triton import store_kv_triton

        return store_kv_triton(k, v, layer, slot_mapping)
    return store_kv_ref(k, v, layer, slot_mapping)


def rope_and_store_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          q_scale: torch.Tensor | None, layer: KVLayer,
                          slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, D], k/v [N, Hkv, D], cos/sin [N, D], q_scale [N] or None -> (rotated q, rotated k);
    the rotated keys and the values go into the cache."""
    q, k = apply_rope_ref(q, k, cos, sin, q_scale)
    store_kv_ref(k, v, layer, slot_mapping)
    return q, k


def rope_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      q_scale: torch.Tensor | None, layer: KVLayer,
                      slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(k):
        from devstral.kernels import rope_kv_store_triton as fused

        if fused.supported(q, k, layer):
            return fused.rope_and_store_kv_triton(q, k, v, cos, sin, q_scale, layer, slot_mapping)
    q, k = apply_rope(q, k, cos, sin, q_scale)
    store_kv(k, v, layer, slot_mapping)
    return q, k
