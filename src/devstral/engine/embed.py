"""Text embeddings from the decoder: mean-pooled, L2-normalized final hidden states.

The final hidden states are the model's own (after the last RMSNorm, before the LM head), averaged
over every token of the input (BOS included when the text was encoded with one, as llama.cpp's
mean pooling does) and scaled to unit length, so a dot product is a cosine similarity.

Short inputs are batched: sorted by length, right-padded up to a token budget per forward, with a
key mask so that no token attends to padding. An input longer than one chunk is run alone a chunk at
a time, its keys and values kept in a small contiguous store (`_Prefix`), like a long prompt's
prefill, so the attention mask never grows to the square of the whole input. This runs beside the
paged engine, not in it: an embedding needs every token's hidden state and no sampling.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from devstral.errors import DevstralError
from devstral.kernels.rope import apply_rope

POOLING = {"pooling": "mean", "normalized": "l2", "layer": "final hidden states (after the last norm)"}
BATCH_TOKENS = 4096  # padded tokens per batched forward
CHUNK = 512  # longer inputs go alone, a chunk at a time through a KV cache


def embedding_info(llm) -> dict:
    """How the vectors are made, for /v1/models."""
    return {**POOLING, "dimensions": llm.config.dim, "bos": "added to text inputs, not to token-id inputs"}


def _batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped so that count x longest <= budget; longest inputs first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _pooled(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, T, D] states, [B, T] bool -> [B, D] unit vectors (float32)."""
    weights = valid.to(torch.float32)[..., None]
    summed = (hidden.to(torch.float32) * weights).sum(1)
    return F.normalize(summed / weights.sum(1).clamp_min(1.0), dim=-1)


def _padded(llm, seqs: list[list[int]]) -> torch.Tensor:
    longest = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), longest, dtype=torch.long, device=llm.device)
    valid = torch.zeros(len(seqs), longest, dtype=torch.bool, device=llm.device)
    for row, ids in enumerate(seqs):
        tokens[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        valid[row, :len(ids)] = True
    # [B, 1, 1, T]: every query may see only real keys (the model ANDs it with the causal mask)
    hidden = llm.model.hidden_states(tokens, attn_mask=valid[:, None, None, :])
    return _pooled(hidden, valid)


class _Prefix:
    """The model's AttentionCache for one sequence fed a chunk at a time: keeps every key and value
    (contiguous) and attends causally (and within the sliding window) from the new chunk."""

    def __init__(self, window: int | None):
        self.window = window
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, q_scale: torch.Tensor | None, xq: tuple[int, ...] = ()) -> torch.Tensor:
        q, k = apply_rope(q, k, cos, sin, q_scale)
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], 1), torch.cat([self.v[layer], v], 1)
        self.k[layer], self.v[layer] = k, v
        n_new, n_all = q.shape[1], k.shape[1]
        q_pos = torch.arange(n_all - n_new, n_all, device=q.device)[:, None]
        k_pos = torch.arange(n_all, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if self.window is not None:
            allowed &= (q_pos - k_pos) < self.window
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=allowed, enable_gqa=True)
        return out.transpose(1, 2)


def _chunked(llm, ids: list[int], chunk: int) -> torch.Tensor:
    store, total = _Prefix(llm.config.sliding_window), None
    for start in range(0, len(ids), chunk):
        part = torch.as_tensor(ids[start:start + chunk], dtype=torch.long, device=llm.device)[None]
        positions = torch.arange(start, start + part.shape[1], device=llm.device)[None]
        hidden = llm.model.hidden_states(part, positions, cache=store)[0].to(torch.float32).sum(0)
        total = hidden if total is None else total + hidden
    return F.normalize(total / len(ids), dim=-1)[None]


def embed_batches(llm, seqs: Sequence[Sequence[int]], *, batch_tokens: int = BATCH_TOKENS,
                  chunk: int = CHUNK) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (input indices, their vectors [k, dim] float32 on the CPU), one forward at a time."""
    if getattr(llm, "tp", None) is not None:  # these passes run outside the engine's steps
        raise DevstralError("embeddings are not available with --tensor-parallel")
    lengths = [len(s) for s in seqs]
    if any(n == 0 for n in lengths):
        raise ValueError("cannot embed an empty input")
    with torch.inference_mode():
        for group in _batches(lengths, batch_tokens):
            if len(group) == 1 and lengths[group[0]] > chunk:
                vectors = _chunked(llm, list(seqs[group[0]]), chunk)
            else:
                vectors = _padded(llm, [list(seqs[i]) for i in group])
            yield group, vectors.cpu()


def embed(llm, seqs: Sequence[Sequence[int]], **kw) -> torch.Tensor:
    """All vectors [len(seqs), dim], in input order."""
    out = torch.empty(len(seqs), llm.config.dim)
    for group, vectors in embed_batches(llm, seqs, **kw):
        out[group] = vectors
    return out
