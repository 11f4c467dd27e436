"""Write new keys and values into the paged cache at their slots (quantizing for the quantized kinds).

`slot_mapping[i]` is token i's slot (`block * block_size + offset`); a negative slot is skipped, so a
CUDA-graph batch can carry padding rows.
"""

from __future__ import annotations

import torch

from devstral.kernels import use_triton
from devstral.kernels.kv_format import KVLayer, quantize


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
