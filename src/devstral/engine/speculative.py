"""Prompt-lookup speculative decoding: draft tokens from the sequence's own context, verify them in
one forward pass, keep exactly the target model's distribution.

In a coding agent most output copies text already in the context (an edit quotes the file, a rewrite
repeats most of it). The drafter matches the last n tokens (n from 4 down to 1) at their most recent
earlier occurrence in the prompt or output and proposes what followed. The engine computes the last
sampled token and the k drafts in one pass (k + 1 decode rows of the same sequence, each attending up
to its own position: on CUDA a captured graph, see model_runner.py); `verify` then walks the drafts:
- greedy: a draft is kept while it equals the argmax at its position, so the output is token for
  token plain greedy decoding;
- sampling: the draft distribution is a point mass, so a draft x is kept with probability p(x), and
  at the first rejection the token comes from p with x removed (renormalised): standard speculative
  sampling, which leaves the target distribution unchanged.
Either way the first position that is not kept yields one sampled token, so a step makes 1..k+1 tokens.

How many drafts, if any: each sequence estimates the chance `a` that a draft token is kept given the
ones before it were (a geometric model: k drafts then yield (1 - a^(k+1)) / (1 - a) tokens per step),
and the engine measures what a step of r rows costs (StepCosts, per row bucket: on CUDA a verify
step replays the graph of the smallest captured row count that holds it). The drafter picks the k
among those that fill a bucket exactly whose tokens per unit of cost beat a plain decode step by
MIN_GAIN, or none; a sequence that does not draft still drafts one token every PROBE_EVERY steps (less
often where that probe costs more than PROBE_SHARE of the time), so that its estimate recovers when the
text turns into a copy. Plain prose therefore costs (almost)
nothing, and a file rewrite drafts as far as the measured costs say it pays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from devstral.engine.sampling import MIN_TEMPERATURE, SamplingParams, candidates

MAX_NGRAM, MIN_NGRAM = 4, 1
K_MAX = 15  # drafts per sequence and step: 16 rows at batch 1, the largest verify graph's
PROBE_EVERY = 16  # a sequence that skips drafting on cost still drafts once this many steps...
PROBE_SHARE = 0.02  # ...or fewer, so that the probes' extra cost stays under this share of its time
MIN_GAIN = 1.03  # drafting must promise this many times a plain step's tokens per unit of cost
# An unmeasured row count is assumed to cost this much more per extra row than a plain step: optimistic,
# so that the drafter tries it once and the measurement takes over.
PRIOR_ROW_COST = 0.01
VERIFY_ROWS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # row counts captured for verify steps (with decode's)


def verify_rows(max_num_seqs: int, spec_max_batch: int, k_max: int = K_MAX) -> list[int]:
    """The row counts a verify step can take: up to every speculating sequence with k_max drafts, at
    most 64 rows (beyond that a step of that many sequences is no longer bound by reading weights)."""
    top = min(min(max_num_seqs, spec_max_batch) * (1 + k_max), VERIFY_ROWS[-1])
    return [r for r in VERIFY_ROWS if r <= top]


class StepCosts:
    """Measured wall time of decode-only engine steps (exponential moving averages), per row count:
    the graph bucket a step replayed on CUDA, the rows themselves when it ran eagerly. A plain decode
    step of n sequences has n rows; a verify step adds each sequence's drafts."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.seconds: dict[int, float] = {}
        self.seen: set[int] = set()

    def record(self, rows: int, seconds: float) -> None:
        """The first step of a row count is not kept (a graph's first replay uploads it, a kernel may
        compile), and a later one moves the average by at most a factor of two (a stray pause must not
        make a row count look so dear that it is never tried, and so never measured, again)."""
        if rows not in self.seen:
            self.seen.add(rows)
            return
        old = self.seconds.get(rows)
        if old is not None:
            seconds = min(max(seconds, 0.5 * old), 2.0 * old)
        self.seconds[rows] = seconds if old is None else old + self.alpha * (seconds - old)

    def ratio(self, plain: int, before: int, after: int) -> float | None:
        """What a step of `after` rows costs instead of one of `before` rows, in plain steps of `plain`
        rows: 1 + (cost(after) - cost(before)) / cost(plain). None while nothing is measured (the drafter
        then uses its prior); infinite while `plain` is not, so that the next step runs plain and measures
        it; an unmeasured `after` is estimated from the nearest measured row count below it."""
        base = self.seconds.get(plain)
        if base is None or base <= 0:
            return None if not self.seconds else math.inf
        lo = self._at(before, base)
        hi = self.seconds.get(after)
        if hi is None:
            below = [r for r in self.seconds if r <= after]
            ref = max(below) if below else plain
            hi = self.seconds.get(ref, base) + PRIOR_ROW_COST * base * (after - ref)
        return 1 + max(hi - lo, 0.0) / base

    def _at(self, rows: int, base: float) -> float:
        if rows in self.seconds:
            return self.seconds[rows]
        below = [r for r in self.seconds if r <= rows]
        return self.seconds[max(below)] if below else base


