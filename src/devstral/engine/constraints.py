"""Token constraints: what structured output (a grammar, a JSON schema, forced tool calls) asks of sampling.

A constraint is stateful and belongs to one sequence. Before each sampled token the engine asks it
which tokens are allowed and masks the others to -inf; after sampling it tells the constraint which
token was taken. A constraint that is complete ends generation as if the model had stopped.

`SamplingParams.constraint` holds a factory (called once per sequence), so one set of parameters can
serve several sequences (`n > 1`) without sharing grammar state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class TokenConstraint(Protocol):
    def allowed_tokens(self) -> torch.Tensor | None:
        """Bool mask [n] on the CPU (True = may be sampled; ids >= n are not allowed), or None for
        "anything" at this step."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token (raises if the token was not allowed)."""
        ...

    def is_finished(self) -> bool:
        """The constrained text is complete: no further token may be sampled."""
        ...


ConstraintFactory = Callable[[], TokenConstraint]


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """logits [..., V] with every token outside `allowed` [n] (n <= V, CPU or same device) at -inf."""
    if allowed is None:
        return logits
    vocab = logits.shape[-1]
    mask = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
    n = min(vocab, allowed.shape[0])
    mask[:n] = allowed[:n].to(logits.device, non_blocking=True)
    return logits.masked_fill(~mask, float("-inf"))
