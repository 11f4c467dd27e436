"""Prompt-lookup speculative decoding: draft tokens from the sequence's own context, verify them in
one forward pass, keep exactly the target model's distribution.

In a coding agent most output copies text already in the context (an edit quotes the file, a rewrite
repeats most of it). The drafter matches the last n tokens (n from 4 down to 1) at their most recent
earlier occurrence in the prompt or output and proposes what followed. The engine computes the last
sampled token and the k drafts in one pass; `verify` then walks the drafts:
- greedy: a draft is kept while it equals the argmax at its position, so the output is token for
  token plain greedy decoding;
- sampling: the draft distribution is a point mass, so a draft x is kept with probability p(x), and
  at the first rejection the token comes from p with x removed (renormalised): standard speculative
  sampling, which leaves the target distribution unchanged.
Either way the first position that is not kept yields one sampled token, so a step makes 1..k+1 tokens.
k adapts to the sequence's recent acceptance; a sequence whose drafts keep failing stops drafting for
a while, and a sequence whose expected kept drafts do not pay for the measured cost of a verify step
(StepCosts: verify vs plain decode step time) drafts only now and then, so plain prose costs (almost)
nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from devstral.engine.sampling import MIN_TEMPERATURE, SamplingParams, candidates

MAX_NGRAM, MIN_NGRAM = 4, 1
PROBE_EVERY = 16  # a sequence that skips drafting on cost still drafts once this many steps


class StepCosts:
    """Measured wall time of decode-only engine steps, with and without drafts, per number of sequences in
    the step (exponential moving averages). On a GPU a plain decode step replays a CUDA graph while a
    verify step runs eagerly over 1 + k rows per sequence, so a draft must be kept often enough to pay."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.plain: dict[int, float] = {}
        self.verify: dict[int, float] = {}

    def record(self, n_seqs: int, drafted: bool, seconds: float) -> None:
        table = self.verify if drafted else self.plain
        old = table.get(n_seqs)
        table[n_seqs] = seconds if old is None else old + self.alpha * (seconds - old)

    def ratio(self, n_seqs: int) -> float | None:
        """A verify step's cost in plain steps at this batch size, once both have been measured."""
        plain, verify = self.plain.get(n_seqs), self.verify.get(n_seqs)
        return None if plain is None or verify is None or plain <= 0 else verify / plain


_MUL = 0x9E3779B97F4A7C15  # odd 64-bit multiplier for the n-gram hash
_MASK = (1 << 64) - 1


