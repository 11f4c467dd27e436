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


class AllOf:
    """Several constraints on one sequence (a grammar and `think: false`, say): a token must be allowed
    by every one, each is told every token, and the sequence is complete when any of them is."""

    def __init__(self, parts: list[TokenConstraint]):
        self.parts = parts

    def allowed_tokens(self) -> torch.Tensor | None:
        masks = [m for m in (p.allowed_tokens() for p in self.parts) if m is not None]
        if not masks:
            return None
        n = min(m.shape[0] for m in masks)  # ids past a mask's end are not allowed by it
        allowed = masks[0][:n].clone()
        for m in masks[1:]:
            allowed &= m[:n]
        return allowed

    def accept(self, token_id: int) -> None:
        for p in self.parts:
            p.accept(token_id)

    def is_finished(self) -> bool:
        return any(p.is_finished() for p in self.parts)


def all_of(*factories: ConstraintFactory | None) -> ConstraintFactory | None:
    """One factory for every given one (None ones skipped; None when none is left)."""
    given = [f for f in factories if f is not None]
    if len(given) <= 1:
        return given[0] if given else None
    return lambda: AllOf([f() for f in given])
