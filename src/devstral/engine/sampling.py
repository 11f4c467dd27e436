"""Sampling parameters and the sampler: repeat penalty, temperature, top-k, top-p, min-p, seed.

Order follows transformers/vLLM: penalty, temperature, then the truncations on the tempered
distribution. Temperature 0 (or below 1e-5) is greedy.

The sampler works on a batch: one row of logits per sequence, each with its own parameters, all on
the device. A token is drawn as argmax(p / E) with E ~ Exp(1) per candidate (the "exponential race",
exactly a draw from p), so no host synchronisation is needed until the engine reads the batch's
tokens once per step. A seeded sequence draws its noise from its own generator, so its tokens do not
depend on what else shares the batch.
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


def penalize(logits: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor:
    """llama.cpp's repeat penalty on one row: divide positive logits, multiply negative ones, once per token."""
    if p.repeat_penalty == 1.0 or not history or p.repeat_last_n == 0:
        return logits
    window = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:]
    ids = torch.tensor(sorted(set(window)), device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / p.repeat_penalty, picked * p.repeat_penalty)
    return logits


def candidates(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tempered logits [S, V] -> (values [S, K], ids [S, K], keep [S, K]): per row, the tokens that
    survive top-k, then top-p (smallest set reaching p, on the top-k renormalised), then min-p relative
    to the best token. Columns are sorted best first; K is the largest top-k in the batch (V if a row
    has none), so rows share one topk call instead of masking the whole vocabulary."""
    S, V = logits.shape
    dev = logits.device
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    K = max(ks)
    any_p = any(p.top_p < 1.0 for p in params)
    if K < V:
        values, index = torch.topk(logits, K)
    elif any_p or min(ks) < V:
        values, index = torch.sort(logits, descending=True)
    else:
        values, index = logits, torch.arange(V, device=dev).expand(S, V)
    keep = torch.isfinite(values)
    if min(ks) < K:
        keep &= torch.arange(K, device=dev)[None, :] < torch.tensor(ks, device=dev)[:, None]
    keep[:, 0] = True
    if any_p:
        top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device=dev)
        probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
        keep &= probs.cumsum(-1) - probs < top_p[:, None]  # keep tokens until p is reached
        keep[:, 0] = True  # a top_p that rounds to 0 in float32 still keeps the best token
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=dev)
        probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
        keep &= probs >= min_p[:, None] * probs.max(-1, keepdim=True).values
    return values, index, keep


def sample(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits [S, V] (any float dtype) -> token ids [S] on the device."""
    logits = logits.float()
    rows = [i for i, p in enumerate(params) if p.repeat_penalty != 1.0]
    if rows:
        logits = logits.clone()
        for i in rows:
            logits[i] = penalize(logits[i], histories[i], params[i])
    # Extreme penalties can overflow float32; keep the order of the logits, drop NaNs.
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    out = torch.argmax(logits, dim=-1)
    hot = [i for i, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
    if not hot:
        return out
    sub = logits if len(hot) == len(params) else logits[hot]
    temp = torch.tensor([params[i].temperature for i in hot], device=logits.device)
    # Shift before dividing: a tiny temperature then sends the others to -inf instead of the top to +inf.
    tempered = (sub - sub.max(-1, keepdim=True).values) / temp[:, None]
    values, index, keep = candidates(tempered, [params[i] for i in hot])
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    noise = torch.empty_like(probs)
    free = [j for j, i in enumerate(hot) if generators[i] is None]
    if len(free) == len(hot):
        noise.exponential_()
    else:
        if free:
            noise[free] = torch.empty_like(probs[free]).exponential_()
        for j, i in enumerate(hot):
            if generators[i] is not None:
                noise[j].exponential_(generator=generators[i])
    choice = torch.argmax(probs / noise, dim=-1, keepdim=True)
    picked = index.gather(1, choice).squeeze(1)
    if len(hot) == len(params):
        return picked
    out[hot] = picked
    return out


class Sampler:
    """One sequence's sampler (its parameters and seeded generator) over the batched functions."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.p = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits [V] -> the next token id."""
        return int(sample(logits[None], [self.p], [history], [self.generator])[0])

    def penalize(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        return penalize(logits, history, self.p)

    def truncate(self, logits: torch.Tensor) -> torch.Tensor:
        """Tempered logits [V] with every token outside the candidates set to -inf."""
        values, index, keep = candidates(logits[None], [self.p])
        out = torch.full_like(logits, float("-inf"))
        out[index[0][keep[0]]] = values[0][keep[0]]
        return out