class NgramIndex:
    """Most recent end of every n-gram (n = 1..4) of a growing token list. A long prompt is indexed with
    numpy in one pass (a 64-bit hash per n-gram); later tokens are added one at a time. A hash hit is
    checked against the tokens before a draft is proposed."""

    def __init__(self) -> None:
        self.last: list[dict[int, int]] = [{} for _ in range(MAX_NGRAM + 1)]
        self.indexed = 0  # n-grams ending before tokens[indexed] (and followed by a token) are recorded

    @staticmethod
    def _hash(gram) -> int:
        h = 0
        for t in gram:
            h = ((h * _MUL) + int(t) + 1) & _MASK
        return h

    def update(self, tokens: list[int]) -> None:
        # An n-gram is recorded with the index e just past it, once tokens[e] exists: a match must have
        # a continuation to propose.
        start, end = max(self.indexed, 1), len(tokens)
        if end - start > 256:
            self._bulk(tokens, start, end)
        else:
            for e in range(start, end):
                for n in range(MIN_NGRAM, min(MAX_NGRAM, e) + 1):
                    self.last[n][self._hash(tokens[e - n:e])] = e
        self.indexed = end

    def _bulk(self, tokens: list[int], start: int, end: int) -> None:
        arr = np.asarray(tokens[max(0, start - MAX_NGRAM):end], dtype=np.uint64)
        offset = max(0, start - MAX_NGRAM)
        with np.errstate(over="ignore"):
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                ends = np.arange(max(start, n), end)
                if not len(ends):
                    continue
                h = np.zeros(len(ends), dtype=np.uint64)
                for i in range(n):
                    h = h * np.uint64(_MUL) + arr[ends - offset - n + i] + np.uint64(1)
                self.last[n].update(zip(h.tolist(), ends.tolist(), strict=True))

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest suffix match."""
        self.update(tokens)
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(tokens) <= n:
                continue
            gram = tokens[-n:]
            e = self.last[n].get(self._hash(gram))
            if e is not None and e < len(tokens) and tokens[e - n:e] == gram:
                return tokens[e:e + k]
        return []


class Drafter:
    """Per-sequence drafting state: the n-gram index, recent acceptance, and the adaptive k."""

    def __init__(self, k_max: int = 8):
        self.k_max = k_max
        self.index = NgramIndex()
        self.acceptance = 0.5  # running estimate of the share of drafted tokens kept
        self.cooldown = 0  # steps to skip drafting after repeated failures
        self.skipped = 0  # steps skipped because drafting did not pay for its verify cost
        self.drafted = self.accepted = 0

    def propose(self, tokens: list[int], limit: int, cost_ratio: float | None = None) -> list[int]:
        """Up to `limit` draft tokens. `cost_ratio` is what a verify step costs in plain decode steps
        (StepCosts, measured): drafting pays only when the tokens a step is expected to yield, 1 plus the
        kept share of k drafts, beat it; otherwise skip, probing every PROBE_EVERY steps so that the
        acceptance estimate can recover when the text turns into a copy."""
        if self.cooldown > 0:
            self.cooldown -= 1
            self.index.update(tokens)
            return []
        k = max(1, min(self.k_max, limit, round(1 + self.acceptance * (self.k_max - 1))))
        if cost_ratio is not None and 1 + self.acceptance * k < cost_ratio:
            self.skipped += 1
            if self.skipped < PROBE_EVERY:
                self.index.update(tokens)
                return []
        self.skipped = 0
        return self.index.propose(tokens, k) if limit > 0 else []

    def record(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.acceptance = 0.7 * self.acceptance + 0.3 * (accepted / drafted)
        if self.acceptance < 0.15:
            self.cooldown, self.acceptance = 16, 0.3  # back off, then try again with a short draft


def speculation_allowed(params: SamplingParams, has_constraint: bool) -> bool:
    """Drafts are verified against the sampler's own distribution; the repeat penalty (which depends on
    each position's history), constraints and logprobs are not carried through verification."""
    return params.repeat_penalty == 1.0 and not has_constraint and params.logprobs is None


def verify(logits: torch.Tensor, draft: list[int], params: SamplingParams,
           generator: torch.Generator | None) -> list[int]:
    """logits [len(draft)+1, V] at the positions of the last token and each draft -> the tokens to append
    (the kept drafts, then one sampled token)."""
    d = len(draft)
    logits = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    if params.temperature < MIN_TEMPERATURE:
        target = torch.argmax(logits, dim=-1).tolist()
        kept = 0
        while kept < d and draft[kept] == target[kept]:
            kept += 1
        return [*draft[:kept], target[kept]]
    tempered = (logits - logits.max(-1, keepdim=True).values) / params.temperature
    values, index, keep = candidates(tempered, [params] * (d + 1))
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)  # [d+1, K] over candidate ids
    dev = logits.device
    if d:
        drafts = torch.tensor(draft, device=dev)
        is_draft = index[:d] == drafts[:, None]
        p_draft = (probs[:d] * is_draft).sum(-1)
        uniform = torch.rand(d, device=dev, generator=generator)
        residual = probs.clone()
        residual[:d] = residual[:d].masked_fill(is_draft, 0.0)  # p with the rejected draft removed
    else:
        residual = probs
    noise = torch.empty_like(residual).exponential_(generator=generator)
    picks = index.gather(1, torch.argmax(residual / noise, dim=-1, keepdim=True)).squeeze(1)
    if not d:
        return picks.tolist()
    accept = (uniform < p_draft).tolist()
    picks = picks.tolist()
    kept = 0
    while kept < d and accept[kept]:
        kept += 1
    return [*draft[:kept], picks[kept]]