def expected_tokens(a: float, k: int) -> float:
    """Tokens a verify step of k drafts yields when each draft is kept with probability a given the
    previous ones were: the kept prefix plus the one sampled token."""
    if a >= 1.0:
        return k + 1.0
    return (1.0 - a ** (k + 1)) / (1.0 - a)


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
    """Per-sequence drafting state: the n-gram index and the estimate of how often a draft is kept."""

    DECAY = 0.85  # weight of the past in the acceptance counts: about the last seven verify steps

    def __init__(self, k_max: int = K_MAX):
        self.k_max = k_max
        self.index = NgramIndex()
        # decayed counts of drafts kept and of draft positions tried (a position after a rejection is
        # not tried): their ratio is the geometric model's a. The prior is a = 0.5 worth two positions.
        self.kept_w, self.tried_w = 1.0, 2.0
        self.skipped = 0  # steps in a row that did not draft because drafting did not pay
        self.drafted = self.accepted = 0

    @property
    def acceptance(self) -> float:
        """Chance that a draft token is kept, given the drafts before it were."""
        return self.kept_w / self.tried_w

    def propose(self, tokens: list[int], ks: Sequence[int],
                ratio: Callable[[int], float | None] | None = None) -> list[int]:
        """Drafts for the next step (possibly none). `ks`: the draft counts this step can take,
        ascending (on CUDA those that fill a captured row bucket exactly); `ratio(k)`: what a step with
        k drafts costs in plain decode steps (StepCosts), None before it was measured."""
        k = self.choose(ks, ratio)
        if k == 0:
            self.index.update(tokens)  # keep the index current: drafting may pay again later
            return []
        return self.index.propose(tokens, k)

    def choose(self, ks: Sequence[int], ratio: Callable[[int], float | None] | None = None) -> int:
        """The k whose expected tokens per unit of cost is highest and beats a plain step by MIN_GAIN;
        0 when none does, except every PROBE_EVERY-th such step (or so many more that the probes cost at
        most PROBE_SHARE of the time), which drafts the smallest k."""
        k = self.plan(ks, ratio)
        if any(0 < k <= self.k_max for k in ks):  # a step that could draft: count the skips to the probe
            self.skipped = 0 if k else self.skipped + 1
        return k

    def plan(self, ks: Sequence[int], ratio: Callable[[int], float | None] | None = None) -> int:
        """What choose() would return, without counting the step: the overlapped decode asks this
        before it knows the sequence's last token (a draft needs it, the choice of k does not)."""
        ks = [k for k in ks if 0 < k <= self.k_max]
        if not ks:
            return 0
        a = self.acceptance
        best_k, best, probe_cost = 0, MIN_GAIN, None
        for k in ks:
            r = ratio(k) if ratio is not None else None
            r = 1.0 + PRIOR_ROW_COST * k if r is None else r
            probe_cost = r - 1.0 if probe_cost is None else probe_cost
            gain = expected_tokens(a, k) / r
            if gain > best:
                best_k, best = k, gain
        if best_k:
            return best_k
        return ks[0] if self.skipped + 1 >= max(PROBE_EVERY, probe_cost / PROBE_SHARE) else 0

    def record(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        tried = accepted + (accepted < drafted)  # the kept prefix and the first rejected position
        self.kept_w = self.DECAY * self.kept_w + accepted
        self.tried_w = self.DECAY * self.tried_w + tried


def speculation_allowed(params: SamplingParams, has_constraint: bool) -> bool:
    """Drafts are verified against the sampler's own distribution; the repeat penalty (which depends on
    each position's history), constraints and logprobs are not carried through verification."""
    return params.repeat_penalty == 1.0 and not has_constraint and params.logprobs is None


def accept_greedy(draft: list[int], target: list[int]) -> list[int]:
    """Greedy verification: target[j] is the argmax at the position of draft j (target[0] at the last
    token's). The drafts equal to it, then the argmax where they first differ."""
    kept = 0
    while kept < len(draft) and draft[kept] == target[kept]:
        kept += 1
    return [*draft[:kept], target[kept]]


def verify(logits: torch.Tensor, draft: list[int], params: SamplingParams,
           generator: torch.Generator | None) -> list[int]:
    """logits [len(draft)+1, V] at the positions of the last token and each draft -> the tokens to append
    (the kept drafts, then one sampled token)."""
    d = len(draft)
    logits = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    if params.temperature < MIN_TEMPERATURE:
        return accept_greedy(draft, torch.argmax(logits, dim=-1).tolist())
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
