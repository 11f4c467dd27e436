"""How keys and values are stored in the paged KV cache, and the reference (de)quantizers.

One layer's cache is a `KVLayer`: keys and values as [num_blocks, block_size, n_kv_heads, X] plus,
for the quantized kinds, scales [num_blocks, block_size, n_kv_heads, S]. A token's slot is
`block * block_size + offset`. The kinds:

| kind          | values                         | scales                                  | bytes/value |
|---------------|--------------------------------|-----------------------------------------|-------------|
| bf16/fp16/fp32| the dtype, X = head_dim        | none                                    | 2 / 2 / 4   |
| fp8           | float8_e4m3fn, X = head_dim    | float32 per (token, head): amax / 448   | ~1.03       |
| q8_0          | int8, X = head_dim             | fp16 per 32 values: amax / 127 (ggml)   | 1.0625      |
| q4_0          | uint8 nibbles, X = head_dim/2  | fp16 per 32 values (ggml's q4_0)        | 0.5625      |

q8_0 and q4_0 follow ggml's rules (llama.cpp's `--cache-type-k q8_0/q4_0`), so a quality figure from
one tool carries over. fp8 keeps a scale per token and head rather than per tensor: keys of real
models have outlier heads that one fixed scale would clip at 448.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FLOAT_KINDS = {"bf16": torch.bfloat16, "fp16": torch.float16, "f16": torch.float16, "fp32": torch.float32,
               "f32": torch.float32}
QUANT_KINDS = ("fp8", "q8_0", "q4_0")
KV_KINDS = (*FLOAT_KINDS, *QUANT_KINDS)
GROUP = 32  # values per scale in q8_0 / q4_0
FP8_MAX = 448.0


class KVLayer(NamedTuple):
    """One layer's paged cache. `k_scale`/`v_scale` are None for the float kinds."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    kind: str


def storage(kind: str, head_dim: int) -> tuple[torch.dtype, int, torch.dtype | None, int]:
    """(value dtype, values per head, scale dtype or None, scales per head) for a kind."""
    if kind in FLOAT_KINDS:
        return FLOAT_KINDS[kind], head_dim, None, 0
    if kind == "fp8":
        return torch.float8_e4m3fn, head_dim, torch.float32, 1
    if head_dim % GROUP:
        raise ValueError(f"{kind} KV cache needs head_dim divisible by {GROUP}, got {head_dim}")
    if kind == "q8_0":
        return torch.int8, head_dim, torch.float16, head_dim // GROUP
    if kind == "q4_0":
        return torch.uint8, head_dim // 2, torch.float16, head_dim // GROUP
    raise ValueError(f"unknown KV cache kind {kind!r}")


def bytes_per_token(kind: str, n_layers: int, n_kv_heads: int, head_dim: int) -> int:
    """Cache bytes one token takes over all layers (keys and values)."""
    vdtype, nv, sdtype, ns = storage(kind, head_dim)
    per_head = nv * vdtype.itemsize + (ns * sdtype.itemsize if sdtype is not None else 0)
    return 2 * n_layers * n_kv_heads * per_head


def _div(x: torch.Tensor, c: float) -> torch.Tensor:
    """x / c correctly rounded on every device. On CUDA, torch turns division by a Python number into a
    multiplication by its float32 reciprocal (BinaryDivTrueKernel.cu), one bit off ggml's `amax / 127`;
    a divisor tensor on x's device takes the true division (and needs no host copy under graph capture)."""
    return x / torch.full((), c, dtype=x.dtype, device=x.device)


def _reciprocal(d: torch.Tensor) -> torch.Tensor:
    """1 / d as ggml computes it (`1.0f/d`, an IEEE division), spelled as a tensor division for the reason above."""
    return torch.full((), 1.0, dtype=d.dtype, device=d.device) / d


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)  # C's roundf, as ggml uses


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., head_dim] (any float) -> (values, scales) in `kind`'s storage."""
    if kind in FLOAT_KINDS:
        return x.to(FLOAT_KINDS[kind]), None
    x = x.float()
    if kind == "fp8":
        amax = x.abs().amax(-1, keepdim=True)  # scales [..., 1]: the pool's layout (S = 1)
        scale = torch.where(amax > 0, _div(amax, FP8_MAX), torch.ones_like(amax))
        return (x / scale).to(torch.float8_e4m3fn), scale
    blocks = x.unflatten(-1, (-1, GROUP))
    if kind == "q8_0":
        d = _div(blocks.abs().amax(-1), 127.0)
        inv = torch.where(d > 0, _reciprocal(d), torch.zeros_like(d))
        q = _round_half_away(blocks * inv[..., None]).clamp(-127, 127)
        return q.to(torch.int8).flatten(-2), d.to(torch.float16)
    if kind == "q4_0":
        # ggml: the value of largest magnitude, with its sign, maps to -8; others round to 0..15.
        idx = blocks.abs().argmax(-1, keepdim=True)
        d = torch.gather(blocks, -1, idx).squeeze(-1) / -8.0
        inv = torch.where(d != 0, _reciprocal(d), torch.zeros_like(d))
        q = torch.clamp(torch.trunc(blocks * inv[..., None] + 8.5), max=15).to(torch.uint8)
        packed = q[..., :GROUP // 2] | (q[..., GROUP // 2:] << 4)  # byte j holds values j and j+16
        return packed.flatten(-2), d.to(torch.float16)
    raise ValueError(f"unknown KV cache kind {kind!r}")


def dequantize(values: torch.Tensor, scales: torch.Tensor | None, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize`: [..., head_dim] in `dtype`."""
    if kind in FLOAT_KINDS:
        return values.to(dtype)
    if kind == "fp8":
        return (values.float() * scales).to(dtype)
    d = scales.float()[..., None]
    if kind == "q8_0":
        return (values.unflatten(-1, (-1, GROUP)).float() * d).flatten(-2).to(dtype)
    if kind == "q4_0":
        packed = values.unflatten(-1, (-1, GROUP // 2))
        q = torch.cat((packed & 0x0F, packed >> 4), dim=-1).float() - 8.0
        return (q * d).flatten(-2).to(dtype)
    raise ValueError(f"unknown KV cache kind {kind!r}")
