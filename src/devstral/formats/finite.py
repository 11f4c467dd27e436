"""NaN / infinity checks on weights as they are loaded, cheap enough to run on every tensor.

A checkpoint with a non-finite weight makes every answer NaN (a server would fail each request with
a 500), so it is refused at load time with the name of the tensor. Float tensors are checked with one
min/max reduction (NaN propagates into it, infinities are its extremes; it allocates nothing the size
of the tensor, so loading keeps its one-tensor-in-flight memory bound); GGUF quantized tensors by
their fp16 block scales, since every weight of a block is `scale * q (+ min)`: a block decodes to a
non-finite value exactly when one of its scales is one.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as QType

from devstral.errors import DevstralError

# Byte offsets of the fp16 scale (and min) fields in one block, from llama.cpp's ggml-common.h.
SCALE_OFFSETS: dict[QType, tuple[int, ...]] = {
    QType.Q4_0: (0,), QType.Q4_1: (0, 2), QType.Q5_0: (0,), QType.Q5_1: (0, 2), QType.Q8_0: (0,),
    QType.Q2_K: (80, 82),  # scales[16], qs[64], d, dmin
    QType.Q3_K: (108,),  # hmask[32], qs[64], scales[12], d
    QType.Q4_K: (0, 2), QType.Q5_K: (0, 2),  # d, dmin, scales[12], ...
    QType.Q6_K: (208,),  # ql[128], qh[64], scales[16], d
    QType.IQ4_NL: (0,), QType.IQ4_XS: (0,),
}


def check_finite(tensor: torch.Tensor, name: str, source: object) -> None:
    """Raise naming `name` and `source` when a floating tensor holds NaN or +-inf."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor)  # NaN propagates into both; no temporary the size of the tensor
    if not (torch.isfinite(low) and torch.isfinite(high)):
        _raise(source, name, _describe(tensor))


def check_finite_blocks(raw: torch.Tensor, qtype: QType, name: str, source: object) -> None:
    """The same check on GGUF blocks (uint8 rows of whole blocks) through their fp16 scales."""
    from devstral.quant.layout import block_info

    offsets = SCALE_OFFSETS.get(QType(qtype))
    if offsets is None or raw.numel() == 0:
        return
    _, type_size = block_info(qtype)
    blocks = raw.reshape(-1, type_size)
    for off in offsets:
        # fp16 non-finite <=> all five exponent bits set: bits 10..14 of the little-endian half
        hi = blocks[:, off + 1]
        if bool(((hi & 0x7C) == 0x7C).any()):
            _raise(source, name, f"a non-finite {QType(qtype).name} block scale")


def _describe(tensor: torch.Tensor) -> str:
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    parts = [f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else ""]
    return " and ".join(p for p in parts if p) + f" value{'s' if nan + inf > 1 else ''}"


def _raise(source: object, name: str, what: str) -> None:
    raise DevstralError(f"{source}: tensor {name} holds {what}; the checkpoint is damaged "
                        "(re-download or re-export it)")
