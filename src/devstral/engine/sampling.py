"""Sampling parameters and the sampler: repeat penalty, temperature, top-k, top-p, min-p, seed.

Order follows transformers/vLLM: penalty, temperature, then the truncations on the tempered
distribution. Temperature 0 (or below 1e-5) is greedy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from devstral.errors import DevstralError

# Devstral's recommended settings (Mistral / Unsloth guidance for Devstral Small).
# Below this the tempered distribution is one-hot in float32 anyway: sample greedily.
MIN_TEMPERATURE = 1e-5
DEVSTRAL_DEFAULTS: dict[str, Any] = dict(temperature=0.15, top_k=64, top_p=0.95, min_p=0.01, repeat_penalty=1.0)


@dataclass
class SamplingParams:
    temperature: float = DEVSTRAL_DEFAULTS["temperature"]
    top_k: int = DEVSTRAL_DEFAULTS["top_k"]
    top_p: float = DEVSTRAL_DEFAULTS["top_p"]
    min_p: float = DEVSTRAL_DEFAULTS["min_p"]
    repeat_penalty: float = DEVSTRAL_DEFAULTS["repeat_penalty"]
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int | None = None  # None: until EOS or the end of the context
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # also return the top-N log-probs of each sampled token
    # Structured output: a factory of per-sequence TokenConstraint (engine/constraints.py), or None.
    constraint: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1)"),
            ("repeat_penalty", self.repeat_penalty > 0, "must be > 0"),
            ("repeat_last_n", self.repeat_last_n >= -1, "must be >= -1 (-1: whole context)"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 0, "must be >= 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise DevstralError(f"{name}={getattr(self, name)!r} {why}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    def updated(self, **changes: Any) -> SamplingParams:
        """A copy with the non-None values of `changes` applied (how flags override defaults)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def defaults_for_model(folder: Path | None) -> SamplingParams:
    """Devstral's defaults, overridden by the model folder's generation_config.json."""
    params = SamplingParams()
    path = folder / "generation_config.json" if folder else None
    if path is None or not path.is_file():
        return params
    try:
        gen = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DevstralError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    mapping = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
               "repetition_penalty": "repeat_penalty"}
    known = {f.name for f in fields(SamplingParams)}
    changes = {ours: gen[theirs] for theirs, ours in mapping.items() if gen.get(theirs) is not None and ours in known}
    if gen.get("do_sample") is False:
        changes["temperature"] = 0.0
    return params.updated(**changes)


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.p = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits [V] (any float dtype) -> the next token id."""
        logits = self.penalize(logits.float(), history)
        # Extreme penalties can overflow float32; keep the order of the logits, drop NaNs.
        logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
        if self.p.temperature < MIN_TEMPERATURE:
            return int(torch.argmax(logits))
        # Shift before dividing: a tiny temperature then sends the others to -inf instead of the top to +inf.
        values, index = self.candidates((logits - logits.max()) / self.p.temperature)
        choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=self.generator)
        return int(index[choice])

    def penalize(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        """llama.cpp's repeat penalty: divide positive logits, multiply negative ones, once per token."""
        if self.p.repeat_penalty == 1.0 or not history or self.p.repeat_last_n == 0:
            return logits
        window = history if self.p.repeat_last_n == -1 else history[-self.p.repeat_last_n:]
        ids = torch.tensor(sorted(set(window)), device=logits.device)
        picked = logits[ids]
        logits = logits.clone()
        logits[ids] = torch.where(picked > 0, picked / self.p.repeat_penalty, picked * self.p.repeat_penalty)
        return logits

    def candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens that survive top-k, then top-p (smallest set reaching p), then min-p relative to
        the top token: (their logits, their ids). Sampling among these few instead of masking a 131k
        vocabulary keeps the sampler cheap next to a small model's step."""
        p = self.p
        use_k = 0 < p.top_k < logits.numel()
        if use_k:
            values, index = torch.topk(logits, p.top_k)  # sorted, descending
        elif p.top_p < 1.0:
            values, index = torch.sort(logits, descending=True)
        else:
            values, index = logits, torch.arange(logits.numel(), device=logits.device)
        keep = torch.isfinite(values)
        keep[0] = True
        if p.top_p < 1.0:
            probs = torch.softmax(values, dim=-1)
            keep &= probs.cumsum(-1) - probs < p.top_p  # keep tokens until p is reached
            keep[0] = True  # a top_p that rounds to 0 in float32 still keeps the best token
        if p.min_p > 0:
            probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
            keep &= probs >= p.min_p * probs.max()
        return values[keep], index[keep]

    def truncate(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` with every token outside `candidates` set to -inf."""
        values, index = self.candidates(logits)
        out = torch.full_like(logits, float("-inf"))
        out[index] = values
        return out
