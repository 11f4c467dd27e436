"""Examples -> micro-batches, deterministic per (seed, epoch) so a resumed run sees the same order.

Three layouts:
- padded: `batch_size` examples per micro-batch, right-padded to the longest (plain causal attention);
- packed (`--packing`): examples laid end to end in rows of `max_seq_len`, `batch_size` rows per
  micro-batch, each example with its own positions 0.. and attending only to itself (the document
  lengths go to the model's varlen attention: no [T, T] mask);
- token budget (`--batch-tokens T`): one packed row of at most T tokens per micro-batch (padding-free).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from devstral.kernels.varlen_attention import Documents
from devstral.prompt.images import PromptImage
from devstral.train.data import IGNORE, Example


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, IGNORE where not learned
    positions: torch.Tensor  # [B, T] long
    attn_mask: torch.Tensor | None = None  # [B, 1, T, T] bool: a caller's own mask (collate sets documents)
    documents: Documents | None = None  # lengths of the examples in each row (padding: one more)
    images: list[tuple[int, PromptImage]] = field(default_factory=list)  # (flat B*T index of its first token, image)

    @property
    def n_label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel())

    def to(self, device: torch.device) -> Batch:
        mask = self.attn_mask.to(device, non_blocking=True) if self.attn_mask is not None else None
        return Batch(self.tokens.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                     self.positions.to(device, non_blocking=True), mask, self.documents, self.images)


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int = 1
    max_seq_len: int = 2048
    packing: bool = False
    batch_tokens: int | None = None
    pad_id: int = 0


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(examples: list[Example], plan: BatchPlan, order: list[int]) -> list[list[list[int]]]:
    """Group example indices: a micro-batch is a list of rows, a row a list of example indices."""
    if plan.batch_tokens is None and not plan.packing:
        return [[[i] for i in order[k:k + plan.batch_size]] for k in range(0, len(order), plan.batch_size)]
    row_len = plan.batch_tokens or plan.max_seq_len
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = min(len(examples[i].ids), row_len)
        if current and used + n > row_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    per_batch = 1 if plan.batch_tokens else plan.batch_size
    return [rows[k:k + per_batch] for k in range(0, len(rows), per_batch)]


def collate(examples: list[Example], rows: list[list[int]], plan: BatchPlan) -> Batch:
    packed = plan.packing or plan.batch_tokens is not None
    width = max(sum(len(examples[i].ids) for i in row) for row in rows)
    B = len(rows)
    tokens = torch.full((B, width), plan.pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, width), dtype=torch.long)
    lengths: list[int] = []
    images: list[tuple[int, PromptImage]] = []
    for b, row in enumerate(rows):
        at = 0
        for i in row:
            ex = examples[i]
            n = len(ex.ids)
            tokens[b, at:at + n] = torch.tensor(ex.ids)
            labels[b, at:at + n] = torch.tensor(ex.labels)
            positions[b, at:at + n] = torch.arange(n)
            images += [(b * width + at + im.start, im) for im in ex.images]
            lengths.append(n)
            at += n
        # Padding continues the last positions; it is never learned and never attended to by real tokens.
        positions[b, at:] = torch.arange(width - at) + (positions[b, at - 1] + 1 if at else 0)
        if at < width:
            if packed or at == 0:
                lengths.append(width - at)  # padding of a packed row: a document of its own
            else:
                lengths[-1] += width - at  # one example per row: the padding follows it causally
    return Batch(tokens, labels, positions, None, Documents(tuple(lengths)), images)
