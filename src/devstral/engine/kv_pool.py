"""The paged KV cache's memory: one [num_blocks, block_size, n_kv_heads, head_dim] tensor of keys and
one of values per layer (plus scales for the quantized kinds), sized from the memory there is."""

from __future__ import annotations

import torch

from devstral.config import ModelConfig
from devstral.errors import DevstralError
from devstral.kernels.kv_format import KV_KINDS, KVLayer, bytes_per_token, storage


def parse_kv_kind(kind: str, compute_dtype: torch.dtype, device: torch.device) -> str:
    if kind == "auto":
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype, "fp32")
    if kind not in KV_KINDS:
        raise DevstralError(f"--kv-cache-dtype: unknown value {kind!r} (choose from auto, {', '.join(KV_KINDS)})")
    if kind == "fp8" and device.type != "cuda":
        raise DevstralError("--kv-cache-dtype fp8 needs a CUDA device (use q8_0 on the CPU)")
    return kind


class KVPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, kind: str, device: torch.device):
        try:
            storage(kind, cfg.head_dim)
        except ValueError as e:
            raise DevstralError(f"--kv-cache-dtype {kind}: {e}") from None
        self.kind, self.block_size, self.num_blocks = kind, block_size, num_blocks
        vdtype, nv, sdtype, ns = storage(kind, cfg.head_dim)
        shape = (cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads)
        # CUDA: zeros, so that the padding rows of a captured decode batch read finite values. CPU:
        # untouched pages of an empty tensor cost no memory until a sequence reaches them.
        alloc = torch.zeros if device.type == "cuda" else torch.empty
        self.k = alloc((*shape, nv), dtype=vdtype, device=device)
        self.v = alloc((*shape, nv), dtype=vdtype, device=device)
        self.k_scale = alloc((*shape, ns), dtype=sdtype, device=device) if sdtype is not None else None
        self.v_scale = alloc((*shape, ns), dtype=sdtype, device=device) if sdtype is not None else None
        self.layers = [KVLayer(self.k[i], self.v[i], None if self.k_scale is None else self.k_scale[i],
                               None if self.v_scale is None else self.v_scale[i], kind) for i in range(cfg.n_layers)]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None)


def pool_tokens_for_memory(cfg: ModelConfig, kind: str, free_bytes: int) -> int:
    return max(0, free_bytes // bytes_per_token(kind, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim))
