"""What a generation stream yields: one StepOutput per token, then a final one with the finish reason."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepOutput:
    """One streamed step: the new token (None on the final event), its text, and the finish reason.

    The final event (finish_reason set) also carries the request's timings and how many prompt tokens
    the prefix cache served (`cached_tokens`)."""

    token_id: int | None
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    cached_tokens: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


# Yielded by `LLM.stream(..., yield_prefill=True)` while the sequence waits for the engine: no token,
# no text. The caller (the server's worker) then runs an engine step for everyone and resumes the
# stream; it never forwards this event.
PENDING = StepOutput(None, "")
PREFILL_PROGRESS = PENDING  # the name the server's jobs used before the batched engine
