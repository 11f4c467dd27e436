"""Request options that forbid tokens, as token constraints (engine/constraints.py's hook):

- `min_tokens` (Mistral's and vLLM's field): no stop token before N tokens, then anything;
- banned tokens (Ollama's `think: false` bans [THINK]): never these tokens.

They mask before sampling exactly like a structured-output mask would.
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


class BannedTokens:
    def __init__(self, vocab_size: int, banned: Iterable[int]):
        self.mask = torch.ones(vocab_size, dtype=torch.bool)
        for i in banned:
            if 0 <= i < vocab_size:
                self.mask[i] = False

    def allowed_tokens(self) -> torch.Tensor | None:
        return self.mask

    def accept(self, token_id: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


def banned_tokens(vocab_size: int, banned: Iterable[int]) -> ConstraintFactory:
    ids = list(banned)
    return lambda: BannedTokens(vocab_size, ids)
