"""Causal attention over packed documents ("varlen"): each document attends only to itself.

A training row of T tokens holds several examples laid end to end; `Documents` says how long each one
is (padding at a row's end counts as one more document: it is never learned from). The reference runs
one causal SDPA per document (FlashAttention on a GPU through SDPA, the math kernel on a CPU), which is
exactly the attention each document gets when run alone, and never builds a [T, T] mask. On CUDA,
torch's FlashAttention varlen entry (`torch.nn.attention.varlen.varlen_attn`) runs every document of
the batch in one launch, when this torch has it with the arguments needed here (grouped-query heads,
causal windows); otherwise the per-document loop runs there too.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Documents:
    """Lengths of the documents of a [B, T] batch, row after row (each row's lengths sum to T)."""

    lengths: tuple[int, ...]

    def check(self, batch: int, width: int) -> None:
        if sum(self.lengths) != batch * width or any(n <= 0 for n in self.lengths):
            raise ValueError(f"document lengths {self.lengths} do not tile {batch} rows of {width} tokens")

    def one_per_row(self, width: int) -> bool:
        return all(n == width for n in self.lengths)

    def cu_seqlens(self, device: torch.device) -> torch.Tensor:
        offsets = [0]
        for n in self.lengths:
            offsets.append(offsets[-1] + n)
        return torch.tensor(offsets, dtype=torch.int32, device=device)


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (windowed) SDPA on [B, H, T, D]: no mask tensor unless a window cuts the sequence."""
    T = q.shape[-2]
    if window is None or window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    i = torch.arange(T, device=q.device)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents,
                         window: int | None = None) -> torch.Tensor:
    """q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]; one causal attention per document."""
    B, T = q.shape[:2]
    if docs.one_per_row(T):
        return _causal(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window).transpose(1, 2)
    qf, kf, vf = (t.reshape(B * T, *t.shape[2:]) for t in (q, k, v))
    outs, at = [], 0
    for n in docs.lengths:
        piece = (t[at:at + n].transpose(0, 1)[None] for t in (qf, kf, vf))  # [1, H, n, D]
        outs.append(_causal(*piece, window)[0].transpose(0, 1))
        at += n
    return torch.cat(outs).view(q.shape)


@functools.cache
def _flash_varlen():
    """torch's varlen_attn when it takes grouped-query heads and a causal window, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "enable_gqa" not in params or "window_size" not in params:
        return None
    return varlen_attn


_flash_failed: list[str] = []  # set once torch's varlen entry raised: the loop serves from then on


def flash_varlen_available(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None
            and not _flash_failed)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents,
                     window: int | None = None) -> torch.Tensor:
    B, T, H, D = q.shape
    if flash_varlen_available(q) and not docs.one_per_row(T):
        cu = docs.cu_seqlens(q.device)
        longest = max(docs.lengths)
        left = -1 if window is None else window - 1  # flash's window counts the keys before the query
        try:
            out = _flash_varlen()(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D), cu, cu,
                                  longest, longest, window_size=(left, 0), enable_gqa=True)
            return out.view(B, T, H, D)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError, ValueError) as e:
            # an experimental torch API whose arguments changed between releases: say so once, then use the
            # per-document loop, which computes the same attention
            _flash_failed.append(str(e))
            warnings.warn(f"torch varlen_attn failed ({str(e).splitlines()[0][:200]}); packed documents "
                          "use one attention call each instead", stacklevel=2)
    return varlen_attention_ref(q, k, v, docs, window)
