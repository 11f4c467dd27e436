"""`min_tokens` (Mistral's and vLLM's request field) as a token constraint: no stop token before N tokens.

It plugs into the engine's TokenConstraint hook (engine/constraints.py), so the stop tokens are
masked before sampling exactly like any structured-output mask; after N tokens it allows everything.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from devstral.engine.constraints import ConstraintFactory


class MinTokens:
    def __init__(self, vocab_size: int, stop_ids: Iterable[int], n: int):
        self.left = n
        self.mask = torch.ones(vocab_size, dtype=torch.bool)
        for i in stop_ids:
            if 0 <= i < vocab_size:
                self.mask[i] = False

    def allowed_tokens(self) -> torch.Tensor | None:
        return self.mask if self.left > 0 else None

    def accept(self, token_id: int) -> None:
        self.left -= 1

    def is_finished(self) -> bool:
        return False


def min_tokens(vocab_size: int, stop_ids: Iterable[int], n: int | None) -> ConstraintFactory | None:
    """A per-sequence factory for `SamplingParams.constraint`, or None when nothing is required."""
    if not n:
        return None
    ids = list(stop_ids)
    return lambda: MinTokens(vocab_size, ids, n)
